"""``Pipeline``: load a VLM (the embedded default, a local directory or a model object),
accelerate it, and answer questions about images and videos with one ``Stats`` record."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .stats import Stats


@dataclass
class Answer:
    """One answer and what producing it cost."""

    text: str
    stats: Stats
    media: dict = field(default_factory=dict)  # what was fed: kind, frames, indices

    def __str__(self) -> str:
        return self.text

    def to_dict(self) -> dict:
        return {"answer": self.text, "stats": self.stats.to_dict(), "media": self.media}


def load_model(path: str | os.PathLike, device: str = "cpu", dtype=None, trust_remote_code: bool = False):
    """``(model, processor)`` from a local directory written by ``save_pretrained``.

    Safetensors only (no pickle loading); remote code only when asked for.
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = Path(path)
    if not (path / "config.json").exists():
        raise ValueError(f"{path} is not a model directory (no config.json); pass a folder written by save_pretrained")
    if not any(path.glob("*.safetensors")):
        raise ValueError(f"{path} has no .safetensors weights; mmaccel refuses pickle checkpoints (convert them first)")
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=dtype or torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    return model.to(device).eval(), processor


class Pipeline:
    """Answer questions about images or videos with an accelerated VLM.

    >>> pipe = Pipeline(method="fastv", retention=0.25)       # the embedded default model
    >>> ans = pipe.ask("clip.mp4", "Which direction does the red circle move?")
    >>> ans.text, ans.stats.visual_tokens_kept
    """

    def __init__(self, model_or_path: Any = None, processor=None, method: str | None = None,
                 retention: float | None = None, config=None, position_policy: str | None = None,
                 device: str = "cpu", dtype=None, trust_remote_code: bool = False, **params):
        from .api import accelerate_vlm

        self.model, self.processor = self._load(model_or_path, processor, device, dtype, trust_remote_code)
        self._pad_left()
        self.handle = accelerate_vlm(self.model, method=method, retention=retention, config=config,
                                     position_policy=position_policy, **params)

    @staticmethod
    def _load(model_or_path, processor, device, dtype, trust_remote_code):
        if model_or_path is None:
            from .embedded import load_default_model

            return load_default_model(device=device, dtype=dtype)
        if isinstance(model_or_path, (str, os.PathLike)):
            model, proc = load_model(model_or_path, device, dtype, trust_remote_code)
            return model, processor or proc
        if processor is None:
            raise ValueError("pass the model's processor: Pipeline(model, processor=AutoProcessor.from_pretrained(...))")
        return model_or_path, processor

    def _pad_left(self) -> None:
        tok = getattr(self.processor, "tokenizer", None)
        if tok is not None:
            tok.padding_side = "left"  # decoder-only generation needs left padding

    @property
    def stats(self) -> Stats:
        return self.handle.stats

    def ask(self, media, question: str, max_new_tokens: int = 32, num_frames: int | None = 8,
            fps: float | None = None, backend: str = "auto", **generate_kwargs) -> Answer:
        """Answer ``question`` about ``media``: an image (PIL, array, path), a list of images,
        a video path, or decoded frames (T, H, W, 3) uint8."""
        return self.ask_batch([(media, question)], max_new_tokens, num_frames, fps, backend, **generate_kwargs)[0]

    def ask_batch(self, items: list[tuple[Any, str]], max_new_tokens: int = 32, num_frames: int | None = 8,
                  fps: float | None = None, backend: str = "auto", **generate_kwargs) -> list[Answer]:
        """Several (media, question) pairs in one left-padded batch; one shared ``Stats``."""
        import torch

        if not items:
            return []

        prepared = [prepare_media(m, num_frames, fps, backend) for m, _ in items]
        texts = [self._prompt(p, q) for p, (_, q) in zip(prepared, items)]
        inputs = self._encode(texts, prepared).to(self.model.device)
        generate_kwargs.setdefault("do_sample", False)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, **generate_kwargs)
        new = out[:, inputs["input_ids"].shape[1]:]
        answers = self.processor.batch_decode(new, skip_special_tokens=True)
        stats = self.handle.stats
        return [Answer(a.strip(), stats, p.info) for a, p in zip(answers, prepared)]

    def _prompt(self, media: "Media", question: str) -> str:
        if not isinstance(question, str) or not question.strip():
            raise ValueError("the question must be a non-empty string")
        content = [{"type": media.kind}] * media.count + [{"type": "text", "text": question}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def _encode(self, texts, prepared):
        images = [im for p in prepared if p.kind == "image" for im in p.items]
        videos = [v for p in prepared if p.kind == "video" for v in p.items]
        kwargs = {"images": images or None, "videos": videos or None, "video_metadata": self._video_metadata(prepared)}
        inputs = self.processor(text=texts, padding=True, return_tensors="pt",
                                **{k: v for k, v in kwargs.items() if v is not None})
        if videos and "pixel_values_videos" not in inputs:  # the processor dropped them without a word
            raise ValueError(f"{type(self.model).__name__} takes images, not videos: pass the frames as a list of "
                             "images, or use a video model (LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL)")
        return inputs

    def _video_metadata(self, prepared) -> list | None:
        """Qwen2.5-VL spaces its temporal positions by the frames' real rate; without metadata the
        processor assumes 24 fps, which puts the slices of a few frames sampled from a long video
        at one time. The rate of frames sampled from a file is known: pass it on."""
        from .stream_units import uses_frame_rate

        videos = [p for p in prepared if p.kind == "video"]
        if not videos or not uses_frame_rate(self.model) or any("sampled_fps" not in p.info for p in videos):
            return None
        from transformers.video_utils import VideoMetadata

        return [VideoMetadata(total_num_frames=p.info["frames"], fps=p.info["sampled_fps"]) for p in videos]

    def restore(self):
        """Remove the acceleration; the model is returned untouched."""
        return self.handle.restore()


@dataclass
class Media:
    kind: str  # "image" | "video"
    items: list
    info: dict

    @property
    def count(self) -> int:
        return len(self.items) if self.kind == "image" else 1


def prepare_media(media, num_frames: int | None = 8, fps: float | None = None, backend: str = "auto") -> Media:
    """Load an image, images, a video path or decoded frames into what the processor takes."""
    import numpy as np

    from .vision.io import check_frames, is_video_path, load_image, read_video

    if isinstance(media, Media):
        return media
    if isinstance(media, (str, os.PathLike)) and is_video_path(media):
        clip = read_video(media, num_frames=None if fps else num_frames, fps=fps, backend=backend)
        info = {"kind": "video", "frames": len(clip.indices), "indices": clip.indices, "backend": clip.backend,
                "sampled_fps": len(clip.indices) / max(clip.total_frames, 1) * clip.fps}
        return Media("video", [clip.frames], info)
    if isinstance(media, np.ndarray) and media.ndim == 4:
        return Media("video", [check_frames(media)], {"kind": "video", "frames": int(media.shape[0])})
    if isinstance(media, (list, tuple)):
        images = [load_image(m) for m in media]
        return Media("image", images, {"kind": "image", "count": len(images)})
    if media is None:
        raise ValueError("no media given: pass an image, a list of images, a video path or frames")
    image = load_image(media)
    return Media("image", [image], {"kind": "image", "count": 1, "size": list(image.size)})
