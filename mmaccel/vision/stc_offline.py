"""STC-Cacher for offline videos under ``accelerate_vlm(model, method="stc", cacher=True)``.

A video's frames (LLaVA-OneVision) or temporal slices (Qwen2-VL / Qwen2.5-VL) form one chain:
every ``cache_interval``-th unit, counted from the video's first, is a reference that runs each
tower block in full; the others recompute only their dynamic tokens against the latest
reference's same block (:mod:`.stc_cacher`, :mod:`.stc_cacher_qwen`). A stream does the same
one unit at a time; here the tower runs block by block over the whole batch, so at each block
the reference units run first (together) and then the cached ones. A unit's output at a block
depends only on its own input and its reference's store at that block, so the order gives what
the stream gives. Each video starts its own chain; images are never cached.
"""
from __future__ import annotations

import torch

from .stc_cacher import cached_layer, reference_layer
from .stc_cacher_qwen import qwen_cached_block, qwen_reference_block


def chains(units_per_video: list[int], interval: int) -> list[int]:
    """For each unit of each video in order, the index of its reference unit (itself for a
    reference): units t with t % interval == 0 of their own video."""
    out, start = [], 0
    for n in units_per_video:
        out += [start + t - t % interval for t in range(n)]
        start += n
    return out


def install_offline_cacher(runtime, interval: int, ratio: float, threshold: float | None) -> list:
    """Swap every tower block's forward for one that caches video units; -> removable handles."""
    from ..methods.tome import _swap_forward

    blocks = runtime.adapter.vision_layers
    make = _qwen_forward if runtime.adapter.uses_mrope else _siglip_forward
    return [_swap_forward(block, make(runtime, block, (interval, ratio, threshold))) for block in blocks]


def _video_call(runtime) -> dict | None:
    """The running video feature call's inputs by name, or None outside one."""
    call = runtime.current_call
    return None if call is None or call[0] != "video" else call[1]


def _siglip_forward(runtime, layer, setting):
    interval, ratio, threshold = setting
    plain = layer.forward

    def forward(hidden_states, attention_mask=None, *args, **kwargs):
        call = _video_call(runtime)
        if call is None:
            return plain(hidden_states, attention_mask, *args, **kwargs)
        batch, frames = call["pixel_values_videos"].shape[:2]
        ref_of = torch.tensor(chains([frames] * batch, interval))
        return _cached_rows(layer, hidden_states, ref_of, ratio, threshold)

    return forward


def _cached_rows(layer, h: torch.Tensor, ref_of: torch.Tensor, ratio: float, threshold) -> torch.Tensor:
    """h: (U, N, D) units; reference rows in one full pass, the others in one cached pass."""
    is_ref = ref_of == torch.arange(len(ref_of))
    refs, cached = is_ref.nonzero().flatten(), (~is_ref).nonzero().flatten()
    store: dict = {}
    out = torch.empty_like(h)
    out[refs] = reference_layer(layer, h[refs], store)
    if cached.numel():
        row = torch.empty(len(ref_of), dtype=torch.long)
        row[refs] = torch.arange(refs.numel())
        picked = row[ref_of[cached]].to(h.device)
        out[cached] = cached_layer(layer, h[cached], {k: v[picked] for k, v in store.items()}, ratio, threshold)[0]
    return out


def _qwen_forward(runtime, block, setting):
    interval, ratio, threshold = setting
    plain = block.forward

    def forward(hidden_states, cu_seqlens, rotary_pos_emb=None, position_embeddings=None, **kwargs):
        call = _video_call(runtime)
        if call is None:
            return plain(hidden_states, cu_seqlens=cu_seqlens, rotary_pos_emb=rotary_pos_emb,
                         position_embeddings=position_embeddings, **kwargs)
        grid = call["video_grid_thw"]
        sizes = [int(h * w) for t, h, w in grid.tolist() for _ in range(int(t))]
        ref_of = chains([int(t) for t in grid[:, 0].tolist()], interval)
        return _qwen_units(block, hidden_states, cu_seqlens, position_embeddings, sizes, ref_of, ratio, threshold)

    return forward


def _qwen_units(block, h, cu_seqlens, position_embeddings, sizes, ref_of, ratio, threshold) -> torch.Tensor:
    """Slice by slice along the packed tokens (each slice's tokens, windows included, are one
    contiguous run), every slice's attention chunks rebased to it."""
    out, stores, start = torch.empty_like(h), {}, 0
    cu = cu_seqlens.to(torch.long)
    for unit, n in enumerate(sizes):
        end = start + n
        part = slice(start, end)
        cu_unit = cu[(cu >= start) & (cu <= end)] - start
        pe = tuple(x[part] for x in position_embeddings)
        if ref_of[unit] == unit:
            stores[unit] = {}
            out[part] = qwen_reference_block(block, h[part], cu_unit, pe, stores[unit])
        else:
            out[part] = qwen_cached_block(block, h[part], cu_unit, pe, stores[ref_of[unit]], ratio, threshold)[0]
        start = end
    return out
