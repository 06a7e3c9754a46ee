"""mmaccel: make vision and video LLMs fast.

``accelerate_vlm(model, method=..., retention=...)`` patches one transformers VLM instance so
that its own ``generate`` runs on fewer visual tokens; ``Pipeline`` wraps loading, media and
generation. Heavy modules (torch, transformers, gradio, av, triton) load lazily.
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "accelerate_vlm": ("mmaccel.api", "accelerate_vlm"),
    "AccelHandle": ("mmaccel.api", "AccelHandle"),
    "AccelConfig": ("mmaccel.config", "AccelConfig"),
    "list_methods": ("mmaccel.methods", "list_methods"),
    "describe_methods": ("mmaccel.methods", "describe_methods"),
    "Stats": ("mmaccel.stats", "Stats"),
    "Pipeline": ("mmaccel.pipeline", "Pipeline"),
    "Answer": ("mmaccel.pipeline", "Answer"),
    "load_default_model": ("mmaccel.embedded", "load_default_model"),
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mmaccel' has no attribute {name!r}")
