"""Method registry: ``list_methods()`` and ``make_method(name, **params)``."""
from __future__ import annotations

from .base import InLLMPruner, Method, PreLLMReducer, Reduction
from .aim import AIM
from .fastv import FastV
from .hired import HiRED
from .mustdrop import MustDrop
from .simple import NoneMethod, Pool, RandomDrop
from .stc import STCPruner
from .tome import ToMe
from .visionzip import VisionZip

REGISTRY: dict[str, type[Method]] = {m.name: m for m in (NoneMethod, RandomDrop, Pool, FastV, AIM, HiRED, VisionZip, STCPruner, MustDrop, ToMe)}


def list_methods() -> list[str]:
    """Names of the registered methods."""
    return sorted(REGISTRY)


def describe_methods() -> dict[str, dict]:
    """name -> {"description", "defaults"} for every method."""
    return {n: {"description": c.description, "defaults": c.field_defaults()} for n, c in sorted(REGISTRY.items())}


def make_method(name: str, **params) -> Method:
    """Instantiate a method by name; unknown names or parameters raise ``ValueError``."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(list_methods())}")
    cls = REGISTRY[name]
    allowed = cls.field_defaults()
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"method {name!r} has no parameter(s) {', '.join(unknown)}; its parameters: "
                         f"{', '.join(sorted(allowed))}")
    return cls(**params)


__all__ = ["REGISTRY", "InLLMPruner", "Method", "PreLLMReducer", "Reduction", "describe_methods",
           "list_methods", "make_method"]
