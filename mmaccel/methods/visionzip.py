"""VisionZip (Yang et al., CVPR 2025; dvlab-research/VisionZip): keep the dominant visual
tokens, merge the rest into a few contextual tokens.

Per image / crop / frame: the ``dominant`` share of the budget goes to the tokens with the most
CLS attention (summed over heads) at the tower's feature layer (the penultimate layer for
LLaVA); the remaining tokens are grouped around ``contextual`` targets taken at a uniform stride,
each joining the target its key is most cosine-similar to, and each group becomes one token. As
in the official code, on CLIP/SigLIP towers (LLaVA, LLaVA-NeXT, LLaVA-OneVision images) the
grouping metric is the feature layer's head-mean keys and groups are merged on the tower's
feature-layer hidden states, before the projector: a contextual token is
``projector(mean of its group's hidden states)``. The official example splits 64 tokens as
54 dominant + 10 contextual; that ratio is kept for any ``retention``.

Deliberate differences:
- the budget counts the model's visual tokens; the official 54 includes the CLS token (CLS + 53
  patches), which LLaVA's ``default`` feature selection never hands the LLM, so none is added;
- a contextual token is the true average of its group (the official code adds the target to
  the group mean);
- towers without a CLS token (SigLIP, Qwen2-VL) rank by the mean attention a token receives;
- where hidden states and tokens do not map one to one (LLaVA-OneVision video frames, pooled
  after the projector; Qwen2-VL, whose merger joins 2x2 patches; multi-layer feature
  selection) the grouping and merging use the projected features;
- row-newline tokens (LLaVA-NeXT / OneVision) are never dominant and never join a group (they
  hold no image content); they are dropped unless the image tokens cannot fill the budget;
- tokens keep their spatial slots, so positions and provenance stay meaningful.

``proportional_attention`` (off, as official) makes a contextual token weigh log(group size)
in the LLM's attention, as in ``aim``; on the embedded world it is within noise at 0.25
(96.5% -> 96.1% kept) and helps at 0.11 (81.8% -> 83.6%).
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


def dominant_contextual(features: torch.Tensor, scores: torch.Tensor, n_dominant: int, n_contextual: int,
                        metric: torch.Tensor | None = None, merge=None):
    """VisionZip on one segment. features: (n, D); scores: (n,) (-inf = structural, never
    dominant, never grouped); metric: (n, C) grouping metric (default: ``features``); merge:
    ``(index (m,), owner (m,), groups) -> (groups, D)`` contextual features (default: the mean of
    ``features`` over each group).

    Returns (keep (k,) sorted slots, features (k, D), groups) with k <= n_dominant + n_contextual.
    Dominant slots that no token can fill go to the contextual share; slots left when the
    image tokens run out keep structural tokens as they are (a segment that is only a
    row-newline token keeps it), so the budget is still spent.
    """
    scores = scores.cpu()  # index bookkeeping on the CPU, features stay on their device
    finite = torch.isfinite(scores)
    budget = n_dominant + n_contextual
    n_dominant = min(n_dominant, int(finite.sum()))
    dominant = scores.topk(n_dominant).indices if n_dominant else torch.empty(0, dtype=torch.long)
    rest = finite.clone()
    rest[dominant] = False
    rest_idx = rest.nonzero().flatten()
    n_contextual = min(budget - n_dominant, rest_idx.numel())
    spare = (~finite).nonzero().flatten()[: budget - n_dominant - n_contextual]
    singles = torch.cat([dominant, spare])
    keep, feats = [singles], [features[singles.to(features.device)].float()]
    groups = [list(singles[:, None].unbind())]  # views, not one tensor per token
    if n_contextual:
        targets, owner = _contextual_groups(features if metric is None else metric, rest_idx, n_contextual)
        merged = (merge or mean_merge(features))(rest_idx, owner, targets.numel()).float()
        alone = (torch.bincount(owner, minlength=targets.numel()) == 1).to(merged.device)
        merged[alone] = features[targets.to(features.device)][alone].float()  # a group of one is its own feature, exactly
        keep.append(targets)
        feats.append(merged)
        groups.append(members_by_slot(owner, targets.numel(), rest_idx))
    keep_all = torch.cat(keep)
    order = keep_all.argsort()
    all_groups = [g for gs in groups for g in gs]
    return keep_all[order], torch.cat(feats)[order].to(features.dtype), [all_groups[i] for i in order.tolist()]


def _contextual_groups(metric: torch.Tensor, rest_idx: torch.Tensor, n_contextual: int):
    """Targets at a uniform stride over ``rest_idx``; every rest token joins its most
    cosine-similar target (a target owns itself). Returns (targets (c,), owner (m,) in 0..c-1)."""
    step = max(1, rest_idx.numel() // n_contextual)
    targets = rest_idx[::step][:n_contextual]
    owner = nearest_targets(metric, rest_idx, targets)
    owner[torch.searchsorted(rest_idx.contiguous(), targets.contiguous())] = torch.arange(targets.numel())
    return targets, owner


def nearest_targets(metric: torch.Tensor, index: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """metric: (n, C); for every token of ``index`` (m,), the position in ``targets`` (c,) of
    its most cosine-similar target, (m,) on the CPU."""
    unit = F.normalize(metric.float(), dim=-1)
    return (unit[index.to(unit.device)] @ unit[targets.to(unit.device)].T).argmax(-1).cpu()


def mean_merge(values: torch.Tensor):
    """Merge function: per group, the mean of ``values`` (n, C) rows."""
    def merge(index: torch.Tensor, owner: torch.Tensor, groups: int) -> torch.Tensor:
        dev = values.device
        sums = torch.zeros(groups, values.shape[1], device=dev).index_add_(0, owner.to(dev), values[index.to(dev)].float())
        return sums / torch.bincount(owner, minlength=groups).clamp(min=1).to(dev)[:, None]

    return merge


@dataclass
class VisionZip(PreLLMReducer):
    name = "visionzip"
    description = "keep dominant tokens by ViT CLS attention, merge the rest into contextual tokens (pre-LLM)"
    retention: float | None = 64 / 576
    dominant_share: float = 54 / 64
    proportional_attention: bool = False  # merged tokens weigh log(size) in the LLM's attention
    vision_mode = "auto"

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.dominant_share <= 1.0:
            raise ValueError(f"visionzip dominant_share must be in [0, 1], got {self.dominant_share}")

    def vision_layers(self, adapter) -> list[int]:
        return [feature_layer(adapter)]

    def install_tower(self, runtime) -> list:
        """On CLIP/SigLIP towers, record each image's feature-layer hidden states and head-mean
        keys for the pre-LLM step (maps ``zip_hidden`` / ``zip_key``, packed like the tokens)."""
        adapter = runtime.adapter
        layer = getattr(adapter.model.config, "vision_feature_layer", None)
        projector = getattr(adapter.inner, "multi_modal_projector", None)
        if adapter.uses_mrope or not isinstance(layer, int) or projector is None:
            return []
        block = adapter.vision_layers[feature_layer(adapter)]
        attn = adapter.attention_of(block)
        if not hasattr(attn, "k_proj"):
            return []
        dtype = next(projector.parameters()).dtype
        self._project = lambda hidden: projector(hidden.to(dtype))  # noqa: E731  (kept until the next install)
        keys = lambda out: out.view(*out.shape[:2], -1, attn.head_dim).mean(2)  # noqa: E731
        hidden = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
        return [attn.k_proj.register_forward_hook(_recorder(runtime, "zip_key", keys)),
                block.register_forward_hook(_recorder(runtime, "zip_hidden", hidden))]

    def reduce(self, features, segment: Segment, budget: int) -> Reduction:
        maps = segment.scores
        scores = head_scores(next(v for k, v in maps.items() if isinstance(k, int)))
        n_dominant = round(budget * self.dominant_share)
        metric = merge = None
        if "zip_hidden" in maps:  # group by keys, merge hidden states, then project
            mean = mean_merge(maps["zip_hidden"])
            metric, merge = maps["zip_key"], lambda *group_args: self._project(mean(*group_args))
        keep, feats, groups = dominant_contextual(features, scores, n_dominant, budget - n_dominant, metric, merge)
        return Reduction(keep.to(features.device), feats, groups, sizes=torch.tensor([g.numel() for g in groups]))


def _recorder(runtime, name: str, transform):
    """Forward hook: keep ``transform(output)`` (B, T, C) of image calls as a (B, C, T) map."""
    def hook(module, args, output):
        if runtime.current_kind == "image":
            runtime.vision_maps.setdefault(name, []).append(transform(output).detach().transpose(1, 2))

    return hook


def feature_layer(adapter) -> int:
    """The tower layer whose output feeds the projector (LLaVA: ``vision_feature_layer``)."""
    layer = getattr(adapter.model.config, "vision_feature_layer", -1)
    layer = layer[-1] if isinstance(layer, (list, tuple)) else layer
    n = len(adapter.vision_layers)
    # hidden_states[i] is the output of block i-1 (hidden_states[0] = embeddings)
    index = layer + n + 1 if layer < 0 else layer
    return max(0, index - 1)
