"""The embedded default model: a tiny LLaVA-OneVision trained on the synthetic world.

``load_default_model(device="cpu", dtype=torch.float32) -> (model, processor)`` loads
the shipped checkpoint at ``DEFAULT_MODEL_DIR`` with stock transformers classes
(``LlavaOnevisionForConditionalGeneration`` + ``AutoProcessor``, no remote code).
Torch and transformers are imported lazily, so ``import mmaccel.embedded`` stays light.
"""
from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "default_model"


def load_model(path, device="cpu", dtype=None):
    """Load ``(model, processor)`` from a directory written by ``save_pretrained``."""
    import torch
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(str(path), dtype=dtype or torch.float32)
    model.to(device).eval()
    processor = AutoProcessor.from_pretrained(str(path))
    return model, processor


def load_default_model(device="cpu", dtype=None):
    """The shipped model and processor; ``dtype`` defaults to ``torch.float32``."""
    if not (DEFAULT_MODEL_DIR / "config.json").exists():
        raise FileNotFoundError(f"no shipped model at {DEFAULT_MODEL_DIR}")
    return load_model(DEFAULT_MODEL_DIR, device, dtype)


__all__ = ["DEFAULT_MODEL_DIR", "load_default_model", "load_model"]
