"""Can the language model learn to find single-frame absences at all, given the signal alone?
(issue 3, `flash`; eighth session)

Fine-tunes a trained model (tower frozen, projector + LM train, lr 3e-4, bf16) on 8-frame
flash videos only, with every object's flash count as a turn (`--extra-followups flash`) in a
shuffled order (`--shuffle-turns`), so no turn position and no other family competes; then
saves it for `flash_shortcut.py`.

Usage: python results/recipe-cpu/flash_finetune.py OUT_DIR [--model DIR] [--minutes 12]
       [--steps N] [--stages 0.3] [--lr 3e-4] [--device cuda] [--grow-after 1,3]
(``--stages``: one-object videos first, where the hole is the only change in the video;
``--grow-after``: a deeper language model, fresh layers inserted, tenth session.)
"""
import argparse
import time

import torch

from mmaccel.embedded import DEFAULT_MODEL_DIR, load_model
from mmaccel.embedded.data import assistant_id
from mmaccel.embedded.train import TrainConfig, make_optimizer, step_batch, train_step

def flash_only(max_objects: int = 3) -> dict:
    """One group: 8-frame flash videos of at most ``max_objects`` objects."""
    return {"video8": (1.0, 1.0, {"num_frames": 8, "max_objects": max_objects}, {"flash": 1.0})}


def objects_at(frac: float, stages: list[float]) -> int:
    """The object cap at time fraction ``frac``: 1 until stages[0], 2 until stages[1] (if
    given), and the world's 3 after the last stage."""
    passed = sum(frac >= s for s in stages)
    return 3 if passed == len(stages) else 1 + passed


def grow_language_model(model, after: list[int], init_std: float = 0.06) -> None:
    """Insert a fresh decoder layer after each listed layer index (of the original stack).
    Each new layer's residual branches start at zero (o_proj and down_proj zeroed), so the grown
    model computes exactly what the original did until training moves them."""
    lm, cfg = model.model.language_model, model.config.text_config
    layers = list(lm.layers)
    for idx in sorted(after, reverse=True):
        if not 0 <= idx < len(lm.layers):
            raise ValueError(f"--grow-after {idx}: the language model has layers 0..{len(lm.layers) - 1}")
        new = type(layers[0])(cfg, 0).to(next(lm.parameters()).dtype)  # renumbered below
        for name, param in new.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")) or "bias" in name:
                torch.nn.init.zeros_(param)
            elif "norm" not in name:
                torch.nn.init.normal_(param, std=init_std)
        layers.insert(idx + 1, new)
    lm.layers = torch.nn.ModuleList(layers)
    for i, layer in enumerate(lm.layers):
        layer.self_attn.layer_idx = i
    cfg.num_hidden_layers = len(layers)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[0]] * len(layers)


def fine_tune(model, processor, cfg: TrainConfig, seconds: float, stages=(), max_steps: int | None = None) -> None:
    """Train on flash-only batches for ``seconds`` or ``max_steps`` steps, whichever ends first
    (object caps by ``stages``, see :func:`objects_at`, over the time or the step budget);
    prints the mean first-turn loss every 100 steps."""
    opt, marker, t0, step, window = make_optimizer(model, cfg), assistant_id(processor), time.time(), 0, []
    while time.time() - t0 < seconds and (max_steps is None or step < max_steps):
        frac = step / max_steps if max_steps else (time.time() - t0) / seconds
        groups = flash_only(objects_at(frac, list(stages)))
        _, batch = step_batch(processor, cfg, step, groups)
        losses, follow = train_step(model, opt, batch, marker, cfg.lr, cfg.clip, cfg.loss_mean, cfg.bf16)
        window.append(float(losses.mean()))
        step += 1
        if step % 100 == 0:
            print(f"step {step} first-turn loss {sum(window) / len(window):.3f} follow-ups {follow:.3f} "
                  f"t {time.time() - t0:.0f}s", flush=True)
            window = []


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--model", default=DEFAULT_MODEL_DIR)
    p.add_argument("--minutes", type=float, default=12.0)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--stages", default="",
                   help="comma list of time fractions where the object cap steps 1 -> 2 -> 3, "
                        "e.g. 0.3 (one object until 30%%) or 0.25,0.5; empty: 1-3 objects throughout")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps (and --minutes)")
    p.add_argument("--grow-after", default="",
                   help="comma list of layer indices: insert a fresh (zero-residual) decoder layer after each")
    a = p.parse_args()
    torch.manual_seed(a.seed)
    model, processor = load_model(a.model)
    if a.grow_after:
        grow_language_model(model, [int(x) for x in a.grow_after.split(",")])
    model.to(a.device).train()
    model.model.vision_tower.requires_grad_(False)  # as --freeze-tower does in stage 2
    cfg = TrainConfig(seed=a.seed, followups=8, extra_followups=("flash",), shuffle_turns=True,
                      loss_mean="tokens", bf16=True, lr=a.lr)  # clip 1.0: TrainConfig's default
    fine_tune(model, processor, cfg, a.minutes * 60, [float(x) for x in a.stages.split(",") if x], a.steps)
    model.eval()
    model.save_pretrained(a.out)
    processor.save_pretrained(a.out)


if __name__ == "__main__":
    main()
