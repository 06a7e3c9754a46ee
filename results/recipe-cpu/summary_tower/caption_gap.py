"""Exact captions by the smallest x gap between horizontally adjacent objects (px, 144 px images),
on seed 15's 600 caption samples: are order errors a position-precision limit?
Usage: python results/recipe-cpu/summary_tower/caption_gap.py MODEL_DIR [...] (eighteenth session)"""
import collections, sys
import torch
from mmaccel.embedded import load_model
from mmaccel.embedded.evaluate import evaluate_samples
from mmaccel.world import generate_samples
torch.set_num_threads(2)
for path in sys.argv[1:]:
    model, processor = load_model(path); model.eval()
    samples = generate_samples(600, seed=15, split="test", families=["caption"])
    res = evaluate_samples(model, processor, samples, return_answers=True)
    bins = collections.defaultdict(lambda: [0, 0])
    for s, a in zip(samples, res["answers"]):
        xs = sorted(o["cx"] for o in s.meta["objects"])
        scale = 144 / s.meta["side"]
        gap = min((b - a_) * scale for a_, b in zip(xs, xs[1:])) if len(xs) > 1 else 999
        key = "1 object" if len(xs) == 1 else "<12 px" if gap < 12 else "12-24 px" if gap < 24 else "24-48 px" if gap < 48 else ">=48 px"
        bins[key][0] += a["gold"] == a["pred"]; bins[key][1] += 1
    print(path, {k: f"{r}/{n} = {r / n:.2f}" for k, (r, n) in sorted(bins.items())}, flush=True)
