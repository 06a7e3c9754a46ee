"""Do stop rows (``--stop-rows``) cure the run-on answers under token reduction? (twelfth session)

Under hired and stc at low retention run 17 answers the first word right and then runs on
without an eos (``first word`` far above exact accuracy in ``fidelity_run17``). This probe
fine-tunes run 17 for a fixed number of steps on the full world (the curriculum's last phase,
tower frozen, background dropout 0.9, bf16, lr 1e-4), once without and once with stop rows, and
saves both; compare them with ``mmaccel bench fidelity``. The control isolates what the extra
steps alone do. A probe, not a recipe: the shipped recipe's budget is one 57-minute run.

Usage: python results/recipe-cpu/summary_tower/stop_rows_probe.py MODEL OUT_DIR STOP_ROWS [STEPS]
"""
import sys
import time

import torch

from mmaccel.embedded import load_model
from mmaccel.embedded.data import assistant_id
from mmaccel.embedded.train import GROUPS, TrainConfig, make_optimizer, step_batch, train_step


def main(model_dir: str, out: str, stop_rows: float, steps: int = 400) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model, processor = load_model(model_dir)
    model.train()
    model.model.vision_tower.requires_grad_(False)  # as --freeze-tower does in stage 2
    cfg = TrainConfig(seed=21, followups=8, extra_followups=("flash", "caption"), loss_mean="tokens",
                      bf16=True, lr=1e-4, background_dropout=0.9, stop_rows=stop_rows)
    opt, marker, t0, window = make_optimizer(model, cfg), assistant_id(processor), time.time(), []
    for step in range(steps):
        _, batch = step_batch(processor, cfg, step, GROUPS)
        losses, _ = train_step(model, opt, batch, marker, cfg.lr, cfg.clip, cfg.loss_mean, cfg.bf16)
        window.append(float(losses.mean()))
        if (step + 1) % 100 == 0:
            print(f"step {step + 1} first-turn loss {sum(window) / len(window):.3f} t {time.time() - t0:.0f}s",
                  flush=True)
            window = []
    model.eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]), *(int(x) for x in sys.argv[4:5]))
