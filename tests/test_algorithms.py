"""Pure-function tests of the splice, budgets, pooling and query-subset scoring."""
import torch

from mmaccel.methods.simple import Pool, RandomDrop
from mmaccel.models.base import Part, Segment
from mmaccel.runtime import allocate, select_visual
from mmaccel.scoring import query_subset_attention
from mmaccel.tokens.splice import compact_positions, gather_positions, pack_kept


def test_pack_kept_left_pads_in_order():
    keep = torch.tensor([[1, 0, 1, 1, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    index, valid = pack_kept(keep)
    assert index.tolist() == [[0, 2, 3], [0, 0, 1]]
    assert valid.tolist() == [[True, True, True], [False, False, True]]
    assert compact_positions(valid).tolist() == [[0, 1, 2], [0, 0, 0]]
    pos3 = torch.arange(5).repeat(3, 2, 1) * torch.tensor([1, 10, 100])[:, None, None]
    assert gather_positions(pos3, index)[:, 0].tolist() == [[0, 2, 3], [0, 20, 30], [0, 200, 300]]


def test_allocate_sums_and_respects_sizes():
    assert allocate([10, 10, 5], 10) == [4, 4, 2]
    assert sum(allocate([7, 3, 3, 1], 5)) == 5
    assert allocate([2, 2], 10) == [2, 2]
    assert allocate([], 3) == []


def test_select_visual_keeps_text_and_top_visual():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.2, 0.0]])
    valid = torch.tensor([[False, True, True, True, True, True]])
    visual = torch.tensor([[False, False, True, True, True, False]])
    keep = select_visual(scores, valid, visual, [2])
    assert keep.tolist() == [[False, True, True, True, False, True]]


def test_select_visual_per_row_budgets_short_rows_and_ties():
    # row 0: budget 1 of three candidates; row 1: budget 3 but only two candidates (padding and
    # text are never filled in); row 2: four tied protected (+inf) tokens, budget 2 -> the
    # earliest two, on every device
    inf = float("inf")
    scores = torch.tensor([[0.0, 0.2, 0.9, 0.4, 0.0, 0.0],
                           [0.0, 0.0, 0.7, 0.8, 0.5, 0.0],
                           [0.0, inf, 0.1, inf, inf, inf]])
    valid = torch.tensor([[True] * 6, [False, False, True, True, True, True], [True] * 6])
    visual = torch.tensor([[False, True, True, True, False, False],
                           [True, False, True, False, True, False],
                           [False, True, True, True, True, True]])
    keep = select_visual(scores, valid, visual, [1, 3, 2])
    assert keep.int().tolist() == [[1, 0, 1, 0, 1, 1], [0, 0, 1, 1, 1, 1], [1, 1, 0, 1, 0, 0]]


def test_pack_kept_with_a_given_length_matches():
    keep = torch.rand(4, 30, generator=torch.Generator().manual_seed(0)) > 0.6
    index, valid = pack_kept(keep)
    again = pack_kept(keep, int(keep.sum(1).max()))
    assert torch.equal(index, again[0]) and torch.equal(valid, again[1])
    for row in range(4):  # each row: its kept positions in order, right-aligned
        assert index[row][valid[row]].tolist() == keep[row].nonzero().flatten().tolist()
        assert valid[row].tolist() == sorted(valid[row].tolist())


def test_pool_averages_windows_and_places_them_at_window_starts():
    feats = torch.arange(16, dtype=torch.float32).reshape(16, 1)
    seg = Segment(0, torch.arange(100, 116), Part(16, (4, 4)))
    red = Pool(retention=0.25).reduce(feats, seg, 4)
    assert red.keep.tolist() == [0, 2, 8, 10]
    assert red.features.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]


def test_pool_keeps_one_newline_per_pooled_row():
    h, w = 4, 2
    feats = torch.arange(h * (w + 1), dtype=torch.float32).reshape(-1, 1)
    seg = Segment(0, torch.arange(h * (w + 1)), Part(h * (w + 1), (h, w), newline=True))
    red = Pool(retention=0.25).reduce(feats, seg, 3)
    assert red.keep.tolist() == [0, 5, 6, 11]  # pooled token, newline of row 1, pooled token, newline of row 3
    assert red.features.flatten().tolist()[1] == 5.0


def test_random_is_reproducible_per_media_part():
    seg = Segment(0, torch.arange(50), Part(50), media=1, index=2)
    other = Segment(3, torch.arange(200, 250), Part(50), media=1, index=2)
    a = RandomDrop(retention=0.2).reduce(torch.zeros(50, 2), seg, 10).keep
    b = RandomDrop(retention=0.2).reduce(torch.zeros(50, 2), other, 10).keep
    assert torch.equal(a, b) and a.numel() == 10 and torch.all(a.diff() > 0)


def test_query_subset_attention_matches_full_softmax():
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 9, 8)
    rows = torch.tensor([[8, 3], [8, 0]])
    kk = k.repeat_interleave(2, dim=1)
    full = (q @ kk.transpose(-1, -2)) * 0.3
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    ref = torch.softmax(full.masked_fill(~causal, float("-inf")), -1)
    got = query_subset_attention(q, k, rows, None, 0.3)
    for b in range(2):
        torch.testing.assert_close(got[b], ref[b][:, rows[b]])
    pad = causal[None, None].repeat(2, 1, 1, 1)
    pad[1, :, :, :2] = False  # sample 1 has two padding keys
    ref_pad = torch.softmax(full.masked_fill(~pad, float("-inf")), -1)
    got_pad = query_subset_attention(q, k, rows[:, :1], pad, 0.3)
    torch.testing.assert_close(got_pad[1, :, 0], ref_pad[1, :, 8])


def test_text_query_rows_pick_text_after_the_media():
    from mmaccel.runtime import text_query_rows

    valid = torch.tensor([[True, True, True, True, True, True], [False, False, True, True, True, True]])
    visual = torch.tensor([[False, True, True, False, False, False], [False, False, False, True, False, False]])
    rows, row_valid = text_query_rows(valid, visual)
    assert rows.tolist() == [[3, 4, 5], [4, 5, 5]]
    assert row_valid.tolist() == [[True, True, True], [True, True, False]]
