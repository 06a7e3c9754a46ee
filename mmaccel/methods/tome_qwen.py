"""Token merging inside Qwen2-VL's vision tower (ToMe, MustDrop's window merge).

Qwen2-VL's tower runs on a flat sequence of patches (N, D) for all images of a call, split
by ``cu_seqlens``, with 2-D rotary embeddings per patch, and its merger joins every four
consecutive patches (a 2x2 window) into one language-model token. So here the unit of
matching and merging is the 2x2 *window*, never a lone patch, and each image merges its own:

- a merge maps every window to a kept window; the kept window becomes the slot-wise,
  size-weighted mean of its group and keeps its own rotary rows; ``cu_seqlens`` shrink;
- ToMe merges inside every block, between its attention and its MLP, by that attention's keys
  (before RoPE), as the official ToMe block does (the block is re-stated,
  :func:`vision_block_forward`); MustDrop's window merge after block 0 is a merge of block 1's
  input;
- the tower hands every block the original lengths and rotary rows, so each later block's
  hook substitutes the current ones (and, for ToMe, log(size) per image as proportional
  attention, through a bias queue the attention wrapper consumes one image at a time);
- at the expansion point every merged window is copied back to all its sources, so the rest
  of the tower and the model's placement see the usual shapes, and the pre-LLM step keeps one
  language-model token per merged group.

Images and videos: the tower attends within each image and within each temporal slice of a
video, so each of those chunks merges its own windows. Qwen2.5-VL's tower attends within
local attention windows (cu_window_seqlens, tokens in window order) in most blocks and within
whole images in its ``fullatt_block_indexes``; there the chunks are its attention windows, so
merges stay inside one window, windowed blocks get the shrunken window lengths and full blocks
the per-image sums (with the proportional-attention bias per window or per image to match).
MustDrop's 3x3 blocks there are whole blocks inside one attention window (a real Qwen2.5-VL
window is 4x4 merge windows, so one block per full window; edge windows under 3 wide take none).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .tome import _representatives, _swap_forward, tome_match


def window_keys(block, x: torch.Tensor, unit: int) -> torch.Tensor:
    """(N, D) patches -> (N / unit, head_dim) keys averaged over heads and the window's patches."""
    attn, d = block.attn, x.shape[-1]
    # only the key third of the fused qkv projection: the metric must not cost a full qkv
    k = F.linear(block.norm1(x), attn.qkv.weight[d:2 * d], attn.qkv.bias[d:2 * d])
    return k.view(x.shape[0], attn.num_heads, -1).mean(1).reshape(-1, unit, attn.head_dim).mean(1)


def merge_windows(x, cos, sin, st: dict, into: torch.Tensor, unit: int):
    """Merge the windows of one image. x (L, D), cos/sin (L, d); ``into`` (U,) the kept window
    each window joins (itself when kept); st holds ``size`` (U,) and ``assign`` (U0,) and is
    updated. Returns the shorter (x, cos, sin), kept windows in their order."""
    n_units, d = x.shape[0] // unit, x.shape[1]
    keep = into == torch.arange(n_units, device=x.device)
    slot = (keep.long().cumsum(0) - 1)[into]
    windows = x.reshape(n_units, unit * d).float() * st["size"][:, None]  # sums in float32, whatever x's dtype
    size = torch.zeros(int(keep.sum()), device=x.device).index_add_(0, slot, st["size"])
    merged = torch.zeros(size.shape[0], unit * d, device=x.device).index_add_(0, slot, windows)
    st["size"], st["assign"] = size, slot[st["assign"]]
    rows = (keep.nonzero().flatten()[:, None] * unit + torch.arange(unit, device=x.device)).flatten()
    return (merged / size[:, None]).reshape(-1, d).to(x.dtype), cos[rows], sin[rows]


def tome_into(metric: torch.Tensor, r: int) -> torch.Tensor:
    """(U,) kept window of every window after merging the ``r`` best bipartite pairs."""
    src, dst = tome_match(metric[None], r, protect_first=False)
    into = torch.arange(metric.shape[0], device=metric.device)
    into[src[0]] = dst[0]
    return into


class QwenWindowMerger:
    """Hooks and per-call state for one installation on a Qwen2-VL tower.

    ``plan(index, block, x, st) -> into or None`` decides the merge of one chunk (an image or
    a video slice) at block ``index`` (x: that chunk's patches entering the block, whose keys
    the plan reads). By default the merge happens before the block (MustDrop's window merge
    after block 0 is a merge before block 1); ``in_block`` merges inside every block instead,
    between its attention and its MLP (ToMe), the block's forward re-stated by
    :func:`vision_block_forward`. Windows are copied back before block ``expand_before`` (None:
    before the merger). ``proportional`` adds log(size) to attention.
    """

    def __init__(self, runtime, plan, expand_before: int | None = None, proportional: bool = False,
                 enabled=lambda: True, in_block: bool = False):
        self.runtime, self.plan, self.proportional, self.enabled = runtime, plan, proportional, enabled
        self.in_block = in_block
        self.visual = runtime.adapter.vision_tower
        self.unit = self.visual.spatial_merge_size ** 2
        self.expand_before = expand_before if expand_before is not None else len(self.visual.blocks)
        self.full_blocks = set(getattr(self.visual, "fullatt_block_indexes", None) or [])
        self.windowed = hasattr(self.visual, "fullatt_block_indexes")  # Qwen2.5-VL
        self.chunks: list[dict] = []

    def install(self) -> list:
        blocks = self.visual.blocks
        first = 0 if self.in_block else 1  # the first block whose inputs may differ from the tower's
        handles = [blocks[i].register_forward_pre_hook(self._block_hook(i), with_kwargs=True)
                   for i in range(first, self.expand_before)]
        if self.in_block:
            handles += [_swap_forward(blocks[i], self._merging_forward(i, blocks[i])) for i in range(self.expand_before)]
        handles.append(self.visual.register_forward_pre_hook(self._grid_hook, with_kwargs=True))
        if self.expand_before < len(blocks):
            handles.append(blocks[self.expand_before].register_forward_pre_hook(self._expand_hook, with_kwargs=True))
        else:
            handles.append(self.visual.merger.register_forward_pre_hook(self._expand_merger_input))
        return handles

    def _expand_merger_input(self, merger, args):
        out = self._expand_hook(merger, args, {})
        return out[0] if out else None

    def _active(self) -> bool:
        return self.runtime.current_kind in ("image", "video") and self.enabled()

    def _grid_hook(self, visual, args, kwargs):
        """Record the (rows, cols) grid of merge windows of every attention chunk: one per image,
        one per temporal slice of a video (the tower attends within each slice); on Qwen2.5-VL
        one per attention window, with the windows' lengths and the image each belongs to."""
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        self.grids = self.windows = None
        if grid is None:
            return
        merge = visual.spatial_merge_size
        if not self.windowed:
            self.grids = [(h // merge, w // merge) for t, h, w in grid.tolist() for _ in range(t)]
            return
        self.windows = attention_windows(visual, grid)
        self.grids = window_grids(grid, merge, visual.window_size // merge // visual.patch_size)
        if [r * c * self.unit for r, c in self.grids] != self.windows[0].diff().tolist():
            raise RuntimeError("Qwen2.5-VL attention windows do not match the expected tiling")

    def _block_hook(self, index: int):
        def hook(block, args, kwargs):
            if not self._active():
                return None
            x = args[0] if args else kwargs["hidden_states"]
            cu = kwargs["cu_seqlens"]  # the tower passes every block the original lengths and rotary rows
            if index == (0 if self.in_block else 1):
                self._start(self.windows[0] if self.windowed else cu, kwargs["position_embeddings"])
                if self.in_block:
                    return None  # nothing merged yet
            parts = self._split(x) if self.in_block else self._merge_parts(index, block, x, x)
            return self._substitute(block, args, kwargs, cu, parts, index in self.full_blocks)

        return hook

    def _split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (N, D) cut into the chunks' current pieces."""
        return list(x.split([st["size"].shape[0] * self.unit for st in self.chunks]))

    def _merge_parts(self, index: int, block, x: torch.Tensor, out: torch.Tensor) -> list[torch.Tensor]:
        """Per chunk: the plan reads x's piece (the block's input), the merge applies to out's
        piece (the same rows: x itself, or the residual stream after the block's attention)."""
        parts = []
        for st, x_piece, piece in zip(self.chunks, self._split(x), self._split(out)):
            into = self.plan(index, block, x_piece, st)
            if into is not None:
                piece, st["cos"], st["sin"] = merge_windows(piece, st["cos"], st["sin"], st, into, self.unit)
            parts.append(piece)
        return parts

    def _merging_forward(self, index: int, block):
        """The block's forward with the chunks' merges between its attention and its MLP."""
        plain = block.forward

        def forward(hidden_states, *args, **kwargs):
            if not self._active() or not self.chunks:
                return plain(hidden_states, *args, **kwargs)
            between = lambda x, h: torch.cat(self._merge_parts(index, block, x, h))  # noqa: E731
            return vision_block_forward(block, hidden_states, *args, between=between, **kwargs)

        return forward

    def _substitute(self, block, args, kwargs, cu, parts, full_block: bool):
        """The block's inputs for the merged sequence: hidden states, lengths, rotary rows, bias.
        On Qwen2.5-VL a full-attention block attends per image: its windows' pieces join."""
        sizes = [st["size"] for st in self.chunks]
        lengths = torch.tensor([p.shape[0] for p in parts], device=cu.device)
        if self.windowed and full_block:
            image_of = self.windows[1].to(cu.device)
            n_images = int(image_of.max()) + 1
            lengths = torch.zeros(n_images, dtype=lengths.dtype, device=cu.device).index_add_(0, image_of, lengths)
            sizes = [torch.cat([s for s, i in zip(sizes, image_of.tolist()) if i == img]) for img in range(n_images)]
        if self.proportional:
            block.attn._mmaccel_bias_queue = [s.repeat_interleave(self.unit).log()[None, None, None] for s in sizes]
        kwargs = {**kwargs, "cu_seqlens": torch.cat([cu[:1], cu[0] + lengths.cumsum(0)]).to(cu.dtype),
                  "max_seqlen": int(lengths.max()),
                  "position_embeddings": (torch.cat([st["cos"] for st in self.chunks]),
                                          torch.cat([st["sin"] for st in self.chunks]))}
        x = torch.cat(parts)
        return ((x,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

    def _start(self, cu: torch.Tensor, rotary) -> None:
        """Per-chunk (image or video slice) state: window sizes, slot of every original window,
        grid, rotary rows."""
        cos, sin = rotary
        self.chunks = []
        for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            n_units = (b - a) // self.unit
            self.chunks.append({"size": torch.ones(n_units, device=cos.device),
                                "assign": torch.arange(n_units, device=cos.device),
                                "grid": self.grids[i] if getattr(self, "grids", None) else None,
                                "cos": cos[a:b], "sin": sin[a:b]})

    def _expand_hook(self, module, args, kwargs):
        for block in self.visual.blocks:
            vars(block.attn).pop("_mmaccel_bias_queue", None)
        if not self._active() or not self.chunks:
            return None
        x = args[0] if args else kwargs["hidden_states"]
        full, reps, owns, start, offset = [], [], [], 0, 0
        for st in self.chunks:
            n_units = st["size"].shape[0]
            windows = x[start:start + n_units * self.unit].reshape(n_units, -1)
            full.append(windows[st["assign"]].reshape(-1, x.shape[-1]))
            reps.append(_representatives(st["assign"][None])[0] + offset)
            owns.append(torch.arange(st["assign"].shape[0], device=x.device) + offset)
            start, offset = start + n_units * self.unit, offset + st["assign"].shape[0]
        self.chunks = []
        patch_map = lambda ids: torch.cat(ids).repeat_interleave(self.unit).float()[None, None]  # noqa: E731
        self.runtime.vision_maps["merge_rep"] = [patch_map(reps)]
        self.runtime.vision_maps["merge_own"] = [patch_map(owns)]
        x = torch.cat(full)
        return ((x,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})


def vision_block_forward(block, x: torch.Tensor, cu_seqlens, position_embeddings=None, between=None, **kwargs):
    """A Qwen2-VL / Qwen2.5-VL vision block (pre-norm attention, then MLP; pinned to the
    library's block by a test) with ``between(x, h)`` applied to the residual stream ``h`` after
    the attention, before the MLP (ToMe's merge, which may shorten it). x: (N, D)."""
    h = x + block.attn(block.norm1(x), cu_seqlens=cu_seqlens, position_embeddings=position_embeddings, **kwargs)
    if between is not None:
        h = between(x, h)
    return h + block.mlp(block.norm2(h))


def attention_windows(visual, grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL: (cu_window_seqlens (W + 1,), image index of every window (W,)), in the
    tower's window order; an "image" is an image or one temporal slice of a video."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import get_vision_window_index

    _, cu_windows = get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                            window_size=visual.window_size, patch_size=visual.patch_size)
    per_slice = torch.cat([torch.full((int(t),), int(h * w)) for t, h, w in grid_thw.tolist()])
    cu_images = torch.cat([torch.zeros(1, dtype=torch.long), per_slice.cumsum(0)])
    image_of = torch.searchsorted(cu_images, cu_windows[:-1].long().cpu(), right=True) - 1
    return cu_windows, image_of


def window_grids(grid_thw: torch.Tensor, merge: int, window: int) -> list[tuple[int, int]]:
    """Qwen2.5-VL: (rows, cols) of merge windows in every attention window, in the tower's window
    order (each image or video slice tiled by ``window`` x ``window`` from its top-left corner)."""
    out = []
    for t, h, w in grid_thw.tolist():
        rows, cols = h // merge, w // merge
        tiles = [(min(window, rows - i), min(window, cols - j))
                 for i in range(0, rows, window) for j in range(0, cols, window)]
        out += tiles * t
    return out


def tome_installer(runtime, keep_fraction) -> QwenWindowMerger:
    """ToMe: inside every block, between its attention and its MLP, ``r`` windows per chunk
    (image, video slice, or Qwen2.5-VL attention window) merge by bipartite soft matching on
    window keys (that attention's keys, before RoPE, averaged over heads and the window's
    patches), ``r`` spread so each chunk reaches ``keep_fraction`` of its windows in the last
    block; proportional attention; copied back before the merger."""
    depth = len(runtime.adapter.vision_tower.blocks)

    def plan(index, block, x, st):
        unit = runtime.adapter.vision_tower.spatial_merge_size ** 2
        n_units = x.shape[0] // unit
        target = max(1, round(keep_fraction() * st["assign"].shape[0]))
        r = min(math.ceil((n_units - target) / (depth - index)), n_units // 2)
        return tome_into(window_keys(block, x, unit), r) if r > 0 else None

    return QwenWindowMerger(runtime, plan, proportional=True, enabled=lambda: keep_fraction() < 1.0, in_block=True)


def mustdrop_installer(runtime, threshold: float, window: int = 3, proportional: bool = False) -> QwenWindowMerger:
    """MustDrop's local merge after block 0: each 3x3 block of 2x2 windows whose mean pairwise
    cosine similarity (window features: the mean of their patches) reaches ``threshold``
    collapses into its first window; copied back before the last block (the key-set layer).
    On Qwen2.5-VL the blocks tile each attention window on its own. ``proportional``: merged
    windows weigh log(size) in attention (``MustDrop.proportional_attention``)."""
    from ..vision.window_merge import window_groups

    def plan(index, block, x, st):
        if index != 1 or st["grid"] is None:
            return None
        unit = runtime.adapter.vision_tower.spatial_merge_size ** 2
        rows, cols = st["grid"]
        feats = x.reshape(-1, unit, x.shape[-1]).mean(1)
        return window_groups(feats, rows, threshold, window, cols)

    return QwenWindowMerger(runtime, plan, expand_before=len(runtime.adapter.vision_tower.blocks) - 1,
                            proportional=proportional)
