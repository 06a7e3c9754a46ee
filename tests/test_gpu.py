"""Every method on a CUDA copy of each tiny model gives what it gives on the CPU: the same kept
visual positions per layer and sample, the same greedy tokens and first-step logits within
float32 rounding. Catches tensors made on the wrong device inside hooks and selections. Skipped
(not faked) where no CUDA device is present; run on a lent GPU machine."""
import copy

import pytest
import torch

from mmaccel import accelerate_vlm, list_methods
from conftest import VIDEO_FAMILIES, make_inputs, video

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

METHODS = [m for m in list_methods() if m != "none"]


@pytest.fixture(scope="module")
def cuda_models():
    """family -> (CPU model, CUDA copy, processor), TF32 off so both sides compute in float32.
    Towers of 4 blocks, so tome and MustDrop's window merge really merge inside them."""
    from mmaccel.testing.tiny import build

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cache = {}

    def get(family):
        if family not in cache:
            model, proc = build(family, vision_layers=4)
            cache[family] = (model, copy.deepcopy(model).to("cuda"), proc)
        return cache[family]

    return get


def accelerated_generate(model, inputs, method):
    """(greedy tokens, first-step logits, kept positions per sample, visual tokens per layer)."""
    gen = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True,
               return_dict_in_generate=True)
    with accelerate_vlm(model, method=method, retention=0.25) as handle, torch.no_grad():
        out = model.generate(**inputs, **gen)
        kept = [k.cpu() for k in handle.kept_visual_positions()]
        per_layer = list(handle.stats.visual_tokens_per_layer)
    return out.sequences.cpu(), out.logits[0].float().cpu(), kept, per_layer


def assert_same_on_cuda(cpu_model, gpu_model, inputs, method, label):
    cpu = accelerated_generate(cpu_model, inputs, method)
    gpu = accelerated_generate(gpu_model, {k: v.to("cuda") for k, v in inputs.items()}, method)
    assert gpu[3] == cpu[3], f"{label}: visual tokens per layer differ"
    for b, (c, g) in enumerate(zip(cpu[2], gpu[2])):
        assert torch.equal(c, g), f"{label}: sample {b} keeps other visual positions on CUDA"
    torch.testing.assert_close(gpu[1], cpu[1], atol=1e-3, rtol=1e-3, msg=lambda m: f"{label}: {m}")
    assert torch.equal(gpu[0], cpu[0]), f"{label}: greedy tokens differ"


@pytest.mark.parametrize("method", METHODS)
def test_method_on_cuda_equals_cpu_on_images(cuda_models, family, method):
    cpu_model, gpu_model, proc = cuda_models(family)
    inputs = make_inputs(proc, batch=2)  # left padded, two prompt lengths
    assert_same_on_cuda(cpu_model, gpu_model, inputs, method, f"{family}/{method}/images")


@pytest.mark.parametrize("family_video", VIDEO_FAMILIES)
@pytest.mark.parametrize("method", ["stc", "fastv", "aim", "mustdrop"])
def test_method_on_cuda_equals_cpu_on_video(cuda_models, family_video, method):
    cpu_model, gpu_model, proc = cuda_models(family_video)
    inputs = make_inputs(proc, batch=2, media=("video",))
    assert_same_on_cuda(cpu_model, gpu_model, inputs, method, f"{family_video}/{method}/video")


def test_speed_bench_runs_on_cuda_in_bf16(tmp_path):
    import json

    from typer.testing import CliRunner

    from mmaccel.cli import app

    res = CliRunner().invoke(app, ["bench", "speed", "--small", "--methods", "fastv,aim", "--retentions", "0.25",
                                   "--repeats", "1", "--warmup", "1", "--device", "cuda", "--dtype", "bfloat16",
                                   "--batch", "2", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "speed.json").read_text())
    assert data["environment"]["device"] == "cuda" and data["environment"]["gpu"]
    for p in data["points"]:
        assert p["visual_tokens_last_layer"] < p["visual_tokens_in"] and p["accel_ms"] > 0
    assert "bfloat16, batch 2" in (tmp_path / "speed.md").read_text()


@pytest.mark.parametrize("family_video", VIDEO_FAMILIES)
@pytest.mark.parametrize("options", [{}, {"cacher": True}, {"retrieve_frames": 2, "max_frames": 2}],
                         ids=["plain", "cacher", "retrieval"])
def test_stream_session_on_cuda_equals_cpu(cuda_models, family_video, options):
    """Every stream family and option on CUDA: the kept tokens and the answer of the CPU run
    (5 frames: on Qwen the last one waits for its pair and joins the question)."""
    from mmaccel.stream import StreamSession

    cpu_model, gpu_model, proc = cuda_models(family_video)
    per_unit = 2 if family_video.startswith("qwen") else 1
    options = {k: v * per_unit if k.endswith("frames") else v for k, v in options.items()}
    sessions = [StreamSession(m, proc, retention=0.5, **options) for m in (cpu_model, gpu_model)]
    for frame in video(1, frames=5):
        for s in sessions:
            s.add_frame(frame)
    for c, g in zip(sessions[0].kept_index, sessions[1].kept_index):
        assert torch.equal(c.cpu(), g.cpu())
    answers = [s.ask("what is the color ?", 4) for s in sessions]
    assert answers[0].text == answers[1].text and answers[1].stats.visual_tokens_kept < answers[1].stats.visual_tokens_in
