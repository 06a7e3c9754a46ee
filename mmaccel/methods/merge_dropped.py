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
import torch.nn.functional as F

from .base import Reduction, members_by_slot


def merge_dropped(features: torch.Tensor, keep: torch.Tensor, structural: torch.Tensor):
    """features: (n, D) one part's tokens; keep: (k,) sorted kept indices; structural: (n,) bool
    tokens never merged (newlines), kept or not. Returns (features (k, D) of the kept tokens,
    each the mean of itself and the dropped grid tokens most similar to it; owner (n,): the slot
    in ``keep`` each token ends in, -1 for dropped structural tokens; sizes (k,))."""
    n, device = features.shape[0], features.device
    keep_cpu, structural = keep.cpu(), structural.cpu()
    kept = torch.zeros(n, dtype=torch.bool)
    kept[keep_cpu] = True
    owner = torch.full((n,), -1, dtype=torch.long)
    owner[keep_cpu] = torch.arange(keep_cpu.numel())
    targets, dropped = (kept & ~structural).nonzero().flatten(), (~kept & ~structural).nonzero().flatten()
    if targets.numel() and dropped.numel():
        metric = F.normalize(features.float(), dim=-1)
        best = (metric[dropped.to(device)] @ metric[targets.to(device)].T).argmax(-1).cpu()
        owner[dropped] = owner[targets[best]]
    joined = owner >= 0
    sizes = torch.bincount(owner[joined], minlength=keep_cpu.numel())
    sums = torch.zeros(keep_cpu.numel(), features.shape[1], dtype=torch.float32, device=device)
    sums.index_add_(0, owner[joined].to(device), features[joined.to(device)].float())
    return (sums / sizes.to(device)[:, None]).to(features.dtype), owner, sizes


def with_dropped_merged(features: torch.Tensor, red: Reduction, structural: torch.Tensor) -> Reduction:
    """``red`` (a keep set without new features) with its kept tokens' features replaced by
    :func:`merge_dropped`; its groups list each kept token's sources."""
    feats, owner, sizes = merge_dropped(features, red.keep, structural)
    joined = (owner >= 0).nonzero().flatten()
    groups = lambda: members_by_slot(owner[joined], red.keep.numel(), values=joined)  # noqa: E731 (built lazily)
    return Reduction(red.keep, feats, groups, red.protected, sizes=sizes)
