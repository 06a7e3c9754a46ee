"""ToMe inside the vision tower: matching and merging by hand, shorter ViT, one token per group."""
import pytest
import torch

from mmaccel import accelerate_vlm
from mmaccel.methods.tome import _representatives, tome_match, tome_merge
from mmaccel.models import get_adapter
from mmaccel.testing import tiny
from conftest import make_inputs


def test_match_merges_identical_tokens_and_protects_cls():
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.3]]])
    src, dst = tome_match(metric, 1, protect_first=True)
    # slot 0 (CLS) is identical to slot 1 but protected; slot 2 is identical to slot 3
    assert src.tolist() == [[2]] and dst.tolist() == [[3]]


def test_merge_is_size_weighted_and_tracks_sources():
    x = torch.tensor([[[0.0], [2.0], [4.0], [10.0]]])
    size = torch.tensor([[1.0, 1.0, 3.0, 1.0]])
    assign = torch.arange(4)[None]
    out, size2, assign2 = tome_merge(x, size, assign, torch.tensor([[2]]), torch.tensor([[3]]))
    assert out.flatten().tolist() == [0.0, 2.0, (3 * 4.0 + 10.0) / 4] and size2.tolist() == [[1.0, 1.0, 4.0]]
    assert assign2.tolist() == [[0, 1, 2, 2]] and _representatives(assign2).tolist() == [[0, 1, 2, 2]]


@pytest.fixture(scope="module")
def deep_tower_llava():
    saved = tiny._clip_vision
    tiny._clip_vision = lambda **k: saved(layers=5)
    try:
        return tiny.build("llava_next", seed=5)
    finally:
        tiny._clip_vision = saved


def test_tower_runs_shorter_and_each_group_keeps_one_token(deep_tower_llava):
    model, proc = deep_tower_llava
    inputs = make_inputs(proc, batch=2)
    adapter = get_adapter(model)
    seen = []
    probe = adapter.vision_layers[2].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    try:
        with torch.no_grad():
            model(**inputs)
            with accelerate_vlm(model, method="tome", retention=0.5) as handle:
                model(**inputs)
                provenance = handle.provenance()
                stats = handle.stats
    finally:
        probe.remove()
    assert seen[1] < seen[0]  # the ViT block after a merge sees fewer tokens
    assert stats.visual_tokens_kept < stats.visual_tokens_in
    image_id = model.config.image_token_id
    for b, groups in enumerate(provenance):
        sources = torch.cat(list(groups.values()))
        assert sources.unique().numel() == sources.numel()  # groups do not overlap
        assert torch.all(inputs["input_ids"][b, sources] == image_id)
    assert "_mmaccel_bias" not in vars(adapter.attention_of(adapter.vision_layers[1]))


def test_tome_refuses_qwen(tiny_models):
    model, _ = tiny_models("qwen2_vl")
    with pytest.raises(ValueError, match="CLIP/SigLIP"):
        accelerate_vlm(model, method="tome")
