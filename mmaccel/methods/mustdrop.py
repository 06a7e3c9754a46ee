"""MustDrop (Liu et al., 2024; liuting20/MustDrop): measure token importance across the whole
life cycle: a key set from the vision tower, dual-attention filtering during prefill, and an
output-aware KV-cache policy for decoding.

- Key set: the top 8% of each image's tokens left after the window merge (``ceil(0.08 * n)``,
  as the official code counts them), by CLS attention at the tower's last layer (mean received
  attention for towers without CLS), are never dropped.
- Prefill, at layers 2/6/10/14 of 32 (scaled to the decoder's depth; each filter reads its
  layer's own attention and the cut holds from the next layer on, as in the official code): with
  A the head-mean attention of the text after the media over the visual tokens, visual token j is
  dropped iff
  ``sum_t A[t, j] < global_thr * sum_tj A`` and ``max_t A[t, j] < individual_thr`` (official
  defaults 0.001 / 0.001, the ~192-token setting; presets hold the 128 and 64 settings).
- Decode: the caches from the first scoring layer on keep only the tokens the last stage kept.

With ``retention`` the thresholds give way to a budget: the tokens with the lowest summed
attention go first, the kept share falling geometrically over the pruning layers to
``retention`` at the last one, key tokens always kept. The shares count the image's tokens
before the window merge, so mustdrop ends at the same number of visual tokens as every other
method at that retention (counted after the merge it ended under it: 19.7 of 99 at 0.25).
Deliberate differences: scores come from the query-subset tap (SDPA stays SDPA, never N x N),
kept tokens keep their positions unless the policy is ``compact`` (the official code
renumbers), batches get per-sample sets, layer choices scale with depth instead of the
hard-coded 32; the window merge (see :mod:`mmaccel.vision.window_merge`) is per image rather
than ``min`` over the batch and keeps spatial order. As in the official code, every later
block runs on the merged tokens and the key set ranks them (CLS attention, or on SigLIP the
mean attention received from the real, unpadded queries); the feature layer's output is copied
back to the merged windows' cells for the model's projector and packing, and the pre-LLM step
keeps one token per window. Unlike the official code, the blocks after the merge weigh
a merged window by its size (``proportional_attention``, default on: log(size) added to the
attention logits, ToMe's proportional attention), so it attends and is attended as its nine
copies would be; the official code propagates no sizes, so a merged background window counts as
one token and every object token gains attention share. On the embedded model (seed 15's first
300 caption scenes, retention 0.25) that shift made captions list objects twice ("a yellow
square and a yellow square" for one square): 124 right of 300 with the official weighting, 192
with sizes, 225 at full tokens (``results/fidelity/mustdrop_proportional.md``). On
Qwen2-VL the cells are the tower's 2x2 merge windows (one language-model token each), so a
merged 3x3 block is nine LLM tokens (:mod:`.tome_qwen`); on Qwen2.5-VL the 3x3 blocks tile
each attention window on its own (4x4 merge windows in the real model: one block per full
window, none in edge windows under 3 wide), so no merge crosses a window and the windowed
attention stays exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import InLLMPruner, PreLLMReducer, Reduction
from .tome import one_per_group
from .visionzip import feature_layer, head_scores

OFFICIAL_LAYERS = (2, 6, 10, 14)


def scaled_layers(num_layers: int) -> list[int]:
    """The official 32-layer scoring layers scaled to ``num_layers``: distinct, >= 1 (layer 0
    keeps the full sequence and cache, as layers 0-1 do in the official code) and at most
    ``num_layers - 2`` (a cut needs a layer after it)."""
    return sorted({min(num_layers - 2, max(1, round(l * num_layers / 32))) for l in OFFICIAL_LAYERS})


def dual_attention_keep(attn, valid, visual, global_thr: float, individual_thr: float) -> torch.Tensor:
    """attn: (B, Q, L) head-mean attention of the query rows (padded rows zeroed). Returns the
    visual tokens that pass the dual filter, (B, L) bool."""
    vis = (valid & visual).float()[:, None]
    a = attn * vis
    total = a.sum((1, 2), keepdim=True).squeeze(1)  # (B, 1)
    summed, peak = a.sum(1), a.amax(1)
    drop = (summed < global_thr * total) & (peak < individual_thr)
    return valid & visual & ~drop


@dataclass
class MustDrop(PreLLMReducer, InLLMPruner):
    name = "mustdrop"
    description = "key set from the ViT, dual-attention pruning in prefill, output-aware KV cache (MustDrop)"
    query = "text"
    budget_base = "original"
    retention: float | None = None
    global_thr: float = 0.001
    individual_thr: float = 0.001
    key_ratio: float = 0.08
    window_merge: bool = True
    merge_threshold: float = 0.8
    proportional_attention: bool = True  # not in the official code (False there); see the module docstring
    vision_mode = "auto"

    def vision_layers(self, adapter) -> list[int]:
        return [len(adapter.vision_layers) - 1]

    def llm_proportional(self) -> bool:
        """No: ``proportional_attention`` weighs the merged windows in the tower. In the LLM too it
        changed nothing on the embedded world (``results/fidelity/llm_proportional.md``), so the
        LLM keeps its own mask (and any attention kernel)."""
        return False

    def reduce_media(self, features, segments, budget):
        """Keep one token per merged window and mark the key set (top ``key_ratio`` of each image
        by the tower's last-layer attention), which later stages never drop."""
        out = []
        for seg in segments:
            red = one_per_group(seg)  # no sizes: see llm_proportional
            tap = [v for k, v in seg.scores.items() if not str(k).startswith("merge_")]
            scores = head_scores(tap[0]).cpu()[red.keep]  # red.keep is on the CPU
            # official: ceil(0.08 * (N - 1)) of the tokens left *after* the window merge
            scorable = int(torch.isfinite(scores).sum())
            k = min(math.ceil(self.key_ratio * scorable), scorable)
            red.protected = red.keep[scores.topk(k).indices]
            out.append(red)
        return out

    def install_tower(self, runtime) -> list:
        if not self.window_merge or self.retention == 1.0:
            return []
        from .tome import wrap_tower_attention

        adapter = runtime.adapter
        if adapter.uses_mrope:
            return self._install_qwen(runtime)
        layers, last = adapter.vision_layers, feature_layer(adapter)
        if last < 1:
            return []
        state: dict = {}
        handles = [layers[1].register_forward_pre_hook(self._merge_hook(runtime, state), with_kwargs=True)]
        return handles + merged_to_the_end(runtime, state, last) + wrap_tower_attention(adapter)

    def _install_qwen(self, runtime) -> list:
        """Qwen2-VL / Qwen2.5-VL: the merge works on whole 2x2 merge windows (:mod:`.tome_qwen`),
        within each image (Qwen2-VL) or each attention window (Qwen2.5-VL)."""
        from .tome_qwen import mustdrop_installer

        return mustdrop_installer(runtime, self.merge_threshold, proportional=self.proportional_attention).install()

    def _merge_hook(self, runtime, state):
        from ..vision.window_merge import merge_rows

        def hook(module, args, kwargs):
            if runtime.current_kind != "image":
                return None
            x = args[0] if args else kwargs["hidden_states"]
            merged, state["assign"], bias = merge_rows(x, runtime.adapter.vision_has_cls, self.merge_threshold,
                                                       proportional=self.proportional_attention)
            for layer in runtime.adapter.vision_layers:
                runtime.adapter.attention_of(layer)._mmaccel_bias = bias
            return ((merged,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": merged})

        return hook

    def keep_fraction(self) -> float:
        return 1.0  # nothing is dropped before the LLM

    def check_model(self, adapter) -> None:
        if len(adapter.layers) < 3:
            raise ValueError(f"mustdrop needs a decoder of at least 3 layers (one with the full sequence, one that "
                             f"scores, one that sees the cut); this one has {len(adapter.layers)}")

    def schedule(self, num_layers: int):
        """As in the official code, the filter runs on a scoring layer's own attention and the cut
        holds from the next layer on: (scoring layer + 1, share kept)."""
        layers = scaled_layers(num_layers)
        if self.retention is None:
            return [(layer + 1, 1.0) for layer in layers]
        r = float(self.retention)
        if r >= 1.0:
            return []
        return [(layer + 1, r ** ((i + 1) / len(layers))) for i, layer in enumerate(layers)]

    def select(self, probs, rows, row_valid, valid, visual, protected, budgets):
        attn = probs.mean(1) * row_valid[..., None].float()  # (B, Q, L)
        if self.retention is None:
            keep = dual_attention_keep(attn, valid, visual, self.global_thr, self.individual_thr)
            return keep | (valid & ~visual) | protected
        return super().select(probs, rows, row_valid, valid, visual, protected, budgets)

    def importance(self, probs, rows, row_valid, text_keys):
        return (probs.mean(1) * row_valid[..., None].float()).sum(1)

    def after_prefill(self, runtime, cache) -> None:
        # the official policy cuts the cache from the first scoring layer on, which ran on the full sequence
        runtime.shrink_caches_to_final(cache, from_layer=scaled_layers(len(runtime.adapter.layers))[0])


def merged_to_the_end(runtime, state: dict, feature: int) -> list:
    """Every block after the merge runs on the merged sequence, as in the official code. The
    feature block's output is copied back to the sources for the projector (hidden_states
    [feature] is recorded after this hook: ``prepend``), a later block takes one copy per merged
    token again, and the key-set scores the last block's attention gives the merged tokens (CLS
    rows, or mean received over the real queries) are spread back over their sources."""
    from .tome import expand_to_sources

    layers = runtime.adapter.vision_layers

    def expand_output(module, args, output):
        if "assign" not in state:
            return None
        full = expand_to_sources(output[0] if isinstance(output, tuple) else output, state["assign"], runtime)
        return (full,) + tuple(output[1:]) if isinstance(output, tuple) else full

    def remerge(module, args, kwargs):
        if "assign" not in state:
            return None
        x = args[0] if args else kwargs["hidden_states"]
        rows = torch.gather(x, 1, _first_sources(state["assign"])[..., None].expand(-1, -1, x.shape[-1]))
        return ((rows,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": rows})

    def finish(module, args, output):
        for layer in layers:
            vars(runtime.adapter.attention_of(layer)).pop("_mmaccel_bias", None)
        assign = state.pop("assign", None)
        tap = getattr(runtime.adapter.attention_of(module), "_mmaccel_tap", None)
        if assign is not None and tap is not None and tap.collected:
            entry = tap.collected[-1]  # (B, H, 1, L) CLS rows or (B, H, L) means over the merged tokens
            index = assign.view(assign.shape[0], *([1] * (entry.dim() - 2)), -1)
            tap.collected[-1] = torch.gather(entry, -1, index.expand(*entry.shape[:-1], -1))

    handles = [layers[-1].register_forward_hook(finish)]  # first: it reads the merged assignment
    if feature + 1 < len(layers):
        handles.append(layers[feature + 1].register_forward_pre_hook(remerge, with_kwargs=True))
    return handles + [layers[feature].register_forward_hook(expand_output, prepend=True)]


def _first_sources(assign: torch.Tensor) -> torch.Tensor:
    """(B, N0) merged slot of every token -> (B, L) the first token of every slot (slots past a
    shorter row's end, padding, take token 0; attention masks them out)."""
    from .tome import first_sources

    first = first_sources(assign, int(assign.max()) + 1)
    return first.masked_fill(first == assign.shape[1], 0)
