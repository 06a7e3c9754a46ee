"""Pipeline and the video-qa command line, on a saved tiny model and real video files."""
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import mmaccel
from mmaccel import AccelConfig, Pipeline
from mmaccel.cli import app
from mmaccel.testing.tiny import save_tiny
from conftest import image


def write_video(path, frames=12, size=56):
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=6)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            arr = np.full((size, size, 3), 200, dtype=np.uint8)
            arr[10:20, 4 * i % size: 4 * i % size + 10] = (220, 40, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    return save_tiny("llava_onevision", tmp_path_factory.mktemp("tiny_ov"), seed=1)


def test_pipeline_image_and_video(saved_model, tmp_path):
    pipe = Pipeline(str(saved_model), method="fastv", retention=0.25)
    ans = pipe.ask(image(1), "what is the color ?", max_new_tokens=3)
    assert isinstance(ans.text, str) and ans.stats.visual_tokens_kept < ans.stats.visual_tokens_in
    video = write_video(tmp_path / "clip.mp4")
    vans = pipe.ask(str(video), "which direction does the red square move ?", max_new_tokens=3, num_frames=4)
    assert vans.media["frames"] == 4 and vans.stats.visual_tokens_in > 0
    answers = pipe.ask_batch([(image(2), "what is the color ?"), ([image(3), image(4)], "how many ?")], max_new_tokens=2)
    assert len(answers) == 2
    model = pipe.restore()
    assert "generate" not in vars(model)


def test_pipeline_answers_match_model_generate(saved_model):
    """The Pipeline's answer is the model's own greedy answer (method none)."""
    pipe = Pipeline(str(saved_model), method="none")
    ans = pipe.ask(image(5), "what is the color ?", max_new_tokens=4)
    proc = pipe.processor
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                    "text": "what is the color ?"}]}], add_generation_prompt=True)
    inputs = proc(text=[text], images=[image(5)], return_tensors="pt")
    pipe.restore()
    with torch.no_grad():
        out = pipe.model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert ans.text == proc.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()


def test_pipeline_refuses_pickle_only_dirs(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(ValueError, match="no .safetensors"):
        Pipeline(str(tmp_path))


def test_cli_video_qa_json_and_compare(saved_model, tmp_path):
    video = write_video(tmp_path / "clip.mp4")
    runner = CliRunner()
    res = runner.invoke(app, ["video-qa", str(video), "-q", "which direction ?", "--model", str(saved_model),
                              "--method", "pool", "--retention", "0.25", "--frames", "4", "--json",
                              "--max-new-tokens", "2"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["config"]["method"] == "pool" and data["stats"]["visual_tokens_kept"] < data["stats"]["visual_tokens_in"]
    res = runner.invoke(app, ["video-qa", str(video), "-q", "which direction ?", "--model", str(saved_model),
                              "--preset", "fastv-50", "--compare", "--max-new-tokens", "2"])
    assert res.exit_code == 0, res.output
    assert "baseline" in res.stdout and "fastv" in res.stdout and "prefill" in res.stdout


def test_cli_video_qa_method_knobs_on_top_of_a_preset(saved_model, tmp_path):
    """``--method aim:prune=false`` sets a knob as the bench sweeps do; over a preset it changes
    that knob and keeps the preset's others."""
    video = write_video(tmp_path / "clip.mp4", frames=4)
    common = ["video-qa", str(video), "-q", "which direction ?", "--model", str(saved_model), "--json",
              "--max-new-tokens", "2"]
    res = CliRunner().invoke(app, [*common, "--preset", "aim-7x", "--method", "aim:prune=false:tau=0.2"])
    assert res.exit_code == 0, res.output
    cfg = json.loads(res.stdout)["config"]
    preset = AccelConfig.load("aim-7x")
    assert (cfg["method"], cfg["retention"]) == ("aim", preset.retention)
    assert cfg["params"] == {**preset.params, "prune": False, "tau": 0.2}
    res = CliRunner().invoke(app, [*common, "--method", "aim:pass_fraction=0.25", "--retention", "0.5"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["config"] == {"method": "aim", "retention": 0.5, "position_policy": "preserve",
                                                "params": {"pass_fraction": 0.25}}


@pytest.mark.parametrize("argv, message", [
    (["--method", "nope"], "unknown method 'nope'"),
    (["--retention", "2"], "retention"),
    (["--preset", "nope"], "no config file or preset"),
    (["--frames", "4", "--fps", "2"], "either --frames or --fps"),
    (["--cacher"], "--cacher is STC-Cacher, part of stc, not none"),
    (["--cacher", "--method", "fastv"], "not fastv: use --method stc"),
    (["--max-frames", "2"], "need --stream"),
    (["--stream", "--max-frames", "0"], "max_frames must be a positive"),
    (["--retrieve-frames", "2"], "need --stream"),
    (["--stream", "--retrieve-frames", "0"], "retrieve_frames must be a positive"),
    (["--stream", "--method", "fastv"], "not fastv: use --method stc"),
    (["--stream", "--preset", "fastv-50"], "not fastv: use --method stc"),
    (["--stream", "--method", "stc:merge_dropped=true"], "session does not take stc's merge_dropped"),
    (["--method", "aim:prune=flase"], "aim prune must be true or false, got 'flase'"),
    (["--method", "aim:tau"], "expected name:knob=value"),
    (["--method", "fastv:kk=2"], "no parameter(s) kk"),
])
def test_cli_user_errors_are_one_line(saved_model, tmp_path, argv, message):
    video = write_video(tmp_path / "clip.mp4", frames=4)
    res = CliRunner().invoke(app, ["video-qa", str(video), "-q", "q ?", "--model", str(saved_model), *argv])
    assert res.exit_code != 0
    assert message in res.output and "Traceback" not in res.output


def test_cli_corrupt_and_missing_video(saved_model, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 10)
    for path in (bad, tmp_path / "missing.mp4"):
        res = CliRunner().invoke(app, ["video-qa", str(path), "-q", "q ?", "--model", str(saved_model)])
        assert res.exit_code == 1 and res.output.startswith("error: ") and "Traceback" not in res.output


def test_help_is_fast_and_does_not_import_torch():
    code = "import sys, mmaccel.cli as c; sys.argv=['mmaccel','--help']\ntry: c.main()\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "video-qa" in out.stdout
    assert out.stdout.strip().endswith("False")
    assert time.perf_counter() - start < 3.0


def test_import_mmaccel_is_light():
    code = "import sys, mmaccel; print(sorted(m for m in ('torch','gradio','av','triton','cv2') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_cli_video_qa_default_sample_shows_its_true_answer(saved_model):
    meta = json.loads((Path(mmaccel.__file__).parent / "assets" / "sample_video.json").read_text())
    runner = CliRunner()
    res = runner.invoke(app, ["video-qa", "--model", str(saved_model), "--max-new-tokens", "2"])
    assert res.exit_code == 0, res.output
    assert meta["question"] in res.stdout and f"true answer (bundled sample): {meta['answer']}" in res.stdout
    res = runner.invoke(app, ["video-qa", "-q", "which shape ?", "--model", str(saved_model), "--max-new-tokens", "2"])
    assert res.exit_code == 0, res.output
    assert "true answer" not in res.stdout  # the reference belongs to the bundled question only


def test_cli_video_qa_stream_feeds_frames_to_a_session(saved_model, tmp_path):
    """--stream: the decoded frames go one by one into an STC StreamSession (the method's
    default 60/196 share unless --retention), and the answer is the session's."""
    from mmaccel.pipeline import load_model, prepare_media
    from mmaccel.stream import StreamSession

    video = write_video(tmp_path / "clip.mp4")
    res = CliRunner().invoke(app, ["video-qa", str(video), "-q", "which direction ?", "--model", str(saved_model),
                                   "--frames", "4", "--stream", "--retention", "0.5", "--json", "--max-new-tokens", "3"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    session = StreamSession(*load_model(str(saved_model)), retention=0.5)
    kept = [session.add_frame(f) for f in prepare_media(str(video), 4).items[0]]
    assert data["stats"]["method"] == "stc-stream" and data["config"]["method"] == "stc"
    assert data["media"]["kept_per_frame"] == kept and len(kept) == 4
    assert data["answer"] == session.ask("which direction ?", 3).text
    assert data["stats"]["visual_tokens_kept"] == sum(kept) + 1  # and the video's newline token
    res = CliRunner().invoke(app, ["video-qa", str(video), "-q", "which direction ?", "--model", str(saved_model),
                                   "--frames", "4", "--stream", "--retention", "0.5", "--retrieve-frames", "2",
                                   "--json", "--max-new-tokens", "3"])
    assert res.exit_code == 0, res.output
    retrieving = StreamSession(*load_model(str(saved_model)), retention=0.5, retrieve_frames=2)
    for f in prepare_media(str(video), 4).items[0]:
        retrieving.add_frame(f)
    data = json.loads(res.stdout)
    assert data["answer"] == retrieving.ask("which direction ?", 3).text
    assert data["stats"]["visual_tokens_kept"] == sum(kept[:2]) + 1  # two frames of equal size
    assert data["media"]["retrieved_frames_per_layer"] == retrieving.last_retrieved
    res = CliRunner().invoke(app, ["video-qa", str(video), "-q", "which direction ?", "--model", str(saved_model),
                                   "--frames", "4", "--stream", "--retrieve-frames", "2", "--max-new-tokens", "2"])
    assert res.exit_code == 0 and "answered from 2 of 4 frames" in res.stdout, res.output


def test_cli_stream_takes_the_methods_session_knobs(saved_model, tmp_path, monkeypatch):
    """--stream with --method stc:KNOB=...: the knobs a StreamSession takes reach it, with the
    config's position policy (they used to be dropped without a word)."""
    import mmaccel.stream
    from mmaccel.stream import StreamSession

    seen = []

    class Recording(StreamSession):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(mmaccel.stream, "StreamSession", Recording)
    video = write_video(tmp_path / "clip.mp4", frames=4)
    res = CliRunner().invoke(app, ["video-qa", str(video), "-q", "which direction ?", "--model", str(saved_model),
                                   "--frames", "4", "--stream", "--method", "stc:cache_interval=4:update_ratio=0.5",
                                   "--cacher", "--json", "--max-new-tokens", "2"])
    assert res.exit_code == 0, res.output
    assert len(seen) == 1 and seen[0]["cache_interval"] == 4 and seen[0]["update_ratio"] == 0.5
    assert seen[0]["cacher"] is True and seen[0]["position_policy"] == "preserve"


def test_a_video_for_an_image_only_model_is_refused(tmp_path):
    """LLaVA-1.5's processor ignores videos= and its template prints a bare <video>: the model
    answered without seeing anything. The Pipeline and the CLI say what to do instead."""
    model_dir = save_tiny("llava", tmp_path / "llava")
    video = write_video(tmp_path / "clip.mp4", frames=4)
    with pytest.raises(ValueError, match="takes images, not videos"):
        Pipeline(str(model_dir), method="none").ask(str(video), "what ?", max_new_tokens=2)
    res = CliRunner().invoke(app, ["video-qa", str(video), "-q", "what ?", "--model", str(model_dir)])
    assert res.exit_code != 0 and "takes images, not videos" in res.output


def test_an_empty_batch_answers_nothing(saved_model):
    assert Pipeline(str(saved_model), method="fastv", retention=0.25).ask_batch([]) == []


def test_qwen2_5_video_time_follows_the_sampled_frame_rate(tmp_path, monkeypatch):
    """Qwen2.5-VL spaces its temporal positions by the frames' rate. 4 frames sampled from a
    2-second clip are 2 a second, so a slice of 2 frames spans 1 s (the processor's 24 fps for
    bare frames would give 1/12 s and put every slice at time 0). The offline pipeline and the
    streaming command line both pass that rate on."""
    from mmaccel.pipeline import load_model, prepare_media
    from mmaccel.stream import StreamSession

    model_dir = save_tiny("qwen2_5_vl", tmp_path / "q25")
    video = write_video(tmp_path / "clip.mp4", frames=12)  # 6 fps: 2 seconds
    media = prepare_media(str(video), 4)
    assert media.info["sampled_fps"] == pytest.approx(2.0)
    pipe = Pipeline(str(model_dir), method="none")
    inputs = pipe._encode([pipe._prompt(media, "what ?")], [media])
    assert inputs["second_per_grid_ts"].tolist() == [1.0]
    assert inputs["video_grid_thw"].tolist() == [[2, 4, 4]]  # the 4 frames, not resampled
    import mmaccel.stream

    rates = []

    class Recording(StreamSession):
        def __init__(self, *args, **kwargs):
            rates.append(kwargs.get("fps"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(mmaccel.stream, "StreamSession", Recording)
    res = CliRunner().invoke(app, ["video-qa", str(video), "-q", "what ?", "--model", str(model_dir), "--frames", "4",
                                   "--stream", "--json", "--max-new-tokens", "3"])
    assert res.exit_code == 0, res.output
    assert rates == [pytest.approx(2.0)]
    model, processor = load_model(str(model_dir))
    session = StreamSession(model, processor, fps=2.0)
    for frame in media.items[0]:
        session.add_frame(frame)
    assert json.loads(res.stdout)["answer"] == session.ask("what ?", 3).text
    # slice 1 at 1 s: tokens_per_second positions after slice 0
    assert session.kept_positions[1][0, 0] - session.kept_positions[0][0, 0] == model.config.vision_config.tokens_per_second


def test_cli_offline_cacher_runs_stc_with_stc_cacher(saved_model, tmp_path):
    """--cacher without --stream: offline stc with STC-Cacher on the tower, the answer of
    ``accelerate_vlm(..., method="stc", cacher=True)`` through the Pipeline."""
    from mmaccel.pipeline import load_model

    video = write_video(tmp_path / "clip.mp4")
    res = CliRunner().invoke(app, ["video-qa", str(video), "-q", "which direction ?", "--model", str(saved_model),
                                   "--frames", "4", "--method", "stc", "--cacher", "--json", "--max-new-tokens", "3"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["config"]["method"] == "stc" and data["config"]["params"] == {"cacher": True}
    pipe = Pipeline(*load_model(str(saved_model)), method="stc", cacher=True)
    assert data["answer"] == pipe.ask(str(video), "which direction ?", max_new_tokens=3, num_frames=4).text
