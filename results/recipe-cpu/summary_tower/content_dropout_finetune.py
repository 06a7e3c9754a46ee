"""Does the embedded model keep more under reduction once it has answered from sets with content
missing? A fine-tune probe (twenty-eighth session; a probe, not a recipe).

`results/fidelity/content_oracle.md` found that no pre-LLM keep set reaches issue 4's 97% at
retention 0.25 on the shipped model. The model was trained with background dropout only: a hidden
token never held object pixels, except in stop rows, which train only the answer's end. At 0.25
a reduction must drop content in most scenes.

This continues the shipped model's training on the recipe's final-phase mixes (`GROUPS`, 8
follow-ups with flash and caption turns, token-mean loss, tower frozen), with background dropout
0.9 from the pixel detector as in the recipe. It has no stop rows and runs at a flat lr.

`--content-dropout C` adds content dropout: a share `--content-share` of the rows hide a fraction
u ~ U(0, C) of their content tokens, lowest random priority first, always leaving one. The
answers stay trained, so the model learns to answer from what is left. With `C = 0` it is the
control: the same steps without content dropout. (The same plan is now `train.py
--content-dropout`; this script keeps its own random stream, so it reproduces the probe.)

Usage: python results/recipe-cpu/summary_tower/content_dropout_finetune.py OUT_DIR
       [--minutes 15 | --steps N] [--lr 3e-5] [--content-dropout 0.6] [--content-share 0.5]
"""
import argparse
import time

import numpy as np
import torch

from mmaccel.embedded import DEFAULT_MODEL_DIR, load_model
from mmaccel.embedded.data import assistant_id
from mmaccel.embedded.dropout import plan_content_dropout
from mmaccel.embedded.train import GROUPS, TrainConfig, make_optimizer, step_batch, train_step


def add_content_dropout(batch, step: int, seed: int, max_fraction: float, share: float) -> None:
    """The library's content dropout (``plan_content_dropout``) on its own stream per step."""
    plan_content_dropout(batch, max_fraction, share, np.random.default_rng(np.random.SeedSequence([seed, step, 9])))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--model", default=DEFAULT_MODEL_DIR)
    p.add_argument("--minutes", type=float, default=15.0)
    p.add_argument("--steps", type=int, default=None, help="a step budget instead of --minutes")
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--seed", type=int, default=28)
    p.add_argument("--content-dropout", type=float, default=0.6)
    p.add_argument("--content-share", type=float, default=0.5)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    torch.set_num_threads(2)
    model, processor = load_model(a.model)
    model.train()
    model.model.vision_tower.requires_grad_(False)
    cfg = TrainConfig(seed=a.seed, followups=8, extra_followups=("flash", "caption"), loss_mean="tokens",
                      lr=a.lr, background_dropout=0.9, content_from="pixels")
    opt, marker, t0, step, window = make_optimizer(model, cfg), assistant_id(processor), time.time(), 0, []
    while (step < a.steps) if a.steps else (time.time() - t0 < a.minutes * 60):
        _, batch = step_batch(processor, cfg, step, GROUPS, prog=1.0)
        if a.content_dropout > 0:
            add_content_dropout(batch, step, a.seed, a.content_dropout, a.content_share)
        losses, _ = train_step(model, opt, batch, marker, cfg.lr, cfg.clip, cfg.loss_mean)
        window.append(float(losses.mean()))
        step += 1
        if step % 100 == 0:
            print(f"step {step} first-turn loss {sum(window) / len(window):.4f} t {time.time() - t0:.0f}s", flush=True)
            window = []
    model.eval()
    model.save_pretrained(a.out)
    processor.save_pretrained(a.out)
    print(f"{step} steps in {time.time() - t0:.0f}s -> {a.out}", flush=True)


if __name__ == "__main__":
    main()
