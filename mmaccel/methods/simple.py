"""Baselines: ``none``, ``random`` and ``pool`` (spatial average pooling to the budget)."""
from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.base import Segment
from .base import Method, PreLLMReducer, Reduction


@dataclass
class NoneMethod(Method):
    """No reduction: the model runs untouched (stats are still recorded)."""

    name = "none"
    description = "no reduction; measure the unaccelerated model"


@dataclass
class RandomDrop(PreLLMReducer):
    """Keep a uniformly random subset of each image/crop/frame, seeded per (seed, media, part)
    so a sample keeps the same tokens alone and in a batch."""

    name = "random"
    description = "keep a random subset of visual tokens per image/frame (pre-LLM)"
    retention: float | None = 0.5
    seed: int = 0

    def reduce(self, features, segment: Segment, budget: int) -> Reduction:
        key = zlib.crc32(f"{self.seed}:{segment.media}:{segment.index}:{segment.n}".encode())
        gen = torch.Generator().manual_seed(key)
        keep = torch.randperm(segment.n, generator=gen)[:budget].sort().values
        return Reduction(keep.to(features.device))


def _window_edges(size: int, out: int) -> list[tuple[int, int]]:
    """Adaptive-pooling windows [start, end) of ``size`` into ``out`` bins (torch's convention)."""
    return [((i * size) // out, math.ceil((i + 1) * size / out)) for i in range(out)]


@dataclass
class Pool(PreLLMReducer):
    """Spatial average pooling of each grid to about ``retention`` of its tokens.

    The grid (h, w) is pooled adaptively to (round(h*sqrt(r)), round(w*sqrt(r))); each pooled
    token sits at the sequence slot of its window's first token, and for any-resolution crops
    the newline token of each pooled row's last source row is kept. Segments without a grid
    are pooled along the sequence. ``proportional_attention`` (off: plain pooling, the
    baseline) makes a pooled token weigh log(window size) in the LLM's attention, as in
    ``aim``; on the embedded world it lifts pool's kept share at 0.25 from 83.6% to 89.3%.
    """

    name = "pool"
    description = "average-pool each image/frame grid down to the budget (pre-LLM)"
    retention: float | None = 0.25
    proportional_attention: bool = False  # merged tokens weigh log(size) in the LLM's attention

    def reduce(self, features, segment: Segment, budget: int) -> Reduction:
        grid = segment.part.grid
        if grid is None or grid[0] * grid[1] == 0:
            return self._pool_1d(features, budget)
        return self._pool_2d(features, segment, grid)

    def _pool_1d(self, features, budget):
        n = features.shape[0]
        edges = _window_edges(n, max(1, min(budget, n)))
        pooled = F.adaptive_avg_pool1d(features.t().unsqueeze(0).float(), len(edges))[0].t()
        keep = torch.tensor([s for s, _ in edges], device=features.device)
        groups = [torch.arange(s, e) for s, e in edges]
        sizes = torch.tensor([e - s for s, e in edges])
        return Reduction(keep, pooled.to(features.dtype), groups, sizes=sizes)

    def _pool_2d(self, features, segment, grid):
        h, w = grid
        scale = math.sqrt(self.keep_fraction())
        oh, ow = max(1, round(h * scale)), max(1, round(w * scale))
        cols = w + 1 if segment.part.newline else w
        raster = features[: h * cols].reshape(h, cols, -1)
        pixels = raster[:, :w].permute(2, 0, 1).unsqueeze(0)
        pooled = F.adaptive_avg_pool2d(pixels.float(), (oh, ow))[0].permute(1, 2, 0).to(features.dtype)
        row_edges, col_edges = _window_edges(h, oh), _window_edges(w, ow)
        starts = torch.tensor([r0 * cols for r0, _ in row_edges])[:, None]
        keep = starts + torch.tensor([c0 for c0, _ in col_edges])[None]  # (oh, ow) first cells
        sizes = torch.tensor([r1 - r0 for r0, r1 in row_edges])[:, None] * torch.tensor([c1 - c0 for c0, c1 in col_edges])
        if segment.part.newline:  # each pooled row keeps the newline of its last source row
            last_rows = [r1 - 1 for _, r1 in row_edges]
            keep = torch.cat([keep, torch.tensor(last_rows)[:, None] * cols + w], 1)
            sizes = torch.cat([sizes, torch.ones(oh, 1, dtype=sizes.dtype)], 1)
            pooled = torch.cat([pooled, raster[last_rows, w][:, None]], 1)
        groups = functools.partial(_pool_groups, row_edges, col_edges, cols, w if segment.part.newline else None)
        return Reduction(keep.flatten().to(features.device), pooled.reshape(keep.numel(), -1), groups,
                         sizes=sizes.flatten())


def _pool_groups(row_edges, col_edges, cols: int, newline_col: int | None) -> list[torch.Tensor]:
    """Source cells of each pooled token in raster order (and each kept newline: itself)."""
    groups = []
    for r0, r1 in row_edges:
        for c0, c1 in col_edges:
            groups.append((torch.arange(r0, r1)[:, None] * cols + torch.arange(c0, c1)[None]).flatten())
        if newline_col is not None:
            groups.append(torch.tensor([(r1 - 1) * cols + newline_col]))
    return groups
