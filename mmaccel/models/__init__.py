"""One adapter per model family; :func:`get_adapter` picks it from the model's class."""
from __future__ import annotations

from .base import Part, Segment, VLMAdapter
from .llava import LlavaAdapter, LlavaNextAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen2_vl import Qwen2VLAdapter

ADAPTERS: tuple[type[VLMAdapter], ...] = (LlavaAdapter, LlavaNextAdapter, LlavaOnevisionAdapter, Qwen2VLAdapter)


def supported_classes() -> list[str]:
    return [c for a in ADAPTERS for c in a.model_classes]


def get_adapter(model) -> VLMAdapter:
    """The adapter for ``model``; ``ValueError`` naming the supported classes otherwise."""
    name = type(model).__name__
    for adapter in ADAPTERS:
        if name in adapter.model_classes:
            if getattr(getattr(model, "model", None), "language_model", None) is None:
                break
            return adapter(model)
    raise ValueError(
        f"mmaccel cannot accelerate a {name}: it needs a vision-language model with a vision tower. "
        f"Supported classes: {', '.join(supported_classes())}. Load your checkpoint with one of these "
        "(e.g. AutoModelForImageTextToText.from_pretrained(path))."
    )


__all__ = ["ADAPTERS", "Part", "Segment", "VLMAdapter", "get_adapter", "supported_classes"]
