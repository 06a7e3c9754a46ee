"""What the reductions take from captions: on seed 15's first N caption-only test samples, the
kind of each wrong caption (fewer objects, more objects, same count but wrong) and the accuracy
by the scene's object count, at full tokens and under each method at one retention.
Usage: [N=300] [RETENTION=0.25] [METHODS=fastv,aim,...] python results/fidelity/caption_loss_kinds.py MODEL_DIR [OUT.json]
"""
import collections
import json
import os
import sys

from mmaccel.api import accelerate_vlm
from mmaccel.bench.fidelity import caption_errors, objects_listed
from mmaccel.embedded import load_model
from mmaccel.embedded.evaluate import generate_answers
from mmaccel.world import generate_samples


def tally(samples, answers) -> dict:
    """Wrong captions by kind (the sweep's ``caption_errors``) and accuracy by the scene's object count."""
    by_n = collections.defaultdict(lambda: [0, 0])
    for s, pred in zip(samples, answers):
        tally_n = by_n[objects_listed(s.answer)]
        tally_n[0] += pred == s.answer
        tally_n[1] += 1
    return {"kinds": caption_errors(samples, answers),
            "accuracy_by_objects": {k: round(r / t, 3) for k, (r, t) in sorted(by_n.items())},
            "scenes_by_objects": {k: t for k, (r, t) in sorted(by_n.items())}}


def main() -> None:
    model, processor = load_model(sys.argv[1])
    model.eval()
    n, retention = int(os.environ.get("N", 300)), float(os.environ.get("RETENTION", 0.25))
    methods = os.environ.get("METHODS", "fastv,hired,visionzip,stc,mustdrop,aim").split(",")
    samples = generate_samples(n, seed=15, split="test", families=["caption"])
    out = {"model": sys.argv[1], "n": n, "retention": retention,
           "full": tally(samples, generate_answers(model, processor, samples, 16))}
    for method in methods:
        with accelerate_vlm(model, method=method, retention=retention):
            out[method] = tally(samples, generate_answers(model, processor, samples, 16))
    for name, row in out.items():
        if isinstance(row, dict):
            print(f"{name:10s} {row['kinds']} by objects {row['accuracy_by_objects']}")
    if len(sys.argv) > 2:
        open(sys.argv[2], "w").write(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
