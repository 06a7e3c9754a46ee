"""STC-Cacher on Qwen2-VL / Qwen2.5-VL vision towers (not in the official code, which caches
CLIP/SigLIP layers only; see :mod:`mmaccel.vision.stc_cacher` for the method).

The unit is a temporal slice (2 frames), encoded alone as a stream encodes it. A Qwen vision
block is a pre-norm attention over packed tokens (``cu_seqlens``: the slice, or Qwen2.5-VL's
attention windows in its windowed blocks) with 2-D rotary embeddings, then an MLP. On a cached
slice each block computes the keys of all tokens (the key rows of the fused ``qkv``), picks the
``update_ratio`` share whose pre-rotary keys are least cosine-similar to the reference slice's,
and computes queries, values, attention rows and the MLP for those tokens only; the others take
the reference's values, attention output and MLP output, and residuals add the current states,
as in the CLIP/SigLIP cacher. Attention runs as ``scaled_dot_product_attention`` under a mask
that keeps each token inside its ``cu_seqlens`` chunk; a test pins the reference pass to the
library's block.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .stc_cacher import STCCacher, _dynamic_rows


def _chunk_mask(cu_seqlens: torch.Tensor, n: int) -> torch.Tensor | None:
    """(n, n) True where two packed tokens share a ``cu_seqlens`` chunk; None when all do (one
    chunk: attention needs no mask, and the unmasked kernel is the faster one)."""
    if len(cu_seqlens) == 2:
        return None
    chunk = torch.searchsorted(cu_seqlens[1:].to(torch.long), torch.arange(n, device=cu_seqlens.device), right=True)
    return chunk[:, None] == chunk[None, :]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The vision rotary embedding of ``x`` (n, H, d) at rows ``cos``/``sin`` (n, d), in float32 as
    the library's ``apply_rotary_pos_emb_vision``."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import rotate_half

    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    return (x.float() * cos + rotate_half(x.float()) * sin).to(x.dtype)


def _project(attn, x: torch.Tensor, part: int) -> torch.Tensor:
    """Rows ``part`` (0 queries, 1 keys, 2 values) of the fused ``qkv`` of x (n, D) -> (n, H, d)."""
    dim = attn.qkv.in_features
    rows = slice(part * dim, (part + 1) * dim)
    bias = attn.qkv.bias[rows] if attn.qkv.bias is not None else None
    return F.linear(x, attn.qkv.weight[rows], bias).view(x.shape[0], attn.num_heads, -1)


def _attend(attn, q, k, v, mask) -> torch.Tensor:
    """q (m, H, d) over k, v (n, H, d) under ``mask`` (m, n) -> projected output (m, D)."""
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask, scale=attn.scaling)
    return attn.proj(out.transpose(0, 1).reshape(q.shape[0], -1))


def qwen_reference_block(block, x: torch.Tensor, cu_seqlens, position_embeddings, store: dict) -> torch.Tensor:
    """Full block forward on x (N, D) that keeps the pre-rotary keys (N, D), the values, the
    attention output and the MLP output in ``store``."""
    attn, (cos, sin) = block.attn, position_embeddings
    h = block.norm1(x)
    q, k, v = (_project(attn, h, part) for part in range(3))
    out = _attend(attn, _rotate(q, cos, sin), _rotate(k, cos, sin), v, _chunk_mask(cu_seqlens, x.shape[0]))
    mid = x + out
    mlp = block.mlp(block.norm2(mid))
    store.update(k=k.flatten(1)[None], v=v, attn=out, mlp=mlp)
    return mid + mlp


def qwen_cached_block(block, x: torch.Tensor, cu_seqlens, position_embeddings, ref: dict, ratio: float,
                      threshold: float | None = None) -> tuple[torch.Tensor, int]:
    """Selective recompute of one block against the reference; -> (output (N, D), dynamic tokens)."""
    attn, (cos, sin) = block.attn, position_embeddings
    h = block.norm1(x)
    k = _project(attn, h, 1)
    dyn = _dynamic_rows(k.flatten(1)[None], ref["k"], ratio, threshold)[0]
    q_dyn, v_dyn = _project(attn, h[dyn], 0), _project(attn, h[dyn], 2)
    v = ref["v"].clone()
    v[dyn] = v_dyn
    mask = _chunk_mask(cu_seqlens, x.shape[0])
    mask = None if mask is None else mask[dyn]
    attn_dyn = _attend(attn, _rotate(q_dyn, cos[dyn], sin[dyn]), _rotate(k, cos, sin), v, mask)
    mid = x + ref["attn"]
    mid[dyn] = x[dyn] + attn_dyn
    out = mid + ref["mlp"]
    out[dyn] = mid[dyn] + block.mlp(block.norm2(mid[dyn]))
    return out, dyn.numel()


class QwenSTCCacher(STCCacher):
    """:class:`STCCacher` for the blocks of a Qwen2-VL / Qwen2.5-VL tower, one slice at a time:

    >>> with QwenSTCCacher(model.model.visual.blocks, state):
    ...     feats = model.model.get_video_features(pixels, grid_thw)
    """

    def __init__(self, blocks, state):
        for block in blocks:
            missing = [n for n in ("norm1", "attn", "norm2", "mlp") if not hasattr(block, n)]
            if missing or not hasattr(block.attn, "qkv"):
                raise ValueError(f"the Qwen STC-Cacher needs Qwen2-VL vision blocks; {type(block).__name__} lacks "
                                 f"{missing or ['attn.qkv']}")
        self.layers, self.state = list(blocks), state

    def _forward(self, index: int, block):
        state = self.state

        def forward(hidden_states, cu_seqlens, rotary_pos_emb=None, position_embeddings=None, **kwargs):
            n = hidden_states.shape[0]
            state.total += n
            if state.is_reference:
                state.recomputed += n
                store = state.reference.setdefault(index, {})
                return qwen_reference_block(block, hidden_states, cu_seqlens, position_embeddings, store)
            if state.reference[index]["mlp"].shape != hidden_states.shape:
                raise ValueError(f"STC-Cacher: a slice of {n} patches after a reference of "
                                 f"{state.reference[index]['mlp'].shape[0]}; the frames of one stream must share a size")
            out, n_dyn = qwen_cached_block(block, hidden_states, cu_seqlens, position_embeddings,
                                           state.reference[index], state.update_ratio, state.similarity_threshold)
            state.recomputed += n_dyn
            return out

        return forward
