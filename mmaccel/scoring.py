"""Query-subset attention scoring: the attention a few chosen queries pay to every key,
taken from inside the model's own attention call (SDPA, eager, ...) without switching to
eager mode and without materialising the N x N matrix.

The tap is an ``AttentionInterface`` entry that wraps the model's configured implementation:
it returns exactly what that implementation returns and, for layers carrying a tap request,
also computes ``softmax(q_sel k^T * scale + mask_sel)`` for the selected query rows only.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .stats import clock

WRAPPER_PREFIX = "mmaccel_"


def query_subset_attention(query: torch.Tensor, key: torch.Tensor, rows: torch.Tensor,
                           mask: torch.Tensor | None, scaling: float, causal: bool = True) -> torch.Tensor:
    """Attention probabilities of selected query rows against all keys.

    query: (B, H, Tq, D); key: (B, Hkv, Tk, D) with H a multiple of Hkv (GQA); rows: (B, Q)
    long indices into Tq; mask: None (then ``causal`` decides), or (B|1, 1|H, Tq, Tk) bool
    (True = attend) or additive float. Returns (B, H, Q, Tk) float32. Cost O(B*H*Q*Tk*D), never
    Tq x Tk; on CUDA the softmax rows come from the Triton kernel in :mod:`mmaccel.kernels`.
    """
    from .kernels import query_scores

    b, h, _, d = query.shape
    q = torch.gather(query, 2, rows[:, None, :, None].expand(b, h, -1, d))
    return query_scores(q, key, _row_bias(query, key, rows, mask, causal), scaling)


def _row_bias(query, key, rows, mask, causal) -> torch.Tensor | None:
    """Additive (B, 1|H, Q, Tk) bias of the selected rows: -inf where a key is not visible."""
    b = rows.shape[0]
    if mask is None:
        if not causal:
            return None
        offset = key.shape[2] - query.shape[2]  # key j is visible to query i iff j <= i + (Tk - Tq)
        visible = torch.arange(key.shape[2], device=key.device)[None, None, :] <= (rows + offset)[:, :, None]
        return torch.zeros(visible.shape, device=key.device).masked_fill(~visible, float("-inf"))[:, None]
    if mask.shape[2] == 1:  # one row for every query (a padding or size bias): broadcast before gathering
        mask = mask.expand(-1, -1, query.shape[2], -1)
    m = torch.gather(mask.expand(b, -1, -1, -1), 2, rows[:, None, :, None].expand(b, mask.shape[1], -1, mask.shape[-1]))
    if m.dtype == torch.bool:
        return torch.zeros(m.shape, device=m.device).masked_fill(~m, float("-inf"))
    return m.float()


def mean_received_attention(query, key, mask, scaling, causal: bool = False, chunk: int = 256) -> torch.Tensor:
    """Mean attention each key receives over all real queries, (B, H, Tk), in query chunks so the
    full Tq x Tk matrix never exists at once (for encoders without a CLS token). In
    self-attention a padded slot (a key no query may see, e.g. a shorter merged row of a batch)
    is a padded query too, and does not count."""
    b, _, tq, _ = query.shape
    real = _real_queries(mask, b, tq)
    total = None
    for start in range(0, tq, chunk):
        rows = torch.arange(start, min(start + chunk, tq), device=query.device).expand(b, -1)
        probs = query_subset_attention(query, key, rows, mask, scaling, causal)
        if real is not None:
            probs = probs * real[:, None, start:start + rows.shape[1], None]
        part = probs.sum(2)
        total = part if total is None else total + part
    return total / (tq if real is None else real.sum(1).clamp(min=1)[:, None, None])


def _real_queries(mask, b: int, tq: int) -> torch.Tensor | None:
    """(B, Tq) float: 1 for a query row that is real, 0 for padding (self-attention only);
    None where no row can be padding (no mask, or not self-attention)."""
    if mask is None or mask.shape[-1] != tq:
        return None
    visible = mask if mask.dtype == torch.bool else torch.isfinite(mask)
    return visible.expand(b, -1, -1, -1).any(2).any(1).float()


@dataclass
class TapRequest:
    """Ask a layer's attention call for scores (prefill only).

    mode ``"rows"``: probabilities of query ``rows`` (None = the last query), stored in ``probs``
    as (B, H, Q, Tk). Mode ``"cls"``: rows = [0]. Mode ``"mean_received"``: (B, H, Tk) mean over
    queries. Every call appends to ``collected`` (a layer may attend per image chunk).
    """

    rows: torch.Tensor | None = None
    mode: str = "rows"
    probs: torch.Tensor | None = None
    enabled: bool = True
    collected: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    seconds: float = 0.0  # time spent computing scores (the scoring overhead)

    def compute(self, module, query, key, mask, scaling, causal) -> torch.Tensor:
        if self.mode == "mean_received":
            return mean_received_attention(query, key, mask, scaling, causal)
        rows = self.rows
        if rows is None:
            start = 0 if self.mode == "cls" else query.shape[2] - 1
            rows = torch.full((query.shape[0], 1), start, dtype=torch.long, device=query.device)
        return query_subset_attention(query, key, rows, mask, scaling, causal)


def _eager_of(module):
    """The modeling file's own ``eager_attention_forward`` (eager is not in the global registry)."""
    import sys

    return sys.modules[type(module).__module__].eager_attention_forward


def _wrapped(base_name: str):
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        fn = ALL_ATTENTION_FUNCTIONS[base_name] if base_name in ALL_ATTENTION_FUNCTIONS else _eager_of(module)
        bias = getattr(module, "_mmaccel_bias", None)  # e.g. ToMe's proportional attention, log(size)
        queue = getattr(module, "_mmaccel_bias_queue", None)  # one bias per call (Qwen2-VL: per image)
        if queue:
            bias = queue.pop(0)
        if bias is not None and bias.shape[-1] == key.shape[-2]:
            bias = bias.to(query.dtype)
            if attention_mask is not None and attention_mask.dtype == torch.bool:
                attention_mask = torch.zeros_like(bias).masked_fill(~attention_mask, float("-inf"))
            attention_mask = bias if attention_mask is None else attention_mask + bias
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", True) if causal is None else causal
        key_bias = getattr(module, "_mmaccel_key_bias", None)  # the LLM's proportional attention
        if key_bias is not None:
            attention_mask = with_key_bias(attention_mask, key_bias, query, key, causal)
        out = fn(module, query, key, value, attention_mask, *args, **kwargs)
        tap: TapRequest | None = getattr(module, "_mmaccel_tap", None)
        if tap is not None and tap.enabled and query.shape[2] > 1:
            scaling = kwargs.get("scaling") or getattr(module, "scaling", None) or module.scale
            mask = attention_mask[..., : key.shape[-2]] if attention_mask is not None else None
            start = clock()
            tap.probs = tap.compute(module, query, key, mask, scaling, causal)
            tap.seconds += clock() - start
            tap.collected.append(tap.probs)
        return out

    return attention


def with_key_bias(mask: torch.Tensor | None, bias: torch.Tensor, query, key, causal: bool) -> torch.Tensor:
    """An additive mask: ``mask`` (None, bool or additive, (B|1, 1|H, Tq, >=Tk)) plus a per-key
    bias (B, Tb), Tb <= Tk: the first Tb keys (a prefill's) get it and later keys (tokens decoded
    since, appended to the cache) get 0. Where the model left the mask to SDPA's ``is_causal``
    (mask None, Tq > 1), causality is built here: a bias alone would let queries see the future.
    Hidden keys get the dtype's minimum, not -inf, so a padded row with no visible key stays finite."""
    tq, tk = query.shape[2], key.shape[2]
    if bias.shape[-1] > tk:  # the cache lost tokens the bias still counts: the layouts disagree
        raise RuntimeError(f"mmaccel: a key bias of {bias.shape[-1]} tokens for {tk} keys")
    bias = torch.nn.functional.pad(bias.to(query.dtype), (0, tk - bias.shape[-1]))[:, None, None]
    if mask is None and causal and tq > 1:
        mask = torch.arange(tk, device=key.device)[None] <= torch.arange(tq, device=key.device)[:, None] + (tk - tq)
    if mask is None:
        return bias
    mask = mask[..., :tk]
    lowest = torch.finfo(query.dtype).min
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=key.device).masked_fill(~mask, lowest)
    return (mask + bias).clamp_min(lowest)


def register_wrapper(base_name: str) -> str:
    """Register (once) the tapping wrapper around ``base_name`` and return its name."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base_name.startswith(WRAPPER_PREFIX):  # already wrapped (several mmaccel stages share it)
        return base_name
    name = WRAPPER_PREFIX + base_name
    if name not in ALL_ATTENTION_FUNCTIONS:
        if base_name not in ALL_ATTENTION_FUNCTIONS and base_name != "eager":
            raise ValueError(f"attention implementation {base_name!r} is not registered in transformers")
        AttentionInterface.register(name, _wrapped(base_name))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base_name])
    return name
