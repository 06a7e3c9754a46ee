"""STC-Cacher (Wang et al., CVPR 2026): reuse the ViT computation of static tokens across frames.

Frames are encoded one chunk at a time. Every ``cache_interval``-th chunk is a reference: each
encoder layer runs in full and keeps its keys, values, attention output and MLP output. In the
other chunks every layer computes the keys of all tokens, picks the ``update_ratio`` share
least cosine-similar to the reference keys ("dynamic" tokens), and computes queries, values,
attention rows and the MLP only for them; static tokens take their values, attention output and
MLP output from the reference, while residuals still add the current states. Official
defaults: ``cache_interval=2``, ``update_ratio=0.25``.

``similarity_threshold`` switches to the rule the paper's README states (reuse a token whose key
cosine similarity to the reference is above 0.85) instead of the official code's fixed share:
each layer then recomputes exactly the tokens below the threshold, so a static stretch costs
little more than the keys and a busy one is recomputed in full. In a batch every row recomputes
the largest such count (the extra rows are computed exactly, so nothing is lost).

The layer forward below is a re-statement of CLIP/SigLIP's ``EncoderLayer.forward`` +
``Attention.forward`` (pre-norm attention and MLP blocks, with ``layer_norm1``, ``self_attn.
{q,k,v,out}_proj``, ``layer_norm2``, ``mlp``) with the selective recompute added; a test pins it
to the library's own output on reference chunks. Unlike the official code, every cached tensor
lives in a ``CacherState`` owned by the caller (no process-wide singleton, no module attributes),
so several streams can share one model, and it works with any attention implementation's math
(it computes the dynamic rows with ``scaled_dot_product_attention``).
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class CacherState:
    """Per-stream STC-Cacher state: the reference chunk's per-layer tensors and a chunk counter."""

    cache_interval: int = 2
    update_ratio: float = 0.25
    similarity_threshold: float | None = None  # the README's rule (0.85) instead of the fixed ratio
    chunk: int = 0
    reference: dict = field(default_factory=dict)  # layer -> {"k", "v", "attn", "mlp"}
    recomputed: int = 0  # tokens whose attention/MLP rows were computed (for cost accounting)
    total: int = 0

    def __post_init__(self):
        if self.cache_interval < 1:
            raise ValueError(f"cache_interval must be >= 1, got {self.cache_interval}")
        if not 0.0 < self.update_ratio <= 1.0:
            raise ValueError(f"update_ratio must be in (0, 1], got {self.update_ratio}")
        if self.similarity_threshold is not None and not -1.0 <= self.similarity_threshold <= 1.0:
            raise ValueError(f"similarity_threshold must be in [-1, 1], got {self.similarity_threshold}")

    @property
    def is_reference(self) -> bool:
        return self.chunk % self.cache_interval == 0 or not self.reference


def _heads(x: torch.Tensor, attn) -> torch.Tensor:
    """(B, N, H*d) -> (B, H, N, d)."""
    return x.view(x.shape[0], x.shape[1], -1, attn.head_dim).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


def reference_layer(layer, h: torch.Tensor, store: dict) -> torch.Tensor:
    """Full layer forward that keeps keys (flat (B, N, D)), values, attention output and MLP
    output in ``store``."""
    attn = layer.self_attn
    x = layer.layer_norm1(h)
    k = attn.k_proj(x)
    q, v = _heads(attn.q_proj(x), attn), _heads(attn.v_proj(x), attn)
    out = attn.out_proj(_merge(F.scaled_dot_product_attention(q, _heads(k, attn), v, scale=attn.scale)))
    h = h + out
    mlp = layer.mlp(layer.layer_norm2(h))
    store.update(k=k, v=v, attn=out, mlp=mlp)
    return h + mlp


def _dynamic_rows(k: torch.Tensor, ref_k: torch.Tensor, ratio: float, threshold: float | None = None) -> torch.Tensor:
    """(B, n) sorted indices of the tokens whose keys are least cosine-similar to the reference
    keys (k, ref_k: (B, N, D)): the ``ratio`` share, or with ``threshold`` the most tokens of any
    row whose similarity is below it (at least one)."""
    similarity = F.cosine_similarity(k, ref_k, dim=-1)  # (B, N)
    if threshold is None:
        n_dyn = max(1, round(ratio * k.shape[1]))
    else:
        n_dyn = max(1, int((similarity < threshold).sum(1).max()))
    return similarity.topk(n_dyn, dim=1, largest=False).indices.sort(dim=1).values


def _dynamic_attention(layer, h: torch.Tensor, ref: dict, ratio: float, threshold: float | None = None):
    """The recompute shared by both cached-layer forms: keys of all tokens, the dynamic rows,
    and those rows' attention output (queries of dynamic rows against all current keys, with
    the reference values outside them). Returns (dyn (B, n), rows (B, n, D), attn_dyn (B, n, D))."""
    attn = layer.self_attn
    x = layer.layer_norm1(h)
    k = attn.k_proj(x)
    dyn = _dynamic_rows(k, ref["k"], ratio, threshold)
    rows = dyn[:, :, None].expand(-1, -1, x.shape[-1])
    x_dyn = torch.gather(x, 1, rows)
    q_dyn, v_dyn = _heads(attn.q_proj(x_dyn), attn), _heads(attn.v_proj(x_dyn), attn)
    v = ref["v"].clone()
    v.scatter_(2, dyn[:, None, :, None].expand(-1, v.shape[1], -1, v.shape[-1]), v_dyn)
    out = F.scaled_dot_product_attention(q_dyn, _heads(k, attn), v, scale=attn.scale)
    return dyn, rows, attn.out_proj(_merge(out))


def cached_layer(layer, h: torch.Tensor, ref: dict, ratio: float,
                 threshold: float | None = None) -> tuple[torch.Tensor, int]:
    """Selective recompute against the reference; returns (output, dynamic tokens per sample).

    Same values as :func:`cached_layer_reference`, bit for bit, with fewer full-size copies:
    the residual adds the reference's attention / MLP output to every row and then overwrites
    the dynamic rows, instead of cloning the reference outputs and scattering into them.
    """
    dyn, rows, attn_dyn = _dynamic_attention(layer, h, ref, ratio, threshold)
    mid = h + ref["attn"]
    mid.scatter_(1, rows, torch.gather(h, 1, rows) + attn_dyn)
    mid_dyn = torch.gather(mid, 1, rows)
    out = mid + ref["mlp"]
    out.scatter_(1, rows, mid_dyn + layer.mlp(layer.layer_norm2(mid_dyn)))
    return out, dyn.shape[1]


def cached_layer_reference(layer, h: torch.Tensor, ref: dict, ratio: float,
                           threshold: float | None = None) -> tuple[torch.Tensor, int]:
    """Plain re-statement of the official selective recompute (clone the reference outputs,
    scatter the dynamic rows in); the test oracle of :func:`cached_layer`."""
    dyn, rows, attn_dyn = _dynamic_attention(layer, h, ref, ratio, threshold)
    out = ref["attn"].clone()
    out.scatter_(1, rows, attn_dyn)
    h = h + out
    mlp = ref["mlp"].clone()
    mlp.scatter_(1, rows, layer.mlp(layer.layer_norm2(torch.gather(h, 1, rows))))
    return h + mlp, dyn.shape[1]


_TOWER_LOCKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # first tower layer -> its lock
_REGISTRY_LOCK = threading.Lock()


def _tower_lock(layer) -> threading.Lock:
    """One lock per tower: the cacher swaps the tower's layer forwards, which every thread using
    that model sees, so streams in threads take turns for a cached chunk's encoding."""
    with _REGISTRY_LOCK:
        return _TOWER_LOCKS.setdefault(layer, threading.Lock())


class STCCacher:
    """Install on a CLIP/SigLIP tower for the duration of one chunk's encoding:

    >>> with STCCacher(layers, state):
    ...     feats = model.model.get_video_features(pixels)

    Thread-safe: while installed it holds the tower's lock, so sessions in several threads
    encode their cached chunks one at a time (each with its own state).
    """

    def __init__(self, layers, state: CacherState, layer_fn=None):
        for layer in layers:
            missing = [n for n in ("layer_norm1", "self_attn", "layer_norm2", "mlp") if not hasattr(layer, n)]
            if missing:
                raise ValueError(f"STC-Cacher needs CLIP/SigLIP-style encoder layers; {type(layer).__name__} lacks {missing}")
        self.layers, self.state = list(layers), state
        self.layer_fn = layer_fn or cached_layer

    def _forward(self, index: int, layer):
        state = self.state

        def forward(hidden_states, attention_mask=None, *args, **kwargs):  # vision towers pass no mask
            if state.is_reference:
                store = state.reference.setdefault(index, {})
                state.recomputed += hidden_states.shape[1] * hidden_states.shape[0]
                state.total += hidden_states.shape[1] * hidden_states.shape[0]
                return reference_layer(layer, hidden_states, store)
            out, n_dyn = self.layer_fn(layer, hidden_states, state.reference[index], state.update_ratio,
                                       state.similarity_threshold)
            state.recomputed += n_dyn * hidden_states.shape[0]
            state.total += hidden_states.shape[1] * hidden_states.shape[0]
            return out

        return forward

    def __enter__(self):
        self._lock = _tower_lock(self.layers[0])
        self._lock.acquire()
        for i, layer in enumerate(self.layers):
            layer.forward = self._forward(i, layer)
        return self

    def __exit__(self, *exc):
        try:
            for layer in self.layers:
                del layer.forward
            if exc[0] is None:
                self.state.chunk += 1
        finally:
            self._lock.release()
        return False
