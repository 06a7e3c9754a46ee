"""Qwen2-VL and Qwen2.5-VL: native-resolution ViT with 2x2 patch merging and 3-D M-RoPE positions."""
from __future__ import annotations

from .base import Part, VLMAdapter


class Qwen2VLAdapter(VLMAdapter):
    family = "qwen2_vl"
    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    uses_mrope = True

    def feature_methods(self):
        return ("get_image_features", "get_video_features")

    @property
    def vision_tower(self):
        return self.inner.visual

    def media_scores(self, kind, entries, media_parts, call):
        from .scores import qwen_scores

        grids = call.get("image_grid_thw" if kind == "image" else "video_grid_thw")
        return qwen_scores(self, entries, media_parts, grids)

    def media_parts(self, kind, features, call):
        grids = call.get("image_grid_thw" if kind == "image" else "video_grid_thw")
        merge = self.inner.visual.spatial_merge_size
        out = []
        for f, (t, h, w) in zip(features, grids.tolist()):
            grid = (h // merge, w // merge)
            out.append([Part(grid[0] * grid[1], grid, kind=kind) for _ in range(t)])
        return out
