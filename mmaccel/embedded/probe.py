"""What do the visual tokens say? Linear probes on the object-centre tokens of a model.

``python -m mmaccel.embedded.probe [--model DIR]`` (default: the shipped model) reads the
projected visual tokens (what the language model sees) of fresh 144 px scenes, takes the
token of each object's centre cell, and fits a linear classifier for the object's shape and
one for its colour on training scenes, scored on other scenes, by object size. A language
model cannot answer about what its tokens do not carry: this probe found the fourth
session's model at 57% on shape (chance 33%) against 100% on colour (see RECIPE.md).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json
import sys

import numpy as np

from ..world.images import COLOR_NAMES
from ..world.samples import SPLIT_KEY, make_sample
from ..world.spec import SHAPES
from .pretrain import cell_of, projected_tokens

SIZE_BINS = ((0, 12), (12, 18), (18, 26), (26, 40))  # object side in px


def centre_tokens(model, processor, n_scenes: int, seed: int, split: str = "train"):
    """Tokens of object-centre cells in ``n_scenes`` caption scenes (1-4 objects).
    Returns (X (M, D) float tensor, shape (M,), color (M,), size px (M,))."""
    import torch

    rng = np.random.default_rng(np.random.SeedSequence([SPLIT_KEY[split], seed, 7]))
    samples = [make_sample("caption", rng, hires=False) for _ in range(n_scenes)]
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    pix = processor.image_processor([s.image for s in samples], return_tensors="pt")["pixel_values"][:, 0]
    with torch.no_grad():
        feats = projected_tokens(model, pix.to(model.device, model.dtype)).float().cpu()
    rows = [(b, cell_of(o["cx"], o["cy"], s.meta["side"], grid), SHAPES.index(o["shape"]),
             COLOR_NAMES.index(o["color"]), o["size"]) for b, s in enumerate(samples) for o in s.meta["objects"]]
    b, cell, shape, color, size = (np.array(c) for c in zip(*rows))
    return feats[b, cell], shape, color, size


def linear_probe(x_train, y_train, x_test, steps: int = 400, lr: float = 1e-2):
    """Fit a linear softmax classifier (Adam, full batch) and return its test predictions.
    x_*: (M, D) tensors; y_train: (M,) int array."""
    import torch

    torch.manual_seed(0)
    y = torch.as_tensor(y_train)
    head = torch.nn.Linear(x_train.shape[1], int(y.max()) + 1)
    opt = torch.optim.Adam(head.parameters(), lr)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(head(x_train), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return head(x_test).argmax(-1).numpy()


def probe(model, processor, train_scenes: int = 800, test_scenes: int = 200, seed: int = 0) -> dict:
    """Shape and colour probe accuracy of the object-centre tokens, overall and by size."""
    x_tr, shape_tr, color_tr, _ = centre_tokens(model, processor, train_scenes, seed, "train")
    x_te, shape_te, color_te, size = centre_tokens(model, processor, test_scenes, seed, "test")
    out = {"objects_train": len(shape_tr), "objects_test": len(shape_te)}
    for name, y_tr, y_te in (("shape", shape_tr, shape_te), ("color", color_tr, color_te)):
        right = linear_probe(x_tr, y_tr, x_te) == y_te
        out[name] = float(right.mean())
        out[f"{name}_by_size"] = {f"{lo}-{hi}px": float(right[(size >= lo) & (size < hi)].mean())
                                  for lo, hi in SIZE_BINS if ((size >= lo) & (size < hi)).any()}
    return out


def main(argv=None):
    import torch

    p = argparse.ArgumentParser(description="Linear probes of shape and colour on object-centre visual tokens.")
    p.add_argument("--model", default=None, help="a saved model directory (default: the shipped model)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from . import DEFAULT_MODEL_DIR, load_model

    model, processor = load_model(a.model or DEFAULT_MODEL_DIR)
    res = probe(model, processor)
    print(json.dumps(res, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1:])
