"""``Sample`` records and the deterministic sample generator.

Every sample is drawn from its own random stream, seeded by
``SeedSequence([SPLIT_KEY[split], seed, index])``: the same ``(seed, split)``
always gives identical pixels and questions, and the ``train`` and ``test``
splits come from disjoint seed spaces.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable

import numpy as np
from PIL import Image

from .followups import followups_for
from .images import build_image_family, build_multi
from .scene import PlacementError, render
from .spec import ALL_FAMILIES, HIRES_FAMILIES, MAX_OBJECTS, family_kind
from .video import build_video_family

SPLIT_KEY = {"train": 0x5EED0, "test": 0x7E570}


@dataclass
class Sample:
    """One question about an image, several images, or a video.

    images: list of RGB PIL images (one for image families, two for ``multi``);
    frames: uint8 array (T, H, W, 3) for video families, else None.
    followups: extra (question, answer) pairs about the same media, for training only
    (see :mod:`.followups`); prompts and evaluation use the main question alone.
    """

    id: str
    family: str
    question: str
    answer: str
    images: list[Image.Image] = field(default_factory=list)
    frames: np.ndarray | None = None
    meta: dict = field(default_factory=dict)
    followups: list[tuple[str, str]] = field(default_factory=list)

    @property
    def kind(self) -> str:
        """'image', 'multi' or 'video'."""
        return family_kind(self.family)

    @property
    def image(self) -> Image.Image | None:
        """The image of a single-image sample, else None."""
        return self.images[0] if len(self.images) == 1 else None

    def messages(self) -> list[dict]:
        """Chat messages for ``processor.apply_chat_template``."""
        media = [{"type": "video"}] if self.frames is not None else [{"type": "image"} for _ in self.images]
        return [{"role": "user", "content": media + [{"type": "text", "text": self.question}]}]


def sample_rng(seed: int, index: int, split: str = "train") -> np.random.Generator:
    """The random stream of sample ``index`` of ``(seed, split)``."""
    return np.random.default_rng(np.random.SeedSequence([SPLIT_KEY[split], seed, index]))


def make_sample(family: str, rng: np.random.Generator, sid: str = "", hires: bool | None = None,
                num_frames: int | None = None, hires_p: float = 0.2,
                max_objects: int = MAX_OBJECTS, followups: int = 0,
                extra_followups: tuple[str, ...] = ()) -> Sample:
    """Build one sample of ``family``. ``hires`` None: high-res with prob. ``hires_p``.

    ``max_objects`` caps the objects of a scene or video (default: the world's 6; videos
    hold at most 3 anyway).
    ``followups``: up to this many extra questions about the same media (training);
    ``extra_followups``: opt-in follow-up kinds (see :func:`.followups.followups_for`).
    """
    sample = _build_sample(family, rng, sid, hires, num_frames, hires_p, max_objects)
    if followups:
        sample.followups = followups_for(family, sample.meta, sample.question, rng, followups,
                                         extra_followups)
    return sample


def shuffled_turns(sample: Sample, rng: np.random.Generator) -> Sample:
    """The same media and question-answer pairs, the main question and its follow-ups in a
    random order (training only).

    Without it the main turn is always the family's built question, whose answer set can
    differ from the follow-ups' (a flash video's main question is about the object that
    vanishes, answers 1-3; its follow-ups ask the others, ``0``), so the turn's position
    alone gives the answer away and the pixels are never needed.
    """
    turns = [(sample.question, sample.answer), *sample.followups]
    (question, answer), *rest = [turns[int(i)] for i in rng.permutation(len(turns))]
    return replace(sample, question=question, answer=answer, followups=rest)


def _build_sample(family, rng, sid, hires, num_frames, hires_p, max_objects) -> Sample:
    kind = family_kind(family)
    if kind == "video":
        frames, q, a, meta = build_video_family(family, rng, num_frames, max_objects)
        return Sample(sid, family, q, a, frames=frames, meta=meta)
    if kind == "multi":
        scenes, q, a, meta = _retry(lambda: build_multi(rng))
        meta = {**meta, "scenes": [s.to_meta() for s in scenes]}
        return Sample(sid, family, q, a, images=[render(s) for s in scenes], meta=meta)
    if hires is None:
        hires = family in HIRES_FAMILIES and bool(rng.random() < hires_p)
    scene, sample = draw_image_sample(family, rng, hires, max_objects, sid)
    sample.images = [render(scene)]
    return sample


def draw_image_sample(family: str, rng: np.random.Generator, hires: bool, max_objects: int = MAX_OBJECTS,
                      sid: str = ""):
    """(scene, its sample without pixels) of a single-image family: the draws ``make_sample``
    takes from ``rng`` for it with ``hires`` given, without the rendering, so that a caller can
    keep the stream and render only the scenes it needs (rendering draws nothing from it)."""
    scene, q, a, meta = build_image_family(family, rng, hires, max_objects)
    return scene, Sample(sid, family, q, a, meta={**meta, **scene.to_meta(), "hires": hires})


def _retry(fn, tries: int = 100):
    for _ in range(tries):
        try:
            return fn()
        except PlacementError:
            continue
    raise PlacementError("could not build a scene")


def generate_samples(n: int, seed: int = 0, split: str = "train",
                     families: Iterable[str] | None = None, kinds: Iterable[str] | None = None,
                     start: int = 0, **kw) -> list[Sample]:
    """Deterministic list of ``n`` samples, families taken in turn (balanced).

    families: subset of ``ALL_FAMILIES``; kinds: subset of {'image','multi','video'}.
    Extra keywords go to :func:`make_sample` (``hires``, ``num_frames``, ``hires_p``).
    """
    fams = [f for f in (families or ALL_FAMILIES) if kinds is None or family_kind(f) in set(kinds)]
    if not fams:
        raise ValueError("no family selected")
    out = []
    for i in range(start, start + n):
        fam = fams[i % len(fams)]
        out.append(make_sample(fam, sample_rng(seed, i, split), f"{split}-{seed}-{i}", **kw))
    return out
