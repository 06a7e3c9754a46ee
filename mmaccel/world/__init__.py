"""The synthetic visual world: procedurally generated images, videos and questions.

See ``mmaccel/world/README.md`` for the full specification.
"""
from .images import caption, where
from .samples import Sample, generate_samples, make_sample, sample_rng
from .scene import Obj, Scene, blank_like, render
from .spec import (ALL_FAMILIES, COLORS, HIRES_SIDE, IMAGE_FAMILIES, IMAGE_SIDE, MODEL_FAMILIES,
                   MULTI_FAMILIES, SHAPES, TEMPLATES, VIDEO_FAMILIES, family_kind)
from .video import read_mp4, write_mp4

__all__ = [
    "ALL_FAMILIES", "COLORS", "HIRES_SIDE", "IMAGE_FAMILIES", "IMAGE_SIDE", "MODEL_FAMILIES", "MULTI_FAMILIES",
    "Obj", "SHAPES", "Sample", "Scene", "TEMPLATES", "VIDEO_FAMILIES", "blank_like", "caption",
    "family_kind", "generate_samples", "make_sample", "read_mp4", "render", "sample_rng", "where",
    "write_mp4",
]
