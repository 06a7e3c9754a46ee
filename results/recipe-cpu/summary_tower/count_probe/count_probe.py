"""Why is `count` stuck at 0.72-0.83 in every run? (thirty-third session)

Three readings, each printed as one JSON line (``--out`` appends them to a file):

- ``answers``: the model's own answers to count questions of seed 15's test split, by true
  count, by distractors, and by whether two counted objects share a 24-px cell (one cell, one
  centre label in stage 1);
- ``tokens``: a linear probe (softmax regression, 1,500 Adam steps) of each shape's count
  (0-6) from the projected visual tokens of fresh 144 px count scenes: from the tile's mean of
  the summary channels, and from one token; trained on 4,000 scenes, scored on 1,000 others;
- ``--stage1 WEIGHT``: the same probe on a tower freshly pre-trained by stage 1 alone with the
  shipped run's flags (seed 2, 2,000 steps, summary from every token on 64 channels) and
  ``--summary-weight WEIGHT``.

usage: python count_probe.py [--model DIR | --stage1 WEIGHT] [--answers N] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter, defaultdict

import numpy as np
import torch

from mmaccel.embedded.pretrain import projected_tokens, summary_targets
from mmaccel.world.samples import SPLIT_KEY, generate_samples, make_sample

CELL = 24  # px of one patch cell, at the crop scale of 144 and 288 px images alike
MAX_COUNT = 6


def count_scenes(processor, n: int, seed: int):
    """(pixel tiles (n, 3, S, S), per-shape counts (n, len(SHAPES))) of fresh 144 px count scenes."""
    rng = np.random.default_rng(np.random.SeedSequence([SPLIT_KEY["train"], seed, 11]))
    samples = [make_sample("count", rng, hires=False) for _ in range(n)]
    pix = processor.image_processor([s.image for s in samples], return_tensors="pt")["pixel_values"][:, 0]
    return pix, torch.from_numpy(np.stack([summary_targets(s.meta)[1] for s in samples]))


def tokens_of(model, pix, batch: int = 64):
    with torch.no_grad():
        return torch.cat([projected_tokens(model, pix[i:i + batch]) for i in range(0, len(pix), batch)]).float()


def fit_probe(x, y, classes: int, steps: int = 1500):
    """Softmax regression x (m, D) -> y (m,) or (m, H) on standardised features, one linear layer
    for all H targets; returns a predictor z (k, D) -> (k,) or (k, H)."""
    torch.manual_seed(0)
    mu, sd = x.mean(0), x.std(0) + 1e-5
    heads = y.shape[1] if y.dim() == 2 else 1
    head = torch.nn.Linear(x.shape[1], heads * classes)
    opt = torch.optim.Adam(head.parameters(), 1e-2, weight_decay=1e-4)
    x = (x - mu) / sd  # once, not at every step
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(head(x).view(-1, classes), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lambda z: head((z - mu) / sd).view(*z.shape[:-1], *y.shape[1:], classes).argmax(-1)


def linear_probe(x, y, x_test, y_test, steps: int = 1500) -> dict:
    """Softmax regression of every shape's count from x (n, D); accuracy overall and by true count."""
    predict = fit_probe(x, y, MAX_COUNT + 1, steps)
    with torch.no_grad():
        right = (predict(x_test) == y_test).float()
    return {"all": round(right.mean().item(), 3),
            "by_count": {k: round(right[y_test == k].mean().item(), 3) for k in range(MAX_COUNT) if (y_test == k).any()}}


def token_probe(model, processor, channels: int = 64) -> dict:
    x, y = count_scenes(processor, 4000, 1)
    xt, yt = count_scenes(processor, 1000, 2)
    f, ft = tokens_of(model, x)[..., :channels], tokens_of(model, xt)[..., :channels]
    centre = f.shape[1] // 2 - 4  # an inner cell of the 6 x 6 grid (14)
    return {"tile_mean": linear_probe(f.mean(1), y, ft.mean(1), yt),
            "one_token": linear_probe(f[:, centre], y, ft[:, centre], yt)}


def answer_breakdown(model, processor, n: int) -> dict:
    from mmaccel.embedded.evaluate import generate_answers

    samples = generate_samples(n, seed=15, split="test", families=["count"])
    answers = generate_answers(model, processor, samples)
    by = defaultdict(lambda: defaultdict(list))
    for s, a in zip(samples, answers):
        target = [o for o in s.meta["objects"] if o["shape"] == s.meta["target"][0]]
        cells = Counter((int(o["cx"] // CELL), int(o["cy"] // CELL)) for o in target)
        ok = a == s.answer
        by["true_count"][s.answer].append(ok)
        by["distractors"][len(s.meta["objects"]) - len(target)].append(ok)
        by["two_in_one_cell"][max(cells.values(), default=0) > 1].append(ok)
        by["side"][s.meta["side"]].append(ok)
        if not ok:
            by["errors"][f"{s.answer}->{a}"].append(ok)
    out = {k: {str(g): [len(v), round(float(np.mean(v)), 3)] for g, v in sorted(d.items())}
           for k, d in by.items() if k != "errors"}
    out["errors"] = dict(Counter({g: len(v) for g, v in by["errors"].items()}).most_common(8))
    out["accuracy"] = round(float(np.mean([a == s.answer for s, a in zip(samples, answers)])), 3)
    return out


def stage1_model(weight: float, steps: int = 2000, lr: float | None = None, ranks: int = 1):
    """A fresh model whose tower and projector went through stage 1 alone (the shipped flags), in
    ``ranks`` data-parallel processes (the same batches)."""
    from mmaccel.embedded.pretrain import pretrain_vision
    from mmaccel.embedded.train import build_model, build_processor, build_tokenizer, parse_args
    from mmaccel.machine import machine_line

    cfg, _ = parse_args(["--out", "/tmp/unused", "--seed", "2", "--init-std", "0.06", "--order", "question-both",
                         "--extra-followups", "flash,caption"])
    processor = build_processor(build_tokenizer(cfg.order, cfg.extra_followups), cfg.order)
    model = build_model(processor.tokenizer, seed=cfg.seed, text=cfg.text, vision=cfg.vision)
    model.train()
    t0 = time.time()
    acc = pretrain_vision(model, processor, cfg.seed, steps, lr=lr or cfg.vision_lr, log=lambda m: None,
                          summary="token", summary_weight=weight, summary_channels=64, dense=True, ranks=ranks)
    model.eval()
    return model, processor, {"cell_accuracy": round(acc, 3), "seconds": round(time.time() - t0),
                              "machine": machine_line()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model directory (default: the shipped model)")
    p.add_argument("--stage1", type=float, default=None, help="probe a fresh stage-1 tower with this summary weight")
    p.add_argument("--stage1-steps", type=int, default=2000, help="stage-1 steps of that tower (the recipe's 2,000)")
    p.add_argument("--stage1-lr", type=float, default=None, help="stage-1 peak lr (the recipe's 2e-3)")
    p.add_argument("--stage1-ranks", type=int, default=1, help="data-parallel processes for that stage 1")
    p.add_argument("--answers", type=int, default=0, help="also break down N count answers of the model")
    p.add_argument("--out", default=None, help="append the JSON lines to this file")
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    if a.stage1 is not None:
        model, processor, info = stage1_model(a.stage1, a.stage1_steps, a.stage1_lr, a.stage1_ranks)
        rows = [{"reading": "tokens", "stage1_summary_weight": a.stage1, "stage1_steps": a.stage1_steps,
                 **({"stage1_lr": a.stage1_lr} if a.stage1_lr else {}),
                 **({"stage1_ranks": a.stage1_ranks} if a.stage1_ranks > 1 else {}), **info,
                 **token_probe(model, processor)}]
    else:
        from mmaccel.pipeline import load_model

        model, processor = load_model(a.model) if a.model else __import__("mmaccel").load_default_model()
        rows = [{"reading": "tokens", "model": a.model or "shipped", **token_probe(model, processor)}]
        if a.answers:
            rows.append({"reading": "answers", "model": a.model or "shipped", **answer_breakdown(model, processor, a.answers)})
    for row in rows:
        print_line(row, a.out)


def print_line(row: dict, out: str | None = None) -> None:
    """Print ``row`` as one JSON line, and append it to ``out`` when given."""
    line = json.dumps(row)
    print(line)
    if out:
        with open(out, "a") as fh:
            fh.write(line + "\n")


if __name__ == "__main__":
    main()
