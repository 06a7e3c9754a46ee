"""Scenes: objects on a light background, placement and rendering.

An object is a solid ``circle`` / ``square`` / ``triangle`` of one palette color,
given by its centre ``(cx, cy)`` in pixels and its ``size`` (bounding-box side, px).
Objects never overlap, and their x centres differ by at least ``min_dx`` pixels so
that "left to right" is unambiguous.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .spec import COLORS, TEXT_RGB


@dataclass
class Obj:
    """One solid object; ``size`` is the bounding-box side in pixels."""

    shape: str
    color: str
    cx: float
    cy: float
    size: float

    @property
    def radius(self) -> float:
        return self.size / 2.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Scene:
    """A still scene: ``side`` x ``side`` pixels, background grey level, objects, text."""

    side: int
    background: int
    objects: list[Obj] = field(default_factory=list)
    text: str | None = None
    text_box: tuple[float, float, float, float] | None = None  # x0, y0, x1, y1
    text_px: int = 0

    def to_meta(self) -> dict:
        return {
            "side": self.side,
            "background": self.background,
            "objects": [o.to_dict() for o in self.objects],
            "text": self.text,
            "text_box": list(self.text_box) if self.text_box else None,
            "text_px": self.text_px,
        }


class PlacementError(RuntimeError):
    """Raised when objects cannot be placed; callers resample the scene."""


def random_background(rng: np.random.Generator) -> int:
    """White half of the time, else a light grey level in [222, 248]."""
    return 255 if rng.random() < 0.5 else int(rng.integers(222, 249))


def _clear_of(x: float, y: float, r: float, others: list[Obj], gap: float, min_dx: float) -> bool:
    for o in others:
        if np.hypot(x - o.cx, y - o.cy) < (r + o.radius) * 1.2 + gap:
            return False
        if abs(x - o.cx) < min_dx:
            return False
    return True


def _clear_of_box(x: float, y: float, r: float, box) -> bool:
    if box is None:
        return True
    x0, y0, x1, y1 = box
    return x + r + 2 < x0 or x - r - 2 > x1 or y + r + 2 < y0 or y - r - 2 > y1


def place(scene: Scene, shape: str, color: str, size: float, rng: np.random.Generator,
          region=None, tries: int = 200) -> Obj:
    """Add an object at a random free position (centre inside ``region`` if given).

    region: (x0, y0, x1, y1) bounds for the centre, in pixels.
    """
    r, side = size / 2.0, scene.side
    x0, y0, x1, y1 = region or (r + 2, r + 2, side - r - 2, side - r - 2)
    x0, y0, x1, y1 = max(x0, r + 2), max(y0, r + 2), min(x1, side - r - 2), min(y1, side - r - 2)
    if x0 >= x1 or y0 >= y1:
        raise PlacementError("empty region")
    for _ in range(tries):
        x, y = float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1))
        if _clear_of(x, y, r, scene.objects, 2.0, 0.04 * side) and _clear_of_box(x, y, r, scene.text_box):
            obj = Obj(shape, color, x, y, size)
            scene.objects.append(obj)
            return obj
    raise PlacementError("no free position")


def font(px: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled FreeType font at ``px`` pixels."""
    return ImageFont.load_default(size=px)


def place_text(scene: Scene, text: str, rng: np.random.Generator) -> None:
    """Reserve a random box for a digit string (before objects are placed)."""
    px = int(scene.side * rng.uniform(0.17, 0.22))
    x0, y0, x1, y1 = font(px).getbbox(text)
    w, h = x1 - x0, y1 - y0
    x = float(rng.uniform(2, scene.side - w - 2))
    y = float(rng.uniform(2, scene.side - h - 2))
    scene.text = text
    scene.text_box = (x, y, x + w, y + h)
    scene.text_px = px


def draw_object(draw: ImageDraw.ImageDraw, o: Obj) -> None:
    """Draw one solid object (no outline)."""
    r, rgb = o.radius, COLORS[o.color]
    box = [o.cx - r, o.cy - r, o.cx + r, o.cy + r]
    if o.shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif o.shape == "square":
        draw.rectangle(box, fill=rgb)
    elif o.shape == "triangle":
        draw.polygon([(o.cx, o.cy - r), (o.cx - r, o.cy + r), (o.cx + r, o.cy + r)], fill=rgb)
    else:
        raise ValueError(f"unknown shape {o.shape!r}")


def render(scene: Scene, objects: list[Obj] | None = None) -> Image.Image:
    """Render a scene (or the given subset of its objects) to an RGB PIL image."""
    img = Image.new("RGB", (scene.side, scene.side), (scene.background,) * 3)
    draw = ImageDraw.Draw(img)
    for o in scene.objects if objects is None else objects:
        draw_object(draw, o)
    if scene.text:
        x0, y0, _, _ = scene.text_box
        fnt = font(scene.text_px)
        bx0, by0, _, _ = fnt.getbbox(scene.text)
        draw.text((x0 - bx0, y0 - by0), scene.text, fill=TEXT_RGB, font=fnt)
    return img


def blank_like(side: int, background: int = 255) -> Image.Image:
    """A background-only image of the same size (for the blind-model check)."""
    return Image.new("RGB", (side, side), (background,) * 3)
