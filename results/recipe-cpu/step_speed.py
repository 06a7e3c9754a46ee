"""Stage-2 step time of the shipped architecture: float32 eager vs ``--bf16`` vs ``--compile``.

``python results/recipe-cpu/step_speed.py [--batches 12] [--out step_speed.md]``

The same 12 full-world batches (16 rows, 8 follow-ups, opt-in extra follow-ups) go through
``train_step`` in each mode, interleaved twice (fp32, bf16, compile, compile+bf16, then
again) so that drift on a shared machine hits every mode alike. A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import transformers  # noqa: E402

from mmaccel.embedded import load_default_model  # noqa: E402
from mmaccel.embedded.data import assistant_id  # noqa: E402
from mmaccel.embedded.train import TrainConfig, compiled_language_model, make_optimizer, step_batch, train_step  # noqa: E402

MODES = ("fp32", "bf16", "compile", "compile+bf16")


def time_mode(model, opt, batches, marker: int, bf16: bool) -> float:
    """Mean seconds per optimiser step over ``batches`` (tiny lr: the weights barely move)."""
    t0 = time.perf_counter()
    for b in batches:
        train_step(model, opt, copy.copy(b), marker, 1e-7, 1.0, "tokens", bf16)
    return (time.perf_counter() - t0) / len(batches)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(2)
    model, processor = load_default_model()
    model.train().model.vision_tower.requires_grad_(False)
    cfg = TrainConfig(seed=5, followups=8, extra_followups=("flash", "caption"), loss_mean="tokens")
    opt, marker = make_optimizer(model, cfg), assistant_id(processor)
    batches = [step_batch(processor, cfg, s, None)[1] for s in range(a.batches)]
    times = {m: [] for m in MODES}
    t0 = time.perf_counter()
    with compiled_language_model(model):
        train_step(model, opt, copy.copy(batches[0]), marker, 1e-7, 1.0, "tokens", False)
        train_step(model, opt, copy.copy(batches[0]), marker, 1e-7, 1.0, "tokens", True)
    warm = time.perf_counter() - t0
    for _ in range(2):
        for mode in MODES:
            if mode.startswith("compile"):
                with compiled_language_model(model):
                    times[mode].append(time_mode(model, opt, batches, marker, mode.endswith("bf16")))
            else:
                times[mode].append(time_mode(model, opt, batches, marker, mode == "bf16"))
    base = min(times["fp32"])
    lines = [f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
             f"transformers {transformers.__version__}, {time.strftime('%Y-%m-%d %H:%M:%S')}. "
             f"{a.batches} batches x 2 rounds; compile warm-up (2 steps, inductor cache as found) {warm:.0f} s.",
             "", "| mode | s / step (best round) | rounds | speed-up vs fp32 |", "|---|---|---|---|"]
    for mode in MODES:
        lines.append(f"| {mode} | {min(times[mode]):.3f} | {' / '.join(f'{t:.3f}' for t in times[mode])} "
                     f"| {base / min(times[mode]):.2f} |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write("# Stage-2 step time\n\n" + text + "\n")


if __name__ == "__main__":
    main()
