"""HiRED (Arif et al., AAAI 2025; hasanar1f/HiRED): a high-resolution image's token budget is
split between the base image and its crops by an early ViT layer's CLS attention, then each
part keeps its tokens with the most CLS attention at the feature layer.

Official defaults: budget 20% of the image's tokens (``retention=0.2``), ``alpha=0.5`` of it for
the base image; the allocation counts, per crop, how many of the base image's top
``(1 - alpha) * P`` layer-0 CLS-attended patches fall in it; CLS attention is summed over heads.

Deliberate differences: crops are found by their real geometry (the tile index of every packed
token comes from the model's own unpadding code, and a base patch counts for the crop whose
area holds its centre), where the official code splits the 576-token raster into row bands;
budgets are split with largest remainders instead of ``int()`` truncation, so they add up; towers
without a CLS token rank by mean received attention; images without crops (LLaVA-1.5, video
frames) keep the feature-layer top tokens of each part. Newline tokens are dropped, as in the
official code.
The budget is ``retention`` of the tokens the model gives the image (base, unpadded crops and
newlines), the convention every method here shares; the official code counts every view as a
padded 576-token one (``int(P * 576 * rate)``), so on a non-square image it budgets more (a
16:9 image on a 2 x 2 grid: 576 tokens against 390 here). Crops pick among their real tokens:
the official top-k runs over padded views and loses the picks that land in the padding. On
LLaVA-OneVision, whose ``anyres_max`` packing can shrink the crop raster, each packed token
belongs to the crop of largest weight (:func:`mmaccel.models.scores.anyres_crop_ids`).

``merge_dropped`` (not in the official code, off by default): every token HiRED drops is
averaged into the kept token of its part most similar to it (:mod:`.merge_dropped`), so the kept
set and its cost stay HiRED's and the kept features carry what the dropped ones held. On the
embedded model (n=2700, retention 0.25) the kept share of full accuracy rises from 94.9% to 96.6%
on run 56 and from 92.2% to 96.2% on run 57, at the same cost
(``results/fidelity/n2700_run56/merge_dropped.md``, ``results/fidelity/n2700_run57/``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.base import Segment
from .base import PreLLMReducer, Reduction
from .visionzip import feature_layer, head_scores


def crop_boxes(tile: torch.Tensor, grid: tuple[int, int]) -> dict[int, tuple[float, float, float, float]]:
    """Fractional (top, bottom, left, right) box of every crop in the unpadded crop raster.

    tile: (rows * (cols + 1), 1) tile index per token incl. the newline column (NaN)."""
    rows, cols = grid
    ids = tile.reshape(rows, cols + 1)[:, :cols]
    boxes = {}
    for k in ids.unique().tolist():
        where = (ids == k).nonzero()
        r0, c0 = where.min(0).values.tolist()
        r1, c1 = where.max(0).values.tolist()
        boxes[int(k)] = (r0 / rows, (r1 + 1) / rows, c0 / cols, (c1 + 1) / cols)
    return boxes


def count_in_boxes(selected: torch.Tensor, side: int, boxes: dict) -> dict[int, int]:
    """How many selected base patches (flat indices on a side x side grid) centre in each box."""
    y = (selected // side + 0.5) / side
    x = (selected % side + 0.5) / side
    return {k: int(((y >= t) & (y < b) & (x >= l) & (x < r)).sum()) for k, (t, b, l, r) in boxes.items()}


def top_tokens(scores: torch.Tensor, k: int, among: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the ``k`` best finite scores (optionally only ``among`` these indices)."""
    scores = scores.cpu()  # selection bookkeeping on the CPU whatever the tower's device
    idx = among.cpu() if among is not None else torch.arange(scores.numel())
    s = scores[idx]
    k = min(k, int(torch.isfinite(s).sum()))
    return idx[s.topk(k).indices] if k > 0 else torch.empty(0, dtype=torch.long)


@dataclass
class HiRED(PreLLMReducer):
    name = "hired"
    description = "split the budget over base image and crops by early ViT attention, keep top tokens (pre-LLM)"
    retention: float | None = 0.2
    alpha: float = 0.5
    merge_dropped: bool = False  # average dropped tokens into kept ones; see the module docstring
    vision_mode = "auto"

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"hired alpha must be in [0, 1], got {self.alpha}")

    def vision_layers(self, adapter) -> list[int]:
        return sorted({0, feature_layer(adapter)})

    def reduce(self, features, segment: Segment, budget: int) -> Reduction:
        scores = head_scores(segment.scores[max(k for k in segment.scores if k != "tile")])
        return Reduction(top_tokens(scores, budget).sort().values.to(features.device))

    def reduce_media(self, features, segments, budget):
        if budget >= sum(s.n for s in segments):  # full retention: no reduction at all
            return [Reduction(torch.arange(s.n)) for s in segments]
        if len(segments) != 2 or not segments[1].part.newline or segments[1].part.grid is None:
            return super().reduce_media(features, segments, budget)
        base, crops = segments
        full = min(int(budget * self.alpha), base.n)
        sub = budget - full
        feat_layer = max(k for k in base.scores if k != "tile")
        base_keep = top_tokens(head_scores(base.scores[feat_layer]), full)
        crop_keep = self._crop_tokens(base, crops, sub, feat_layer)
        return [Reduction(base_keep.sort().values), Reduction(crop_keep.sort().values)]

    def _crop_tokens(self, base, crops, sub, feat_layer) -> torch.Tensor:
        side = base.part.grid[0]
        early = head_scores(base.scores[min(k for k in base.scores if k != "tile")])
        selected = top_tokens(early, int(base.n * (1 - self.alpha)))
        tile_map = crops.scores["tile"].cpu()
        tiles = tile_map.flatten()
        boxes = crop_boxes(tile_map, crops.part.grid)
        counts = count_in_boxes(selected, side, boxes)
        ids = sorted(counts)
        members = {k: (tiles == k).nonzero().flatten() for k in ids}
        budgets = _proportional([counts[k] for k in ids], [members[k].numel() for k in ids], sub)
        late = head_scores(crops.scores[feat_layer]).cpu()  # once, not in every crop's top_tokens
        picks = [top_tokens(late, b, members[k]) for k, b in zip(ids, budgets)]
        return torch.cat(picks) if picks else torch.empty(0, dtype=torch.long)


def _proportional(weights: list[int], caps: list[int], total: int) -> list[int]:
    """Split ``total`` by ``weights`` (largest remainder), never above ``caps``; leftovers go to
    the parts with room, so the budget is spent whenever the crops can hold it."""
    total = min(total, sum(caps))
    weights = weights if sum(weights) else caps
    exact = [w * total / sum(weights) for w in weights]
    out = [int(e) for e in exact]
    for i in sorted(range(len(out)), key=lambda i: exact[i] - out[i], reverse=True)[: total - sum(out)]:
        out[i] += 1
    out = [min(o, c) for o, c in zip(out, caps)]
    while sum(out) < total:
        room = [i for i in range(len(out)) if out[i] < caps[i]]
        out[max(room, key=lambda i: (weights[i], caps[i] - out[i]))] += 1
    return out
