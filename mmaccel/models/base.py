"""What a model family adapter knows: where the tower, decoder and placeholders live, and the
layout (grids, newline tokens, frames) of the visual features each media item produces."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Part:
    """Layout of one contiguous piece of a media item's features (a crop, a frame, the base image)."""

    length: int
    grid: tuple[int, int] | None = None  # (rows, cols) of the non-newline tokens, raster order
    newline: bool = False  # each row ends with one newline token (included in ``length``)
    kind: str = "image"


@dataclass
class Segment:
    """One part placed in the batch: which sample it is in and its sequence positions.

    positions: (n,) long, indices into the original (un-reduced) sequence of ``sample``.
    """

    sample: int
    positions: torch.Tensor
    part: Part
    media: int = 0
    index: int = 0  # part index within the media
    scores: dict = None  # vision layer -> (n, H) tap scores (NaN on newline tokens), when requested

    @property
    def n(self) -> int:
        return int(self.positions.numel())

    def token_kinds(self) -> torch.Tensor:
        """(n,) bool, True where the token is a structural newline token."""
        is_nl = torch.zeros(self.n, dtype=torch.bool)
        if self.part.newline and self.part.grid is not None:
            cols = self.part.grid[1] + 1
            is_nl[cols - 1 :: cols] = True
        elif self.part.newline and self.part.grid is None:
            is_nl[:] = True
        return is_nl


def square_grid(n: int) -> tuple[int, int] | None:
    side = math.isqrt(n)
    return (side, side) if side * side == n else None


class VLMAdapter:
    """Base adapter. Subclasses name the classes they support and describe feature layouts."""

    family: str = ""
    model_classes: tuple[str, ...] = ()
    uses_mrope: bool = False

    def __init__(self, model):
        self.model = model
        self.inner = model.model

    # --- where things are -------------------------------------------------------------
    @property
    def language_model(self):
        return self.inner.language_model

    @property
    def layers(self):
        return self.language_model.layers

    @property
    def text_config(self):
        return self.language_model.config

    @property
    def vision_tower(self):
        return getattr(self.inner, "vision_tower", None) or getattr(self.inner, "visual", None)

    @property
    def vision_layers(self):
        """The vision tower's transformer blocks, in order."""
        tower = self.vision_tower
        if hasattr(tower, "blocks"):
            return tower.blocks
        model = getattr(tower, "vision_model", tower)
        return model.encoder.layers

    @staticmethod
    def attention_of(block):
        return getattr(block, "self_attn", None) or block.attn

    @property
    def vision_has_cls(self) -> bool:
        """CLIP towers prepend a CLS token; SigLIP and Qwen2-VL towers have none."""
        return getattr(self.model.config.vision_config, "model_type", "") == "clip_vision_model"

    def placeholder_ids(self) -> dict[str, int]:
        ids = {"image": self.model.config.image_token_id}
        video = getattr(self.model.config, "video_token_id", None)
        if video is not None:
            ids["video"] = video
        return ids

    def media_scores(self, kind: str, entries: list, media_parts: list, call: dict) -> list[list]:
        """Vision-tap entries of one layer -> per media, per part, (n, H) scores."""
        raise ValueError(f"{type(self.model).__name__}: vision scores are not mapped for this family")

    def media_tiles(self, kind: str, media_parts: list, call: dict):
        """Per media, per part: (n, 1) tile index of each token (any-resolution families), or None."""
        return None

    def original_pack(self, **kwargs):
        """The inner model's own ``pack_image_features`` (unwrapped)."""
        return type(self.inner).pack_image_features(self.inner, **kwargs)

    def feature_methods(self) -> tuple[str, ...]:
        """Names of the inner model's feature methods that the runtime wraps to learn layouts."""
        return ("get_image_features",)

    # --- layouts ------------------------------------------------------------------------
    def media_parts(self, kind: str, features: list[torch.Tensor], call: dict) -> list[list[Part]]:
        """Split each media item's features (list of (n_i, D)) into parts. Default: one part per item."""
        return [[Part(int(f.shape[0]), square_grid(int(f.shape[0])), kind=kind)] for f in features]

    @staticmethod
    def pooler_list(output) -> list[torch.Tensor]:
        feats = output.pooler_output
        if isinstance(feats, torch.Tensor):
            return list(feats) if feats.dim() == 3 else [feats]
        return list(feats)
