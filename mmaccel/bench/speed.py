"""The speed benchmark: measured LLM prefill wall time beside the analytic FLOP ratio.

A LLaVA-1.5-shaped random-weight model (CLIP tower at 336 px / patch 14 -> 576 visual tokens,
a Llama decoder of about 0.5B parameters) is built from configs. For each (method, retention)
the LLM prefill (language model forward, including mmaccel's splice, scoring and pruning) is
timed against the unaccelerated model in the same process, interleaved, median of ``repeats``
after ``warmup`` runs. The vision tower is shrunk (it is identical for every method and is
not what the ratio measures); its time is reported separately.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from ..machine import machine_line
from ..stats import clock, synced_clock

LLAVA15_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    num_key_value_heads=16, vocab_size=32064, max_position_embeddings=4096)
# LLaVA-1.5-7B's decoder (Vicuna-7B): for GPU runs, where a 0.5B decoder at batch 1 is launch-bound
LLAVA15_7B_TEXT = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096)
LLM_SHAPES = {"0.5b": LLAVA15_TEXT, "7b": LLAVA15_7B_TEXT}
SMALL_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=128, max_position_embeddings=2048)


def build_llava15_shaped(text: dict | None = None, image_size: int = 336, vision_layers: int = 2, seed: int = 0,
                         device: str = "cpu", dtype: str = "float32", batch: int = 1):
    """(model, inputs): LlavaForConditionalGeneration with ``(image_size/14)^2`` visual tokens per
    sample, ``batch`` samples of equal length, weights built on ``device`` (a 7B decoder is
    initialised there, not on the CPU) and cast to ``dtype``."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text_cfg = LlamaConfig(**(text or LLAVA15_TEXT), pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = CLIPVisionConfig(image_size=image_size, patch_size=14, hidden_size=256, intermediate_size=512,
                              num_hidden_layers=vision_layers, num_attention_heads=4)
    image_token = text_cfg.vocab_size - 1
    cfg = LlavaConfig(vision_config=vision, text_config=text_cfg, image_token_id=image_token,
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration(cfg).eval()
    model.to(getattr(torch, dtype))
    n_visual = (image_size // 14) ** 2
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, image_token, (batch, 40), generator=gen)
    ids = torch.cat([prompt[:, :5], torch.full((batch, n_visual), image_token), prompt[:, 5:]], 1)
    pixels = torch.randn(batch, 3, image_size, image_size, generator=gen).to(getattr(torch, dtype))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}
    return model, {k: v.to(device) for k, v in inputs.items()}


class ModuleTimer:
    """Times each call of ``module`` (default: the language model); registered before
    ``accelerate_vlm`` so it includes the splice and pruning hooks. ``sync``: wait for the GPU at
    both ends, so a call's time is its device time (and nothing in between waits)."""

    def __init__(self, model, module=None, sync: bool = False):
        lm = module if module is not None else model.model.language_model
        self.times: list[float] = []
        self.sync = sync
        self._handles = [lm.register_forward_pre_hook(self._start), lm.register_forward_hook(self._stop)]

    def _now(self) -> float:
        if self.sync:
            import torch

            torch.cuda.synchronize()
        return clock()

    def _start(self, module, args):
        self._t0 = self._now()

    def _stop(self, module, args, output):
        self.times.append(self._now() - self._t0)

    def remove(self):
        for h in self._handles:
            h.remove()


@dataclass
class Point:
    method: str
    retention: float
    base_ms: float
    accel_ms: float
    flop_ratio: float
    scoring_share: float
    reduce_share: float
    visual_tokens_in: int
    visual_tokens_last_layer: int
    base_vit_ms: float = 0.0
    accel_vit_ms: float = 0.0

    @property
    def speedup(self) -> float:
        return self.base_ms / self.accel_ms

    @property
    def efficiency(self) -> float:
        """Measured speedup as a fraction of the analytic FLOP ratio."""
        return self.speedup / self.flop_ratio

    def to_dict(self) -> dict:
        return {**self.__dict__, "speedup": self.speedup, "efficiency": self.efficiency}


def time_prefill(model, inputs, timer: ModuleTimer, repeats: int, warmup: int) -> float:
    """Median LLM prefill milliseconds of ``repeats`` forward passes after ``warmup``."""
    import torch

    timer.times.clear()
    with torch.inference_mode():
        for _ in range(warmup + repeats):
            model(**inputs, logits_to_keep=1, use_cache=True)
    return statistics.median(timer.times[warmup:]) * 1e3


def measure(model, inputs, method: str, retention: float, repeats: int = 5, warmup: int = 2,
            cuda: bool = False) -> Point:
    """One (method, retention) point, interleaving baseline and accelerated runs.

    On CUDA the timed runs wait for the GPU only at the language model's two ends, as a user's
    prefill would; the scoring and reduce shares come from one more run under
    :func:`synced_clock` (its per-stage waits serialise launches with compute, which would
    inflate the accelerated time of methods that prune at many layers)."""
    timer, vit = ModuleTimer(model, sync=cuda), ModuleTimer(model, model.model.vision_tower, sync=cuda)
    base, accel, base_vit, accel_vit, staged = [], [], [], [], []
    try:
        for _ in range(repeats):
            base.append(time_prefill(model, inputs, timer, 1, warmup))
            base_vit.append(vit.times[-1] * 1e3)
            stats = _accelerated(model, inputs, timer, method, retention, warmup, accel)
            accel_vit.append(vit.times[-1] * 1e3)
            warmup = 0
        if cuda:
            with synced_clock(True):
                stats = _accelerated(model, inputs, timer, method, retention, 0, staged)
    finally:
        timer.remove()
        vit.remove()
    accel_ms = statistics.median(accel)
    stage_ms = staged[0] if staged else accel[-1]  # the run the stage timings come from
    t = stats.timings
    return Point(method, retention, statistics.median(base), accel_ms, stats.flop_ratio,
                 t.get("scoring", 0.0) * 1e3 / stage_ms, t.get("reduce", 0.0) * 1e3 / stage_ms,
                 stats.visual_tokens_in, stats.visual_tokens_kept,
                 statistics.median(base_vit), statistics.median(accel_vit))


def _accelerated(model, inputs, timer, method, retention, warmup, times: list):
    """One accelerated prefill (after ``warmup``); appends its ms to ``times``, returns its stats.
    ``method`` may carry knobs (``aim:proportional_attention=false``, see ``parse_method_spec``)."""
    from ..api import accelerate_vlm
    from ..config import parse_method_spec

    name, params = parse_method_spec(method)
    with accelerate_vlm(model, method=name, retention=retention, **params) as handle:
        times.append(time_prefill(model, inputs, timer, 1, warmup))
        return handle.stats


def environment(threads: int, device: str = "cpu", dtype: str = "float32", batch: int = 1) -> dict:
    import platform

    import torch
    import transformers

    env = {"machine": platform.machine(), "cpu": machine_line(), "cpu_count": __import__("os").cpu_count(),
           "threads": threads,
           "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "device": device, "dtype": dtype, "batch": batch,
           "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if device.startswith("cuda"):
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return env


def run(methods: list[str], retentions: list[float], repeats: int = 5, warmup: int = 2, threads: int = 2,
        small: bool = False, progress=None, vision_layers: int = 2, device: str = "cpu", dtype: str = "float32",
        batch: int = 1, llm: str = "0.5b") -> dict:
    """The whole benchmark; ``small`` uses a tiny decoder (for tests of the plumbing only).
    ``vision_layers``: depth of the CLIP tower (methods that work inside it, like ``tome``,
    need several blocks before the feature layer). ``llm``: a key of :data:`LLM_SHAPES`.
    On a CUDA device the prefill is timed between two waits for the GPU, and the stage shares
    come from a separate run under :func:`synced_clock` (see :func:`measure`)."""
    import torch

    torch.set_num_threads(threads)
    text = SMALL_TEXT if small else LLM_SHAPES[llm]
    model, inputs = build_llava15_shaped(text, image_size=112 if small else 336, vision_layers=vision_layers,
                                         device=device, dtype=dtype, batch=batch)
    params = sum(p.numel() for p in model.model.language_model.parameters())
    points = []
    for method in methods:
        for retention in retentions:
            point = measure(model, inputs, method, retention, repeats, warmup, device.startswith("cuda"))
            points.append(point.to_dict())
            if progress:
                progress(point)
    return {"environment": environment(threads, device, dtype, batch), "llm_parameters": params,
            "llm": "small" if small else llm, "vision_layers": vision_layers,
            "sequence_length": int(inputs["input_ids"].shape[1]), "repeats": repeats, "points": points}


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"LLaVA-1.5-shaped random model: {result['llm_parameters'] / 1e6:.0f}M-parameter decoder, "
             f"{result['sequence_length']} tokens. {_where(env)}, torch {env['torch']}, "
             f"transformers {env['transformers']}, {env['date']}. Median of {result['repeats']}. "
             f"CLIP tower: {result.get('vision_layers', 2)} layers x 256 (ViT ms below).", "",
             "| method | retention | visual tokens (last layer) | base ms | accel ms | speedup | FLOP ratio | "
             "speedup / FLOP ratio | scoring % | reduce % | ViT base ms | ViT accel ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in result["points"]:
        lines.append(f"| {p['method']} | {p['retention']} | {p['visual_tokens_in']} -> {p['visual_tokens_last_layer']} | "
                     f"{p['base_ms']:.1f} | {p['accel_ms']:.1f} | {p['speedup']:.2f} | {p['flop_ratio']:.2f} | "
                     f"{p['efficiency']:.2f} | {100 * p['scoring_share']:.1f} | {100 * p['reduce_share']:.1f} | "
                     f"{p.get('base_vit_ms', 0.0):.1f} | {p.get('accel_vit_ms', 0.0):.1f} |")
    return "\n".join(lines)


def _where(env: dict) -> str:
    """Where the run was timed, for the table's heading (never compare CPU and GPU rows)."""
    if env.get("device", "cpu").startswith("cuda"):
        return f"{env['gpu']} (CUDA {env['cuda']}), {env['dtype']}, batch {env['batch']}"
    return (f"CPU ({env.get('cpu', env['machine'])}), {env['threads']} threads, {env.get('dtype', 'float32')}, "
            f"batch {env.get('batch', 1)}")


def mostly_static_video(frames: int = 16, size: int = 384, seed: int = 0):
    """A light background with a few fixed shapes and one small square drifting right."""
    import numpy as np

    rng = np.random.default_rng(seed)
    base = np.full((size, size, 3), 235, dtype=np.uint8)
    for _ in range(4):
        y, x = rng.integers(0, size - 60, 2)
        base[y:y + 50, x:x + 50] = rng.integers(30, 220, 3)
    clip = np.repeat(base[None], frames, 0)
    for t in range(frames):
        x = 10 + t * (size - 60) // max(1, frames - 1)
        clip[t, size // 2:size // 2 + 30, x:x + 30] = (220, 40, 40)
    return clip


def stc_flop_cut(tokens: int, hidden: int, mlp: int, layers: int, patch: int, frames: int, interval: int,
                 ratio: float) -> float:
    """Analytic ViT FLOP cut of STC-Cacher over a clip (multiply-adds; norms, similarity and
    copies left out). Full layer per token: q/k/v/out projections 4 D^2, MLP 2 D I, attention
    2 N D. A cached layer computes keys for all tokens (D^2 each) and the rest for the dynamic
    share ``ratio`` only (queries against all N keys). Patch embedding: 3 p^2 D per token."""
    import math

    full_tok = 4 * hidden ** 2 + 2 * hidden * mlp + 2 * tokens * hidden
    cached_tok = hidden ** 2 + max(1, round(ratio * tokens)) / tokens * (full_tok - hidden ** 2)
    embed = 3 * patch ** 2 * hidden
    refs = math.ceil(frames / interval)
    full = frames * (layers * full_tok + embed)
    cached = refs * (layers * full_tok + embed) + (frames - refs) * (layers * cached_tok + embed)
    return 1.0 - cached / full


STC_SETTINGS = ((2, 0.25, None), (4, 0.25, None), (2, 0.25, 0.85))


def stc_vit_time(frames: int = 16, settings=STC_SETTINGS, threads: int = 2, repeats: int = 3,
                 image_size: int = 384, layers: int = 6) -> dict:
    """ViT time per frame with and without STC-Cacher on a SigLIP-shaped tower (384 px, patch 14 ->
    729 tokens, 6 layers x 384), mostly static video, one frame per chunk. Median of ``repeats``.

    ``settings``: (cache_interval, update_ratio, similarity_threshold) triples; the threshold rows
    recompute a data-dependent share, and their analytic FLOP cut uses the share they measured.
    Each row also reports the worst frame's relative error of the tower output against the full
    compute (the cost of the reuse)."""
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tower = SiglipVisionModel(SiglipVisionConfig(image_size=image_size, patch_size=14, hidden_size=384,
                                                 intermediate_size=1536, num_hidden_layers=layers,
                                                 num_attention_heads=6)).eval()
    clip = torch.tensor(mostly_static_video(frames, image_size)).permute(0, 3, 1, 2).float() / 127.5 - 1
    layers = getattr(tower, "vision_model", tower).encoder.layers
    _stc_encode(tower, layers, clip, None)  # warm-up
    full_runs = [_stc_encode(tower, layers, clip, None) for _ in range(repeats)]
    full, reference = statistics.median(r[0] for r in full_runs), full_runs[-1][2]
    out = {"frames": frames, "tokens_per_frame": (image_size // 14) ** 2, "threads": threads, "full_s": full,
           "cached": []}
    for interval, ratio, threshold in settings:
        runs = [_stc_encode(tower, layers, clip, (interval, ratio, threshold)) for _ in range(repeats)]
        t = statistics.median(r[0] for r in runs)
        state, outputs = runs[-1][1], runs[-1][2]
        share = _dynamic_share(state, frames, interval, len(layers), out["tokens_per_frame"])
        flop_cut = stc_flop_cut(out["tokens_per_frame"], 384, 1536, len(layers), 14, frames, interval, share)
        error = max(float((o - r).norm() / r.norm()) for o, r in zip(outputs, reference))
        out["cached"].append({"cache_interval": interval, "update_ratio": ratio, "similarity_threshold": threshold,
                              "seconds": t, "vit_time_cut": 1 - t / full, "vit_flop_cut": flop_cut,
                              "rows_recomputed": state.recomputed / state.total, "dynamic_share": share,
                              "max_relative_error": error})
    return out


def _stc_encode(tower, layers, clip, setting):
    """Encode ``clip`` (T, 3, H, W) frame by frame, with STC-Cacher when ``setting`` =
    (interval, ratio, threshold) is given. Returns (seconds, state or None, outputs)."""
    import torch

    from ..vision.stc_cacher import CacherState, STCCacher

    state = CacherState(*setting) if setting else None
    outputs, start = [], time.perf_counter()
    with torch.inference_mode():
        for frame in clip:
            if state is None:
                outputs.append(tower(frame[None]).last_hidden_state)
            else:
                with STCCacher(layers, state):
                    outputs.append(tower(frame[None]).last_hidden_state)
    return time.perf_counter() - start, state, outputs


def _dynamic_share(state, frames: int, interval: int, n_layers: int, tokens: int) -> float:
    """Mean share of tokens recomputed per layer in the non-reference chunks."""
    import math

    refs = math.ceil(frames / interval)
    cached_rows = state.recomputed - refs * n_layers * tokens
    return cached_rows / max(1, (frames - refs) * n_layers * tokens)


def stc_markdown(result: dict) -> str:
    """The STC-Cacher part of the speed report (``result`` from :func:`stc_vit_time`)."""
    head = (f"STC-Cacher, mostly static video (SigLIP-shaped tower, {result['tokens_per_frame']} tokens/frame, "
            f"{result['frames']} frames, 1 frame/chunk): full {result['full_s']:.2f} s\n\n"
            "| cache_interval | update rule | seconds | ViT time cut | analytic FLOP cut | rows recomputed "
            "| max relative error |\n|---|---|---|---|---|---|---|\n")
    rows = [f"| {c['cache_interval']} | {_stc_rule(c)} | {c['seconds']:.2f} | {100 * c['vit_time_cut']:.1f}% | "
            f"{100 * c['vit_flop_cut']:.1f}% | {100 * c['rows_recomputed']:.1f}% | {c['max_relative_error']:.2e} |"
            for c in result["cached"]]
    return head + "\n".join(rows)


def _stc_rule(row: dict) -> str:
    if row["similarity_threshold"] is None:
        return f"fixed share {row['update_ratio']} (official)"
    return f"similarity < {row['similarity_threshold']} (README rule; {100 * row['dynamic_share']:.1f}% updated)"


def build_qwen2_vl_tower_model(depth: int = 8, dim: int = 384, seed: int = 0, text_layers: int = 1):
    """A Qwen2-VL model with a real-shaped vision tower (``depth`` blocks of ``dim``, MLP 4x)
    and a small text model (``text_layers``; mustdrop needs 3): enough for ``accelerate_vlm`` to
    install, cheap to run."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from ..testing.tiny import make_tokenizer

    tok = make_tokenizer()
    vision = dict(depth=depth, embed_dim=dim, hidden_size=64, num_heads=max(1, dim // 64), patch_size=14, mlp_ratio=4,
                  spatial_merge_size=2, temporal_patch_size=2, in_chans=3)
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers,
                num_attention_heads=2, num_key_value_heads=2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    cfg = Qwen2VLConfig(vision_config=vision, text_config=text,
                        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
                        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"))
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(cfg).eval()


def qwen_tome_vit_time(retentions=(0.5, 0.25), threads: int = 2, repeats: int = 3, side: int = 448,
                       depth: int = 8, dim: int = 384) -> dict:
    """ViT time of ``tome`` inside a Qwen2-VL tower (one ``side`` px image: (side/14)^2 patches)
    against the plain tower, beside the analytic FLOP ratio from the patches each block's
    attention and MLP saw (ToMe merges between them). Median of ``repeats`` after one warm-up."""
    from contextlib import nullcontext

    import torch

    from ..api import accelerate_vlm

    torch.set_num_threads(threads)
    model = build_qwen2_vl_tower_model(depth, dim)
    grid = side // 14
    pixels = torch.randn(grid * grid, 3 * 2 * 14 * 14)  # Qwen's flattened patches (temporal patch 2)
    thw = torch.tensor([[1, grid, grid]])
    seen: list[int] = []
    mlp_seen: list[int] = []
    blocks = model.model.visual.blocks
    probes = [b.attn.register_forward_pre_hook(lambda m, a, k: seen.append(a[0].shape[0]), with_kwargs=True)
              for b in blocks] + [b.mlp.register_forward_pre_hook(lambda m, a: mlp_seen.append(a[0].shape[0]))
                                  for b in blocks]

    def vit(retention):
        accelerated = accelerate_vlm(model, method="tome", retention=retention) if retention else nullcontext()
        with torch.inference_mode(), accelerated:
            return _median_time(lambda: model.model.get_image_features(pixels, thw), repeats)

    try:
        out = {"patches": grid * grid, "depth": depth, "dim": dim, "threads": threads, "full_s": vit(None),
               "points": []}
        for r in retentions:
            seen.clear()
            t = vit(r)
            per_block, per_mlp = seen[-depth:], mlp_seen[-depth:]
            flops = sum(_block_flops(n, dim, m) for n, m in zip(per_block, per_mlp))
            out["points"].append({"retention": r, "seconds": t, "speedup": out["full_s"] / t,
                                  "flop_ratio": depth * _block_flops(grid * grid, dim) / flops,
                                  "patches_per_block": per_block, "patches_per_mlp": per_mlp})
    finally:
        for p in probes:
            p.remove()
    return out


def _block_flops(n: int, dim: int, mlp_n: int | None = None) -> float:
    """Multiply-adds of one Qwen2-VL block whose attention runs on n patches (qkv + out 4 D^2,
    attention 2 n D a patch) and its MLP on ``mlp_n`` (default n; 8 D^2 a patch)."""
    mlp_n = n if mlp_n is None else mlp_n
    return n * (4 * dim * dim + 2 * n * dim) + mlp_n * 8 * dim * dim


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
