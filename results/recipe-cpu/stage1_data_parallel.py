"""Stage 1 in one 2-thread process against two forked 1-thread data-parallel ranks.

``python results/recipe-cpu/stage1_data_parallel.py [--steps 300] [--repeats 2] [--out stage1_data_parallel.md]``

The recipe's stage 1 (``--vision-dense --summary token --summary-channels 64``, weight 3 as run
43 asks, batch 48, seed 2) from the same fresh model, run alternately in both layouts; each run's
wall time covers ``pretrain_vision`` whole (the ranks' fork and the state sent back included).
Also reports the two layouts' final cell accuracy and how far their trained parameters lie apart,
next to a 1-thread against 2-thread process (float noise). A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as train.py sets it, before torch

import torch  # noqa: E402

from mmaccel.embedded.build import build_model, build_processor, build_tokenizer  # noqa: E402
from mmaccel.embedded.pretrain import pretrain_vision, stage1_params  # noqa: E402
from mmaccel.machine import machine_line  # noqa: E402

ORDER, EXTRA = "question-both", ("flash", "caption")


def one_run(processor, steps: int, ranks: int, threads: int = 2):
    """(seconds, final cell accuracy, trained stage-1 parameters flattened)."""
    torch.set_num_threads(threads)
    model = build_model(processor.tokenizer, seed=2)
    torch.manual_seed(2)  # the heads' initialisation
    t0 = time.time()
    acc = pretrain_vision(model, processor, seed=2, steps=steps, summary="token", dense=True, summary_weight=3.0,
                          summary_channels=64, ranks=ranks, log=lambda *_: None)
    seconds = time.time() - t0
    torch.set_num_threads(2)
    return seconds, acc, torch.cat([p.detach().reshape(-1) for p in stage1_params(model)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).with_name("stage1_data_parallel.md")))
    a = ap.parse_args()
    processor = build_processor(build_tokenizer(ORDER, EXTRA), ORDER)
    rows, params = [], {}
    for rep in range(a.repeats):
        for label, ranks in (("1 process, 2 threads", 1), ("2 ranks, 1 thread each", 2)):
            s, acc, flat = one_run(processor, a.steps, ranks)
            rows.append((rep, label, s, acc))
            params[label] = flat
            print(f"repeat {rep} {label}: {s:.1f} s ({s / a.steps:.3f} s/step), cell acc {acc:.4f}", flush=True)
    one_thread = one_run(processor, a.steps, 1, threads=1)
    write(a, rows, params, one_thread)


def write(a, rows, params, one_thread) -> None:
    one, two = params["1 process, 2 threads"], params["2 ranks, 1 thread each"]
    fresh = build_model(build_processor(build_tokenizer(ORDER, EXTRA), ORDER).tokenizer, seed=2)
    start = torch.cat([p.detach().reshape(-1) for p in stage1_params(fresh)])
    mean = {lab: sum(s for _, l, s, _ in rows if l == lab) / a.repeats for lab in params}
    speedup = mean["1 process, 2 threads"] / mean["2 ranks, 1 thread each"]
    lines = [
        "# Stage 1: one 2-thread process against two 1-thread data-parallel ranks", "",
        f"Machine: {machine_line()}; torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M:%S')}. "
        f"`python results/recipe-cpu/stage1_data_parallel.py --steps {a.steps} --repeats {a.repeats}`: "
        "the recipe's stage 1 (dense, summary token, 64 channels, weight 3, batch 48, seed 2), same fresh "
        "model each run, layouts alternating; wall time of `pretrain_vision` whole.", "",
        "| repeat | layout | s | s / step | final cell accuracy |", "| --- | --- | --- | --- | --- |",
        *[f"| {r} | {lab} | {s:.1f} | {s / a.steps:.3f} | {acc:.4f} |" for r, lab, s, acc in rows],
        f"| - | 1 process, 1 thread | {one_thread[0]:.1f} | {one_thread[0] / a.steps:.3f} | {one_thread[1]:.4f} |",
        "", f"Two ranks: **{speedup:.2f}x** the one-process speed (means over the repeats).", "",
        "Trained stage-1 parameters, mean |difference| over mean |movement from the initialisation|: "
        f"2 ranks against 1 process {rel(two, one, start):.2e}; 1 thread against 2 threads "
        f"{rel(one_thread[2], one, start):.2e}: float noise, grown over the steps (another summation order, "
        "as a thread count gives, moves the trajectory as far; the first steps agree to 1e-6, "
        "`tests/test_embedded_model.py::test_a_data_parallel_stage1_trains_as_one_process`).", ""]
    Path(a.out).write_text("\n".join(lines))
    print("\n".join(lines))


def rel(x, ref, start) -> float:
    """Mean |x - ref| over the mean movement of ``ref`` from ``start``."""
    return float((x - ref).abs().mean() / (ref - start).abs().mean())


if __name__ == "__main__":
    main()
