"""HiRED and VisionZip: hand-checkable pieces and agreement with eager ViT attention."""
import pytest
import torch

from mmaccel import accelerate_vlm
from mmaccel.methods.hired import _proportional, count_in_boxes, crop_boxes
from mmaccel.methods.visionzip import dominant_contextual
from mmaccel.models import get_adapter
from conftest import make_inputs
from test_vision_taps import eager_attentions


def test_dominant_contextual_by_hand():
    feats = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [5.0, 5.0], [0.2, 0.8]])
    scores = torch.tensor([0.1, 0.2, 0.3, 0.1, 0.9, float("-inf")])
    keep, out, groups = dominant_contextual(feats, scores, 1, 2)
    # dominant: token 4; token 5 is structural (-inf: a row newline) and joins no group;
    # rest [0,1,2,3] -> targets at stride 2: tokens 0 and 2
    assert keep.tolist() == [0, 2, 4]
    assert [g.tolist() for g in groups] == [[0, 1], [2, 3], [4]]
    torch.testing.assert_close(out[0], feats[[0, 1]].mean(0))
    torch.testing.assert_close(out[1], feats[[2, 3]].mean(0))


def test_dominant_slots_nobody_can_fill_go_to_context():
    """A segment holding only a newline token (score -inf): at full budget it is kept, not lost
    (LLaVA-OneVision gives each image of a multi-image prompt, and each video, one)."""
    keep, out, groups = dominant_contextual(torch.ones(1, 2), torch.tensor([float("-inf")]), 1, 0)
    assert keep.tolist() == [0] and [g.tolist() for g in groups] == [[0]]
    # three tokens, one finite: 2 dominant asked, 1 possible; the other slot becomes contextual
    keep, _, _ = dominant_contextual(torch.eye(3), torch.tensor([0.5, float("-inf"), float("-inf")]), 2, 0)
    assert keep.tolist() == [0, 1]


def test_crop_boxes_and_counts():
    # a 2x4 crop raster (+ newline column) made of two crops side by side
    tile = torch.tensor([1, 1, 2, 2, float("nan"), 1, 1, 2, 2, float("nan")])[:, None]
    boxes = crop_boxes(tile, (2, 4))
    assert boxes == {1: (0.0, 1.0, 0.0, 0.5), 2: (0.0, 1.0, 0.5, 1.0)}
    selected = torch.tensor([0, 1, 2, 5, 9, 15])  # 4x4 base grid: columns 0,1,2,1,1,3
    assert count_in_boxes(selected, 4, boxes) == {1: 4, 2: 2}


def test_proportional_budgets_add_up_under_caps():
    assert _proportional([3, 1], [10, 10], 8) == [6, 2]
    assert _proportional([3, 1], [2, 10], 8) == [2, 6]
    assert sum(_proportional([0, 0], [3, 5], 4)) == 4 and _proportional([5, 5], [1, 1], 9) == [1, 1]


def test_hired_on_llava_keeps_the_eager_top_cls_tokens(tiny_models):
    model, proc = tiny_models("llava")
    inputs = make_inputs(proc)
    adapter = get_adapter(model)
    attn = eager_attentions(adapter.vision_tower, inputs["pixel_values"])
    # vision_feature_layer=-2 -> the features come out of block n-2, whose attention ranks the tokens
    cls = attn[len(attn) - 2][0, :, 0, 1:].sum(0)
    k = round(0.25 * cls.numel())
    image_pos = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    expected = image_pos[cls.topk(k).indices].sort().values
    with accelerate_vlm(model, method="hired", retention=0.25) as handle, torch.no_grad():
        model(**inputs)
        kept = handle.kept_visual_positions()[0]
    assert torch.equal(kept, expected)


def test_hired_anyres_budget_split(tiny_models):
    model, proc = tiny_models("llava_next")
    inputs = make_inputs(proc)
    n_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    with accelerate_vlm(model, method="hired", retention=0.4, alpha=0.5) as handle, torch.no_grad():
        model(**inputs)
        kept = handle.kept_visual_positions()[0]
    budget = round(0.4 * n_visual)
    image_pos = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    base = image_pos[:16]  # the 4x4 base image comes first
    assert kept.numel() == budget
    assert int(torch.isin(kept, base).sum()) == min(int(budget * 0.5), 16)


@pytest.mark.parametrize("method", ["hired", "visionzip"])
def test_vision_methods_restore_the_tower(tiny_models, family, method):
    model, proc = tiny_models(family)
    inputs = make_inputs(proc, batch=2)
    with torch.no_grad():
        before = model(**inputs).logits[:, -1]
    vision_cfg = get_adapter(model).attention_of(get_adapter(model).vision_layers[0]).config
    with accelerate_vlm(model, method=method, retention=0.25) as handle, torch.no_grad():
        assert vision_cfg._attn_implementation.startswith("mmaccel_")
        model(**inputs)
        assert 0 < handle.stats.visual_tokens_kept < handle.stats.visual_tokens_in
    assert vision_cfg._attn_implementation == "sdpa" and "pack_image_features" not in vars(model.model)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits[:, -1], before)


def test_hired_crops_stay_whole_when_onevision_resizes_the_raster():
    """anyres_max_1 makes LLaVA-OneVision shrink the crop raster bilinearly: each crop must still
    be one block of the packed raster (averaged tile indices used to put crop 2 between 1 and 3)."""
    import mmaccel.methods.hired as hired
    from mmaccel.testing.tiny import build

    model, proc = build("llava_onevision")
    model.config.vision_aspect_ratio = proc.vision_aspect_ratio = "anyres_max_1"
    inputs = make_inputs(proc)
    seen = []
    spy = lambda tile, grid: seen.append(crop_boxes(tile, grid)) or seen[-1]  # noqa: E731
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hired, "crop_boxes", spy)
        with accelerate_vlm(model, method="hired", retention=0.25), torch.no_grad():
            model(**inputs)
    boxes = list(seen[0].values())
    assert len(boxes) == 4  # a 2x2 crop grid
    for i, (t, b, l, r) in enumerate(boxes):
        for t2, b2, l2, r2 in boxes[i + 1:]:
            assert min(b, b2) <= max(t, t2) or min(r, r2) <= max(l, l2)  # no two crops overlap
    assert sum((b - t) * (r - l) for t, b, l, r in boxes) == pytest.approx(1.0)


@pytest.mark.parametrize("fam", ["llava", "llava_next", "llava_onevision"])
def test_visionzip_merges_feature_layer_states_by_keys_before_the_projector(tiny_models, fam):
    """On CLIP/SigLIP towers the contextual groups follow the feature layer's head-mean keys and
    each contextual token is the projector applied to its group's mean hidden state, as in the
    official code. The recorded states line up with the tokens: projected, they are the
    model's own features."""
    import torch.nn.functional as F

    from mmaccel.methods.visionzip import VisionZip

    model, proc = tiny_models(fam)
    seen = []
    original = VisionZip.reduce

    def spy(self, features, segment, budget):
        out = original(self, features, segment, budget)
        seen.append((features, segment.scores, out))
        return out

    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(VisionZip, "reduce", spy)
        with accelerate_vlm(model, method="visionzip", retention=0.5):
            model(**make_inputs(proc, batch=2))
        projector = model.model.multi_modal_projector
        contextual = 0
        for features, maps, red in seen:
            image = ~maps["zip_hidden"].isnan().any(-1)  # newline tokens carry NaN maps
            torch.testing.assert_close(projector(maps["zip_hidden"][image]), features[image], atol=1e-5, rtol=1e-5)
            keys = F.normalize(maps["zip_key"].float(), dim=-1)
            for slot, feat, group in zip(red.keep.tolist(), red.features, red.group_list()):
                if group.numel() == 1 and group[0] == slot:
                    continue  # a dominant token: the model's own feature
                contextual += 1
                torch.testing.assert_close(feat, projector(maps["zip_hidden"][group].mean(0)), atol=1e-5, rtol=1e-5)
                targets = [s for s, g in zip(red.keep.tolist(), red.group_list()) if g.numel() > 1 or g[0] != s]
                best = (keys[group] @ keys[targets].T).argmax(-1)
                assert all(targets[b] == slot for b in best.tolist())  # each member's most similar target
        assert contextual > 0
