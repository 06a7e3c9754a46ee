"""Exact-match evaluation per question family.

``evaluate_samples(model, processor, samples)`` is the reusable entry point (it only
calls ``model.generate``, so acceleration hooks installed on the model apply).

CLI: ``python -m mmaccel.embedded.evaluate --model DIR --n N [--blank] [--json out.json]``
"""
from __future__ import annotations

import os

# On a shared CPU, spinning OpenMP workers stall badly when another process holds a
# core; passive waiting keeps 2 threads close to full speed (must precede torch import).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json
import sys
import time
from collections import Counter, defaultdict

from ..world.samples import Sample, generate_samples
from ..world.spec import ALL_FAMILIES, MODEL_FAMILIES, family_kind
from .data import blanked, encode_prompts

MAX_NEW_TOKENS = 32


def group_key(sample: Sample) -> tuple:
    """Samples with equal keys give equal visual token counts (cheap batching)."""
    if sample.frames is not None:
        return ("video", sample.frames.shape[0])
    return (sample.kind, len(sample.images), sample.images[0].size)


def generate_answers(model, processor, samples: list[Sample], batch_size: int = 16,
                     max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Greedy answers (stripped strings), batched by :func:`group_key`, left padded."""
    import torch

    groups = defaultdict(list)
    for i, s in enumerate(samples):
        groups[group_key(s)].append(i)
    answers: list[str] = [""] * len(samples)
    for idx in groups.values():
        for k in range(0, len(idx), batch_size):
            chunk = idx[k:k + batch_size]
            inputs = encode_prompts(processor, [samples[i] for i in chunk]).to(model.device)
            with torch.inference_mode():
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            for i, t in zip(chunk, texts):
                answers[i] = t.strip()
    return answers


def summarize(samples: list[Sample], answers: list[str]) -> dict:
    """Per-family {n, correct, accuracy, chance} plus aggregates.

    chance: share of the family's most common gold answer (the best blind guess).
    Aggregates: ``image_questions`` (image + multi families except caption),
    ``caption``, ``video``, ``all``. Subsets (``SUBSETS``, where present): ``small_objects``
    (high-resolution stills, objects 3.5-10% of the side) and ``counting`` (count, flash).
    """
    per = defaultdict(lambda: {"n": 0, "correct": 0})
    gold = defaultdict(Counter)
    for s, a in zip(samples, answers):
        per[s.family]["n"] += 1
        per[s.family]["correct"] += int(a == s.answer)
        gold[s.family][s.answer] += 1
    fams = {f: _rates(per[f], gold[f]) for f in ALL_FAMILIES if f in per}
    groups = {"image_questions": lambda f: family_kind(f) != "video" and f != "caption",
              "caption": lambda f: f == "caption", "video": lambda f: family_kind(f) == "video",
              "all": lambda f: True}
    agg = {name: _aggregate([fams[f] for f in fams if pick(f)]) for name, pick in groups.items()}
    return {"families": fams, "aggregates": {k: v for k, v in agg.items() if v["n"]},
            "subsets": subset_rates(samples, answers)}


SUBSETS = {"small_objects": lambda s: bool(s.meta.get("hires")),
           "counting": lambda s: s.family in ("count", "flash")}


def subset_rates(samples: list[Sample], answers: list[str]) -> dict:
    """{name: {n, correct, accuracy}} for each non-empty subset of ``SUBSETS``."""
    out = {}
    for name, pick in SUBSETS.items():
        hits = [a == s.answer for s, a in zip(samples, answers) if pick(s)]
        if hits:
            out[name] = {"n": len(hits), "correct": sum(hits), "accuracy": sum(hits) / len(hits)}
    return out


def _rates(p: dict, gold: Counter) -> dict:
    chance = max(gold.values()) / p["n"]
    return {**p, "accuracy": p["correct"] / p["n"], "chance": chance}


def _aggregate(rows: list[dict]) -> dict:
    n, c = sum(r["n"] for r in rows), sum(r["correct"] for r in rows)
    chance = sum(r["chance"] * r["n"] for r in rows) / n if n else 0.0
    return {"n": n, "correct": c, "accuracy": c / n if n else 0.0, "chance": chance}


def evaluate_samples(model, processor, samples: list[Sample], batch_size: int = 16,
                     blank: bool = False, return_answers: bool = False) -> dict:
    """Exact-match results per family for ``samples`` (``blank``: media replaced by white)."""
    inputs = [blanked(s) for s in samples] if blank else samples
    t0 = time.time()
    answers = generate_answers(model, processor, inputs, batch_size)
    res = summarize(samples, answers)
    res["seconds"] = time.time() - t0
    if return_answers:
        res["answers"] = [{"id": s.id, "question": s.question, "gold": s.answer, "pred": a}
                          for s, a in zip(samples, answers)]
    return res


def format_table(res: dict) -> str:
    """Human-readable per-family table."""
    lines = [f"{'family':<16}{'n':>6}{'acc':>8}{'chance':>8}"]
    for name, r in list(res["families"].items()) + [("--", None)] + list(res["aggregates"].items()):
        if r is None:
            lines.append("-" * 38)
            continue
        lines.append(f"{name:<16}{r['n']:>6}{r['accuracy']:>8.3f}{r['chance']:>8.3f}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model dir (default: the shipped model)")
    p.add_argument("--n", type=int, default=200, help="held-out samples (families in turn)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--families", default=None, help="comma-separated subset")
    p.add_argument("--blank", action="store_true", help="replace images/frames by a blank canvas")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    import torch

    from . import DEFAULT_MODEL_DIR, load_model

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = load_model(args.model or DEFAULT_MODEL_DIR)
    fams = args.families.split(",") if args.families else None
    samples = generate_samples(args.n, seed=args.seed, split="test", families=fams or MODEL_FAMILIES)
    res = evaluate_samples(model, processor, samples, args.batch_size, blank=args.blank)
    res.update({"model": str(args.model or DEFAULT_MODEL_DIR), "n": args.n, "seed": args.seed,
                "split": "test", "blank": args.blank})
    print(format_table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
