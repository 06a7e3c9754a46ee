"""Does a model read the flashing object, or the turn position? (issue 3, `flash`)

In a held-out flash video only the asked object vanishes (1-3 single frames). This asks every
video twice as the main (first) question: once about that object (gold 1-3) and once about
another object of a unique kind that never vanishes (gold 0). A model that looks at the
frames answers differently; one that learned "the first turn asks the flasher" (training's
main question always does; its follow-ups ask the others, answer 0) answers the same.

Usage: python results/recipe-cpu/flash_shortcut.py [MODEL_DIR] [--n 80]
"""
import argparse
from collections import Counter
from dataclasses import replace

import numpy as np

from mmaccel.embedded import DEFAULT_MODEL_DIR, load_model
from mmaccel.embedded.evaluate import generate_answers
from mmaccel.world.followups import flash_followups
from mmaccel.world.samples import SPLIT_KEY, make_sample


def paired_questions(n: int, seed: int = 5):
    """``n`` 8-frame flash videos as (flasher sample, same video asking a steady object)."""
    rng = np.random.default_rng(np.random.SeedSequence([SPLIT_KEY["test"], seed, 99]))
    flasher, steady = [], []
    while len(steady) < n:
        s = make_sample("flash", rng, num_frames=8)
        others = [qa for qa in flash_followups(s.meta["objects"]) if qa[0] != s.question]
        if others:
            flasher.append(s)
            steady.append(replace(s, question=others[0][0], answer=others[0][1]))
    return flasher, steady


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL_DIR)
    p.add_argument("--n", type=int, default=80)
    a = p.parse_args()
    model, processor = load_model(a.model)
    flasher, steady = paired_questions(a.n)
    answers = {}
    for name, samples in (("flashing object", flasher), ("steady object", steady)):
        answers[name] = generate_answers(model, processor, samples)
        acc = np.mean([x == s.answer for x, s in zip(answers[name], samples)])
        print(f"{name:16s} accuracy {acc:.3f} answers {dict(Counter(answers[name]))}")
    same = np.mean([x == y for x, y in zip(*answers.values())])
    print(f"same answer for both questions: {same:.3f}")


if __name__ == "__main__":
    main()
