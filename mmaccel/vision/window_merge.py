"""MustDrop's local spatial merge after ViT layer 0: every non-overlapping 3x3 window of patch
tokens whose mean pairwise cosine similarity (self excluded) reaches the threshold (official
0.8) collapses into one token, the plain mean of its nine. Each image merges its own windows:
rows of a batch get different lengths, padded and masked out of attention, so an image gets the
same result alone or in a batch (the official code merges ``min`` over the batch). Tokens stay in
spatial order, the merged token at its window's first cell (the official order puts merged
windows first). With ``proportional`` the attention bias carries log(size) for every token (ToMe's
proportional attention): a merged window attends and is attended as its nine copies would be.
The official code does not propagate sizes, so later blocks weigh a merged window as one token."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def window_similarity(x: torch.Tensor, side: int, window: int = 3, cols: int | None = None) -> torch.Tensor:
    """x: (N, D) patch tokens of a side x side grid (side x cols when ``cols`` is given) ->
    (side//w, cols//w) mean pairwise cosine similarity inside each window, the diagonal excluded.
    Cells beyond the last whole window are left alone."""
    cols = cols or side
    n_r, n_c = side // window, cols // window
    g = F.normalize(x.float(), dim=-1).view(side, cols, -1)[: n_r * window, : n_c * window]
    tiles = g.reshape(n_r, window, n_c, window, -1).permute(0, 2, 1, 3, 4).reshape(n_r, n_c, window * window, -1)
    sim = tiles @ tiles.transpose(-1, -2)
    k = window * window
    return (sim.sum((-1, -2)) - sim.diagonal(dim1=-2, dim2=-1).sum(-1)) / (k * (k - 1))


def window_groups(x: torch.Tensor, side: int, threshold: float, window: int = 3, cols: int | None = None) -> torch.Tensor:
    """(N,) group id per patch (its window's first cell when merged, else itself)."""
    cols = cols or side
    groups = torch.arange(side * cols, device=x.device)
    if side < window or cols < window:
        return groups  # no whole window fits
    sim = window_similarity(x, side, window, cols)
    for wi, wj in (sim >= threshold).nonzero().tolist():
        rows = torch.arange(wi * window, wi * window + window, device=x.device)
        cells = (rows[:, None] * cols + torch.arange(wj * window, wj * window + window, device=x.device)[None])
        cells = cells.flatten()
        groups[cells] = cells[0]
    return groups


def merge_rows(x: torch.Tensor, cls: bool, threshold: float, window: int = 3, proportional: bool = False):
    """x: (B, N0, D) after ViT layer 0. Returns (merged (B, L, D) padded, assign (B, N0) slot of
    every original token, bias (B, 1, 1, L): -inf on padding, log(tokens merged) on the real
    slots with ``proportional``, else 0)."""
    offset, dev = int(cls), x.device
    side = math.isqrt(x.shape[1] - offset)
    rows, assigns, sizes = [], [], []
    for b in range(x.shape[0]):
        groups = window_groups(x[b, offset:], side, threshold, window) + offset
        groups = torch.cat([torch.arange(offset, device=dev), groups])
        reps, slot = groups.unique(return_inverse=True)  # reps sorted: spatial order kept
        size = torch.bincount(slot, minlength=reps.numel())
        merged = torch.zeros(reps.numel(), x.shape[-1], dtype=x.dtype, device=dev).index_add_(0, slot, x[b])
        rows.append(merged / size[:, None].to(x.dtype))
        assigns.append(slot)
        sizes.append(size)
    length = max(r.shape[0] for r in rows)
    out = torch.zeros(x.shape[0], length, x.shape[-1], dtype=x.dtype, device=dev)
    bias = torch.zeros(x.shape[0], 1, 1, length, device=dev)
    for b, r in enumerate(rows):
        out[b, : r.shape[0]] = r
        bias[b, ..., r.shape[0]:] = float("-inf")
        if proportional:
            bias[b, 0, 0, : r.shape[0]] = sizes[b].float().log()
    return out, torch.stack(assigns), bias
