"""One ``Stats`` record per forward/generate call, read by the API, CLI, demo and benchmarks."""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, field

_SYNC_CUDA = False  # see synced_clock(): off by default, so hooks never stall the GPU stream


def clock() -> float:
    """``time.perf_counter()``; inside :func:`synced_clock` it first waits for queued CUDA work,
    so stage timings (``reduce``, ``scoring``) are GPU time rather than launch time."""
    if _SYNC_CUDA:
        import torch

        torch.cuda.synchronize()
    return time.perf_counter()


@contextlib.contextmanager
def synced_clock(enabled: bool = True):
    """Make :func:`clock` synchronise CUDA while the block runs (benchmarks on a GPU use it;
    a sync per timed stage costs a little, so normal runs leave it off)."""
    global _SYNC_CUDA
    before, _SYNC_CUDA = _SYNC_CUDA, enabled
    try:
        yield
    finally:
        _SYNC_CUDA = before


@dataclass
class Stats:
    """What a call cost. Token counts are batch totals without padding.

    visual_tokens_in: visual placeholder tokens the processor produced.
    visual_tokens_per_layer: visual tokens each LLM decoder layer processed during prefill.
    tokens_per_layer: all tokens (text + visual) each decoder layer processed during prefill.
    prefill_flops: analytic FLOPs of the decoder prefill (projections, MLP, causal attention,
        LM head on the last position), from the actual per-layer lengths.
    timings: stage -> seconds: ``vision`` (tower + projector), ``prefill`` (the prefill forward;
        in ``generate`` the media are encoded before it), ``decode``, ``total`` (generate), and the
        method's own overhead inside prefill: ``reduce`` (selection, merging, splicing) and
        ``scoring`` (query-subset attention scores).
    """

    method: str = "none"
    batch_size: int = 0
    visual_tokens_in: int = 0
    visual_tokens_per_layer: list[int] = field(default_factory=list)
    tokens_per_layer: list[int] = field(default_factory=list)
    prefill_flops: float = 0.0
    prefill_flops_full: float = 0.0  # the same formula with no reduction, for the FLOP ratio
    kv_cache_tokens: int = 0  # K/V entries held after prefill, summed over layers and batch
    new_tokens: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def visual_tokens_kept(self) -> int:
        return self.visual_tokens_per_layer[-1] if self.visual_tokens_per_layer else self.visual_tokens_in

    @property
    def flop_ratio(self) -> float:
        return self.prefill_flops_full / self.prefill_flops if self.prefill_flops else 1.0

    def add_time(self, stage: str, seconds: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + seconds

    def to_dict(self) -> dict:
        d = asdict(self)
        d["visual_tokens_kept"] = self.visual_tokens_kept
        d["flop_ratio"] = self.flop_ratio
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def summary(self) -> str:
        ms = {k: f"{v * 1e3:.1f} ms" for k, v in self.timings.items()}
        return (f"{self.method}: visual tokens {self.visual_tokens_in} -> {self.visual_tokens_kept}, "
                f"prefill {self.prefill_flops / 1e9:.3f} GFLOP (x{self.flop_ratio:.2f} fewer), {ms}")


def layer_prefill_flops(cfg, n: int) -> float:
    """Analytic FLOPs of one decoder layer on a sequence of ``n`` tokens (one sample, causal)."""
    d = cfg.hidden_size
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or d // heads
    kv = getattr(cfg, "num_key_value_heads", heads) * head_dim
    q = heads * head_dim
    proj = 2 * n * d * (2 * q + 2 * kv)  # q, k, v, o
    mlp = 2 * n * 3 * d * cfg.intermediate_size  # gated MLP: gate, up, down
    attn = 2 * 2 * q * n * (n + 1) / 2  # QK^T and AV over the causal half
    return float(proj + mlp + attn)


def prefill_flops(cfg, tokens_per_layer_per_sample: list[list[int]]) -> float:
    """Sum over layers and samples, plus the LM head on each sample's last position."""
    total = sum(layer_prefill_flops(cfg, n) for layer in tokens_per_layer_per_sample for n in layer)
    batch = len(tokens_per_layer_per_sample[0]) if tokens_per_layer_per_sample else 0
    return total + batch * 2.0 * cfg.hidden_size * cfg.vocab_size


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
