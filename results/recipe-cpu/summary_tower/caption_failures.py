"""Caption failures of models: exact, fewer objects, more objects, or the same count wrong (order,
colour, shape), on the first N (default 200) of seed 15's caption-only test samples.
Usage: [N=600] [OUT=captions.json] python results/recipe-cpu/summary_tower/caption_failures.py MODEL_DIR [...]
OUT (one model only) writes {"n", "right", "accuracy", "kinds"}: gates.py's caption set (run 26 on)."""
import collections
import json
import os
import sys
from mmaccel.embedded import load_model
from mmaccel.embedded.evaluate import evaluate_samples
from mmaccel.world import generate_samples
N = int(os.environ.get("N", 200))
for path in sys.argv[1:]:
    model, processor = load_model(path); model.eval()
    samples = generate_samples(N, seed=15, split="test", families=["caption"])
    res = evaluate_samples(model, processor, samples, return_answers=True)
    kinds = collections.Counter()
    for a in res["answers"]:
        g, p = a["gold"], a["pred"]
        if g == p: kinds["right"] += 1; continue
        ng, np_ = g.count(",") + g.count(" and ") + 1, p.count(",") + p.count(" and ") + 1
        kinds["fewer objects" if np_ < ng else "more objects" if np_ > ng else "same count, wrong"] += 1
    print(path, len(samples), dict(kinds))
    if os.environ.get("OUT"):
        summary = {"model": path, "n": len(samples), "right": kinds["right"],
                   "accuracy": kinds["right"] / len(samples), "kinds": dict(kinds)}
        open(os.environ["OUT"], "w").write(json.dumps(summary, indent=1) + "\n")
    bad = [a for a in res["answers"] if a["gold"] != a["pred"]][:5]
    for a in bad: print("  gold:", a["gold"], "| pred:", a["pred"])
