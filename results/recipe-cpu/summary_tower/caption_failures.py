"""Caption failures of models: exact, fewer objects, more objects, or the same count wrong (order,
colour, shape), on the first 200 captions of seed 15's caption-only test samples.
Usage: python results/recipe-cpu/summary_tower/caption_failures.py MODEL_DIR [...]"""
import sys, collections
from mmaccel.embedded import load_model
from mmaccel.embedded.evaluate import evaluate_samples
from mmaccel.world import generate_samples
for path in sys.argv[1:]:
    model, processor = load_model(path); model.eval()
    samples = generate_samples(1600, seed=15, split="test", families=["caption"])[:200]
    res = evaluate_samples(model, processor, samples, return_answers=True)
    kinds = collections.Counter()
    for a in res["answers"]:
        g, p = a["gold"], a["pred"]
        if g == p: kinds["right"] += 1; continue
        ng, np_ = g.count(",") + g.count(" and ") + 1, p.count(",") + p.count(" and ") + 1
        kinds["fewer objects" if np_ < ng else "more objects" if np_ > ng else "same count, wrong"] += 1
    print(path, len(samples), dict(kinds))
    bad = [a for a in res["answers"] if a["gold"] != a["pred"]][:5]
    for a in bad: print("  gold:", a["gold"], "| pred:", a["pred"])
