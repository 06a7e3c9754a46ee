"""Vision-tap scores laid out like the LLM's visual tokens.

A method that ranks visual tokens by ViT attention (HiRED, VisionZip, MustDrop's key set) gets,
for every segment, a (n, H) tensor: one row per token of the segment, one column per head,
NaN on structural newline tokens. Each family maps tower rows to tokens with the model's own
packing code (any-resolution unpadding, video pooling, Qwen2.5-VL window order), so the scores
follow exactly the transformation the features went through.
"""
from __future__ import annotations

import torch


def tower_rows(entries: list[torch.Tensor]) -> torch.Tensor:
    """Tap entries of one layer -> (rows, T, H): (N, H, 1, T) CLS rows or (N, H, T) means."""
    rows = [e[:, :, 0] if e.dim() == 4 else e for e in entries]
    return torch.cat(rows, 0).transpose(1, 2)


def split_parts(tokens: torch.Tensor, parts) -> list[torch.Tensor]:
    """(n, H) scores of one media item -> one tensor per part."""
    return list(torch.split(tokens, [p.length for p in parts]))


def llava_scores(adapter, entries, media_parts) -> list[list[torch.Tensor]]:
    rows = tower_rows(entries)
    if adapter.model.config.vision_feature_select_strategy == "default":
        rows = rows[:, 1:]
    return [split_parts(rows[i], parts) for i, parts in enumerate(media_parts)]


def anyres_scores(adapter, entries, media_parts, pack_call: dict) -> list[list[torch.Tensor]]:
    """Run the model's own ``pack_image_features`` on score maps instead of features."""
    rows = tower_rows(entries)
    if adapter.model.config.vision_feature_select_strategy == "default":
        rows = rows[:, 1:]
    counts = [int(f.shape[0]) for f in pack_call["image_features"]]
    heads = rows.shape[-1]
    kwargs = {k: v for k, v in pack_call.items() if k not in ("image_features", "image_newline")}
    packed, _ = adapter.original_pack(image_features=list(torch.split(rows, counts)),
                                      image_newline=torch.full((heads,), float("nan"), device=rows.device), **kwargs)
    return [split_parts(p, parts) for p, parts in zip(packed, media_parts)]


def anyres_crop_ids(adapter, media_parts, pack_call: dict) -> list[list[torch.Tensor]]:
    """Which tile (0 = base image, 1.. = crops, row-major) each token comes from, (n, 1), NaN
    on newlines: the model's own packing applied to one-hot tile maps, each token taking the
    tile of largest weight. One-hot, not the tile index itself: LLaVA-OneVision's
    ``anyres_max`` packing resizes the raster bilinearly, and averaged indices would round to a
    third tile (the mean of crops 1 and 3 of a 2 x 2 grid is crop 2's index)."""
    width = max(int(f.shape[0]) for f in pack_call["image_features"])  # one channel width for all images
    onehot = torch.eye(width)
    ids = [onehot[: int(f.shape[0]), None, :].expand(-1, f.shape[1], -1) for f in pack_call["image_features"]]
    kwargs = {k: v for k, v in pack_call.items() if k not in ("image_features", "image_newline")}
    packed, _ = adapter.original_pack(image_features=ids, image_newline=torch.full((width,), float("nan")), **kwargs)
    return [split_parts(_dominant_tile(p), parts) for p, parts in zip(packed, media_parts)]


def _dominant_tile(weights: torch.Tensor) -> torch.Tensor:
    """(n, tiles) packed one-hot weights -> (n, 1) index of the heaviest tile, NaN on newlines."""
    tile = weights.nan_to_num(-1.0).argmax(-1).float()
    tile[weights.isnan().any(-1)] = float("nan")
    return tile[:, None]


def onevision_video_scores(adapter, entries, media_parts) -> list[list[torch.Tensor]]:
    rows = tower_rows(entries)  # (videos * frames, P, H)
    pooled = adapter.inner.apply_pooling(rows)  # the same 2x2 bilinear pooling as the features
    out, start = [], 0
    for parts in media_parts:
        frames = len(parts) - 1
        tokens = pooled[start:start + frames].reshape(-1, rows.shape[-1])
        start += frames
        newline = torch.full((1, rows.shape[-1]), float("nan"), device=tokens.device, dtype=tokens.dtype)
        out.append(split_parts(torch.cat([tokens, newline]), parts))
    return out


def qwen_scores(adapter, entries, media_parts, grids: torch.Tensor) -> list[list[torch.Tensor]]:
    """Mean-received scores per patch (one entry per image chunk) averaged over each merge group."""
    patches = torch.cat([e[0].transpose(0, 1) for e in entries], 0)  # (patches, H)
    visual = adapter.inner.visual
    unit = visual.spatial_merge_size ** 2
    groups = patches.reshape(-1, unit, patches.shape[-1]).mean(1)
    if hasattr(visual, "fullatt_block_indexes"):  # Qwen2.5-VL attends in window order
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import get_vision_window_index

        window_index, _ = get_vision_window_index(grids, spatial_merge_size=visual.spatial_merge_size,
                                                  window_size=visual.window_size, patch_size=visual.patch_size,
                                                  kwargs={})
        groups = groups[torch.argsort(window_index)]
    sizes = [sum(p.length for p in parts) for parts in media_parts]
    return [split_parts(g, parts) for g, parts in zip(torch.split(groups, sizes), media_parts)]
