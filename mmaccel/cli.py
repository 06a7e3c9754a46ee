"""The ``mmaccel`` command. Help and argument errors never import torch; user mistakes get a
one-line error and a non-zero exit, never a traceback."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Make vision and video LLMs fast: visual-token reduction for transformers VLMs.")

ASSETS = Path(__file__).parent / "assets"


class UserError(Exception):
    """A mistake the user can fix; printed as one line."""


def _fail(message: str, code: int = 1):
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _sample_video() -> tuple[Path, str, str | None]:
    """The bundled sample video, its question and the world's true answer."""
    meta_path = ASSETS / "sample_video.json"
    if not meta_path.exists():
        raise UserError(f"no bundled sample video at {meta_path}; pass a VIDEO and -q QUESTION")
    meta = json.loads(meta_path.read_text())
    return ASSETS / meta.get("video", "sample_video.mp4"), meta["question"], meta.get("answer")


@app.command("methods")
def methods_cmd(as_json: bool = typer.Option(False, "--json", help="print one JSON object")):
    """List the methods with a one-line description and their defaults."""
    from .methods import describe_methods

    info = describe_methods()
    if as_json:
        typer.echo(json.dumps(info))
        return
    for name, item in info.items():
        defaults = ", ".join(f"{k}={v}" for k, v in item["defaults"].items())
        typer.echo(f"{name:10s} {item['description']}  [{defaults}]")


@app.command("video-qa")
def video_qa(
    video: Optional[Path] = typer.Argument(None, help="video file (default: the bundled sample)"),
    question: Optional[str] = typer.Option(None, "-q", "--question", help="the question to answer"),
    model: Optional[Path] = typer.Option(None, "--model", help="model directory (default: embedded model)"),
    method: Optional[str] = typer.Option(None, "--method",
                                         help="reduction method (see `mmaccel methods`); knobs as aim:prune=false"),
    retention: Optional[float] = typer.Option(None, "--retention", help="fraction of visual tokens kept, (0, 1]"),
    preset: Optional[str] = typer.Option(None, "--preset", help="a preset name or YAML config file"),
    frames: Optional[int] = typer.Option(None, "--frames", help="frames sampled uniformly (default 8)"),
    fps: Optional[float] = typer.Option(None, "--fps", help="sample at this rate instead of --frames"),
    backend: str = typer.Option("auto", "--backend", help="auto | pyav | decord | opencv"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens"),
    compare: bool = typer.Option(False, "--compare", help="also run the unaccelerated model, side by side"),
    stream: bool = typer.Option(False, "--stream", help="feed the frames one by one to an STC streaming session "
                                "(LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL), then ask"),
    cacher: bool = typer.Option(False, "--cacher", help="STC-Cacher reuses static ViT work (with --stream, or "
                                "offline with --method stc)"),
    max_frames: Optional[int] = typer.Option(None, "--max-frames", help="with --stream: hold only the newest N frames"),
    retrieve_frames: Optional[int] = typer.Option(None, "--retrieve-frames",
                                                  help="with --stream: each LLM layer answers from the K frames "
                                                  "most relevant to the question (ReKV; official K=64)"),
    as_json: bool = typer.Option(False, "--json", help="print exactly one JSON object on stdout"),
):
    """Answer a question about a video (no arguments: the embedded model on a bundled sample)."""
    try:
        options = {"cacher": cacher, "max_frames": max_frames, "retrieve_frames": retrieve_frames}
        if not stream and (max_frames is not None or retrieve_frames is not None):
            raise UserError("--max-frames and --retrieve-frames need --stream (they set the streaming session)")
        session = options if stream else None
        result = _run_video_qa(video, question, model, method, retention, preset, frames, fps, backend,
                               max_new_tokens, compare, session, offline_cacher=cacher and not stream)
    except (UserError, ValueError, FileNotFoundError) as err:
        _fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
    if as_json:
        typer.echo(json.dumps(result))
    else:
        _print_video_qa(result)


def _accel_config(preset, method_spec: str | None, retention):
    """The preset (if any) with ``--method`` and ``--retention`` on top; the spec's knobs
    (``aim:prune=false``) update the preset's params."""
    from .config import AccelConfig, parse_method_spec

    cfg = AccelConfig.load(preset, retention=retention)
    if method_spec is None:
        return cfg
    name, knobs = parse_method_spec(method_spec)
    return AccelConfig.load(cfg, method=name, params={**cfg.params, **knobs})


def _run_video_qa(video, question, model_dir, method, retention, preset, frames, fps, backend,
                  max_new_tokens, compare, stream: dict | None = None, offline_cacher: bool = False) -> dict:
    """``stream``: None, or the ``StreamSession`` options to answer from a stream instead;
    ``offline_cacher``: run stc with STC-Cacher on the tower."""
    if frames is not None and fps is not None:
        raise UserError("give either --frames or --fps, not both")
    reference = None
    if video is None:
        video, default_q, default_a = _sample_video()
        reference = default_a if question is None else None
        question = question or default_q
    if not question:
        raise UserError("a question is required: -q 'What happens in the video?'")
    from .config import AccelConfig
    from .pipeline import Pipeline, load_model, prepare_media

    streaming_default = "stc" if stream is not None and method is None and preset is None else None
    cfg = _accel_config(preset, method or streaming_default, retention)
    if stream is not None and cfg.method != "stc":
        raise UserError(f"--stream runs STC's streaming session, not {cfg.method}: use --method stc or "
                        "--preset stc-stream (or neither)")
    if stream is not None:
        stream = _stream_options(cfg, stream)  # refuses knobs the session does not take before loading anything
    if offline_cacher:
        if cfg.method != "stc":
            raise UserError(f"--cacher is STC-Cacher, part of stc, not {cfg.method}: use --method stc (or --stream)")
        cfg = AccelConfig.load(cfg, params={**cfg.params, "cacher": True})
    media = prepare_media(str(video), None if fps else (frames or 8), fps, backend)  # fail before loading a model
    _quiet_transformers()
    loaded = load_model(model_dir) if model_dir else _default_model()
    result = {"video": str(video), "question": question}
    if reference is not None:
        result["reference"] = reference
    if compare:
        base = Pipeline(*loaded, method="none")
        result["baseline"] = base.ask(media, question, max_new_tokens).to_dict()
        base.restore()
    if stream is not None:
        result.update(_streamed(loaded, media, question, cfg.retention, stream, max_new_tokens))
    else:
        pipe = Pipeline(*loaded, config=cfg)
        result.update(pipe.ask(media, question, max_new_tokens).to_dict())
    result["config"] = cfg.model_dump()
    return result


def _stream_options(cfg, options: dict) -> dict:
    """The ``StreamSession`` options: the command line's, plus the stc knobs of ``--method`` /
    ``--preset`` that a session takes and the position policy. A knob it does not take (such
    as ``merge_dropped``, offline only) is refused rather than silently ignored."""
    from .stream import SESSION_KNOBS

    unsupported = sorted(set(cfg.params) - set(SESSION_KNOBS))
    if unsupported:
        raise UserError(f"--stream's session does not take stc's {', '.join(unsupported)} (offline only: drop "
                        f"--stream); it takes {', '.join(SESSION_KNOBS)}")
    knobs = {**cfg.params, "cacher": bool(options.get("cacher")) or bool(cfg.params.get("cacher", False))}
    return {**options, **knobs, "position_policy": cfg.position_policy}


def _streamed(loaded, media, question: str, retention, options: dict, max_new_tokens: int) -> dict:
    """Frames into an STC ``StreamSession`` (with ``options``) one at a time, then the question:
    the answer dict with the tokens each frame kept."""
    from .stream import StreamSession
    from .stream_units import uses_frame_rate

    if uses_frame_rate(loaded[0]) and "sampled_fps" in media.info:
        options = {**options, "fps": media.info["sampled_fps"]}
    session = StreamSession(*loaded, **({} if retention is None else {"retention": retention}), **options)
    kept = [session.add_frame(frame) for frame in media.items[0]]
    answer = session.ask(question, max_new_tokens).to_dict()
    answer["media"] = {**media.info, **answer["media"], "kept_per_frame": kept,
                       "frames_per_unit": session.units.frames_per_unit}
    if session.last_retrieved is not None:
        answer["media"]["retrieved_frames_per_layer"] = session.last_retrieved
    return answer


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def _default_model():
    from .embedded import load_default_model

    return load_default_model()


def _row(label: str, item: dict) -> str:
    s = item["stats"]
    t = s["timings"]
    return (f"{label:12s} {item['answer']!r:28s} visual tokens {s['visual_tokens_in']}->{s['visual_tokens_kept']:<5d} "
            f"prefill {t.get('prefill', 0) * 1e3:7.1f} ms  total {t.get('total', 0) * 1e3:7.1f} ms")


def _print_video_qa(result: dict) -> None:
    typer.echo(f"video:    {result['video']} ({result['media'].get('frames', '?')} frames)")
    typer.echo(f"question: {result['question']}")
    if "reference" in result:
        typer.echo(f"true answer (bundled sample): {result['reference']}")
    label = result["stats"].get("method") or result["config"]["method"]  # "stc-stream" for --stream
    if "baseline" in result:
        typer.echo(_row("baseline", result["baseline"]))
    else:
        typer.echo(f"answer:   {result['answer']}")
    typer.echo(_row(label, result))
    if "kept_per_frame" in result["media"]:
        appended = result["stats"]["timings"].get("append", 0)
        when = (f"prefilled as they arrived ({appended * 1e3:.1f} ms)" if appended
                else "prefilled at the question (the chat template puts the question before the video)")
        typer.echo(f"streamed: tokens kept per frame {result['media']['kept_per_frame']}, {when}")
        if result["media"].get("frames_per_unit", 1) > 1:
            typer.echo(f"          (the tower encodes {result['media']['frames_per_unit']} frames at a time: a group's "
                       "tokens count at its last frame; an unfinished group is encoded with the question)")
    if "retrieved_frames_per_layer" in result["media"]:
        chosen = result["media"]["retrieved_frames_per_layer"]
        first = ", ".join(map(str, chosen[0][:8])) + (", ..." if len(chosen[0]) > 8 else "")
        per_unit = result["media"].get("frames_per_unit", 1)
        blocks = "frames" if per_unit == 1 else f"slices of {per_unit} frames"
        typer.echo(f"retrieved: each of {len(chosen)} layers answered from {len(chosen[0])} of "
                   f"{len(result['media']['kept_per_frame']) // per_unit} {blocks} (layer 0: {first})")


@app.command("caption")
def caption_cmd(
    config: Optional[Path] = typer.Option(None, "--config", help="caption job YAML (see configs/caption.yaml)"),
    set_: list[str] = typer.Option([], "--set", help="override a config key: --set batch_size=4"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
):
    """Caption a folder, glob or JSONL manifest of images into a JSONL file (resumable)."""
    try:
        from .caption import load_caption_config, run_caption

        cfg = load_caption_config(config, set_)
        cfg.accel_config()  # unknown method / preset fails before loading anything
        _quiet_transformers()
        summary = run_caption(cfg, progress=not quiet)
    except (UserError, ValueError, FileNotFoundError) as err:
        _fail(str(err).splitlines()[0])
    typer.echo(f"{cfg.output}: {summary.line()}")
    for path in summary.skipped_files[:5]:
        typer.echo(f"  skipped (not an image): {path}", err=True)


@app.command("demo")
def demo_cmd(
    host: str = typer.Option("127.0.0.1", "--host", help="interface to bind (default: this machine only)"),
    port: int = typer.Option(7860, "--port"),
    model: Optional[Path] = typer.Option(None, "--model", help="model directory (default: embedded model)"),
):
    """Start the Gradio demo (baseline vs accelerated answers, kept-token pictures)."""
    import socket

    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as err:
            _fail(f"cannot listen on {host}:{port} ({err.strerror}); pick another --port")
    try:
        from .demo_app import launch
    except ImportError as err:
        _fail(f"the demo needs gradio: pip install 'mmaccel[demo]' ({err})")
    _quiet_transformers()
    typer.echo(f"mmaccel demo on http://{host}:{port}", err=True)
    launch(str(model) if model else None, host, port, block=True)


bench_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Benchmarks (fidelity, speed).")
app.add_typer(bench_app, name="bench")


def _floats(text: str, name: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{name} must be comma-separated numbers, got {text!r}") from None


@bench_app.command("fidelity")
def bench_fidelity(
    method: Optional[str] = typer.Option(None, "--method",
                                         help="one method (or use --sweep); knobs as aim:pass_fraction=0.25"),
    retention: Optional[float] = typer.Option(None, "--retention"),
    n: int = typer.Option(200, "--n", help="held-out samples"),
    seed: int = typer.Option(0, "--seed"),
    model: Optional[Path] = typer.Option(None, "--model", help="model directory (default: embedded model)"),
    batch_size: int = typer.Option(16, "--batch-size"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the result JSON here"),
    sweep: bool = typer.Option(False, "--sweep", help="all --methods x --retentions; table + plot in --out"),
    methods: str = typer.Option("random,pool,fastv,aim,hired,visionzip,stc,mustdrop,tome", "--methods",
                                help="comma list; a method may carry knobs: aim:pass_fraction=0.25:prune=false"),
    retentions: str = typer.Option("1.0,0.5,0.25,0.11", "--retentions"),
    out: Path = typer.Option(Path("results/fidelity"), "--out"),
    from_json: Optional[Path] = typer.Option(None, "--from-json",
                                             help="re-render a saved sweep's table and plot into --out (no model run)"),
):
    """Accuracy per family, agreement, first-token KL and tokens per layer of a method on the world."""
    try:
        if from_json:
            result = _render_saved_sweep(from_json, out)
        else:
            result = _run_fidelity(method, retention, n, seed, model, batch_size, sweep, methods, retentions, out)
    except (UserError, ValueError, FileNotFoundError) as err:
        _fail(str(err).splitlines()[0])
    if json_out:
        json_out.write_text(json.dumps(result, indent=2))
    from .bench.fidelity import markdown_table

    typer.echo(markdown_table(result))


def _render_saved_sweep(path: Path, out: Path) -> dict:
    from .bench.fidelity import write_sweep

    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not a sweep JSON ({err})") from None
    if not isinstance(result, dict) or not {"baseline", "points", "environment", "n"} <= set(result):
        raise UserError(f"{path} is not a sweep JSON written by `mmaccel bench fidelity --sweep`")
    for written in write_sweep(result, out).values():
        typer.echo(f"wrote {written}", err=True)
    return result


def _check_method_specs(names: list[str], retentions: list) -> None:
    """Unknown methods, knobs and out-of-range retentions fail before any work. A spec may carry
    knobs, as in ``aim:proportional_attention=false`` (see ``parse_method_spec``)."""
    from .config import AccelConfig, parse_method_spec

    for name in names:
        method, params = parse_method_spec(name)
        for r in retentions:
            AccelConfig.load(None, method=method, retention=r, params=params)


def _run_fidelity(method, retention, n, seed, model_dir, batch_size, sweep, methods, retentions, out):
    if not sweep and method is None:
        raise UserError("give --method (and --retention), or --sweep")
    names = methods.split(",") if sweep else [method]
    rets = _floats(retentions, "--retentions") if sweep else [retention]
    _check_method_specs(names, rets)
    from .bench.fidelity import sweep as run_sweep, write_sweep
    from .pipeline import load_model
    from .world.samples import generate_samples
    from .world.spec import MODEL_FAMILIES

    _quiet_transformers()
    loaded = load_model(model_dir) if model_dir else _default_model()
    samples = generate_samples(n, seed=seed, split="test", families=MODEL_FAMILIES)
    progress = lambda p: typer.echo(f"{p['method']} r={p['retention']}: acc {p['aggregates']['all']:.3f} "
                                    f"agree {p['agreement']:.3f}", err=True)
    result = run_sweep(*loaded, samples, names, rets, batch_size, progress)
    if sweep:
        for path in write_sweep(result, out).values():
            typer.echo(f"wrote {path}", err=True)
    return result


@bench_app.command("speed")
def bench_speed(
    methods: str = typer.Option("fastv,pool,random,aim", "--methods",
                                help="comma list; a method may carry knobs: aim:proportional_attention=false"),
    retentions: str = typer.Option("0.25,0.11", "--retentions"),
    repeats: int = typer.Option(5, "--repeats"),
    warmup: int = typer.Option(2, "--warmup"),
    threads: int = typer.Option(2, "--threads"),
    small: bool = typer.Option(False, "--small", help="tiny decoder: checks the plumbing, not speed"),
    stc: bool = typer.Option(False, "--stc", help="also time STC-Cacher on a mostly static video"),
    qwen_tome: bool = typer.Option(False, "--qwen-tome", help="also time tome inside a Qwen2-VL tower"),
    vision_layers: int = typer.Option(2, "--vision-layers", help="CLIP tower depth (tome needs several)"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda[:N]; CUDA stages are timed after a sync"),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16"),
    batch: int = typer.Option(1, "--batch", help="samples per prefill (all of the same length)"),
    llm: str = typer.Option("0.5b", "--llm", help="decoder shape: 0.5b (LLaVA-1.5-shaped, small) or 7b"),
    out: Optional[Path] = typer.Option(None, "--out", help="folder for speed.json and speed.md"),
):
    """Prefill wall-time speedup beside the analytic FLOP ratio on a LLaVA-1.5-shaped model."""
    try:
        names, rets = methods.split(","), _floats(retentions, "--retentions")
        _check_method_specs(names, rets)
        _check_speed_target(device, dtype, batch, llm)
        if "tome" in names and vision_layers < 3:  # the tower's feature layer is block L-2
            raise UserError(f"tome merges in the CLIP blocks before the feature layer (block L-2); a tower of "
                            f"{vision_layers} has none: add --vision-layers 8")
    except (UserError, ValueError) as err:
        _fail(str(err).splitlines()[0])
    from .bench.speed import markdown, run

    _quiet_transformers()
    progress = lambda p: typer.echo(f"{p.method} r={p.retention}: {p.speedup:.2f}x (FLOP ratio {p.flop_ratio:.2f})",
                                    err=True)
    result = run(names, rets, repeats, warmup, threads, small, progress, vision_layers, device, dtype, batch, llm)
    table = markdown(result)
    if out:  # written before the optional STC part, so a failure there loses nothing
        out.mkdir(parents=True, exist_ok=True)
        (out / "speed.json").write_text(json.dumps(result, indent=2))
        (out / "speed.md").write_text("# Prefill speed\n\n" + table + "\n")
    if stc:
        from .bench.speed import stc_markdown, stc_vit_time

        sizes = dict(frames=6, repeats=1, image_size=112, layers=2) if small else dict(frames=16, repeats=3)
        result["stc_cacher"] = stc_vit_time(threads=threads, **sizes)
        table += "\n\n" + stc_markdown(result["stc_cacher"])
    if qwen_tome:
        table += _qwen_tome_section(result, threads, small, rets)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "speed.json").write_text(json.dumps(result, indent=2))
        (out / "speed.md").write_text("# Prefill speed\n\n" + table + "\n")
    typer.echo(table)


SPEED_DTYPES = ("float32", "bfloat16", "float16")


def _check_speed_target(device: str, dtype: str, batch: int, llm: str) -> None:
    """Reject a bad --device/--dtype/--batch/--llm before any model is built."""
    from .bench.speed import LLM_SHAPES

    if dtype not in SPEED_DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose from {', '.join(SPEED_DTYPES)}")
    if llm not in LLM_SHAPES:
        raise UserError(f"--llm {llm!r}: choose from {', '.join(LLM_SHAPES)}")
    if batch < 1:
        raise UserError(f"--batch must be at least 1, got {batch}")
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"--device {device!r}: use cpu or cuda[:N]")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA device is available here")


def _qwen_tome_section(result: dict, threads: int, small: bool, retentions: list[float]) -> str:
    """Time tome inside a Qwen2-VL tower; store it in ``result`` and return its Markdown."""
    from .bench.speed import qwen_tome_vit_time

    sizes = dict(side=112, depth=2, dim=64, repeats=1) if small else {}
    q = result["qwen_tome"] = qwen_tome_vit_time(retentions, threads=threads, **sizes)
    head = (f"\n\ntome inside a Qwen2-VL tower ({q['depth']} blocks x {q['dim']}, one image of {q['patches']} "
            f"patches): full {1000 * q['full_s']:.1f} ms\n\n| retention | ViT ms | speedup | FLOP ratio | "
            "speedup / FLOP ratio | patches per block (attention/MLP) |\n|---|---|---|---|---|---|\n")
    return head + "\n".join(f"| {p['retention']} | {1000 * p['seconds']:.1f} | {p['speedup']:.2f} | "
                             f"{p['flop_ratio']:.2f} | {p['speedup'] / p['flop_ratio']:.2f} | "
                             f"{' '.join(f'{a}/{m}' for a, m in zip(p['patches_per_block'], p['patches_per_mlp']))} |"
                             for p in q["points"])


def main():
    try:
        app()
    except UserError as err:  # pragma: no cover - safety net
        _fail(str(err))


if __name__ == "__main__":
    sys.exit(main())
