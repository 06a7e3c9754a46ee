"""LLaVA-1.5 (`LlavaForConditionalGeneration`) and LLaVA-NeXT (`LlavaNextForConditionalGeneration`)."""
from __future__ import annotations

import torch

from .base import Part, VLMAdapter, square_grid


class LlavaAdapter(VLMAdapter):
    family = "llava"
    model_classes = ("LlavaForConditionalGeneration",)

    def media_scores(self, kind, entries, media_parts, call):
        from .scores import llava_scores

        return llava_scores(self, entries, media_parts)


def anyres_parts(feature: torch.Tensor, newline: torch.Tensor | None, base_tokens: int, kind="image") -> list[Part]:
    """Parts of one packed any-resolution image: the base image grid, then the unpadded crop
    raster whose rows end with the model's newline embedding (found by exact equality)."""
    n = int(feature.shape[0])
    if n <= base_tokens or newline is None:
        return [Part(n, square_grid(n), kind=kind)]
    parts = [Part(base_tokens, square_grid(base_tokens), kind=kind)]
    rest = feature[base_tokens:]
    rows = int((rest == newline.to(rest.dtype)).all(-1).sum())
    length = n - base_tokens
    if rows and length % rows == 0 and length // rows > 1:
        parts.append(Part(length, (rows, length // rows - 1), newline=True, kind=kind))
    else:  # a lone trailing newline (single-tile image)
        parts.append(Part(length, None, newline=length == rows, kind=kind))
    return parts


class LlavaNextAdapter(VLMAdapter):
    family = "llava_next"
    model_classes = ("LlavaNextForConditionalGeneration",)

    def base_tokens(self) -> int:
        vc = self.model.config.vision_config
        return (vc.image_size // vc.patch_size) ** 2

    def media_parts(self, kind, features, call):
        newline = getattr(self.inner, "image_newline", None)
        return [anyres_parts(f, newline, self.base_tokens(), kind) for f in features]

    def media_scores(self, kind, entries, media_parts, call):
        from .scores import anyres_scores

        return anyres_scores(self, entries, media_parts, call["_pack"][-1])

    def media_tiles(self, kind, media_parts, call):
        from .scores import anyres_crop_ids

        return anyres_crop_ids(self, media_parts, call["_pack"][-1]) if kind == "image" else None
