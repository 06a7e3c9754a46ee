"""Write the bundled sample media under ``mmaccel/assets/`` (CLI defaults).

``python -m mmaccel.world.assets [--out DIR]`` writes ``sample_video.mp4`` with
``sample_video.json`` ({question, answer, family, seed, index}) and ``sample_image.png``
with ``sample_image.json``, all from held-out (``test``) samples.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .samples import make_sample, sample_rng
from .video import write_mp4

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
SAMPLE_VIDEO = ASSETS_DIR / "sample_video.mp4"
SAMPLE_IMAGE = ASSETS_DIR / "sample_image.png"
VIDEO_SEED, VIDEO_INDEX = 2024, 0
IMAGE_SEED, IMAGE_INDEX = 2024, 1


def _record(s, seed: int, index: int) -> dict:
    return {"question": s.question, "answer": s.answer, "family": s.family, "seed": seed,
            "index": index, "split": "test"}


def write_assets(out: Path = ASSETS_DIR) -> list[Path]:
    """Regenerate the bundled sample video and image with their questions."""
    out.mkdir(parents=True, exist_ok=True)
    vid = make_sample("motion", sample_rng(VIDEO_SEED, VIDEO_INDEX, "test"), num_frames=16)
    write_mp4(vid.frames, out / "sample_video.mp4")
    (out / "sample_video.json").write_text(json.dumps(_record(vid, VIDEO_SEED, VIDEO_INDEX), indent=2))
    img = make_sample("caption", sample_rng(IMAGE_SEED, IMAGE_INDEX, "test"), hires=False)
    img.image.save(out / "sample_image.png")
    (out / "sample_image.json").write_text(json.dumps(_record(img, IMAGE_SEED, IMAGE_INDEX), indent=2))
    return [out / n for n in ("sample_video.mp4", "sample_video.json", "sample_image.png", "sample_image.json")]


def load_sample_video():
    """(frames uint8 (T, H, W, 3), question, answer) of the bundled sample video."""
    from .video import read_mp4

    rec = json.loads(SAMPLE_VIDEO.with_suffix(".json").read_text())
    return read_mp4(SAMPLE_VIDEO), rec["question"], rec["answer"]


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ASSETS_DIR))
    for path in write_assets(Path(p.parse_args().out)):
        print(path, path.stat().st_size)
