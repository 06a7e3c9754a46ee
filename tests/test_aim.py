"""AIM: merging and PageRank importance on hand-checkable inputs, official schedule."""
import pytest
import torch

from mmaccel.methods.aim import AIM, aim_schedule, bipartite_merge, merge_to_budget, pagerank_importance
from mmaccel.methods.base import members_by_slot
from mmaccel.methods.fastv import FastV
from mmaccel.models.base import Part, Segment


def test_identical_tokens_merge_and_distinct_ones_stay():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    keep, feats, owner = bipartite_merge(x, 1)
    # A = {0, 2}, B = {1, 3}: token 0 is identical to token 1, so it is the one merged
    assert keep.tolist() == [1, 2, 3] and owner.tolist() == [0, 0, 1, 2]
    assert torch.equal(feats[0], x[1]) and [g.tolist() for g in members_by_slot(owner, 3)] == [[0, 1], [2], [3]]


def test_merge_is_an_unweighted_mean_including_the_destination():
    x = torch.tensor([[2.0, 1.0], [4.0, 2.0], [6.0, 3.0], [0.0, -5.0]])
    keep, feats, owner = bipartite_merge(x, 2)  # both A tokens (0, 2) go to B token 1
    assert keep.tolist() == [1, 3] and owner.tolist() == [0, 0, 0, 1]
    torch.testing.assert_close(feats[0], torch.tensor([4.0, 2.0]))  # mean of 2,4,6
    assert members_by_slot(owner, 2)[0].tolist() == [0, 1, 2]


def test_a_second_pass_carries_the_first_passes_sources():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    keep, feats, owner = bipartite_merge(x, 2)  # 0 -> 1 and 2 -> 3: slots 1, 3, 4, 5 remain
    assert keep.tolist() == [1, 3, 4, 5] and owner.tolist() == [0, 0, 1, 1, 2, 3]
    # pass 2 over [1,0], [0,1], [1,1], [-1,0]: A = {0, 2}, B = {1, 3}; [1,1] is nearest [0,1]
    # (cosine 0.71; [1,0] is at best 0 from B), so slot 2 (token 4) joins slot 1 (tokens 2, 3)
    keep2, _, owner2 = bipartite_merge(feats, 1, owner)
    assert keep2.tolist() == [0, 1, 3] and owner2.tolist() == [0, 0, 1, 1, 1, 2]
    assert [g.tolist() for g in members_by_slot(owner2, 3)] == [[0, 1], [2, 3, 4], [5]]


def test_official_two_passes_keep_a_quarter_and_cover_everything():
    torch.manual_seed(0)
    x = torch.randn(196, 8)
    slots, feats, groups, sizes = merge_to_budget(x, 49)
    assert feats.shape == (49, 8) and slots.numel() == 49 and torch.all(slots.diff() > 0)
    covered = torch.cat(groups).sort().values
    assert torch.equal(covered, torch.arange(196))
    for slot, group in zip(slots.tolist(), groups):  # each kept token sits at one of its own sources
        assert slot in group.tolist()
    assert sizes.tolist() == [g.numel() for g in groups]


def test_schedule_matches_the_official_28_layer_rates():
    """Official: rate[l] = 1 - (l - 13) * 0.125 from l = 14, applied after layer l (so from l + 1)."""
    rates = dict(aim_schedule(28))
    assert min(rates) == 15 and rates[15] == pytest.approx(0.875) and rates[18] == pytest.approx(0.5)
    assert rates[21] == pytest.approx(0.125) and rates[22] == 0.0 and rates[27] == 0.0
    assert AIM().tap_layer(15) == 14  # the cut after layer 14 is ranked by layer 14's own attention


def test_schedule_matches_the_official_32_layer_rates():
    """Official LLaVA-1.5 variant (LLaVA-PruMerge/modeling_llama.py): rate[l] = 1 - (l - 12) * 0.125
    from l = 13, applied after layer l; not the 28-layer schedule scaled (first cut at 17)."""
    official = [max(0.0, 1.0 - (l - 12) * 0.125) if l >= 13 else 1.0 for l in range(32)]
    expected = [(l + 1, official[l]) for l in range(32 - 1) if l >= 13]
    assert aim_schedule(32) == [(layer, pytest.approx(rate)) for layer, rate in expected]
    rates = dict(aim_schedule(32))
    assert min(rates) == 14 and rates[21] == 0.0 and rates[20] == pytest.approx(0.125)
    # other knobs or depths: the 28-layer shape scaled
    assert min(dict(aim_schedule(32, 0.5, 0.76))) == 17 and min(dict(aim_schedule(30))) == 16


def test_four_layer_schedule_halves_the_last_layer_and_empties_none():
    assert aim_schedule(4) == [(3, 0.5)]
    assert aim_schedule(8) == [(5, pytest.approx(2 / 3)), (6, pytest.approx(1 / 3)), (7, 0.0)]
    assert aim_schedule(4, 0.5, 1.0) == [(3, pytest.approx(2 / 3))] and aim_schedule(1) == []


def test_pagerank_prefers_the_token_the_text_attends_to():
    probs = torch.full((1, 2, 2, 6), 0.02)
    probs[..., 4] = 0.02
    probs[0, :, :, 1] = 0.6  # both text queries look at visual token 1
    probs = probs / probs.sum(-1, keepdim=True)
    rows, valid = torch.tensor([[4, 5]]), torch.tensor([[True, True]])
    imp = pagerank_importance(probs, rows, valid)
    assert imp.shape == (1, 6) and imp[0].argmax() == 1


def test_aim_reduce_keeps_newlines_and_budget():
    feats = torch.randn(4 * 5, 3)
    seg = Segment(0, torch.arange(20), Part(20, (4, 4), newline=True))
    red = AIM().reduce(feats, seg, 8)
    is_newline = seg.token_kinds()
    assert red.keep.numel() == 8 and set(is_newline.nonzero().flatten().tolist()) <= set(red.keep.tolist())
    assert torch.all(red.keep.diff() > 0)


def test_aim_retention_one_disables_every_stage():
    assert AIM(retention=1.0).schedule(28) == [] and AIM().schedule(28)
    with pytest.raises(ValueError, match="prune_start"):
        AIM(prune_start=0.9, prune_end=0.5)


def test_gentle_passes_leave_a_lone_distinct_token_unmerged():
    """Eight tokens, one distinct (slot 0, an A slot) among seven identical ones, merged to 4.
    The official first pass (r = n/2) must merge every A token, the distinct one too; passes of
    at most a quarter merge identical pairs first, so the distinct token survives unaveraged."""
    x = torch.zeros(8, 2)
    x[:, 1] = 1.0
    x[0] = torch.tensor([1.0, 0.0])
    _, official, groups, _ = merge_to_budget(x, 4)
    assert not any(torch.equal(f, x[0]) for f in official) and not any(g.tolist() == [0] for g in groups)
    slots, gentle, groups, _ = merge_to_budget(x, 4, pass_fraction=0.25)
    assert gentle.shape == (4, 2) and slots[0] == 0 and torch.equal(gentle[0], x[0])
    assert groups[0].tolist() == [0] and torch.equal(torch.cat(groups).sort().values, torch.arange(8))


def test_presets_name_the_paper_setting_and_the_merge_alone():
    """aim-7x pins the official two passes and the in-LLM schedule; aim-merge-25 (for shallow
    language models) merges in gentle passes and never cuts inside the LLM."""
    from mmaccel.config import AccelConfig

    paper, merge = AccelConfig.load("aim-7x").build_method(), AccelConfig.load("aim-merge-25").build_method()
    # pinned in the file, so the preset stays the paper's whatever aim's own default becomes
    assert AccelConfig.load("aim-7x").params["pass_fraction"] == 0.5
    assert paper.pass_fraction == 0.5 and paper.schedule(28)[0] == (15, 0.875)
    assert merge.pass_fraction == 0.25 and merge.schedule(4) == [] and merge.schedule(28) == []
    assert paper.keep_fraction() == merge.keep_fraction() == 0.25


def test_pass_fraction_out_of_range_is_refused():
    with pytest.raises(ValueError, match="pass_fraction"):
        AIM(pass_fraction=0.6)
    with pytest.raises(ValueError, match="pass_fraction"):
        AIM(pass_fraction=0.0)


def test_in_llm_budget_rounds_down_as_the_official_keep_num():
    """Official: keep_inds = inds[:, :int(keep_num)], keep_num = (N - protected) * rate + protected,
    so a 49-token frame at rate 7/8 keeps 42 visual tokens (round would give 43)."""
    aim = AIM()
    assert aim.layer_budget(49, 0.875) == 42 and aim.layer_budget(10, 0.3) == 3 and aim.layer_budget(7, 0.0) == 0
    assert FastV().layer_budget(49, 0.875) == 43  # other pruners keep the nearest count
