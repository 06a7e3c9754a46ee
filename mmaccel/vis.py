"""Pictures of which visual tokens were kept: dropped regions dimmed on the image or frames."""
from __future__ import annotations

import numpy as np
from PIL import Image


def kept_grid(segment, kept: set[int]) -> np.ndarray | None:
    """(rows, cols) bool: which grid cells of ``segment`` reached the last decoder layer."""
    if segment.part.grid is None:
        return None
    rows, cols = segment.part.grid
    stride = cols + 1 if segment.part.newline else cols
    grid = np.zeros((rows, cols), dtype=bool)
    for i, pos in enumerate(segment.positions.tolist()):
        r, c = divmod(i, stride)
        if c < cols and r < rows and pos in kept:
            grid[r, c] = True
    return grid


def overlay(image: Image.Image, grid: np.ndarray, dim: float = 0.25) -> Image.Image:
    """Dim the image where ``grid`` (rows, cols) is False; draw it at the image's size."""
    rgb = np.asarray(image.convert("RGB")).astype(np.float32)
    mask = np.asarray(Image.fromarray(grid.astype(np.uint8) * 255).resize(image.size, Image.NEAREST)) > 0
    out = np.where(mask[..., None], rgb, rgb * dim + 255 * (1 - dim) * 0.15)
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def _best_segments(segments, sample: int):
    """Per media: the finest grid (crops raster over the base image) or each frame."""
    mine = [s for s in segments if s.sample == sample and s.part.grid is not None]
    by_media: dict = {}
    for s in mine:
        by_media.setdefault((s.part.kind, s.media), []).append(s)
    return by_media


def kept_token_pictures(handle, media: list, sample: int = 0) -> list[Image.Image]:
    """One picture per image (or per frame of a video) of the last call of ``handle``.

    media: the PIL images, or the (T, H, W, 3) frames of one video, as fed to the model.
    """
    request = handle._runtime.last_call()[1]
    if request is None:
        return []
    provenance = handle.provenance()
    # a cell counts as kept when a kept token stands for it (itself, or merged into a kept token)
    kept = {int(p) for group in provenance[sample].values() for p in group} if provenance else set()
    pictures = []
    for (kind, idx), segs in sorted(_best_segments(request.segments, sample).items()):
        if kind == "video":
            frames = media if isinstance(media, np.ndarray) else np.asarray(media)
            for seg, frame in zip(segs, _sample_frames(frames, len(segs))):
                pictures.append(overlay(Image.fromarray(frame), kept_grid(seg, kept)))
        elif idx < len(media):
            seg = max(segs, key=lambda s: s.n)  # the crops raster when there is one
            pictures.append(overlay(media[idx], kept_grid(seg, kept)))
    return pictures


def _sample_frames(frames: np.ndarray, n: int) -> list[np.ndarray]:
    """``n`` frames spread over ``frames`` (Qwen2-VL merges frame pairs into one grid)."""
    idx = np.linspace(0, len(frames) - 1, n).round().astype(int)
    return [frames[i] for i in idx]


def stream_pictures(session, frames: np.ndarray) -> list[Image.Image]:
    """One picture per unit a ``StreamSession`` holds (a frame; Qwen: a pair, drawn on its last
    frame) with the cells STC-Pruner did not keep dimmed. frames: the (T, H, W, 3) frames fed to
    it, in order; units ``max_frames`` dropped are left out."""
    from .models.base import square_grid

    per_unit = session.units.frames_per_unit
    first = session.units_seen - len(session.kept_index)  # the oldest unit still held
    pictures = []
    for unit, index in enumerate(session.kept_index, start=first):
        n = session.tokens_per_unit[unit]
        rows, cols = session.grids[unit] or square_grid(n) or (1, n)
        grid = np.zeros(rows * cols, dtype=bool)
        grid[index.numpy()] = True
        pictures.append(overlay(Image.fromarray(frames[(unit + 1) * per_unit - 1]), grid.reshape(rows, cols)))
    return pictures
