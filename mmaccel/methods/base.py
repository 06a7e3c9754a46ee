"""Method base classes. A method is a small dataclass with typed, official defaults and one
thing to implement; it never imports a model family (adapters never contain a method)."""
from __future__ import annotations

import numbers
import types
import typing
from dataclasses import dataclass, fields
from typing import Callable, ClassVar

import numpy as np
import torch

from ..models.base import Segment


@dataclass
class Method:
    """Common fields. ``retention`` (0, 1] overrides the method's native budget when given: the
    fraction of a sample's visual tokens (as the processor made them) left after the method's
    budgeted reduction step. A method that merges before the LLM and prunes inside it
    (mustdrop) ends at that count like the others; AIM's retention is its merge budget and its
    in-LLM schedule then applies the official relative rates (see its docstring)."""

    retention: float | None = None
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def __post_init__(self):
        self._check_knob_types()
        if self.retention is not None and not (0.0 < self.retention <= 1.0):  # a number: checked above
            raise ValueError(
                f"retention must be in (0, 1], got {self.retention}: it is the fraction of visual tokens kept "
                "(e.g. 0.25 keeps a quarter)."
            )

    def keep_fraction(self) -> float:
        """Fraction of visual tokens the final reduction step keeps."""
        return 1.0 if self.retention is None else float(self.retention)

    def _check_knob_types(self) -> None:
        """Every knob holds its declared type. A config or CLI typo (``prune: flase``) is a string
        that would read as true, and ``tau: '0.1'`` would fail deep inside a kernel."""
        hints = typing.get_type_hints(type(self))
        for key in self.field_defaults():
            value, allowed = getattr(self, key), _allowed_types(hints[key])
            if not any(_is_instance(value, t) for t in allowed):
                expected = " or ".join(_TYPE_WORDS.get(t, getattr(t, "__name__", str(t))) for t in allowed)
                raise ValueError(f"{self.name} {key} must be {expected}, got {value!r} ({type(value).__name__})")

    @classmethod
    def field_defaults(cls) -> dict:
        return {f.name: f.default for f in fields(cls) if f.init and not f.name.startswith("_")}

    def check_model(self, adapter) -> None:
        """Raise ``ValueError`` if this method cannot run on ``adapter``'s model."""

    def after_prefill(self, runtime, cache) -> None:
        """Hook after the prefill forward (e.g. a KV-cache policy)."""


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", type(None): "null (None)"}


def _allowed_types(hint) -> tuple:
    """``float | None`` -> (float, NoneType); a plain class -> (it,)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return (hint,)


def _is_instance(value, kind) -> bool:
    """bool is an int to Python, not to a knob: ``k: true`` is a typo, not layer 1."""
    is_bool = isinstance(value, (bool, np.bool_))
    if kind is bool:
        return is_bool
    if kind is int:
        return isinstance(value, numbers.Integral) and not is_bool
    if kind is float:
        return isinstance(value, numbers.Real) and not is_bool
    return isinstance(value, kind) if isinstance(kind, type) else True


@dataclass
class Reduction:
    """Result of reducing one segment: kept local indices (sorted) and optional new features."""

    keep: torch.Tensor  # (k,) long, sorted, indices into the segment
    features: torch.Tensor | None = None  # (k, D) replacement features (merging methods)
    # per kept token: local indices merged into it; or a function returning that list, so a
    # method can leave it to be built only when provenance is asked for (it costs host time)
    groups: list[torch.Tensor] | Callable[[], list[torch.Tensor]] | None = None
    protected: torch.Tensor | None = None  # (p,) local indices later stages must never drop
    # (k,) how many of the segment's tokens each kept token stands for (merging methods); the
    # LLM weighs a kept token by it when the method asks for proportional attention
    sizes: torch.Tensor | None = None

    def group_list(self) -> list[torch.Tensor] | None:
        """``groups`` as a list (built now if the method left it as a function)."""
        return self.groups() if callable(self.groups) else self.groups


def members_by_slot(owner: torch.Tensor, slots: int, values: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Invert an assignment: ``owner`` (n,) slot of every token -> per slot, its tokens in
    ascending order (or ``values`` at those tokens). One sort, no Python loop over tokens."""
    members = owner.argsort(stable=True)
    members = members if values is None else values[members]
    return list(members.split(torch.bincount(owner, minlength=slots).tolist()))


@dataclass
class PreLLMReducer(Method):
    """Reduces each image / crop / frame's projected features before the LLM."""

    def reduce(self, features: torch.Tensor, segment: Segment, budget: int) -> Reduction:
        """features: (n, D) projected features of ``segment``; keep ``budget`` tokens."""
        raise NotImplementedError

    def llm_proportional(self) -> bool:
        """Whether merged tokens weigh log(size) in the LLM's attention (``Reduction.sizes``):
        the method's ``proportional_attention`` knob where it has one."""
        return bool(getattr(self, "proportional_attention", False))

    def reduce_media(self, features: list[torch.Tensor], segments: list[Segment], budget: int) -> list[Reduction]:
        """All parts of one media item (base image + crops, or frames). Default: the budget is
        split across parts by size and each part is reduced on its own."""
        from ..runtime import allocate

        budgets = allocate([s.n for s in segments], budget)
        return [self.reduce(f, s, b) for f, s, b in zip(features, segments, budgets)]

    def reduce_parts(self, features: list[torch.Tensor], segments: list[Segment], budget: int) -> list[Reduction]:
        """What the runtime calls: :meth:`reduce_media`, then, for a method whose
        ``merge_dropped`` knob is on, every dropped grid token averaged into the kept token most
        similar to it (:mod:`.merge_dropped`; the keep set stays the method's)."""
        reductions = self.reduce_media(features, segments, budget)
        if not getattr(self, "merge_dropped", False):
            return reductions
        from .merge_dropped import with_dropped_merged

        return [red if red.features is not None or red.keep.numel() == seg.n else
                with_dropped_merged(feats, red, seg.token_kinds())
                for feats, seg, red in zip(features, segments, reductions)]


@dataclass
class InLLMPruner(Method):
    """Prunes visual tokens inside the decoder at chosen layers, from query-subset attention."""

    query: ClassVar[str] = "last"  # which queries score the keys: "last" | "text" (all text after the media)
    # what the schedule's fractions count: "llm_input" (the visual tokens that reach the LLM, after
    # any pre-LLM step) or "original" (the processor's visual tokens, before any reduction)
    budget_base: ClassVar[str] = "llm_input"

    def schedule(self, num_layers: int) -> list[tuple[int, float]]:
        """[(layer, fraction of each sample's visual tokens at the LLM input to keep from that layer on)]."""
        raise NotImplementedError

    def select(self, probs, rows, row_valid, valid, visual, protected, budgets) -> torch.Tensor:
        """Which tokens survive a pruning layer. probs: (B, H, Q, L) attention of query ``rows``
        (B, Q); valid, visual, protected: (B, L) bool; budgets: visual tokens to keep per sample.
        Returns keep (B, L) bool. Default: the top-``budget`` visual tokens by :meth:`importance`,
        protected tokens first."""
        from ..runtime import select_visual

        scores = self.importance(probs, rows, row_valid, valid & ~visual)
        scores = scores.masked_fill(protected, float("inf"))
        return select_visual(scores, valid, visual, budgets)

    def layer_budget(self, visual: int, share: float) -> int:
        """Visual tokens a sample keeps at a pruning layer: ``share`` of its ``visual`` tokens."""
        return round(visual * share)

    def tap_layer(self, prune_layer: int) -> int:
        """Layer whose attention scores decide the pruning at ``prune_layer``."""
        return prune_layer - 1

    def importance(self, probs: torch.Tensor, rows: torch.Tensor, row_valid: torch.Tensor,
                   text_keys: torch.Tensor) -> torch.Tensor:
        """probs: (B, H, Q, T) attention of the query rows ``rows`` (B, Q) (positions in the current
        sequence); row_valid: (B, Q) bool (padded query rows are False); text_keys: (B, T) bool.
        Returns (B, T) importance (higher = keep)."""
        weights = row_valid.float() / row_valid.float().sum(1, keepdim=True).clamp(min=1)
        return torch.einsum("bhqt,bq->bt", probs, weights) / probs.shape[1]
