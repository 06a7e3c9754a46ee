"""VisionZip (Yang et al., CVPR 2025; dvlab-research/VisionZip): keep the dominant visual
tokens, merge the rest into a few contextual tokens.

Per image / crop / frame: the ``dominant`` share of the budget goes to the tokens with the most
CLS attention (summed over heads) at the tower's feature layer (the penultimate layer for
LLaVA); the remaining tokens are grouped around ``contextual`` targets taken at a uniform stride
and each group becomes one token. The official example splits 64 tokens as 54 dominant + 10
contextual; that ratio is kept for any ``retention``.

Deliberate differences: towers without a CLS token (SigLIP, Qwen2-VL) rank by the mean
attention a token receives; the contextual grouping metric is the projected features (the
official code uses the tower's head-mean keys, which live in another space); a contextual token
is the true average of its group (the official code adds the target to the group mean); tokens
keep their spatial slots, so positions and provenance stay meaningful.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.base import Segment
from .base import PreLLMReducer, Reduction, members_by_slot


def head_scores(scores: torch.Tensor) -> torch.Tensor:
    """(n, H) tap scores -> (n,) summed over heads, -inf on structural (NaN) tokens."""
    return torch.nan_to_num(scores.float().sum(-1), nan=float("-inf"))


def dominant_contextual(features: torch.Tensor, scores: torch.Tensor, n_dominant: int, n_contextual: int):
    """VisionZip on one segment. features: (n, D); scores: (n,) (-inf = never dominant).

    Returns (keep (k,) sorted slots, features (k, D), groups) with k <= n_dominant + n_contextual.
    Dominant slots that no token can fill (too few finite scores, e.g. a segment that is only a
    row-newline token) go to the contextual share, so the budget is still spent.
    """
    n, dev = features.shape[0], features.device
    scores = scores.cpu()  # index bookkeeping on the CPU, features stay on their device
    wanted = n_dominant
    n_dominant = min(n_dominant, int(torch.isfinite(scores).sum()))
    n_contextual += wanted - n_dominant
    dominant = scores.topk(n_dominant).indices if n_dominant else torch.empty(0, dtype=torch.long)
    rest = torch.ones(n, dtype=torch.bool)
    rest[dominant] = False
    rest_idx = rest.nonzero().flatten()
    n_contextual = min(n_contextual, rest_idx.numel())
    keep = [dominant]
    feats = [features[dominant].float()]
    groups = [list(dominant[:, None].unbind())]  # views, not one tensor per token
    if n_contextual:
        step = max(1, rest_idx.numel() // n_contextual)
        targets = rest_idx[::step][:n_contextual]
        metric = F.normalize(features.float(), dim=-1)
        owner = (metric[rest_idx] @ metric[targets].T).argmax(-1).cpu()
        owner[torch.searchsorted(rest_idx.contiguous(), targets.contiguous())] = torch.arange(targets.numel())  # a target owns itself
        sums = torch.zeros(targets.numel(), features.shape[1], device=dev).index_add_(
            0, owner.to(dev), features[rest_idx].float())
        sizes = torch.bincount(owner, minlength=targets.numel())
        keep.append(targets)
        feats.append(sums / sizes.clamp(min=1).to(dev)[:, None])
        groups.append(members_by_slot(owner, targets.numel(), rest_idx))
    keep_all = torch.cat(keep)
    order = keep_all.argsort()
    all_groups = [g for gs in groups for g in gs]
    return keep_all[order], torch.cat(feats)[order].to(features.dtype), [all_groups[i] for i in order.tolist()]


@dataclass
class VisionZip(PreLLMReducer):
    name = "visionzip"
    description = "keep dominant tokens by ViT CLS attention, merge the rest into contextual tokens (pre-LLM)"
    retention: float | None = 64 / 576
    dominant_share: float = 54 / 64
    vision_mode = "auto"

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.dominant_share <= 1.0:
            raise ValueError(f"visionzip dominant_share must be in [0, 1], got {self.dominant_share}")

    def vision_layers(self, adapter) -> list[int]:
        return [feature_layer(adapter)]

    def reduce(self, features, segment: Segment, budget: int) -> Reduction:
        scores = head_scores(next(iter(segment.scores.values())))
        n_dominant = round(budget * self.dominant_share)
        keep, feats, groups = dominant_contextual(features, scores, n_dominant, budget - n_dominant)
        return Reduction(keep.to(features.device), feats, groups)


def feature_layer(adapter) -> int:
    """The tower layer whose output feeds the projector (LLaVA: ``vision_feature_layer``)."""
    layer = getattr(adapter.model.config, "vision_feature_layer", -1)
    layer = layer[-1] if isinstance(layer, (list, tuple)) else layer
    n = len(adapter.vision_layers)
    # hidden_states[i] is the output of block i-1 (hidden_states[0] = embeddings)
    index = layer + n + 1 if layer < 0 else layer
    return max(0, index - 1)
