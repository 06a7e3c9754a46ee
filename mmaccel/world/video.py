"""Video question families (8-16 frames of ``IMAGE_SIDE`` pixels) and mp4 output.

A video is a list of per-frame object states rendered to ``frames``, a uint8 array
of shape ``(T, H, W, 3)``.

- ``motion``: the asked object moves in a straight line (left / right / up / down);
  other objects stay still or move in another direction.
- ``flash``: the asked object disappears for single frames ``k`` times (1-3).
- ``appear``: a new object appears part-way through and stays; asked: its shape.
"""
from __future__ import annotations

import numpy as np

from .images import COLOR_NAMES, _pick, new_scene
from .scene import Obj, PlacementError, Scene, place, render
from .spec import IMAGE_SIDE, MAX_OBJECTS, MOTIONS, SHAPES, TEMPLATES, VIDEO_FRAMES, VIDEO_SIZE_RANGE

STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def video_size(rng: np.random.Generator) -> float:
    return float(rng.uniform(*VIDEO_SIZE_RANGE)) * IMAGE_SIDE


def track(o: Obj, direction: str | None, dist: float, t: int) -> list[Obj]:
    """Positions of ``o`` over ``t`` frames, moving ``dist`` px in ``direction``."""
    dx, dy = STEP[direction] if direction else (0, 0)
    fr = np.linspace(0.0, 1.0, t)
    return [Obj(o.shape, o.color, o.cx + dx * dist * f, o.cy + dy * dist * f, o.size) for f in fr]


def start_region(direction: str | None, dist: float, r: float):
    """Where a start centre must lie so the whole path stays inside the frame."""
    lo, hi = r + 2, IMAGE_SIDE - r - 2
    x0, y0, x1, y1 = lo, lo, hi, hi
    if direction == "left":
        x0 = lo + dist
    elif direction == "right":
        x1 = hi - dist
    elif direction == "up":
        y0 = lo + dist
    elif direction == "down":
        y1 = hi - dist
    return x0, y0, x1, y1


def tracks_clear(a: list[Obj], b: list[Obj]) -> bool:
    """True when two tracks never come closer than their radii plus a gap."""
    return all(np.hypot(p.cx - q.cx, p.cy - q.cy) > (p.radius + q.radius) * 1.2 + 2 for p, q in zip(a, b))


def add_mover(tracks: list, rng, shape, color, direction, t: int, tries: int = 100) -> list[Obj]:
    """Add a moving (or static, direction None) object whose track clears the others."""
    size = video_size(rng)
    dist = float(rng.uniform(0.3, 0.45)) * IMAGE_SIDE if direction else 0.0
    x0, y0, x1, y1 = start_region(direction, dist, size / 2)
    for _ in range(tries):
        o = Obj(shape, color, float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1)), size)
        tr = track(o, direction, dist, t)
        if all(tracks_clear(tr, other) for other in tracks):
            tracks.append(tr)
            return tr
    raise PlacementError("no clear track")


def render_tracks(scene: Scene, tracks: list, visible: np.ndarray) -> np.ndarray:
    """Render frames; ``visible`` is a bool (n_objects, T) mask. Returns (T, H, W, 3) uint8."""
    frames = []
    for t in range(visible.shape[1]):
        objs = [tr[t] for tr, vis in zip(tracks, visible) if vis[t]]
        frames.append(np.asarray(render(scene, objs)))
    return np.stack(frames)


def video_meta(scene: Scene, tracks: list, visible: np.ndarray) -> dict:
    """Per-object start/end state and visibility for tests and debugging."""
    objs = [{"shape": tr[0].shape, "color": tr[0].color, "start": [tr[0].cx, tr[0].cy],
             "end": [tr[-1].cx, tr[-1].cy], "size": tr[0].size, "visible": vis.tolist()}
            for tr, vis in zip(tracks, visible)]
    return {"side": scene.side, "background": scene.background, "objects": objs}


def _others(rng, k: int, exclude, cap: int):
    """``k`` other (shape, color) kinds, the first ``cap`` of them kept (all ``k`` are drawn,
    so a cap of ``k`` or more leaves the random stream as it was)."""
    kinds = [(s, c) for s in SHAPES for c in COLOR_NAMES if (s, c) != exclude]
    return [_pick(rng, kinds) for _ in range(k)][:max(0, cap)]


def build_motion(rng, t: int, max_objects: int = MAX_OBJECTS):
    shape, color, d = _pick(rng, SHAPES), _pick(rng, COLOR_NAMES), _pick(rng, MOTIONS)
    scene, tracks = new_scene(rng), []
    add_mover(tracks, rng, shape, color, d, t)
    for s, c in _others(rng, int(rng.integers(0, 3)), (shape, color), max_objects - 1):
        other = _pick(rng, [m for m in MOTIONS if m != d] + [None, None])
        add_mover(tracks, rng, s, c, other, t)
    visible = np.ones((len(tracks), t), bool)
    q = TEMPLATES["motion"].format(color=color, shape=shape)
    return scene, tracks, visible, q, d


def flash_frames(rng, t: int, k: int) -> list[int]:
    """``k`` distinct, non-adjacent frame indices in [1, t-2] (the object is hidden)."""
    for _ in range(1000):
        idx = sorted(rng.choice(np.arange(1, t - 1), size=k, replace=False).tolist())
        if all(b - a >= 2 for a, b in zip(idx, idx[1:])):
            return idx
    raise PlacementError("no flash pattern")


def build_flash(rng, t: int, max_objects: int = MAX_OBJECTS):
    shape, color, k = _pick(rng, SHAPES), _pick(rng, COLOR_NAMES), int(rng.integers(1, 4))
    scene, tracks = new_scene(rng), []
    add_mover(tracks, rng, shape, color, None, t)
    for s, c in _others(rng, int(rng.integers(0, 3)), (shape, color), max_objects - 1):
        add_mover(tracks, rng, s, c, None, t)
    visible = np.ones((len(tracks), t), bool)
    visible[0, flash_frames(rng, t, k)] = False
    q = TEMPLATES["flash"].format(color=color, shape=shape)
    return scene, tracks, visible, q, str(k)


def build_appear(rng, t: int, max_objects: int = MAX_OBJECTS):
    shape, color = _pick(rng, SHAPES), _pick(rng, COLOR_NAMES)
    scene, tracks = new_scene(rng), []
    add_mover(tracks, rng, shape, color, None, t)
    for s, c in _others(rng, int(rng.integers(1, 3)), (shape, color), max_objects - 1):
        add_mover(tracks, rng, s, c, None, t)
    visible = np.ones((len(tracks), t), bool)
    visible[0, : int(rng.integers(t // 4, 3 * t // 4 + 1))] = False
    return scene, tracks, visible, TEMPLATES["appear"], shape


VIDEO_BUILDERS = {"motion": build_motion, "flash": build_flash, "appear": build_appear}


def build_video_family(family: str, rng: np.random.Generator, num_frames: int | None = None,
                       max_objects: int = MAX_OBJECTS):
    """Return (frames (T,H,W,3) uint8, question, answer, meta); T from VIDEO_FRAMES if None.
    ``max_objects`` caps the objects per video (1: the asked object alone; curricula)."""
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"max_objects must be in 1..{MAX_OBJECTS}, got {max_objects}")
    t = num_frames or int(_pick(rng, VIDEO_FRAMES))
    for _ in range(100):
        try:
            scene, tracks, visible, q, a = VIDEO_BUILDERS[family](rng, t, max_objects)
        except PlacementError:
            continue
        return render_tracks(scene, tracks, visible), q, a, video_meta(scene, tracks, visible)
    raise PlacementError(f"could not build a {family} video")


def write_mp4(frames: np.ndarray, path, fps: int = 8) -> None:
    """Write uint8 frames (T, H, W, 3) to an H.264 (or mpeg4) mp4 with PyAV."""
    import av

    with av.open(str(path), mode="w") as out:
        stream = _video_stream(out, fps, frames.shape[2], frames.shape[1])
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _video_stream(out, fps: int, width: int, height: int):
    try:
        stream = out.add_stream("libx264", rate=fps)
        stream.options = {"crf": "18"}
    except Exception:  # pragma: no cover - codec availability depends on the av build
        stream = out.add_stream("mpeg4", rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    return stream


def read_mp4(path) -> np.ndarray:
    """Decode every frame of a video file to uint8 (T, H, W, 3)."""
    import av

    with av.open(str(path)) as inp:
        return np.stack([f.to_ndarray(format="rgb24") for f in inp.decode(video=0)])
