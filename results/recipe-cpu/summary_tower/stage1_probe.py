"""Does a scene-summary target read from every token (``--summary token``) make the tower's
attention fall on objects? Stage 1 alone (the shipped recipe's: 2,000 dense steps, seed 2),
then probe 1 of ``results/fidelity/keep_sets.py`` (share of each layer's top-9 mean-received
attention on an object) and the shape / colour probes of ``mmaccel.embedded.probe``.

The shipped model's tower is its stage-1 tower (frozen in stage 2), so running the probes on it
gives the same figures without the summary target.

Usage: python results/recipe-cpu/summary_tower/stage1_probe.py OUT_DIR [SUMMARY] [STEPS]
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fidelity"))
from keep_sets import score_probe  # noqa: E402

from mmaccel.embedded.build import build_model, build_processor, build_tokenizer  # noqa: E402
from mmaccel.embedded.pretrain import pretrain_vision, rescale_projector  # noqa: E402
from mmaccel.embedded.train import TrainConfig  # noqa: E402


def main(out: str, summary: str = "token", steps: int = 2000, seed: int = 2) -> None:
    torch.set_num_threads(2)
    cfg = TrainConfig(seed=seed, summary=summary, vision_dense=True, vision_steps=steps,
                      text={"initializer_range": 0.06})
    tokenizer = build_tokenizer(cfg.order)
    processor = build_processor(tokenizer, cfg.order)
    model = build_model(tokenizer, seed=seed, text=cfg.text, vision=cfg.vision)
    model.train()
    t0 = time.time()
    acc = pretrain_vision(model, processor, seed, steps, lr=cfg.vision_lr, summary=summary, dense=True,
                          log=lambda s: print(s, flush=True))
    rescale_projector(model, processor, seed, cfg.visual_norm)
    print(f"stage 1: cell accuracy {acc:.3f} in {time.time() - t0:.0f}s", flush=True)
    model.eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    score_probe(model, processor)


if __name__ == "__main__":
    main(sys.argv[1], *(sys.argv[2:3] or ["token"]), *([int(sys.argv[3])] if len(sys.argv) > 3 else []))
