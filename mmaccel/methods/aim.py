"""AIM (Zhong et al., ICCV 2025; LaVi-Lab/AIM): merge visual tokens before the LLM, then
prune them progressively inside it.

Merge (per image / crop / frame, on the projected features): bipartite soft matching in the
ToMe style. Tokens alternate into sets A (even) and B (odd); every A token finds its most
cosine-similar B token; the ``r`` best-matched A tokens are averaged into their B token with an
unweighted mean that includes the destination (the official ``scatter_reduce(mean)``). The
official passes are r = n/2 then r = n/4 (keep 25%); here passes repeat with r = min(cur - k,
cur // 2) until the ``retention`` budget k is met, so 0.25 reproduces the official setting.

Prune (inside the LLM, official schedule; scaled to depths it has none for): from the middle layer on, the
visual tokens kept fall linearly and reach 0 at 3/4 depth (28 layers: rates 0.875 ... 0 at
layers 14 -> 21, -12.5%/layer), ranked by a PageRank-style importance: attention at
temperature tau=0.1, 5 power iterations. As in the official code, the rate of layer l is
applied after layer l, from its own attention: layer 15 is the first to see fewer tokens and
layer 22 the first to see none. On a 4-layer model that is one cut, half the visual tokens
from layer 3 on, and no layer runs without them.

Deliberate differences from the official code, each for a reason:
- images and their crops are merged too, as video frames are: the official LLaVA-OneVision
  and Qwen2-VL paths merge video frames only (images reach the LLM whole), and its LLaVA-1.5
  variant merges CLIP tokens by their layer-23 keys (576 -> 288 -> 252); one rule for every
  medium lets ``retention`` mean the same thing for images and video;
- merged tokens stay in spatial order at the slot of their B token (the official code
  concatenates unmerged A then B); a second pass therefore alternates over that order. Under
  the default ``position_policy`` ("preserve") a merged token keeps its slot's position, so the
  merged sequence has gaps where the official shorter sequence is numbered 0..N'-1 ("compact");
  in-LLM pruning keeps positions in both (the official code only masks);
- importance uses text-to-visual attention only (the text tokens after the media: the
  question), computed by the query-subset tap; PageRank runs over the text-to-text block and
  the visual importance is the stationary text distribution pushed through text-to-visual
  attention, RMS over heads. The official code needs eager attention and an N x N softmax at
  every layer;
- pruned tokens leave the hidden states and the KV cache (the official code masks them), and
  the official single-sample ``protected_num[0]`` becomes a per-sample budget;
- ``pass_fraction`` (not in the official code, default 0.5 = official) caps the tokens one pass
  may merge. The official first pass (r = n/2) merges *every* A token, however unlike its best
  B token, so a small object whose tokens sit in A slots is averaged into the background.
  With passes of at most a quarter (0.25) only the most similar pairs merge each time. On the
  embedded world (run 29 of ``results/recipe-cpu/summary_tower/``, n=450, merge only, retention
  0.25) the kept share of full accuracy rises from 84.7% to 93.6% at the same token count, and on
  run 56 (n=2700) from 92.0% to 97.8%; the preset ``aim-merge-25`` is that merge
  without the in-LLM cut, which on a 4-layer LLM lands on the last layer and costs 8-11 points
  there (``results/fidelity/n2700_run56/aim_losses.md``). The default stays the official 0.5;
- ``proportional_attention`` (not in the official code, default on; ``False`` = official): a
  token merged from s tokens adds log(s) to its attention logits in every LLM layer, in prefill
  and at every decode step (ToMe's proportional attention, carried into the LLM). It then draws
  the attention its s sources drew together, where the official merged token counts once, so
  a merged background no longer loses weight against the objects and the text. With one decoder
  layer it is exact: the logits equal those of s copies at the token's position
  (``tests/test_llm_proportional.py``). On the embedded world (shipped model, n=900,
  ``results/fidelity/llm_proportional.md``) the kept share of full accuracy rises from 84.0% to
  90.4% at retention 0.25 and from 76.0% to 80.4% at 0.11;
- ``retention`` sets the merge budget (the LLM's input); the in-LLM schedule then applies its
  official relative rates (``prune=False`` turns it off). ``retention=1.0`` means no reduction
  at any stage, like every other method.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.base import Segment
from ..tokens.splice import to_device_async
from .base import InLLMPruner, PreLLMReducer, Reduction, members_by_slot


def bipartite_merge(x: torch.Tensor, r: int, owner: torch.Tensor | None = None):
    """One AIM merge pass over tokens in order.

    x: (n, D). Merges the ``r`` A tokens (even slots) most similar to a B token (odd slots) into
    it. ``owner``: (n0,) slot in x of every original token (default: the identity, n0 = n), so
    several passes compose. Returns (kept slot indices into x (m,), merged features (m, D),
    owner (n0,) slot in the output of every original token) with m = n - r, kept in order.
    Provenance is a vector rather than per-token lists: a pass is a few tensor ops, not a Python
    loop over tokens (that loop dominated the prefill on a GPU; ``results/speed-gpu/``).
    """
    n = x.shape[0]
    owner = owner if owner is not None else torch.arange(n)
    a_idx, b_idx = torch.arange(0, n, 2), torch.arange(1, n, 2)
    r = max(0, min(r, a_idx.numel(), b_idx.numel()))
    if r == 0:
        return torch.arange(n), x, owner
    metric = F.normalize(x.float(), dim=-1)
    best, dest = (metric[0::2] @ metric[1::2].T).max(-1)
    # index bookkeeping on the CPU (the same ties broken the same way on every device), read in
    # one transfer; the features stay on their device and get their indices in one copy back
    best, dest = torch.stack([best, dest.float()]).cpu()
    dest = dest.long()
    merged_a = best.argsort(descending=True)[:r]
    kept_a = torch.ones(a_idx.numel(), dtype=torch.bool)
    kept_a[merged_a] = False
    slots = torch.cat([a_idx[kept_a], b_idx]).sort()
    to_dest, merged, kept, order = to_device_split([dest[merged_a], merged_a, kept_a.nonzero().flatten(),
                                                    slots.indices], x.device)
    xa = x[0::2].float()
    out = x[1::2].float().scatter_reduce(0, to_dest[:, None].expand(-1, x.shape[1]), xa[merged], reduce="mean",
                                  include_self=True)
    feats = torch.cat([xa[kept], out])[order]
    new_slot = torch.empty(n, dtype=torch.long)  # where each slot of x goes in the output
    new_slot[slots.values] = torch.arange(slots.values.numel())
    new_slot[a_idx[merged_a]] = new_slot[b_idx[dest[merged_a]]]
    return slots.values, feats.to(x.dtype), new_slot[owner]


def to_device_split(parts: list[torch.Tensor], device) -> list[torch.Tensor]:
    """Host index tensors on ``device`` in one copy without a stream sync."""
    if torch.device(device).type != "cuda":
        return parts
    return list(to_device_async(torch.cat(parts), device).split([p.numel() for p in parts]))


def merge_to_budget(x: torch.Tensor, k: int, pass_fraction: float = 0.5):
    """Repeated AIM passes (r = min(cur - k, cur * pass_fraction), at least 1) until ``k``
    tokens remain; 0.5 is the official schedule (r = n/2, then n/4 reaches a quarter).
    Returns (kept slot indices into x, features (k, D), groups of original indices, sizes (k,):
    how many original tokens each kept token stands for)."""
    slots = torch.arange(x.shape[0])
    feats, owner = x, None
    while feats.shape[0] > max(k, 1):
        r = min(feats.shape[0] - k, max(1, int(feats.shape[0] * pass_fraction)))
        keep, feats, owner = bipartite_merge(feats, r, owner)  # r >= 1: every pass shrinks
        slots = slots[keep]
    owner = owner if owner is not None else torch.arange(x.shape[0])
    return slots, feats, members_by_slot(owner, slots.numel()), torch.bincount(owner, minlength=slots.numel())


# The depths the official code has a schedule for: the first layer whose rate is under 1, and
# the number of layers the rate takes to fall to 0 (1/8 a layer). 28: the vendored Qwen2
# (LLaVA-OneVision, LLaVA-Video); 32: the LLaVA-1.5 variant in
# ``other_packages/LLaVA-PruMerge/modeling_llama.py`` (rate[l] = 1 - (l - 12) * 0.125 from l = 13),
# which starts a layer before the middle where a scaled 28-layer schedule would start at 16.
OFFICIAL_SCHEDULES = {28: (14, 8), 32: (13, 8)}


def aim_schedule(num_layers: int, start: float = 0.5, end: float = 0.75) -> list[tuple[int, float]]:
    """Official rates, as this runtime's (first layer that sees the cut, rate).

    The official code ranks the tokens after layer l has run, by that layer's attention, with
    rate[l] (1 before ``start``*L, falling linearly to 0 at ``end``*L) and masks them from layer
    l+1 on; so the pair is (l+1, rate[l]) and the scores come from layer l (``tap_layer``).
    28 layers: 15 is the first layer with fewer visual tokens (87.5%), 22 the first with none.
    At the default ``start``/``end`` a depth with an official schedule (:data:`OFFICIAL_SCHEDULES`)
    gets it verbatim (32 layers: 14 is the first cut, 21 the first layer with none); any other
    depth gets the 28-layer schedule scaled.
    """
    first, last = round(num_layers * start), round(num_layers * end)
    span = max(1, last - first + 1)
    if (start, end) == (0.5, 0.75) and num_layers in OFFICIAL_SCHEDULES:
        first, span = OFFICIAL_SCHEDULES[num_layers]
    return [(layer + 1, max(0.0, 1.0 - (layer - first + 1) / span)) for layer in range(first, num_layers - 1)]


def pagerank_importance(probs, rows, row_valid, tau: float = 0.1, iters: int = 5) -> torch.Tensor:
    """PageRank-style visual importance from text-query attention.

    probs: (B, H, Q, T) attention of the query rows ``rows`` (B, Q) (their key positions);
    row_valid: (B, Q). The text distribution starts uniform and is pushed ``iters`` times through
    the text-to-text block of the attention at temperature ``tau``; the result pushed through
    the text-to-all attention, RMS over heads, is the importance (B, T).
    """
    sharp = torch.softmax(probs.clamp_min(1e-30).log() / tau, dim=-1)
    valid = row_valid.float()[:, None]  # (B, 1, Q)
    dist = valid.expand(-1, sharp.shape[1], -1) / valid.sum(-1, keepdim=True).clamp(min=1)
    index = rows[:, None].expand(-1, sharp.shape[1], -1)
    for _ in range(iters):
        dist = torch.gather(torch.einsum("bhq,bhqt->bht", dist, sharp), 2, index) * valid
        dist = dist / dist.sum(-1, keepdim=True).clamp(min=1e-12)
    return torch.einsum("bhq,bhqt->bht", dist, sharp).pow(2).mean(1).sqrt()


@dataclass
class AIM(PreLLMReducer, InLLMPruner):
    name = "aim"
    description = ("merge similar visual tokens per frame (each weighs its size in the LLM), then prune "
                   "progressively in the LLM by PageRank")
    query = "text"
    retention: float | None = 0.25
    prune: bool = True
    prune_start: float = 0.5
    prune_end: float = 0.75
    tau: float = 0.1
    iters: int = 5
    pass_fraction: float = 0.5  # the official r = n/2 first pass; see the module docstring
    proportional_attention: bool = True  # merged tokens weigh log(size) in the LLM; see the module docstring

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.prune_start <= self.prune_end <= 1.0:
            raise ValueError(f"aim needs 0 < prune_start <= prune_end <= 1, got {self.prune_start}, {self.prune_end}")
        if not 0.0 < self.pass_fraction <= 0.5:
            raise ValueError(f"aim's pass_fraction is the share of tokens one merge pass may merge, in (0, 0.5] "
                             f"(a pass can merge at most the A half), got {self.pass_fraction}")

    def reduce(self, features, segment: Segment, budget: int) -> Reduction:
        structural = segment.token_kinds()
        grid_idx, struct_idx = (~structural).nonzero().flatten(), structural.nonzero().flatten()
        k = max(0, budget - struct_idx.numel())
        slots, feats, groups, sizes = merge_to_budget(features[grid_idx], k, self.pass_fraction)
        keep = torch.cat([grid_idx[slots], struct_idx])
        order = keep.argsort()
        feats = torch.cat([feats, features[structural]])[order]
        sizes = torch.cat([sizes, torch.ones(struct_idx.numel(), dtype=sizes.dtype)])[order]

        def sources():  # per kept token, in order; built only when provenance is asked for
            every = [grid_idx[g] for g in groups] + list(struct_idx[:, None].unbind())
            return [every[i] for i in order.tolist()]

        return Reduction(keep[order].to(features.device), feats, sources, sizes=sizes)

    def schedule(self, num_layers: int):
        if not self.prune or self.keep_fraction() >= 1.0:  # retention 1.0: no reduction at any stage
            return []
        return aim_schedule(num_layers, self.prune_start, self.prune_end)

    def layer_budget(self, visual: int, share: float) -> int:
        """The official count: ``int((N - protected) * retain_rate)`` visual tokens, rounded down."""
        return int(visual * share + 1e-9)  # the epsilon: a product like 0.3 * 10 must not floor to 2

    def importance(self, probs, rows, row_valid, text_keys):
        return pagerank_importance(probs, rows, row_valid, self.tau, self.iters)
