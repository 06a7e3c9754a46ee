"""The splice: shorten a padded batch to the kept tokens, left-padded, with their positions.

Pure tensor functions. Shapes: B batch, T current length, L new length, R rows of M-RoPE ids.
"""
from __future__ import annotations

import torch


def pack_kept(keep: torch.Tensor, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded indices of the kept tokens of every row, in their original order.

    keep: (B, T) bool. Returns ``index`` (B, L) long (0 in padding slots) and ``valid`` (B, L) bool,
    with L the largest kept count (``length`` when the caller already read it, saving a host
    sync on a GPU). Sorted indices keep causal order and KV rollback sane.
    """
    if length is None:
        length = int(keep.sum(1).max()) if keep.numel() else 0
    # a stable sort puts every row's dropped tokens first and its kept ones last, each in order,
    # so the last ``length`` slots are the row's kept tokens, left-padded: no loop over rows
    order = torch.sort(keep.to(torch.uint8), dim=1, stable=True).indices[:, keep.shape[1] - length:]
    valid = torch.gather(keep, 1, order)
    return order.masked_fill(~valid, 0), valid


def to_device_async(host: torch.Tensor, device) -> torch.Tensor:
    """A small host tensor (indices, budgets) on ``device``, copied without a host sync on CUDA:
    pinned memory and non-blocking, since a pageable copy drains the stream first."""
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: (B, T, ...) -> (B, L, ...) rows picked by ``index`` (B, L)."""
    shape = index.shape + x.shape[2:]
    flat = index.reshape(index.shape[0], index.shape[1], *([1] * (x.dim() - 2))).expand(shape)
    return torch.gather(x, 1, flat)


def gather_positions(pos: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """pos: (B, T) or (R, B, T) -> same rank with T replaced by L."""
    if pos.dim() == 2:
        return torch.gather(pos.expand(index.shape[0], -1), 1, index)
    rows = pos.expand(pos.shape[0], index.shape[0], -1)
    return torch.gather(rows, 2, index.unsqueeze(0).expand(pos.shape[0], -1, -1))


def compact_positions(valid: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """Renumbered positions 0..n-1 per row over ``valid`` (B, L); padding gets 0.

    Returns (B, L), or (rows, B, L) for M-RoPE where every axis gets the same renumbering.
    """
    pos = (valid.long().cumsum(1) - 1).clamp(min=0) * valid
    return pos if rows is None else pos.unsqueeze(0).expand(rows, -1, -1).clone()


def default_positions(attention_mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """What ``generate`` would use: cumulative count of real tokens, 0 on padding. (B, T)."""
    if attention_mask is None:
        return torch.arange(length, device=device).unsqueeze(0).expand(batch, -1)
    mask = attention_mask.long()
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
