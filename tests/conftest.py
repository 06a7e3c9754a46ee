"""Shared fixtures: tiny random-weight models of every supported family and their inputs."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any kernel module import
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from mmaccel.testing.tiny import FAMILIES, build

torch.set_num_threads(min(2, torch.get_num_threads()))

VIDEO_FAMILIES = ("llava_onevision", "qwen2_vl", "qwen2_5_vl")
QUESTIONS = ("what is the color ?", "how many circle are there in the image on the left ?")


def image(seed: int = 0, size=(90, 130)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))


def video(seed: int = 0, frames: int = 4, size=(56, 56)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (frames, *size, 3), dtype=np.uint8)


def prompt(proc, question: str, media=("image",)) -> str:
    content = [{"type": m} for m in media] + [{"type": "text", "text": question}]
    return proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def make_inputs(proc, batch: int = 1, media=("image",), seed: int = 0):
    """Processor outputs for ``batch`` prompts of different lengths (left padded when batch > 1)."""
    texts = [prompt(proc, QUESTIONS[i % 2], media) for i in range(batch)]
    kwargs = {}
    n_images = media.count("image")
    if n_images:
        kwargs["images"] = [image(seed + 10 * i + j, size=(90 + 20 * j, 130)) for i in range(batch) for j in range(n_images)]
    if "video" in media:
        kwargs["videos"] = [video(seed + i) for i in range(batch)]
    return proc(text=texts, padding=True, return_tensors="pt", **kwargs)


def _cached_builder(**options):
    """family -> (model, processor), each family built once with ``options``."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = build(family, **options)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def tiny_models():
    return _cached_builder()


@pytest.fixture(scope="session")
def deep_tower_models():
    """Tiny models with 4-block towers (in-tower merges act; Qwen2.5-VL: blocks 0, 2 and 3
    attend per window, block 1 over the whole image or slice)."""
    return _cached_builder(seed=2, vision_layers=4)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def run_in_threads(fn, n: int) -> list:
    """[fn(0), ..., fn(n - 1)], each called in a thread of its own, all started together; a
    thread's exception is raised here (it would otherwise vanish with the thread)."""
    import threading

    results, errors = [None] * n, []

    def worker(i):
        try:
            results[i] = fn(i)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


ONE_LAYER = {"text": {"num_hidden_layers": 1}, "vision": {"num_hidden_layers": 1}}
COLOR_IMAGES = {"image": (1.0, 1.0, {"hires": False}, {"color": 1.0})}  # train()'s groups: colour questions only


def tiny_train_config(**options):
    """The embedded recipe's TrainConfig shrunk for a test: one-layer tower and language model, a
    step-counted run (``minutes=0``) with a one-step warmup and no evaluation; ``options`` override."""
    from mmaccel.embedded.train import TrainConfig

    defaults = {"seed": 2, "minutes": 0, "batch_size": 2, "warmup": 1, "eval_n": 0, **ONE_LAYER}
    return TrainConfig(**{**defaults, **options})
