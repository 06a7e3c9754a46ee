"""FastV (Chen et al., ECCV 2024; pkunlp-icler/FastV).

At decoder layer K the visual tokens are ranked by the attention the **last token** pays them
in layer K-1, averaged over heads, and only the top ``round(n_visual * (1 - R))`` stay.
Official defaults: K=2, R=50%. ``retention`` overrides 1-R.

Deliberate differences from the official code: pruned tokens really leave the hidden states
and the KV cache of layers >= K (the official code has variants that only mask), kept tokens
keep their original positions unless the position policy says ``compact``, the scores come
from a query-subset scoring pass under SDPA (no eager attention, no N x N matrix), and every
sample of a padded batch gets its own budget and kept set (the official code is batch 1).
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import InLLMPruner


@dataclass
class FastV(InLLMPruner):
    name = "fastv"
    description = "prune visual tokens at LLM layer K by the last token's attention at K-1"
    k: int = 2
    ratio: float = 0.5  # R, the fraction of visual tokens pruned

    def __post_init__(self):
        super().__post_init__()
        if self.k < 1:
            raise ValueError(f"fastv k must be >= 1 (it prunes at layer k from layer k-1's attention), got {self.k}")
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"fastv ratio R must be in [0, 1), got {self.ratio}")

    def keep_fraction(self) -> float:
        return 1.0 - self.ratio if self.retention is None else float(self.retention)

    def schedule(self, num_layers: int):
        return [(self.k, self.keep_fraction())]

    def check_model(self, adapter) -> None:
        n = len(adapter.layers)
        if self.k >= n:
            raise ValueError(f"fastv k={self.k} but the decoder has only {n} layers; choose k in 1..{n - 1}")
