"""Is the close-objects caption failure a matter of training signal or of the language model's
capacity? Fine-tunes a trained model on captions alone (tower frozen, projector + LM train,
bf16 where the CPU has it natively, 144 px and 288 px still scenes of 1-4 objects, the caption as the only turn) for a few
minutes, then saves it for `caption_gap.py` (eighteenth session; a probe, not a recipe: the
other families are not trained and will drift).

``--replay W``: instead of captions alone, the full world's final-phase groups with captions
weighted W in the still-image mixes (1.5 in the recipe) and the recipe's follow-ups (8, with
flash and caption turns), so the other families keep training.

``--caption-share S`` (nineteenth session): the full world's final-phase groups (caption weight
1.5) with a still-image group of captions alone (1-4 objects, 144 px) drawn for a share S of the
batches, and the recipe's follow-ups on every sample (the caption samples too), the way a caption
stretch would sit inside a recipe.

``--weights color=3,exists=3`` (thirty-eighth session): the full world's final-phase groups with
those families' weights in the mixes, and the recipe's follow-ups: a binding recovery stretch
after the place head has cost binding.

Usage: python results/recipe-cpu/summary_tower/caption_finetune.py OUT_DIR [--model DIR]
       [--minutes 10] [--lr 1e-4] [--replay 5.4 | --caption-share 0.8 | --weights F=W,...]
"""
import argparse
import time

import torch

from mmaccel.embedded import DEFAULT_MODEL_DIR, load_model
from mmaccel.embedded.data import assistant_id
from mmaccel.embedded.train import (GROUPS, Phase, TrainConfig, make_optimizer, native_bf16, parse_weights, reweighted,
                                    step_batch, train_step, with_stretch)

BF16 = native_bf16("cpu")  # float32 where bfloat16 would run 2-3x slower (thirty-sixth session, on an EPYC)

CAPTIONS_ONLY = {"image": (0.85, 1.0, {"hires": False, "max_objects": 4}, {"caption": 1.0}),
                 "hires": (0.15, 0.5, {"hires": True, "max_objects": 4}, {"caption": 1.0})}


def full_world_config(a) -> TrainConfig:
    """The recipe's follow-ups and loss on the full world's groups, at this run's seed and lr."""
    return TrainConfig(seed=a.seed, followups=8, extra_followups=("flash", "caption"), loss_mean="tokens",
                       bf16=BF16, lr=a.lr)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--model", default=DEFAULT_MODEL_DIR)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=8)
    p.add_argument("--replay", type=float, default=None, help="caption weight in the full world's mixes")
    p.add_argument("--caption-share", type=float, default=None, help="share of caption-only batches")
    p.add_argument("--weights", default=None, help="family=weight,... in the full world's mixes")
    a = p.parse_args()
    torch.manual_seed(a.seed)
    model, processor = load_model(a.model)
    model.train()
    model.model.vision_tower.requires_grad_(False)
    if a.caption_share is not None:
        caption_group = (a.caption_share, 1.0, {"hires": False, "max_objects": 4}, {"caption": 1.0})
        groups = with_stretch((Phase(1.0, GROUPS),), 0.0, 1.0, "captions", caption_group)[0].groups
        cfg = full_world_config(a)
    elif a.weights is not None or a.replay is not None:  # the full world, reweighted (--weights wins)
        weights = parse_weights(a.weights) if a.weights is not None else {"caption": a.replay}
        groups = reweighted((Phase(1.0, GROUPS),), weights)[0].groups
        cfg = full_world_config(a)
    else:
        groups, cfg = CAPTIONS_ONLY, TrainConfig(seed=a.seed, followups=0, loss_mean="tokens", bf16=BF16, lr=a.lr)
    opt, marker, t0, step, window = make_optimizer(model, cfg), assistant_id(processor), time.time(), 0, []
    while time.time() - t0 < a.minutes * 60:
        _, batch = step_batch(processor, cfg, step, groups)
        losses, _ = train_step(model, opt, batch, marker, cfg.lr, cfg.clip, cfg.loss_mean, cfg.bf16)
        window.append(float(losses.mean()))
        step += 1
        if step % 100 == 0:
            print(f"step {step} first-turn loss {sum(window) / len(window):.4f} t {time.time() - t0:.0f}s", flush=True)
            window = []
    model.eval()
    model.save_pretrained(a.out)
    processor.save_pretrained(a.out)


if __name__ == "__main__":
    main()
