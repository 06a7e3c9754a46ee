"""What a :class:`~mmaccel.stream.StreamSession` needs to know about a model family: how frames
group into the units its vision tower encodes, and where a unit's tokens and the text after the
video sit in the language model's positions.

Positions are (R, n) tensors: R = 1 row for 1-D RoPE (LLaVA-OneVision), R = 3 rows
(temporal, height, width) for Qwen2-VL's M-RoPE, numbered from the video's first token.
"""
from __future__ import annotations

import numpy as np
import torch


class FrameUnits:
    """LLaVA-OneVision: each frame is encoded alone (vision tower, projector, 2x2 pooling) and
    its tokens follow each other; the video ends with one ``image_newline`` token."""

    frames_per_unit = 1
    rows = 1
    trailing_tokens = 1  # the video's newline

    def __init__(self, model, processor):
        self.model, self.processor = model, processor

    def encode(self, frames: np.ndarray, encoder=None) -> tuple[torch.Tensor, tuple[int, int] | None]:
        """frames: (1, H, W, 3) uint8 -> ((n, D) projected, pooled tokens, grid or None).
        ``encoder`` wraps the tower call (STC-Cacher)."""
        pixels = self.processor.video_processor(videos=[frames], return_tensors="pt")["pixel_values_videos"]
        pixels = pixels.to(self.model.device, self.model.dtype)
        encode = lambda: self.model.model.get_video_features(pixels).pooler_output[0, :-1]
        return (encode() if encoder is None else encoder(encode)), None

    def unit_positions(self, unit: int, start: int, n: int, grid) -> torch.Tensor:
        """(1, n): a unit's tokens one after another from ``start`` (its first token's position)."""
        return (start + torch.arange(n))[None]

    def text_after(self, span: int, grids: list) -> int:
        """Position of the first text token after the video (preserve), from the video's start:
        right after its last token."""
        return span

    def tail(self) -> torch.Tensor:
        """(t, D) embeddings that end the video before the text after it: the newline."""
        return self.model.model.image_newline[None].to(self.model.device, self.model.dtype)

    def cacher(self, state):
        """STC-Cacher over this family's tower for one unit's encoding (a context manager)."""
        from .models import get_adapter
        from .vision.stc_cacher import STCCacher

        return STCCacher(get_adapter(self.model).vision_layers, state)


class QwenUnits(FrameUnits):
    """Qwen2-VL / Qwen2.5-VL: the tower embeds ``temporal_patch_size`` (2) frames into one
    temporal slice and attends within the slice only, so a pair of frames is encoded the
    moment its second frame arrives, exactly as offline. Tokens of slice ``t`` sit at
    (t * interval, row, column) from the video's start, where ``interval`` is 1 (Qwen2-VL) or
    ``tokens_per_second * temporal_patch_size / fps`` (Qwen2.5-VL); the text after the video
    starts at max(rows, columns), as the library's ``get_rope_index`` numbers it.

    Each pair goes through the processor as a 2-frame video. A processor that bounds a whole
    video's pixels (``cap_pixels_per_frame=True``, qwen-vl-utils' rule) shares that budget over
    the frames, so it would size a long offline video's frames below a stream's, whose length is
    unknown; with the default (no total bound) both size every frame alike."""

    rows = 3
    trailing_tokens = 0

    def __init__(self, model, processor, fps: float | None = None):
        super().__init__(model, processor)
        vision = model.config.vision_config
        self.frames_per_unit = int(vision.temporal_patch_size)
        self.merge = int(vision.spatial_merge_size)
        self.interval = torch.tensor(1.0)
        if hasattr(vision, "tokens_per_second"):  # Qwen2.5-VL: seconds per slice from the frame rate
            fps = 24.0 if fps is None else fps  # what the processor assumes for frames without metadata
            self.interval = vision.tokens_per_second * torch.tensor(self.frames_per_unit / fps, dtype=torch.float32)

    def encode(self, frames: np.ndarray, encoder=None):
        out = self.processor.video_processor(videos=[frames], return_tensors="pt")
        pixels = out["pixel_values_videos"].to(self.model.device, self.model.dtype)
        grid_thw = out["video_grid_thw"]
        if int(grid_thw[0, 0]) != 1:
            raise RuntimeError(f"{len(frames)} frames gave {int(grid_thw[0, 0])} temporal slices, expected 1")
        encode = lambda: self.model.model.get_video_features(pixels, grid_thw.to(self.model.device)).pooler_output[0]
        feats = encode() if encoder is None else encoder(encode)
        return feats, (int(grid_thw[0, 1]) // self.merge, int(grid_thw[0, 2]) // self.merge)

    def unit_positions(self, unit: int, start: int, n: int, grid) -> torch.Tensor:
        """(3, n): slice ``unit``'s tokens at (its time, row, column); ``start`` is unused."""
        rows, cols = grid
        t = (torch.tensor([unit]) * self.interval).long()
        return torch.stack([t.expand(rows * cols), torch.arange(rows).repeat_interleave(cols),
                            torch.arange(cols).repeat(rows)])

    def text_after(self, span: int, grids: list) -> int:
        return max(max(grid) for grid in grids)

    def tail(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight[:0]

    def cacher(self, state):
        from .vision.stc_cacher_qwen import QwenSTCCacher

        return QwenSTCCacher(self.model.model.visual.blocks, state)


def uses_frame_rate(model) -> bool:
    """Whether ``model``'s temporal positions depend on the video's frame rate (Qwen2.5-VL)."""
    return type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"


def stream_units(model, processor, fps: float | None = None) -> FrameUnits:
    """The units of ``model``'s family, or a ValueError naming the families a stream supports."""
    name = type(model).__name__
    if name == "LlavaOnevisionForConditionalGeneration":
        if fps is not None:
            raise ValueError("fps sets Qwen2.5-VL's temporal positions; LLaVA-OneVision's do not use it")
        return FrameUnits(model, processor)
    if name in ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"):
        if fps is not None and (not fps > 0 or not uses_frame_rate(model)):
            raise ValueError(f"fps must be a positive frame rate and only Qwen2.5-VL uses it, got {fps} for {name}")
        return QwenUnits(model, processor, fps)
    raise ValueError("StreamSession supports LlavaOnevisionForConditionalGeneration, Qwen2VLForConditionalGeneration "
                     f"and Qwen2_5_VLForConditionalGeneration, not {name}")
