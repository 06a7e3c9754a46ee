"""Average every token a selection drops into the kept token it is most similar to.

Selection methods (HiRED, STC-Pruner) keep some tokens of a part (image, crop, frame) and
discard the rest. Here each discarded grid token instead joins the kept grid token of highest
cosine similarity, and every kept token becomes the plain mean of itself and the tokens it took
in: the keep set (and so the count and positions) is unchanged, only the kept features carry
what the dropped ones held. It is the idea behind VisionZip's contextual tokens and PruMerge+'s
merge of pruned tokens, applied after another method's selection; neither HiRED's nor STC's
official code does it (the knob ``merge_dropped`` is off by default).
"""
from __future__ import annotations

import torch

from .base import Reduction, members_by_slot
from .visionzip import mean_merge, nearest_targets


def merge_dropped(features: torch.Tensor, keep: torch.Tensor, structural: torch.Tensor):
    """features: (n, D) one part's tokens; keep: (k,) sorted kept indices; structural: (n,) bool
    tokens never merged (newlines), kept or not. Returns (features (k, D) of the kept tokens,
    each the mean of itself and the dropped grid tokens most similar to it; owner (n,): the slot
    in ``keep`` each token ends in, -1 for dropped structural tokens; sizes (k,))."""
    keep, structural = keep.cpu(), structural.cpu()
    kept = torch.zeros(features.shape[0], dtype=torch.bool)
    kept[keep] = True
    owner = torch.full((features.shape[0],), -1, dtype=torch.long)
    owner[keep] = torch.arange(keep.numel())
    targets, dropped = (kept & ~structural).nonzero().flatten(), (~kept & ~structural).nonzero().flatten()
    if targets.numel() and dropped.numel():
        owner[dropped] = owner[targets[nearest_targets(features, dropped, targets)]]
    joined = (owner >= 0).nonzero().flatten()
    merged = mean_merge(features)(joined, owner[joined], keep.numel())
    return merged.to(features.dtype), owner, torch.bincount(owner[joined], minlength=keep.numel())


def with_dropped_merged(features: torch.Tensor, red: Reduction, structural: torch.Tensor) -> Reduction:
    """``red`` (a keep set without new features) with its kept tokens' features replaced by
    :func:`merge_dropped`; its groups list each kept token's sources."""
    feats, owner, sizes = merge_dropped(features, red.keep, structural)
    joined = (owner >= 0).nonzero().flatten()
    groups = lambda: members_by_slot(owner[joined], red.keep.numel(), values=joined)  # noqa: E731 (built lazily)
    return Reduction(red.keep, feats, groups, red.protected, sizes=sizes)
