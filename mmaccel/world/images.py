"""Still-image question families: scene construction plus exact question/answer.

Each builder ``build_<family>(rng, hires) -> (scene, question, answer, meta)``
constructs a scene that makes the answer well defined (e.g. exactly one shape of
the asked kind for ``color``; a clearly dominant axis for ``where``).
"""
from __future__ import annotations

import numpy as np

from .scene import Obj, PlacementError, Scene, place, place_text, random_background
from .spec import (CAPTION_MAX_OBJECTS, COLORS, DIRECTIONS_2D, HIRES_SIDE, HIRES_SIZE_RANGE, IMAGE_SIDE, MAX_COUNT,
                   MAX_OBJECTS, SHAPES, SIZE_RANGE, TEMPLATES)

COLOR_NAMES = tuple(COLORS)


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def new_scene(rng: np.random.Generator, hires: bool = False) -> Scene:
    """An empty scene of the normal or high-resolution side."""
    return Scene(side=HIRES_SIDE if hires else IMAGE_SIDE, background=random_background(rng))


def object_size(rng: np.random.Generator, scene: Scene, n_objects: int) -> float:
    """A random size in pixels; large objects are rarer in crowded scenes."""
    lo, hi = HIRES_SIZE_RANGE if scene.side == HIRES_SIDE else SIZE_RANGE
    hi = min(hi, max(lo * 1.5, 0.5 / np.sqrt(max(n_objects, 1))))
    return max(6.0, float(rng.uniform(lo, hi)) * scene.side)


def add(scene: Scene, rng, shape: str, color: str, n_objects: int, region=None) -> Obj:
    """Place one object of random size (see :func:`object_size`)."""
    return place(scene, shape, color, object_size(rng, scene, n_objects), rng, region)


def add_others(scene: Scene, rng, k: int, n_objects: int, allowed) -> None:
    """Place ``k`` distractors; ``allowed(shape, color)`` filters their kinds."""
    kinds = [(s, c) for s in SHAPES for c in COLOR_NAMES if allowed(s, c)]
    for _ in range(k):
        s, c = _pick(rng, kinds)
        add(scene, rng, s, c, n_objects)


def maybe_text(scene: Scene, rng, p: float = 0.25) -> None:
    """With probability ``p`` (normal images only) reserve a short digit string."""
    if scene.side == IMAGE_SIDE and rng.random() < p:
        place_text(scene, random_number(rng), rng)


def random_number(rng: np.random.Generator) -> str:
    """A 1-3 digit string without a leading zero."""
    n_digits = int(rng.integers(1, 4))
    lo = 0 if n_digits == 1 else 10 ** (n_digits - 1)
    return str(int(rng.integers(lo, 10 ** n_digits)))


def object_phrase(o: Obj) -> str:
    """'a red circle': how a caption (and an ``order`` follow-up) names one object."""
    return f"a {o.color} {o.shape}"


def caption(objects: list[Obj]) -> str:
    """'a red circle, a blue square and a yellow triangle' (objects left to right)."""
    words = [object_phrase(o) for o in sorted(objects, key=lambda o: o.cx)]
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + " and " + words[-1]


WHERE_NAMES = ("left", "right", "top", "bottom")


def where(o: Obj, side: int) -> str:
    """left / right / top / bottom of the object's centre by the dominant axis."""
    return where_of(o.cx, o.cy, side)


def where_of(cx: float, cy: float, side: int) -> str:
    """left / right / top / bottom of the point (cx, cy) in a square of ``side`` px by the
    dominant axis of its offset from the centre (ties go to the horizontal)."""
    dx, dy = cx - side / 2.0, cy - side / 2.0
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def build_color(rng, hires=False, max_objects=MAX_OBJECTS):
    shape, color = _pick(rng, SHAPES), _pick(rng, COLOR_NAMES)
    n = int(rng.integers(1, max_objects + 1))
    scene = new_scene(rng, hires)
    maybe_text(scene, rng)
    add(scene, rng, shape, color, n)
    add_others(scene, rng, n - 1, n, lambda s, c: s != shape)
    q = TEMPLATES["color"].format(shape=shape)
    return scene, q, color, {"target": [shape, color]}


def build_count(rng, hires=False, max_objects=MAX_OBJECTS):
    shape, k = _pick(rng, SHAPES), int(rng.integers(0, min(MAX_COUNT, max_objects) + 1))
    m = int(rng.integers(1 if k == 0 else 0, max_objects - k + 1))
    scene = new_scene(rng, hires)
    maybe_text(scene, rng)
    for _ in range(k):
        add(scene, rng, shape, _pick(rng, COLOR_NAMES), k + m)
    add_others(scene, rng, m, k + m, lambda s, c: s != shape)
    q = TEMPLATES["count"].format(shape=shape)
    return scene, q, str(k), {"target": [shape, None]}


def _hard_negative_kinds(shape: str, color: str):
    """Distractor kinds that share the shape or the color with the absent target."""
    return lambda s, c: (s == shape) != (c == color)


def build_exists(rng, hires=False, max_objects=MAX_OBJECTS):
    shape, color = _pick(rng, SHAPES), _pick(rng, COLOR_NAMES)
    yes = bool(rng.random() < 0.5)
    n = int(rng.integers(1, max_objects + 1))
    scene = new_scene(rng, hires)
    maybe_text(scene, rng)
    if yes:
        add(scene, rng, shape, color, n)
    n_hard = int(rng.integers(0, n + (0 if yes else 1)))
    add_others(scene, rng, n_hard, n, _hard_negative_kinds(shape, color))
    add_others(scene, rng, n - len(scene.objects), n, lambda s, c: (s, c) != (shape, color))
    q = TEMPLATES["exists"].format(color=color, shape=shape)
    return scene, q, "yes" if yes else "no", {"target": [shape, color]}


def where_region(direction: str, side: int):
    """Centre region whose dominant axis clearly gives ``direction``."""
    lo, hi = 0.2 * side, 0.5 * side  # offset from the centre along the axis
    c = side / 2.0
    band = 0.1 * side  # |offset on the other axis| <= band < lo - margin
    if direction in ("left", "right"):
        x0, x1 = (c - hi, c - lo) if direction == "left" else (c + lo, c + hi)
        return x0, c - band, x1, c + band
    y0, y1 = (c - hi, c - lo) if direction == "top" else (c + lo, c + hi)
    return c - band, y0, c + band, y1


def build_where(rng, hires=False, max_objects=MAX_OBJECTS):
    shape, color, d = _pick(rng, SHAPES), _pick(rng, COLOR_NAMES), _pick(rng, DIRECTIONS_2D)
    n = int(rng.integers(1, max_objects + 1))
    scene = new_scene(rng, hires)
    target = add(scene, rng, shape, color, n, where_region(d, scene.side))
    add_others(scene, rng, n - 1, n, lambda s, c: (s, c) != (shape, color))
    assert where(target, scene.side) == d
    q = TEMPLATES["where"].format(color=color, shape=shape)
    return scene, q, d, {"target": [shape, color]}


def build_caption(rng, hires=False, max_objects=MAX_OBJECTS):
    n = int(rng.integers(1, min(max_objects, CAPTION_MAX_OBJECTS) + 1))
    scene = new_scene(rng, hires)
    maybe_text(scene, rng)
    add_others(scene, rng, n, n, lambda s, c: True)
    return scene, TEMPLATES["caption"], caption(scene.objects), {}


def build_digits(rng, hires=False, max_objects=MAX_OBJECTS):
    scene = new_scene(rng, False)
    text = random_number(rng)
    place_text(scene, text, rng)
    n = int(rng.integers(0, min(3, max_objects) + 1))
    add_others(scene, rng, n, max(n, 1), lambda s, c: True)
    return scene, TEMPLATES["digits"], text, {}


BUILDERS = {
    "color": build_color, "count": build_count, "exists": build_exists,
    "where": build_where, "caption": build_caption, "digits": build_digits,
}


def build_image_family(family: str, rng: np.random.Generator, hires: bool = False,
                       max_objects: int = MAX_OBJECTS):
    """Build (scene, question, answer, meta) for an image family, resampling on failure.

    ``max_objects`` (1..MAX_OBJECTS) caps the objects per scene (training curricula);
    count answers are capped by it too.
    """
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"max_objects must be in 1..{MAX_OBJECTS}, got {max_objects}")
    for _ in range(100):
        try:
            return BUILDERS[family](rng, hires, max_objects)
        except PlacementError:
            continue
    raise PlacementError(f"could not build a {family} scene")


def build_multi(rng: np.random.Generator):
    """Two scenes; exactly one holds the asked (color, shape). Answer first/second."""
    shape, color = _pick(rng, SHAPES), _pick(rng, COLOR_NAMES)
    which = int(rng.integers(2))
    scenes = []
    for i in range(2):
        n = int(rng.integers(1, 5))
        scene = new_scene(rng, False)
        if i == which:
            add(scene, rng, shape, color, n)
        add_others(scene, rng, n - len(scene.objects), n, _hard_negative_kinds(shape, color))
        scenes.append(scene)
    q = TEMPLATES["multi"].format(color=color, shape=shape)
    return scenes, q, ("first", "second")[which], {"target": [shape, color]}
