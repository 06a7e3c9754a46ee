"""Vision-stage taps equal the eager attention matrix's CLS row / column means, under SDPA."""
import pytest
import torch

from mmaccel.models import get_adapter
from mmaccel.vision.taps import VisionTap
from conftest import make_inputs


def eager_attentions(tower, pixel_values):
    tower.config._attn_implementation_internal, saved = "eager", tower.config._attn_implementation_internal
    try:
        with torch.no_grad():
            return tower(pixel_values, output_attentions=True).attentions
    finally:
        tower.config._attn_implementation_internal = saved


@pytest.mark.parametrize("fam, mode", [("llava", "cls"), ("llava_onevision", "mean_received")])
def test_tap_matches_eager(tiny_models, fam, mode):
    model, proc = tiny_models(fam)
    adapter = get_adapter(model)
    pixels = make_inputs(proc)["pixel_values"]
    pixels = pixels.flatten(0, 1) if pixels.dim() == 5 else pixels
    tower = adapter.vision_tower
    reference = eager_attentions(tower, pixels)
    with VisionTap(adapter, [0, 1], mode="auto") as tap, torch.no_grad():
        assert tap.mode == mode and tower.config._attn_implementation == "mmaccel_sdpa"
        tower(pixels)
        scores = tap.scores
    assert tower.config._attn_implementation == "sdpa"
    for layer in (0, 1):
        (got,) = scores[layer]
        ref = reference[layer][:, :, 0:1] if mode == "cls" else reference[layer].mean(2)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_tap_on_qwen_vision_chunks(tiny_models):
    model, proc = tiny_models("qwen2_vl")
    adapter = get_adapter(model)
    inputs = make_inputs(proc, batch=2)
    with VisionTap(adapter, [-1]) as tap, torch.no_grad():
        model(**inputs)
        chunks = tap.scores[1]
    sizes = inputs["image_grid_thw"].prod(-1).tolist()
    assert [c.shape[-1] for c in chunks] == sizes  # one block-diagonal chunk per image
    for c in chunks:  # each entry is a mean of probability rows: sums to 1 per head
        torch.testing.assert_close(c.sum(-1), torch.ones_like(c.sum(-1)))


def test_tap_argument_errors(tiny_models):
    model, _ = tiny_models("llava_onevision")
    adapter = get_adapter(model)
    with pytest.raises(ValueError, match="no CLS token"):
        VisionTap(adapter, [0], mode="cls")
    with pytest.raises(ValueError, match="layers must be in"):
        VisionTap(adapter, [7])
