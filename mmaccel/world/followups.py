"""Follow-up questions about a scene that already exists (dense training targets).

A sample's main question comes from its family's builder, which constructs the scene
so that one answer is well defined. The same scene usually answers several more
questions of the world's families exactly; these functions derive them from the
scene metadata alone, keeping only the ones whose answer is unambiguous:

- ``exists`` for any (color, shape): yes for a present kind, no (preferring kinds that
  share the color or the shape with a present object) otherwise;
- ``count`` for a shape when the count is at most ``MAX_COUNT``;
- ``color`` for a shape that occurs exactly once;
- ``where`` for a (color, shape) that occurs once and sits clearly off-centre on one axis;
- ``multi`` for a kind found in exactly one of two images;
- ``motion`` for a moving object whose kind is unique in the video.

Three more kinds are opt-in (``extra``), so older recipes keep their data stream:

- ``flash``: in a flash video, "How many times does the {color} {shape} flash?" for every
  other object of a unique kind; they never vanish, so the answer is ``0`` (the main
  question's answers are 1-3, so these turns teach *which* object's frames to count);
- ``caption``: "Describe the image." for a still scene of at most ``CAPTION_MAX_OBJECTS``
  objects (the caption family's own scenes), so captions are trained beside every image;
- ``order``: the caption's two sub-skills as short turns, for the same scenes: "How many
  objects are there?" and, for one random position, "Which object is {ordinal} from the
  left?" -> "a {color} {shape}", added after the ``k`` picks (so the other turns, the
  caption's included, keep their share). Captions fail mostly by swapping two close objects or
  saying a repeated object once; these turns train exactly that, one short answer each.
  Training only: they are not evaluation families (their words join the tokenizer only when
  asked for, see :data:`EXTRA_VOCABULARY`).

Training packs them as extra chat turns after the main answer, so one image costs one
vision pass for several supervised answers (see ``mmaccel.embedded.data``).
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from .images import caption, object_phrase
from .scene import Obj
from .spec import CAPTION_MAX_OBJECTS, COLORS, MAX_COUNT, MOTIONS, ORDINALS, SHAPES, TEMPLATES

KINDS = tuple((s, c) for s in SHAPES for c in COLORS)
WHERE_MIN_OFFSET = 0.15  # of the side, along the dominant axis
WHERE_MIN_MARGIN = 0.08  # of the side, |dominant offset| - |other offset|


def _where_clear(o: dict, side: int) -> str | None:
    """left/right/top/bottom when the dominant axis is clear, else None."""
    dx, dy = (o["cx"] - side / 2.0) / side, (o["cy"] - side / 2.0) / side
    big, small = max(abs(dx), abs(dy)), min(abs(dx), abs(dy))
    if big < WHERE_MIN_OFFSET or big - small < WHERE_MIN_MARGIN:
        return None
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _exists_question(kinds: Counter, rng: np.random.Generator) -> tuple[str, str]:
    present = sorted(kinds)
    absent = [k for k in KINDS if k not in kinds]
    hard = [k for k in absent if any(k[0] == p[0] or k[1] == p[1] for p in present)]
    if present and (not absent or rng.random() < 0.5):
        (s, c), ans = present[int(rng.integers(len(present)))], "yes"
    else:
        pool = hard if hard and rng.random() < 0.8 else absent
        (s, c), ans = pool[int(rng.integers(len(pool)))], "no"
    return TEMPLATES["exists"].format(color=c, shape=s), ans


def image_followups(objects: list[dict], side: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """All derivable (question, answer) pairs of a still scene, one per family slot.

    objects: the scene's object dicts (shape, color, cx, cy, size). Returns exists
    questions (two), count for every shape, color for unique shapes, where for unique
    kinds with a clear axis; the caller samples from them.
    """
    kinds = Counter((o["shape"], o["color"]) for o in objects)
    shapes = Counter(o["shape"] for o in objects)
    out = [_exists_question(kinds, rng) for _ in range(2)]
    out += [(TEMPLATES["count"].format(shape=s), str(shapes[s])) for s in SHAPES if shapes[s] <= MAX_COUNT]
    for o in objects:
        if shapes[o["shape"]] == 1:
            out.append((TEMPLATES["color"].format(shape=o["shape"]), o["color"]))
        d = _where_clear(o, side) if kinds[(o["shape"], o["color"])] == 1 else None
        if d:
            out.append((TEMPLATES["where"].format(color=o["color"], shape=o["shape"]), d))
    return out


def multi_followups(scenes: list[dict]) -> list[tuple[str, str]]:
    """'Which image has a {color} {shape}?' for every kind found in exactly one image."""
    per_image = [{(o["shape"], o["color"]) for o in sc["objects"]} for sc in scenes]
    out = []
    for s, c in KINDS:
        where = [i for i, kinds in enumerate(per_image) if (s, c) in kinds]
        if len(where) == 1:
            out.append((TEMPLATES["multi"].format(color=c, shape=s), ORDINALS[where[0]]))
    return out


def motion_followups(objects: list[dict]) -> list[tuple[str, str]]:
    """'Which direction does the {color} {shape} move?' for moving objects of a unique kind."""
    kinds = Counter((o["shape"], o["color"]) for o in objects)
    out = []
    for o in objects:
        d = _direction(o["start"], o["end"])
        if d and kinds[(o["shape"], o["color"])] == 1:
            out.append((TEMPLATES["motion"].format(color=o["color"], shape=o["shape"]), d))
    return out


def _direction(start, end) -> str | None:
    dx, dy = end[0] - start[0], end[1] - start[1]
    if abs(dx) < 1 and abs(dy) < 1:
        return None
    d = ("right" if dx > 0 else "left") if abs(dx) >= abs(dy) else ("down" if dy > 0 else "up")
    assert d in MOTIONS
    return d


def flash_followups(objects: list[dict]) -> list[tuple[str, str]]:
    """'How many times does the {color} {shape} flash?' for every object of a unique kind,
    answered by its visible -> hidden transitions (0 for an object that never vanishes)."""
    kinds = Counter((o["shape"], o["color"]) for o in objects)
    out = []
    for o in objects:
        if kinds[(o["shape"], o["color"])] == 1:
            vis = np.asarray(o["visible"], bool)
            out.append((TEMPLATES["flash"].format(color=o["color"], shape=o["shape"]),
                        str(int(np.sum(vis[:-1] & ~vis[1:])))))
    return out


def caption_followups(objects: list[dict]) -> list[tuple[str, str]]:
    """'Describe the image.' for a scene of 1..CAPTION_MAX_OBJECTS objects, else nothing."""
    if not 1 <= len(objects) <= CAPTION_MAX_OBJECTS:
        return []
    return [(TEMPLATES["caption"], caption([Obj(**o) for o in objects]))]


ORDER_ORDINALS = ("first", "second", "third", "fourth")
ORDER_TEMPLATE = "Which object is {ordinal} from the left?"
TOTAL_COUNT_QUESTION = "How many objects are there?"
ORDER_PICKS = 1  # ordinal turns per scene: each turn lengthens the row (steps cost more)
# lines holding the words of the opt-in kinds that no evaluation question uses (the tokenizer
# adds them on request)
EXTRA_VOCABULARY = {"order": [TOTAL_COUNT_QUESTION] + [ORDER_TEMPLATE.format(ordinal=o) for o in ORDER_ORDINALS]}


def order_followups(objects: list[dict], rng: np.random.Generator) -> list[tuple[str, str]]:
    """The object count and up to :data:`ORDER_PICKS` "Which object is {ordinal} from the left?"
    turns for a scene of 1..CAPTION_MAX_OBJECTS objects (the caption's scenes), else nothing."""
    if not 1 <= len(objects) <= CAPTION_MAX_OBJECTS:
        return []
    ordered = sorted((Obj(**o) for o in objects), key=lambda o: o.cx)
    picks = sorted(rng.permutation(len(ordered))[:ORDER_PICKS].tolist())
    out = [(TOTAL_COUNT_QUESTION, str(len(ordered)))]
    return out + [(ORDER_TEMPLATE.format(ordinal=ORDER_ORDINALS[i]), object_phrase(ordered[i])) for i in picks]


EXTRA_KINDS = ("flash", "caption", "order")
IMAGE_QUESTION_FAMILIES = ("color", "count", "exists", "where", "caption")


def check_extra_kinds(extra) -> None:
    """Raise ``ValueError`` naming any kind in ``extra`` that is not in :data:`EXTRA_KINDS`."""
    unknown = set(extra) - set(EXTRA_KINDS)
    if unknown:
        raise ValueError(f"unknown follow-up kinds {sorted(unknown)}; choose from {EXTRA_KINDS}")


def followups_for(family: str, meta: dict, question: str, rng: np.random.Generator,
                  k: int, extra: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """Up to ``k`` follow-ups for a sample of ``family``, never repeating its question;
    ``extra`` adds the opt-in kinds of :data:`EXTRA_KINDS` (``order``'s turns come on top of
    the ``k``)."""
    check_extra_kinds(extra)
    if family == "multi":
        pool = multi_followups(meta["scenes"])
    elif family == "motion":
        pool = motion_followups(meta["objects"])
    elif family == "flash" and "flash" in extra:
        pool = flash_followups(meta["objects"])
    elif family in IMAGE_QUESTION_FAMILIES:
        pool = image_followups(meta["objects"], meta["side"], rng)
        if "caption" in extra:
            pool += caption_followups(meta["objects"])
    else:
        return []
    pool = [qa for qa in dict.fromkeys(pool) if qa[0] != question]
    order = rng.permutation(len(pool))[:k]
    picked = [pool[int(i)] for i in order]
    if "order" in extra and family in IMAGE_QUESTION_FAMILIES:
        # beyond the k picks, drawn after them: every other turn stays what it was without them
        picked += order_followups(meta["objects"], rng)
    return picked
