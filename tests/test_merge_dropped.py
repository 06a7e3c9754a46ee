"""merge_dropped: a selection's dropped tokens averaged into the kept tokens most similar to them."""
import pytest
import torch

from mmaccel import accelerate_vlm
from mmaccel.methods import make_method
from mmaccel.methods.merge_dropped import merge_dropped
from mmaccel.models import get_adapter
from mmaccel.models.base import Part, Segment
from conftest import make_inputs


def test_dropped_tokens_join_their_most_similar_kept_token_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.0, 2.0], [5.0, 5.0], [0.1, 1.0]])
    structural = torch.tensor([False, False, False, False, True, False])
    feats, owner, sizes = merge_dropped(x, torch.tensor([0, 1, 5]), structural)
    # 2 is nearest 0; 3 is parallel to 1 (cosine 1) rather than 5; the newline 4 joins nobody
    assert owner.tolist() == [0, 1, 0, 1, -1, 2] and sizes.tolist() == [2, 2, 1]
    torch.testing.assert_close(feats, torch.stack([x[[0, 2]].mean(0), x[[1, 3]].mean(0), x[5]]))


def test_a_kept_newline_takes_in_nobody_and_nothing_kept_loses_the_rest():
    x = torch.tensor([[1.0, 0.0], [5.0, 5.0], [1.0, 0.2]])
    structural = torch.tensor([False, True, False])
    feats, owner, sizes = merge_dropped(x, torch.tensor([1, 2]), structural)
    assert owner.tolist() == [1, 0, 1] and sizes.tolist() == [1, 2]
    torch.testing.assert_close(feats[0], x[1])
    _, owner, sizes = merge_dropped(x, torch.tensor([1]), structural)  # only the newline kept
    assert owner.tolist() == [-1, 0, -1] and sizes.tolist() == [1]


def test_stc_keeps_its_own_set_and_every_frame_token_lands_in_one_group():
    torch.manual_seed(0)
    frames = [torch.randn(9, 4) for _ in range(3)]
    segments = [Segment(0, torch.arange(9) + 9 * i, Part(9, (3, 3), kind="frame"), index=i) for i in range(3)]
    plain = make_method("stc", retention=1 / 3).reduce_parts(frames, segments, 9)
    merged = make_method("stc", retention=1 / 3, merge_dropped=True).reduce_parts(frames, segments, 9)
    for feats, p, m in zip(frames, plain, merged):
        assert p.features is None and torch.equal(p.keep, m.keep)
        groups = m.group_list()
        assert torch.equal(torch.cat(groups).sort().values, torch.arange(9)) and m.sizes.sum() == 9
        for kept, group, feat in zip(m.keep.tolist(), groups, m.features):
            assert kept in group.tolist()
            torch.testing.assert_close(feat, feats[group].mean(0))


def test_full_retention_is_left_exact():
    frames = [torch.randn(9, 4)]
    segments = [Segment(0, torch.arange(9), Part(9, (3, 3), kind="frame"))]
    red = make_method("stc", retention=1.0, merge_dropped=True).reduce_parts(frames, segments, 9)[0]
    assert red.features is None and red.keep.numel() == 9


def _language_model_input(model, inputs) -> torch.Tensor:
    """The inputs_embeds the language model receives for ``inputs`` (after any splice: this
    hook is registered after mmaccel's, so it runs after it)."""
    seen = []
    hook = get_adapter(model).language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"].detach().clone()), with_kwargs=True)
    try:
        model(**inputs)
    finally:
        hook.remove()
    return seen[0][0]


@pytest.mark.parametrize("fam, method, media", [("llava_onevision", "hired", ("image",)),
                                                ("llava_onevision", "stc", ("video",)),
                                                ("qwen2_vl", "stc", ("video",))])
def test_the_language_model_gets_each_kept_token_as_the_mean_of_its_group(deep_tower_models, fam, method, media):
    """On a real tiny model: the keep set is the method's own, and every kept visual token the
    language model receives is the mean of the full-run embeddings of the tokens it took in."""
    model, proc = deep_tower_models(fam)
    inputs = make_inputs(proc, batch=1, media=media)
    with torch.no_grad():
        full = _language_model_input(model, inputs)
        with accelerate_vlm(model, method=method, retention=0.25) as handle:
            model(**inputs)
            plain_kept = handle.kept_visual_positions()[0]
        with accelerate_vlm(model, method=method, retention=0.25, merge_dropped=True) as handle:
            merged = _language_model_input(model, inputs)
            kept, sources = handle.kept_visual_positions()[0], handle.provenance()[0]
    assert torch.equal(kept, plain_kept) and len(kept) < sum(len(s) for s in sources.values())
    media_ids = [getattr(model.config, n) for n in ("image_token_id", "video_token_id") if hasattr(model.config, n)]
    visual = torch.isin(inputs["input_ids"][0], torch.tensor(media_ids)).nonzero().flatten().tolist()
    dropped = set(visual) - set(kept.tolist())
    packed = [p for p in range(full.shape[0]) if p not in dropped]  # the spliced order
    assert len(packed) == merged.shape[0]
    for p in kept.tolist():
        torch.testing.assert_close(merged[packed.index(p)], full[sources[p]].mean(0), atol=1e-5, rtol=1e-4)
