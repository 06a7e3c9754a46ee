"""Where a stage-2 step of the shipped recipe spends its time on this CPU, and whether two
one-thread processes would beat one two-thread process.

``python results/recipe-cpu/step_breakdown.py [--out step_breakdown.md]``

Batches of run 31's recipe (background dropout from pixels, stop rows, flash and caption
stretches) at 14 schedule positions of a 1,000-step schedule; compiled float32 language model
as ``train.py --compile`` runs it. Reports: batch building vs ``train_step``, the frozen vision
tower's share (forward hooks), the content detector's share (``patch_content``), dynamo's graph
count (recompiles would show as more than one graph), the padding share of the token grid, and
s/step for 2 threads x batch 16, 1 thread x batch 8 alone, and two 1-thread batch-8 processes at
once (the compute of 2-process data parallelism, without its gradient all-reduce). A benchmark,
not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

STEPS = [100, 250, 400, 500, 600, 700, 820, 900, 950, 980, 130, 330, 530, 730]


def recipe(batch_size: int = 16):
    from mmaccel.embedded.train import TrainConfig
    return TrainConfig(seed=2, followups=8, extra_followups=("flash", "caption"), loss_mean="tokens",
                       background_dropout=0.9, content_from="pixels", stop_rows=0.15, stop_rows_media="image",
                       flash_stretch=(0.3, 0.56, 0.25), caption_stretch=(0.62, 0.78, 1.0), steps=1000,
                       batch_size=batch_size)


def setup(threads: int, batch_size: int):
    import torch
    from mmaccel.embedded import load_default_model
    from mmaccel.embedded.data import assistant_id
    from mmaccel.embedded.train import make_optimizer, phase_groups, training_phases
    torch.set_num_threads(threads)
    model, processor = load_default_model()
    model.train().model.vision_tower.requires_grad_(False)
    cfg = recipe(batch_size)
    phases = training_phases(cfg, None)
    return model, processor, cfg, make_optimizer(model, cfg), assistant_id(processor), phases


def timed_hook(module, total: list):
    """Adds each forward's seconds of ``module`` to total[0]; returns the two handles."""
    start = []
    pre = module.register_forward_pre_hook(lambda m, a: start.append(time.perf_counter()))
    post = module.register_forward_hook(lambda m, a, o: total.__setitem__(0, total[0] + time.perf_counter() - start.pop()))
    return pre, post


def breakdown() -> dict:
    """Build vs step, tower and detector shares, graphs, padding: 2 threads, batch 16."""
    import torch._dynamo as dynamo
    from mmaccel.embedded import dropout
    from mmaccel.embedded.train import compiled_language_model, phase_groups, step_batch, train_step
    model, processor, cfg, opt, marker, phases = setup(2, 16)
    tower, detect = [0.0], [0.0]
    timed_hook(model.model.vision_tower, tower)
    plain = dropout.patch_content

    def counted(*a, **k):
        t = time.perf_counter()
        out = plain(*a, **k)
        detect[0] += time.perf_counter() - t
        return out
    dropout.patch_content = counted
    build = step = 0.0
    real = grid = 0
    with compiled_language_model(model):
        for i, s in enumerate(STEPS):
            t0 = time.perf_counter()
            _, batch = step_batch(processor, cfg, s, phase_groups(phases, s / 1000), s / 1000)
            t1 = time.perf_counter()
            ids = batch["input_ids"]
            real, grid = real + int((ids != processor.tokenizer.pad_token_id).sum()), grid + ids.numel()
            if i == 2:  # the first two steps compile and warm up
                tower[0] = detect[0] = 0.0
            train_step(model, opt, batch, marker, 1e-7, 1.0, "tokens", False)
            if i >= 2:
                build, step = build + t1 - t0, step + time.perf_counter() - t1
    dropout.patch_content = plain
    n = len(STEPS) - 2
    return {"build_s": build / n, "step_s": step / n, "tower_s": tower[0] / n, "detect_s": detect[0] / n,
            "graphs": int(dynamo.utils.counters["stats"]["unique_graphs"]), "real_token_share": real / grid}


def step_time(threads: int, batch_size: int) -> float:
    """Mean train_step seconds over prebuilt batches (after two warm-up steps)."""
    import copy
    from mmaccel.embedded.train import compiled_language_model, phase_groups, step_batch, train_step
    model, processor, cfg, opt, marker, phases = setup(threads, batch_size)
    batches = [step_batch(processor, cfg, s, phase_groups(phases, s / 1000), s / 1000)[1] for s in STEPS]
    with compiled_language_model(model):
        for b in batches[:2]:
            train_step(model, opt, copy.copy(b), marker, 1e-7, 1.0, "tokens", False)
        t0 = time.perf_counter()
        for b in batches[2:]:
            train_step(model, opt, copy.copy(b), marker, 1e-7, 1.0, "tokens", False)
    return (time.perf_counter() - t0) / (len(batches) - 2)


def child(threads: int, batch_size: int, count: int = 1) -> list[float]:
    """step_time in ``count`` fresh processes started together."""
    cmd = [sys.executable, __file__, "--child", f"{threads}:{batch_size}"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in range(count)]
    return [float(p.communicate()[0].strip().splitlines()[-1]) for p in procs]


def _all_reduce_worker(rank: int, port: int, numel: int, out) -> None:
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    x = torch.randn(numel)
    for _ in range(3):
        dist.all_reduce(x)
    t0 = time.perf_counter()
    for _ in range(20):
        dist.all_reduce(x)
    if rank == 0:
        out.put((time.perf_counter() - t0) / 20)
    dist.destroy_process_group()


def all_reduce_time(numel: int, port: int = 29533) -> float:
    """Seconds one gloo all-reduce of ``numel`` float32 takes between two local 1-thread processes
    (what 2-process data parallelism adds to every step: the trainable parameters' gradients)."""
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(_all_reduce_worker, args=(port, numel, out), nprocs=2, start_method="spawn")
    return out.get()


def trainable_numel() -> int:
    model = setup(1, 16)[0]
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def report(r: dict) -> str:
    import torch
    import transformers
    total = r["build_s"] + r["step_s"]
    pair = sum(r["two_1x8"]) / 2
    return "\n".join([
        f"Machine: {platform.machine()}, CPU flags with AVX512-BF16/AMX: {r['bf16_flags'] or 'none'}, torch "
        f"{torch.__version__}, transformers {transformers.__version__}, {time.strftime('%Y-%m-%d %H:%M:%S')}. "
        f"Compiled float32 language model; {len(STEPS) - 2} timed steps after 2 warm-up steps.", "",
        "| part (2 threads, batch 16) | s / step | share |", "| --- | --- | --- |",
        f"| batch building (`step_batch`) | {r['build_s']:.3f} | {r['build_s'] / total:.0%} |",
        f"| `train_step` | {r['step_s']:.3f} | {r['step_s'] / total:.0%} |",
        f"| of which the frozen vision tower's forward | {r['tower_s']:.3f} | {r['tower_s'] / total:.0%} |",
        f"| of which the pixel content detector | {r['detect_s']:.3f} | {r['detect_s'] / total:.0%} |",
        f"| **a step as a run pays it** | **{total:.3f}** | |", "",
        f"Dynamo graphs compiled: {r['graphs']} (no recompiles across the batch shapes). Real tokens: "
        f"{r['real_token_share']:.0%} of the padded grid.", "",
        "| layout | s / step (train_step, prebuilt batches) |", "| --- | --- |",
        f"| 1 process, 2 threads, batch 16 | {r['one_2x16'][0]:.3f} |",
        f"| 1 process, 1 thread, batch 16 | {r['one_1x16'][0]:.3f} |",
        f"| 1 process, 1 thread, batch 8, alone | {r['one_1x8'][0]:.3f} |",
        f"| 2 processes at once, 1 thread, batch 8 each | {' / '.join(f'{t:.3f}' for t in r['two_1x8'])} "
        f"(mean {pair:.3f}: {r['one_2x16'][0] / pair:.2f}x the 2-thread step per 16 rows) |", "",
        f"A gloo all-reduce of the {r['trainable']:,} trainable parameters' gradients between two local "
        f"1-thread processes: {r['all_reduce_s'] * 1000:.1f} ms."])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        threads, batch = map(int, a.child.split(":"))
        print(step_time(threads, batch))
        return
    from mmaccel.machine import BF16_FLAGS, cpu_flags
    r = breakdown()
    r.update(bf16_flags=sorted(set(BF16_FLAGS) & cpu_flags()), one_2x16=child(2, 16),
             one_1x16=child(1, 16), one_1x8=child(1, 8), two_1x8=child(1, 8, count=2))
    r["trainable"] = trainable_numel()
    r["all_reduce_s"] = all_reduce_time(r["trainable"])
    text = report(r)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write("# Stage-2 step: where the time goes\n\n" + text + "\n")
        with open(a.out.replace(".md", ".json"), "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    main()
