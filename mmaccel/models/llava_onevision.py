"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): anyres images, pooled video frames."""
from __future__ import annotations

import math

from .base import Part, square_grid
from .llava import LlavaNextAdapter


class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava_onevision"
    model_classes = ("LlavaOnevisionForConditionalGeneration",)

    def feature_methods(self):
        return ("get_image_features", "get_video_features")

    def media_scores(self, kind, entries, media_parts, call):
        if kind == "image":
            return super().media_scores(kind, entries, media_parts, call)
        from .scores import onevision_video_scores

        return onevision_video_scores(self, entries, media_parts)

    def media_parts(self, kind, features, call):
        if kind == "image":
            return super().media_parts(kind, features, call)
        frames = int(call["pixel_values_videos"].shape[1])
        vc = self.model.config.vision_config
        side = math.ceil(vc.image_size // vc.patch_size / 2)  # frames are 2x2 bilinear pooled
        out = []
        for f in features:
            per = (int(f.shape[0]) - 1) // frames  # one newline token closes the video
            grid = (side, side) if side * side == per else square_grid(per)
            out.append([Part(per, grid, kind="video") for _ in range(frames)] + [Part(1, None, newline=True, kind="video")])
        return out
