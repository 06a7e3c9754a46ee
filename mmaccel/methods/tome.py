"""ToMe (Bolya et al., ICLR 2023; facebookresearch/ToMe) inside the vision tower.

In every tower block before the feature layer's, as in the official ToMe block: attention
(adding ``log(size)`` to the logits: proportional attention), then ``r`` token pairs merged by
bipartite soft matching on that attention's keys averaged over heads (alternate A/B split,
each A token to its most similar B token, the ``r`` best edges merged) with a size-weighted
average, then the MLP on the shorter sequence. The CLS token is never merged. ``r`` is spread
evenly over those blocks so that ``retention`` of the tokens reach the feature layer (the
official code takes a fixed ``r``). Before the feature layer's block each merged token is copied
back to its sources (its s copies weigh it s times in that block's attention, which is
proportional attention), so the model's own packing and projection see the usual shapes, and
the pre-LLM step keeps one token per merged group, at its first source's slot.

Deliberate differences: tokens stay in spatial order (the official merge puts unmerged A tokens
first); it runs on images and video frames in CLIP/SigLIP-style towers (LLaVA, LLaVA-NeXT,
LLaVA-OneVision), whose blocks are re-stated here (pinned to the library's own block by a
test), and on images and video slices in Qwen2-VL's packed tower, where whole 2x2 merge windows
are the units, merged inside every block between its attention and its MLP as here
(:mod:`.tome_qwen`; in Qwen2.5-VL's windowed tower merges stay inside one attention
window). LLaVA-OneVision video frames are tower rows too and merge the same way (ViT compute),
but the model then 2x2-pools each frame, so patch groups do not map onto its tokens; there the
pre-LLM step runs ToMe's matching once more on each frame's pooled tokens (cosine similarity of
the projected features, size-weighted, repeated down to the frame's budget).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..models.base import Segment
from .base import PreLLMReducer, Reduction, members_by_slot
from .visionzip import feature_layer


def tome_match(metric: torch.Tensor, r: int, protect_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Bipartite soft matching. metric: (B, N, C). Returns (src, dst), each (B, r): the A-set
    tokens (even slots) merged away and the B-set tokens (odd slots) they merge into, as
    indices into N."""
    metric = F.normalize(metric.float(), dim=-1)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(1, 2)
    if protect_first:
        scores[:, 0] = float("-inf")  # the CLS token (slot 0) is never merged
    best, dst = scores.max(-1)
    src = best.argsort(-1, descending=True)[:, :r]
    return src * 2, torch.gather(dst, 1, src) * 2 + 1


def tome_merge(x, size, assign, src, dst):
    """Size-weighted merge of ``src`` into ``dst`` (B, r); drops the src slots.

    x: (B, N, D); size: (B, N); assign: (B, N0) current slot of every original token.
    Returns (x, size, assign) for the shorter sequence, spatial order kept; x keeps its dtype
    (the mean is taken in float32)."""
    bsz, n, d = x.shape
    dtype, weighted = x.dtype, x.float() * size[..., None]  # sums in float32: bf16 sizes lose counts
    total = weighted.scatter_add(1, dst[..., None].expand(-1, -1, d), torch.gather(weighted, 1, src[..., None].expand(-1, -1, d)))
    size = size.scatter_add(1, dst, torch.gather(size, 1, src))
    x = (total / size[..., None]).to(dtype)
    keep = torch.ones(bsz, n, dtype=torch.bool, device=x.device)
    keep.scatter_(1, src, False)
    redirect = torch.arange(n, device=x.device).expand(bsz, -1).clone()
    redirect.scatter_(1, src, dst)
    new_index = keep.long().cumsum(1) - 1
    assign = torch.gather(new_index, 1, torch.gather(redirect, 1, assign))
    kept = keep.nonzero()[:, 1].view(bsz, -1)
    return torch.gather(x, 1, kept[..., None].expand(-1, -1, d)), torch.gather(size, 1, kept), assign


@dataclass
class ToMe(PreLLMReducer):
    name = "tome"
    description = "merge similar tokens inside the ViT blocks (size-weighted, proportional attention)"
    retention: float | None = 0.5
    # merged tokens weigh log(size) in the LLM's attention too (ToMe's own weighting stops at the tower)
    proportional_attention: bool = False
    _state: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def check_model(self, adapter) -> None:
        if adapter.uses_mrope:
            return None
        if not hasattr(adapter.attention_of(adapter.vision_layers[0]), "k_proj"):
            raise ValueError("tome runs inside CLIP/SigLIP-style or Qwen2-VL towers")
        if feature_layer(adapter) < 1 and self.keep_fraction() < 1.0:
            raise ValueError(f"tome merges in the tower blocks before the feature layer, and this tower's feature "
                             f"layer is its first block ({len(adapter.vision_layers)} blocks, vision_feature_layer "
                             f"{adapter.model.config.vision_feature_layer}): nothing could be merged")

    def install_tower(self, runtime) -> list:
        adapter = runtime.adapter
        if adapter.uses_mrope:
            from .tome_qwen import tome_installer

            return tome_installer(runtime, self.keep_fraction).install() + wrap_tower_attention(adapter)
        layers = adapter.vision_layers
        last = feature_layer(adapter)
        self._cls = adapter.vision_has_cls
        handles = [_swap_forward(layers[i], self._tome_block(runtime, layers[i], i, last)) for i in range(last)]
        return handles + [layers[last].register_forward_pre_hook(self._expand_hook(runtime, adapter), with_kwargs=True)]

    def _tome_block(self, runtime, layer, index: int, last: int):
        """The block's forward with ToMe between its attention and its MLP (image/video calls)."""
        plain = layer.forward

        def forward(hidden_states, *args, **kwargs):
            if runtime.current_kind not in ("image", "video") or self.keep_fraction() >= 1.0:
                return plain(hidden_states, *args, **kwargs)
            st = self._state
            if index == 0:  # a new tower call: every token its own group of size 1
                batch, n = hidden_states.shape[:2]
                dev = hidden_states.device
                st.update(assign=torch.arange(n, device=dev).expand(batch, -1).clone(),
                          size=torch.ones(batch, n, device=dev), cls=self._cls)
            return tome_block_forward(layer, hidden_states, st, self._merge_count(hidden_states.shape[1], st, last - index))

        return forward

    def _merge_count(self, current: int, st: dict, blocks_left: int) -> int:
        """r for this block: what is still to merge to reach the budget, spread over the blocks left."""
        cls = int(self._cls)
        target = max(1, round(self.keep_fraction() * (st["assign"].shape[1] - cls))) + cls
        return max(0, min(math.ceil((current - target) / blocks_left), (current - cls) // 2))

    def _expand_hook(self, runtime, adapter):
        return expand_hook(runtime, self._state)

    def reduce(self, features, segment: Segment, budget: int) -> Reduction:
        if segment.part.kind == "video" and "merge_rep" not in (segment.scores or {}):
            if segment.part.newline:
                return Reduction(torch.arange(segment.n, device=features.device))
            return merge_to_budget(features, budget)
        return one_per_group(segment, with_sizes=self.proportional_attention)


def tome_block_forward(layer, x: torch.Tensor, st: dict, r: int) -> torch.Tensor:
    """One CLIP/SigLIP encoder block (pre-norm attention, then MLP) with ToMe after its
    attention: proportional attention (``log st["size"]`` added to the logits), then ``r`` pairs
    merged by the attention's head-mean keys; ``st`` (size (B, N), assign (B, N0)) is updated.
    x: (B, N, D) -> (B, N - r, D)."""
    attn = layer.self_attn
    h = layer.layer_norm1(x)
    q, k, v = (proj(h).view(x.shape[0], x.shape[1], -1, attn.head_dim).transpose(1, 2)
               for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    bias = st["size"].log()[:, None, None, :].to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)
    x = x + attn.out_proj(out.transpose(1, 2).reshape(x.shape))
    if r > 0:
        src, dst = tome_match(k.mean(1), r, protect_first=st["cls"])
        x, st["size"], st["assign"] = tome_merge(x, st["size"], st["assign"], src, dst)
    return x + layer.mlp(layer.layer_norm2(x))


def _swap_forward(module, forward):
    """Replace ``module.forward`` (an instance attribute); the handle puts the class's back."""
    module.forward = forward
    return _Restore(lambda: vars(module).pop("forward", None))


def merge_to_budget(features: torch.Tensor, budget: int) -> Reduction:
    """ToMe on one pooled frame's tokens: bipartite soft matching on the features (cosine),
    size-weighted merges, repeated until ``budget`` (at least 1) tokens remain.
    features (n, D). Each merged token sits at its group's first slot."""
    n, target = features.shape[0], max(1, budget)
    x, size = features[None].float(), torch.ones(1, n, device=features.device)
    assign = torch.arange(n, device=features.device)[None]
    while x.shape[1] > target:
        r = min(x.shape[1] - target, x.shape[1] // 2)
        src, dst = tome_match(x, r, protect_first=False)
        x, size, assign = tome_merge(x, size, assign, src, dst)
    slots = assign[0]
    first = first_sources(assign, x.shape[1])[0]
    order = first.argsort()
    groups = functools.partial(_members_in_order, slots.cpu(), order.cpu())  # built only for provenance
    return Reduction(first[order], x[0, order].to(features.dtype), groups, sizes=size[0, order].round().long().cpu())


def _members_in_order(slots: torch.Tensor, order: torch.Tensor) -> list[torch.Tensor]:
    """Per merged slot (in ``order``): the original tokens assigned to it."""
    members = members_by_slot(slots, order.numel())
    return [members[j] for j in order.tolist()]


def wrap_tower_attention(adapter) -> list:
    """Route the tower's attention through mmaccel's wrapper (it adds the proportional-attention
    or padding bias); the handles restore the implementation and drop any bias left behind."""
    from ..scoring import register_wrapper

    layers = adapter.vision_layers
    cfg = adapter.attention_of(layers[0]).config
    saved = cfg._attn_implementation_internal
    cfg._attn_implementation_internal = register_wrapper(cfg._attn_implementation or "sdpa")
    drop = lambda: [vars(adapter.attention_of(l)).pop(k, None) for l in layers  # noqa: E731
                    for k in ("_mmaccel_bias", "_mmaccel_bias_queue")]
    return [_Restore(lambda: setattr(cfg, "_attn_implementation_internal", saved)), _Restore(drop)]


def expand_hook(runtime, state: dict):
    """Pre-hook for the feature layer's block: copy merged tokens back to all their sources
    (``state["assign"]``). The s copies of a token weigh it s times in attention, which is
    proportional attention; the attention bias of the merged blocks is removed."""
    def hook(module, args, kwargs):
        for layer in runtime.adapter.vision_layers:
            vars(runtime.adapter.attention_of(layer)).pop("_mmaccel_bias", None)
        if "assign" not in state or runtime.current_kind not in ("image", "video"):
            return None
        x = args[0] if args else kwargs["hidden_states"]
        # pooled video frames: patch groups do not map onto tokens, so no maps (see ``ToMe.reduce``)
        full = expand_to_sources(x, state.pop("assign"), runtime, maps=runtime.current_kind == "image")
        return ((full,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": full})

    return hook


def one_per_group(segment: Segment, with_sizes: bool = False) -> Reduction:
    """Keep the first token of every merged group (maps left by a tower-stage merge); with
    ``with_sizes``, each kept token's group size (for proportional attention in the LLM)."""
    maps = segment.scores or {}
    if "merge_rep" not in maps:
        return Reduction(torch.arange(segment.n))
    rep, own = maps["merge_rep"][:, 0].cpu(), maps["merge_own"][:, 0].cpu()  # index bookkeeping on the CPU
    keep = ((rep == own) | torch.isnan(rep)).nonzero().flatten()  # NaN: structural newline tokens, kept
    sizes = _group_sizes(rep, keep) if with_sizes else None
    return Reduction(keep, None, functools.partial(_window_members, rep, keep), sizes=sizes)  # groups: provenance


def _group_sizes(rep: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(k,) how many tokens share each kept token's representative (a newline, NaN: 1), by one
    count per representative rather than a k x n comparison."""
    values, counts = rep[~torch.isnan(rep)].unique(return_counts=True)
    kept = rep[keep]
    grouped = ~torch.isnan(kept)
    sizes = torch.ones(keep.numel(), dtype=torch.long)
    sizes[grouped] = counts[torch.searchsorted(values, kept[grouped])]
    return sizes


def _window_members(rep: torch.Tensor, keep: torch.Tensor) -> list[torch.Tensor]:
    """Per kept token: the tokens whose merge representative it is (a newline: itself)."""
    return [k[None] if torch.isnan(rep[k]) else ((rep == rep[k]) & ~torch.isnan(rep)).nonzero().flatten()
            for k in keep]


def expand_to_sources(x: torch.Tensor, assign: torch.Tensor, runtime, maps: bool = True) -> torch.Tensor:
    """Copy merged tokens back to every source slot and (``maps``) leave the group maps for the
    pre-LLM step. x: (B, L, D) merged; assign: (B, N0) slot of every original token.
    Returns (B, N0, D)."""
    full = torch.gather(x, 1, assign[..., None].expand(-1, -1, x.shape[-1]))
    if not maps:
        return full
    # ids unique across tower rows (crops), so groups never mix tiles after packing
    offset = (torch.arange(assign.shape[0], device=x.device) * assign.shape[1])[:, None]
    rep = (_representatives(assign) + offset).float()
    own = (torch.arange(assign.shape[1], device=x.device)[None] + offset).float()
    runtime.vision_maps["merge_rep"] = [rep[:, None]]
    runtime.vision_maps["merge_own"] = [own[:, None]]
    return full


def first_sources(assign: torch.Tensor, slots: int | None = None) -> torch.Tensor:
    """(B, N0) merged slot of every original token -> (B, slots) the first original token of
    every slot (N0 for a slot no token maps to; ``slots`` defaults to N0)."""
    big = assign.shape[1]
    first = torch.full((assign.shape[0], slots or big), big, dtype=assign.dtype, device=assign.device)
    return first.scatter_reduce(1, assign, torch.arange(big, device=assign.device).expand_as(assign), reduce="amin")


def _representatives(assign: torch.Tensor) -> torch.Tensor:
    """(B, N0) -> (B, N0): the first original index sharing each token's merged slot."""
    return torch.gather(first_sources(assign), 1, assign)


class _Restore:
    """A removable handle that runs a function (restores state) on ``remove()``."""

    def __init__(self, fn):
        self.fn = fn

    def remove(self):
        self.fn()
