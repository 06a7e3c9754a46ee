"""ToMe inside Qwen2-VL's vision tower (the integration; the algorithm is in :mod:`.tome`).

Qwen2-VL's tower runs on a flat sequence of patches (N, D) for all images of a call, split
by ``cu_seqlens``, with 2-D rotary embeddings per patch, and its merger joins every four
consecutive patches (a 2x2 window) into one language-model token. So here the unit of
matching and merging is the 2x2 *window*, never a lone patch:

- before each block after the first, each image merges ``r`` windows into others by
  bipartite soft matching on the window's keys (heads and the four patches averaged),
  slot by slot and weighted by window size; a merged window keeps the rotary embeddings
  of the window it merged into; ``cu_seqlens`` shrink to match;
- attention adds log(size) of each key's window (proportional attention), per image;
- before the merger, every merged window is copied back to all its sources, so the
  merger and the model's placement see the usual shapes, and the pre-LLM step keeps one
  language-model token per merged group.

Images only (videos pass through); Qwen2.5-VL is refused, because its windowed attention
blocks would need windows of equal content after merging.
"""
from __future__ import annotations

import math

import torch

from .tome import _representatives, tome_match, tome_merge


def check_qwen_tower(adapter) -> None:
    """Raise unless the tower is Qwen2-VL's (full attention in every block)."""
    visual = adapter.vision_tower
    if hasattr(visual, "fullatt_block_indexes"):
        raise ValueError("tome inside the tower supports Qwen2-VL but not Qwen2.5-VL: its windowed attention "
                         "blocks cannot take merged windows")


def window_keys(block, x: torch.Tensor, unit: int) -> torch.Tensor:
    """(N, D) patches -> (N / unit, head_dim) keys averaged over heads and the window's patches."""
    attn = block.attn
    k = attn.qkv(block.norm1(x)).reshape(x.shape[0], 3, attn.num_heads, -1)[:, 1]
    return k.mean(1).reshape(-1, unit, k.shape[-1]).mean(1)


def merge_image(x, cos, sin, metric, st: dict, r: int, unit: int):
    """Merge ``r`` windows of one image. x (L, D), cos/sin (L, d), metric (U, c), st holds this
    image's ``size`` (U,) and ``assign`` (U0,). Returns the shorter (x, cos, sin)."""
    src, dst = tome_match(metric[None], r, protect_first=False)
    n_units, d = x.shape[0] // unit, x.shape[1]
    keep = torch.ones(n_units, dtype=torch.bool, device=x.device)
    keep[src[0]] = False
    kept = keep.nonzero().flatten()
    windows, size, assign = tome_merge(x.reshape(1, n_units, unit * d), st["size"][None], st["assign"][None], src, dst)
    st["size"], st["assign"] = size[0], assign[0]
    rows = (kept[:, None] * unit + torch.arange(unit, device=x.device)).flatten()
    return windows.reshape(-1, d), cos[rows], sin[rows]


class QwenToMe:
    """Hooks for one ToMe installation on a Qwen2-VL tower; all state lives here."""

    def __init__(self, runtime, keep_fraction):
        self.runtime, self.keep_fraction = runtime, keep_fraction
        self.visual = runtime.adapter.vision_tower
        self.unit = self.visual.spatial_merge_size ** 2
        self.images: list[dict] = []

    def install(self) -> list:
        blocks = self.visual.blocks
        handles = [blocks[i].register_forward_pre_hook(self._merge_hook(i), with_kwargs=True)
                   for i in range(1, len(blocks))]
        handles.append(self.visual.merger.register_forward_pre_hook(self._expand_hook))
        return handles

    def _active(self) -> bool:
        return self.runtime.current_kind == "image" and self.keep_fraction() < 1.0

    def _merge_hook(self, index: int):
        depth = len(self.visual.blocks)

        def hook(block, args, kwargs):
            if not self._active():
                return None
            x = args[0] if args else kwargs["hidden_states"]
            cu = kwargs["cu_seqlens"]  # the tower passes every block the original lengths and rotary rows
            if index == 1:
                self._start(cu, kwargs["position_embeddings"])
            parts, start = [], 0
            for st in self.images:
                n_units = st["size"].shape[0]
                length = n_units * self.unit
                r = min(math.ceil((n_units - st["target"]) / (depth - index)), n_units // 2)
                piece = (x[start:start + length], st["cos"], st["sin"])
                if r > 0:
                    piece = merge_image(*piece, window_keys(block, piece[0], self.unit), st, r, self.unit)
                    st["cos"], st["sin"] = piece[1], piece[2]
                parts.append(piece[0])
                start += length
            lengths = torch.tensor([p.shape[0] for p in parts], device=cu.device)
            block.attn._mmaccel_bias_queue = [st["size"].repeat_interleave(self.unit).log()[None, None, None]
                                              for st in self.images]
            kwargs = {**kwargs, "cu_seqlens": torch.cat([cu[:1], cu[0] + lengths.cumsum(0)]).to(cu.dtype),
                      "max_seqlen": int(lengths.max()),
                      "position_embeddings": (torch.cat([st["cos"] for st in self.images]),
                                              torch.cat([st["sin"] for st in self.images]))}
            x = torch.cat(parts)
            return ((x,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

        return hook

    def _start(self, cu: torch.Tensor, rotary) -> None:
        """Per-image state: window sizes, slot of every original window, target, rotary rows."""
        cos, sin = rotary
        self.images = []
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            n_units = (b - a) // self.unit
            self.images.append({"size": torch.ones(n_units, device=cos.device),
                                "assign": torch.arange(n_units, device=cos.device),
                                "target": max(1, round(self.keep_fraction() * n_units)),
                                "cos": cos[a:b], "sin": sin[a:b]})

    def _expand_hook(self, merger, args):
        for block in self.visual.blocks:
            vars(block.attn).pop("_mmaccel_bias_queue", None)
        if not self._active() or not self.images:
            return None
        x = args[0]
        full, reps, owns, start, offset = [], [], [], 0, 0
        for st in self.images:
            n_units = st["size"].shape[0]
            windows = x[start:start + n_units * self.unit].reshape(n_units, -1)
            full.append(windows[st["assign"]].reshape(-1, x.shape[-1]))
            reps.append(_representatives(st["assign"][None])[0] + offset)
            owns.append(torch.arange(st["assign"].shape[0], device=x.device) + offset)
            start, offset = start + n_units * self.unit, offset + st["assign"].shape[0]
        self.images = []
        patch_map = lambda ids: torch.cat(ids).repeat_interleave(self.unit).float()[None, None]  # noqa: E731
        self.runtime.vision_maps["merge_rep"] = [patch_map(reps)]
        self.runtime.vision_maps["merge_own"] = [patch_map(owns)]
        return (torch.cat(full),) + tuple(args[1:])
