"""Do a model's visual tokens say each object's place from the left? (thirty-sixth session)

A linear probe (softmax regression, 1,500 Adam steps) of the place from the left (0-3, the
order a caption lists the objects in; ``pretrain.ordinal_targets``) from the projected token of
every cell an object covers, on fresh 144 px caption scenes: trained on 2,000 scenes, scored on
500 others. Printed as one JSON line: accuracy over the object tokens, over the centre tokens
alone, by the scene's object count, and the share of scenes whose centre tokens all read right
(the order a caption needs). Beside it, the same probe of the covering object's colour and shape
from the same tokens (``kinds``), to tell whether a tower that learned places lost what its
tokens say about the objects themselves. ``--model`` defaults to the shipped model.

usage: python ordinal_probe.py [--model DIR] [--out FILE]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from mmaccel.embedded.pretrain import cell_of, cell_objects
from mmaccel.world.images import COLOR_NAMES
from mmaccel.world.spec import SHAPES
from mmaccel.world.samples import SPLIT_KEY, make_sample

sys.path.insert(0, str(Path(__file__).parent / "count_probe"))
from count_probe import fit_probe, print_line, tokens_of  # noqa: E402

GRID = 6
PLACES = 4  # caption scenes hold 1-4 objects


def caption_scenes(processor, n: int, seed: int):
    """(tiles (n, 3, S, S), places (n, G*G) with -1 off objects, centre-cell mask (n, G*G),
    object counts (n,), (shape, color) (n, G*G, 2)) of fresh 144 px caption scenes."""
    rng = np.random.default_rng(np.random.SeedSequence([SPLIT_KEY["train"], seed, 13]))
    samples = [make_sample("caption", rng, hires=False) for _ in range(n)]
    pix = processor.image_processor([s.image for s in samples], return_tensors="pt")["pixel_values"][:, 0]
    cells = torch.from_numpy(np.stack([cell_objects(s.meta, GRID) for s in samples]))  # (n, G*G, 3)
    places = cells[..., 2].numpy()
    centre = np.zeros_like(places, dtype=bool)
    for i, s in enumerate(samples):
        for o in s.meta["objects"]:
            centre[i, cell_of(o["cx"], o["cy"], s.meta["side"], GRID)] = True
    counts = np.array([len(s.meta["objects"]) for s in samples])
    return pix, cells[..., 2], torch.from_numpy(centre), counts, cells[..., :2]


def probes(model, processor) -> dict:
    """{"places": ..., "kinds": ...} from the same scenes and tokens."""
    pix, y, _, _, kinds = caption_scenes(processor, 2000, 1)
    pix_t, y_t, centre_t, counts_t, kinds_t = caption_scenes(processor, 500, 2)
    f, f_t = tokens_of(model, pix), tokens_of(model, pix_t)
    return {"places": place_probe(f, y, f_t, y_t, centre_t, counts_t), "kinds": kind_probe(f, kinds, f_t, kinds_t)}


def kind_probe(f, kinds, f_t, kinds_t) -> dict:
    """Accuracy of the covering object's shape and colour read from each object token."""
    on, on_t = kinds[..., 0] >= 0, kinds_t[..., 0] >= 0
    out = {}
    for i, (name, classes) in enumerate((("shape", len(SHAPES)), ("color", len(COLOR_NAMES)))):
        predict = fit_probe(f[on], kinds[..., i][on], classes)
        with torch.no_grad():
            out[name] = round((predict(f_t[on_t]) == kinds_t[..., i][on_t]).float().mean().item(), 3)
    return out


def place_probe(f, y, f_t, y_t, centre_t, counts_t) -> dict:
    on = y >= 0
    predict = fit_probe(f[on], y[on], PLACES)
    with torch.no_grad():
        right = predict(f_t) == y_t  # (n, G*G)
    on_t = y_t >= 0
    scene_ok = [(right[i] | ~centre_t[i]).all().item() for i in range(len(y_t))]
    by_count = {int(k): round(float(np.mean([ok for ok, c in zip(scene_ok, counts_t) if c == k])), 3)
                for k in sorted(set(counts_t.tolist()))}
    return {"object_tokens": round(right[on_t].float().mean().item(), 3),
            "centre_tokens": round(right[centre_t].float().mean().item(), 3),
            "scenes_in_order": round(float(np.mean(scene_ok)), 3), "scenes_in_order_by_count": by_count}


def main(argv=None) -> None:
    from mmaccel.embedded import load_default_model, load_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model directory (default: the shipped model)")
    p.add_argument("--out", default=None, help="append the JSON line to this file")
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    model, processor = load_model(a.model) if a.model else load_default_model()
    model.eval()
    print_line({"model": a.model or "shipped", **probes(model, processor)}, a.out)


if __name__ == "__main__":
    main()
