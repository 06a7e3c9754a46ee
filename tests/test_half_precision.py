"""Every method on half-precision models: bf16 on the CPU (the dtype users run real checkpoints
in), with towers deep enough that in-tower merging (tome, mustdrop) really acts."""
import pytest
import torch

from mmaccel import accelerate_vlm, list_methods
from mmaccel.models import get_adapter
from mmaccel.testing.tiny import build
from conftest import VIDEO_FAMILIES, make_inputs

FAMILIES = ("llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl")  # llava: llava_next's tower and decoder


@pytest.fixture(scope="module", params=FAMILIES)
def bf16_model(request):
    model, proc = build(request.param, seed=3, vision_layers=5)
    return request.param, model.to(torch.bfloat16), proc


def _bf16_inputs(proc, media):
    inputs = make_inputs(proc, batch=2, media=media)
    return {k: v.to(torch.bfloat16) if torch.is_floating_point(v) else v for k, v in inputs.items()}


def _dtypes_seen(layers) -> tuple[set, list]:
    """Record the dtype of the hidden states entering every block of ``layers``."""
    seen = set()
    def probe(module, args, kwargs):
        seen.add((args[0] if args else kwargs["hidden_states"]).dtype)
    return seen, [layer.register_forward_pre_hook(probe, with_kwargs=True) for layer in layers]


@pytest.mark.parametrize("method", [m for m in list_methods() if m != "none"])
def test_every_method_runs_in_bf16_and_stays_bf16(bf16_model, method):
    family, model, proc = bf16_model
    adapter = get_adapter(model)
    for media in (("image",), ("video",)) if family in VIDEO_FAMILIES else (("image",),):
        inputs = _bf16_inputs(proc, media)
        seen, probes = _dtypes_seen(list(adapter.vision_layers) + list(adapter.layers))
        try:
            with torch.no_grad(), accelerate_vlm(model, method=method, retention=0.25) as handle:
                out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
                stats = handle.stats
        finally:
            for p in probes:
                p.remove()
        assert out.shape == (2, inputs["input_ids"].shape[1] + 2)
        assert seen == {torch.bfloat16}, (media, seen)  # nothing upcast into the model's blocks
        assert stats.visual_tokens_kept < stats.visual_tokens_in, media
