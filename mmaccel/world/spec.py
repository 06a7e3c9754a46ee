"""Constants of the synthetic visual world (see ``mmaccel/world/README.md``)."""
from __future__ import annotations

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 220),
    "yellow": (235, 200, 40),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS_2D: tuple[str, ...] = ("left", "right", "top", "bottom")
MOTIONS: tuple[str, ...] = ("left", "right", "up", "down")
ORDINALS: tuple[str, ...] = ("first", "second")

IMAGE_SIDE = 144  # normal still images and video frames (one vision tile)
HIRES_SIDE = 288  # high-resolution stills (2x2 crops + base tile)
MAX_OBJECTS = 6
MAX_COUNT = 5  # answers of the count family are 0..MAX_COUNT
CAPTION_MAX_OBJECTS = 4  # caption scenes hold 1-4 objects (a caption lists them all, exactly)
SIZE_RANGE = (0.06, 0.25)  # object size as a fraction of the side, normal images
HIRES_SIZE_RANGE = (0.035, 0.10)  # small objects on high-resolution images
VIDEO_SIZE_RANGE = (0.10, 0.20)
VIDEO_FRAMES = (8, 12, 16)
TEXT_RGB = (25, 25, 25)

IMAGE_FAMILIES: tuple[str, ...] = ("color", "count", "exists", "where", "caption", "digits")
MULTI_FAMILIES: tuple[str, ...] = ("multi",)
VIDEO_FAMILIES: tuple[str, ...] = ("motion", "flash", "appear")
HIRES_FAMILIES: tuple[str, ...] = ("color", "count", "exists", "where", "caption")
ALL_FAMILIES: tuple[str, ...] = IMAGE_FAMILIES + MULTI_FAMILIES + VIDEO_FAMILIES
# The families the embedded model is trained and evaluated on. ``digits`` stays a world
# family, but its 1-3 digit strings are too fine for 24 px patches at 144 px to be read.
MODEL_FAMILIES: tuple[str, ...] = tuple(f for f in ALL_FAMILIES if f != "digits")

TEMPLATES: dict[str, str] = {
    "color": "What color is the {shape}?",
    "count": "How many {shape}s are there?",
    "exists": "Is there a {color} {shape}?",
    "where": "Where is the {color} {shape}?",
    "caption": "Describe the image.",
    "digits": "What number is written?",
    "multi": "Which image has a {color} {shape}?",
    "motion": "Which direction does the {color} {shape} move?",
    "flash": "How many times does the {color} {shape} flash?",
    "appear": "Which shape appears?",
}


def family_kind(family: str) -> str:
    """'image', 'multi' or 'video' for a question family."""
    if family in VIDEO_FAMILIES:
        return "video"
    return "multi" if family in MULTI_FAMILIES else "image"
