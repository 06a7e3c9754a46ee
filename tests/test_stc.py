"""STC-Pruner: novelty scoring on hand-checkable frames, per-frame budgets in a real video run."""
import pytest
import torch

from mmaccel import accelerate_vlm
from mmaccel.methods.stc import STCPruner, gaussian_similarity, stc_scores
from mmaccel.models.base import Part, Segment
from conftest import make_inputs


def test_gaussian_similarity_peaks_at_the_centre():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    s = gaussian_similarity(x, torch.zeros(2))
    assert s[0] == 5.0 and s[0] > s[1] > s[2]


def test_the_odd_token_out_scores_lowest():
    torch.manual_seed(0)
    frame = torch.ones(6, 8)
    frame[:, 4:] = 10 * torch.randn(6, 4)  # high-variance channels are ignored by STC
    frame[3, 0] = -1.0  # the novel token, in a low-variance channel
    memory = []
    scores, anchor = stc_scores(frame, memory)
    assert scores.argmin() == 3 and len(memory) == 1


def test_pruner_keeps_budget_per_frame_and_the_newline():
    torch.manual_seed(0)
    segs = [Segment(0, torch.arange(i * 4, i * 4 + 4), Part(4, (2, 2), kind="video"), 0, i) for i in range(3)]
    segs.append(Segment(0, torch.tensor([12]), Part(1, None, newline=True, kind="video"), 0, 3))
    feats = [torch.randn(s.n, 8) for s in segs]
    reds = STCPruner(retention=0.5).reduce_media(feats, segs, 7)
    assert [r.keep.numel() for r in reds] == [2, 2, 2, 1]
    assert reds[-1].keep.tolist() == [0]


def test_stc_on_a_video_model(tiny_models):
    model, proc = tiny_models("llava_onevision")
    inputs = make_inputs(proc, batch=2, media=("video",))
    with accelerate_vlm(model, method="stc") as handle, torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        stats = handle.stats
        kept = sum(len(p) for p in handle.provenance())
    assert stats.visual_tokens_kept < stats.visual_tokens_in
    assert stats.visual_tokens_kept == kept


def test_temporal_anchor_is_the_normalised_mean_of_raw_frame_means():
    """Official prune.py: memory holds each frame's raw channel-selected mean; the anchor is their
    mean, L2-normalised (a unit vector however many frames have passed)."""
    import torch.nn.functional as F

    from mmaccel.methods.stc import gaussian_similarity, stc_scores

    torch.manual_seed(0)
    frames = [torch.randn(12, 8) * (1 + i) + i for i in range(5)]
    memory, raw_means = [], []
    for f in frames:
        scores, _ = stc_scores(f, memory)
        low = f.var(0).argsort()[:4]
        raw_means.append(f[:, low].mean(0))
        x = F.normalize(f[:, low], dim=-1)
        temporal = F.normalize(torch.stack(raw_means).mean(0), dim=-1)
        expected = gaussian_similarity(x, x.mean(0)) + gaussian_similarity(x, temporal)
        assert torch.allclose(scores, expected, atol=1e-6)
    assert len(memory) == len(frames)


@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl"])
def test_stc_cacher_leaves_images_alone(deep_tower_models, family):
    """``cacher=True`` swaps the tower's block forwards, but only a video's feature call goes
    through the cache: an image batch's logits are bit for bit those of plain stc; and at
    retention 1.0 a video's are the untouched model's."""
    from mmaccel import accelerate_vlm
    from conftest import make_inputs

    model, proc = deep_tower_models(family)
    inputs = make_inputs(proc, batch=2)
    with torch.no_grad():
        with accelerate_vlm(model, method="stc", retention=0.5):
            plain = model(**inputs).logits
        with accelerate_vlm(model, method="stc", retention=0.5, cacher=True):
            cached = model(**inputs).logits
    assert torch.equal(plain, cached)
    video_inputs = make_inputs(proc, media=("video",)) if family in ("llava_onevision", "qwen2_vl", "qwen2_5_vl") else inputs
    with torch.no_grad():
        untouched = model(**video_inputs).logits
        with accelerate_vlm(model, method="stc", retention=1.0, cacher=True):
            assert torch.equal(model(**video_inputs).logits, untouched)  # retention 1.0: no stage acts
    from mmaccel.models import get_adapter

    assert all("forward" not in vars(block) for block in get_adapter(model).vision_layers)  # put back
