"""What a model's wrong `color` and `exists` answers say (thirty-sixth session).

On the first 200 of seed 15's test questions of each family: a wrong colour is another object's
colour (a binding error: the right shape was not what the answer was read from), a colour not
in the scene, or not a colour; a wrong `exists` answer is counted by direction (yes->no,
no->yes: "yes" to a colour-shape pair that is not there, when the colour and the shape are).
usage: python binding_errors.py MODEL_DIR [...]
"""
import collections
import sys

from mmaccel.embedded import load_model
from mmaccel.embedded.evaluate import evaluate_samples
from mmaccel.world import generate_samples
from mmaccel.world.images import COLOR_NAMES


def error_kind(family: str, sample, pred: str) -> str:
    if family == "exists":
        return f"{sample.answer}->{pred}"
    if pred in {o["color"] for o in sample.meta["objects"]}:
        return "another object's color"
    return "a color not in the scene" if pred in COLOR_NAMES else "not a color"


for path in sys.argv[1:]:
    model, processor = load_model(path)
    model.eval()
    for family in ("color", "exists"):
        samples = generate_samples(200, seed=15, split="test", families=[family])
        answers = evaluate_samples(model, processor, samples, return_answers=True)["answers"]
        kinds = collections.Counter("right" if a["pred"] == s.answer else error_kind(family, s, a["pred"])
                                    for s, a in zip(samples, answers))
        print(path, family, dict(kinds))
