"""Hold the place head's channels of the projected tokens back from the language model until a
point of stage 2 (``--place-open START:END``).

Stage 1's place head (``--vision-ordinal``) writes each object's place from the left into a
slice of the projector's output channels. Every run that did so lost colour-shape binding in
stage 2 (results/recipe-cpu/summary_tower/README.md, runs 44e-49e). The gate zeroes those
channels' rows of the projector's last layer, and keeps their gradients at zero, until schedule
progress START; from there the rows ramp back to stage 1's values by END and then train freely.
With START = END = 1 they stay zero to the end, and the saved model carries the zero rows, so
what is evaluated is what was trained.

What it was found to do (runs 53e, 54e): nothing for binding. With the rows at zero throughout,
binding was still lost and the caption gain still came, both through the rest of the tower's
output, which the projector's other rows can carry. Only the place term's strength
(``--vision-fact-weight``; run 55e at 0.6) has separated the two. No recipe uses the gate.
"""
from __future__ import annotations


def gate_level(progress: float, start: float, end: float) -> float:
    """0 before ``start``, 1 from ``end`` on, linear between (0 throughout when start = end = 1)."""
    if progress < start:
        return 0.0
    if progress >= end:
        return 1.0
    return (progress - start) / (end - start)


def check_place_open(spec: tuple) -> None:
    """``ValueError`` unless ``spec`` is () or (start, end) with 0 <= start <= end <= 1."""
    if spec and not (len(spec) == 2 and 0.0 <= spec[0] <= spec[1] <= 1.0):
        raise ValueError(f"place_open is START:END with 0 <= START <= END <= 1, got {spec!r}")


def parse_place_open(text: str) -> tuple:
    """'0.5:0.6' -> (0.5, 0.6); '' -> ()."""
    if not text:
        return ()
    try:
        spec = tuple(float(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"bad --place-open {text!r}: use START:END, e.g. 0.5:0.6") from None
    check_place_open(spec)
    return spec


class PlaceGate:
    """Scales rows ``rows`` of ``layer`` (an nn.Linear) by :func:`gate_level` of the schedule
    progress, from the values they had when the gate was made, and zeroes their gradients until
    the level reaches 1. Call :meth:`set` before every step and :meth:`remove` at the end."""

    def __init__(self, layer, rows: slice, start: float, end: float):
        import torch

        self.layer, self.rows, self.start, self.end = layer, rows, start, end
        self.saved = [p.detach()[rows].clone() for p in self._params()]
        keep = torch.ones(layer.out_features, dtype=layer.weight.dtype, device=layer.weight.device)
        keep[rows] = 0.0
        self.hooks = [p.register_hook(lambda g, k=keep.view(-1, *[1] * (p.dim() - 1)): g * k)
                      for p in self._params()]

    def _params(self) -> list:
        return [p for p in (self.layer.weight, self.layer.bias) if p is not None]

    @property
    def closed(self) -> bool:
        return bool(self.hooks)

    def set(self, progress: float) -> bool:
        """Put the rows at this progress's level; open the gate for good at level 1. Returns
        whether this call opened it."""
        import torch

        if not self.closed:
            return False
        level = gate_level(progress, self.start, self.end)
        with torch.no_grad():
            for p, saved in zip(self._params(), self.saved):
                p[self.rows] = saved * level
        if level >= 1.0:
            self.remove()
        return not self.closed

    def remove(self) -> None:
        """Drop the gradient hooks (the rows keep their current values)."""
        for h in self.hooks:
            h.remove()
        self.hooks = []


def place_gate(model, cfg):
    """The gate ``cfg.place_open`` asks for on ``model``'s projector, or None."""
    if not cfg.place_open:
        return None
    from .pretrain import fact_channels

    rows = fact_channels(cfg.vision_facts_from, cfg.vision_ordinal_channels)
    return PlaceGate(model.model.multi_modal_projector.linear_2, rows, *cfg.place_open)
