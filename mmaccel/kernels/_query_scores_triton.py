"""Triton kernel for :func:`mmaccel.kernels.query_scores` (imported lazily: triton is heavy)."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_CONFIGS = [triton.Config({"BLOCK_T": 64}, num_warps=4), triton.Config({"BLOCK_T": 128}, num_warps=4)]
# the interpreter cannot benchmark: autotune must see exactly one config there
_CONFIGS = _CONFIGS[:1] if _INTERPRET else _CONFIGS


@triton.autotune(configs=_CONFIGS, key=["T", "D"])
@triton.jit
def _query_scores_kernel(Q, K, Bias, Out, T, D: tl.constexpr, scale,
                         sqb, sqh, sqq, skb, skh, skt, sbb, sbh, sbq, sob, soh, soq,
                         GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_T: tl.constexpr):
    b, h, qi = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + b * sqb + h * sqh + qi * sqq + d, mask=d < D, other=0.0).to(tl.float32)
    k_base = K + b * skb + (h // GROUP) * skh
    row_max = tl.full([1], float("-inf"), tl.float32)
    row_sum = tl.zeros([1], tl.float32)
    for start in range(0, T, BLOCK_T):  # pass 1: online max and normaliser
        logits = _block_logits(q, k_base, Bias, b, h, qi, start, T, D, scale, skt, sbb, sbh, sbq,
                               HAS_BIAS, BLOCK_D, BLOCK_T)
        new_max = tl.maximum(row_max, tl.max(logits, 0))
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)
        row_sum = row_sum * tl.exp(row_max - safe) + tl.sum(tl.exp(logits - safe), 0)
        row_max = new_max
    safe_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    for start in range(0, T, BLOCK_T):  # pass 2: normalised probabilities
        logits = _block_logits(q, k_base, Bias, b, h, qi, start, T, D, scale, skt, sbb, sbh, sbq,
                               HAS_BIAS, BLOCK_D, BLOCK_T)
        t = start + tl.arange(0, BLOCK_T)
        probs = tl.exp(logits - safe_max) / row_sum
        tl.store(Out + b * sob + h * soh + qi * soq + t, probs, mask=t < T)


@triton.jit
def _block_logits(q, k_base, Bias, b, h, qi, start, T, D: tl.constexpr, scale, skt, sbb, sbh, sbq,
                  HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    t = start + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    k = tl.load(k_base + t[:, None] * skt + d[None, :], mask=(t[:, None] < T) & (d[None, :] < D), other=0.0)
    logits = tl.sum(k.to(tl.float32) * q[None, :], 1) * scale
    if HAS_BIAS:
        logits += tl.load(Bias + b * sbb + h * sbh + qi * sbq + t, mask=t < T, other=0.0).to(tl.float32)
    return tl.where(t < T, logits, float("-inf"))


def query_scores_triton(q, k, bias, scale):
    """Launcher: one program per (batch, head, query row)."""
    b, h, nq, d = q.shape
    q, k = q.contiguous(), k.contiguous()
    out = torch.empty(b, h, nq, k.shape[2], dtype=torch.float32, device=q.device)
    if bias is not None:
        bias = bias.float().expand(b, h, nq, k.shape[2]).contiguous()
    strides_b = bias.stride()[:3] if bias is not None else (0, 0, 0)
    grid = (b, h, nq)
    _query_scores_kernel[grid](q, k, bias if bias is not None else q, out, k.shape[2], d, float(scale),
                               q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                               *strides_b, out.stride(0), out.stride(1), out.stride(2),
                               GROUP=h // k.shape[1], HAS_BIAS=bias is not None,
                               BLOCK_D=triton.next_power_of_2(d))
    return out
