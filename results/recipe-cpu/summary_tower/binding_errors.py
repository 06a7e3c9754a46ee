"""What a model's wrong `color` and `exists` answers say (thirty-sixth session).

On the first 200 of seed 15's test questions of each family: a wrong colour is another object's
colour (a binding error: the right shape was not what the answer was read from), a colour not
in the scene, or not a colour; a wrong `exists` answer is counted by direction (yes->no,
no->yes: "yes" to a colour-shape pair that is not there, when the colour and the shape are).
Thirty-eighth session: for each wrong colour that is another object's, where that object
stands against the asked one: its place from the left minus the asked object's (the order a
caption lists them in, which `--vision-ordinal` puts in the tokens), and whether it is the
leftmost object, so a reading by place rather than by shape shows.
usage: python binding_errors.py MODEL_DIR [...]
"""
import collections
import sys

from mmaccel.embedded import load_model
from mmaccel.embedded.evaluate import evaluate_samples
from mmaccel.embedded.pretrain import places_from_left
from mmaccel.world import generate_samples
from mmaccel.world.images import COLOR_NAMES


def error_kind(family: str, sample, pred: str) -> str:
    if family == "exists":
        return f"{sample.answer}->{pred}"
    if pred in {o["color"] for o in sample.meta["objects"]}:
        return "another object's color"
    return "a color not in the scene" if pred in COLOR_NAMES else "not a color"


def places(sample) -> list[int]:
    """Each object's place from the left (0 = leftmost), in ``meta["objects"]`` order: the rule
    the place head is trained on."""
    return places_from_left(sample.meta["objects"]).tolist()


def asked_index(sample) -> int:
    """Index in ``meta["objects"]`` of the object a color question asks about (its shape is unique)."""
    return next(i for i, o in enumerate(sample.meta["objects"]) if o["shape"] in sample.question)


def color_sources(sample, pred: str) -> list[str]:
    """For a wrong colour that is another object's: 'place offset +k' for each object of that
    colour (relative to the asked object), and 'leftmost' when one of them is."""
    objs, place = sample.meta["objects"], places(sample)
    asked = asked_index(sample)
    rows = [f"place offset {place[i] - place[asked]:+d}" for i, o in enumerate(objs) if o["color"] == pred]
    return rows + (["leftmost"] if any(place[i] == 0 and o["color"] == pred for i, o in enumerate(objs)) else [])


def source_table(samples, answers) -> dict:
    wrong = [(s, a["pred"]) for s, a in zip(samples, answers)
             if a["pred"] != s.answer and error_kind("color", s, a["pred"]) == "another object's color"]
    asked_leftmost = collections.Counter(places(s)[asked_index(s)] == 0 for s, _ in wrong)
    sources = collections.Counter(r for s, p in wrong for r in color_sources(s, p))
    return {"wrong": len(wrong), "asked object leftmost": asked_leftmost[True], **dict(sorted(sources.items()))}


for path in sys.argv[1:]:
    model, processor = load_model(path)
    model.eval()
    for family in ("color", "exists"):
        samples = generate_samples(200, seed=15, split="test", families=[family])
        answers = evaluate_samples(model, processor, samples, return_answers=True)["answers"]
        kinds = collections.Counter("right" if a["pred"] == s.answer else error_kind(family, s, a["pred"])
                                    for s, a in zip(samples, answers))
        print(path, family, dict(kinds))
        if family == "color":
            print(path, "wrong colours' sources", source_table(samples, answers))
