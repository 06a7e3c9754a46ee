"""STC-Pruner (Wang et al., CVPR 2026; lern-to-write/STC): per video frame, keep the tokens
that are *least* like the frame's spatial anchor and the running temporal anchor.

Per frame: keep the 50% of channels with the lowest variance over the frame's tokens, L2-normalise,
and score every token with a multi-bandwidth Gaussian kernel
``g(x, c) = sum_a exp(-||x - c||^2 / (2a))``, a in {1/8, 1/4, 1/2, 1, 2}, against the frame mean
(spatial anchor) and the L2-normalised mean of the raw frame means seen so far, this one
included (temporal anchor, as the official code builds it). The
``token_per_frame`` lowest scores survive, in spatial order. Official default: 60 of 196 tokens
per frame (``retention = 60/196``).

Differences: kept tokens keep their positions under the default ``position_policy``
("preserve"), where the official code appends them at consecutive positions ("compact", still
available); on the shipped model compact positions cost 14-15 points of video accuracy at 60/196
(``results/stream/stream_positions.md``). The temporal memory is reset per video (the official running list is never
reset between videos; its reset in the benchmark scripts rebinds an alias), and a streaming
session owns it; images are treated as one-frame videos; structural newline
tokens are always kept. STC-Cacher (ViT reuse across frames, ``mmaccel/vision/stc_cacher.py``)
is the ``cacher`` option here and in the streaming session (``mmaccel/stream.py``, frames
appended to a per-session KV cache).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import PreLLMReducer, Reduction

BANDWIDTHS = (0.125, 0.25, 0.5, 1.0, 2.0)


def gaussian_similarity(x: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """x: (n, d), centre: (d,) -> (n,) sum of Gaussian kernels over the official bandwidths."""
    d2 = (x - centre).pow(2).sum(-1)
    return sum(torch.exp(-d2 / (2 * a)) for a in BANDWIDTHS)


def stc_scores(frame: torch.Tensor, memory: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """frame: (n, D) features. Returns (scores (n,), frame anchor); lower score = more novel.
    ``memory`` holds the raw (channel-selected, not normalised) means of the frames so far and
    gets this frame's appended first; the temporal anchor is their mean, L2-normalised, as the
    official ``_update_memory`` / ``compute_scores`` make it (a mean of unit vectors would
    shrink as frames accumulate and fade the temporal term)."""
    f = frame.float()
    low_var = f.var(0).argsort()[: max(1, f.shape[1] // 2)]
    raw = f[:, low_var]
    memory.append(raw.mean(0))
    f = F.normalize(raw, dim=-1)
    anchor = f.mean(0)
    temporal = F.normalize(torch.stack(memory).mean(0), dim=-1)
    return gaussian_similarity(f, anchor) + gaussian_similarity(f, temporal), anchor


@dataclass
class STCPruner(PreLLMReducer):
    """``cacher=True`` adds STC-Cacher to the tower for videos (official ``cache_interval=2``,
    ``update_ratio=0.25``; ``similarity_threshold`` switches to the README's rule): each video's
    frames (Qwen: temporal slices) form a chain of references and cached units, as a stream's
    (:mod:`mmaccel.vision.stc_offline`). Images are never cached. At ``retention=1.0`` the
    cacher is off too, as every stage of every method is there (the model is left exact).

    ``merge_dropped`` (not in the official code, off by default): every token the pruner drops
    from a frame is averaged into that frame's kept token most similar to it
    (:mod:`.merge_dropped`); the kept set and its cost stay STC's. On the embedded model (n=2700,
    retention 0.25) the kept share of full accuracy rises from 92.6% to 95.6% on run 56 and from
    90.0% to 94.9% on run 57 (``results/fidelity/n2700_run56/merge_dropped.md``,
    ``results/fidelity/n2700_run57/``). Offline only: a
    :class:`mmaccel.stream.StreamSession` prunes as the official code does."""
    name = "stc"
    description = "keep per-frame tokens least similar to the frame and temporal anchors (STC-Pruner, pre-LLM)"
    retention: float | None = 60 / 196
    cacher: bool = False
    cache_interval: int = 2
    update_ratio: float = 0.25
    similarity_threshold: float | None = None
    merge_dropped: bool = False  # average dropped tokens into kept ones; see above

    def __post_init__(self):
        super().__post_init__()
        from ..vision.stc_cacher import CacherState

        CacherState(self.cache_interval, self.update_ratio, self.similarity_threshold)  # the same checks

    def install_tower(self, runtime) -> list:
        if not self.cacher or self.keep_fraction() >= 1.0:
            return []
        from ..vision.stc_offline import install_offline_cacher

        return install_offline_cacher(runtime, self.cache_interval, self.update_ratio, self.similarity_threshold)

    def reduce_media(self, features, segments, budget):
        from ..runtime import allocate

        memory: list[torch.Tensor] = []
        budgets = allocate([s.n for s in segments], budget)
        out = []
        for feats, seg, k in zip(features, segments, budgets):
            structural = seg.token_kinds()
            grid_idx = (~structural).nonzero().flatten()
            if grid_idx.numel() == 0:
                out.append(Reduction(torch.arange(seg.n)))
                continue
            scores, _ = stc_scores(feats[grid_idx], memory)
            scores = scores.cpu()  # index bookkeeping on the CPU, features stay on their device
            k = max(0, min(k - int(structural.sum()), grid_idx.numel()))
            kept = grid_idx[scores.topk(k, largest=False).indices] if k else grid_idx[:0]
            out.append(Reduction(torch.cat([kept, structural.nonzero().flatten()]).sort().values))
        return out
