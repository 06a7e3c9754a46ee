"""Where the host time of the slow methods goes on a GPU (seventeenth session's device call).

For each method on the LLaVA-1.5-shaped model (bf16, CUDA), after warm-up: the wall time of a
prefill (median of 5, waiting for the GPU at the end only), then one prefill under
``torch.profiler`` (top ops by self CPU time, with the number of device syncs) and one under
cProfile (the mmaccel functions by cumulative time). Usage:
    python results/speed-gpu/profile_methods.py OUTDIR [--llm 7b] [--batch 1] [--methods aim,mustdrop]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time
from pathlib import Path

import torch

from mmaccel.api import accelerate_vlm
from mmaccel.bench.speed import LLM_SHAPES, SMALL_TEXT, build_llava15_shaped

CUDA = torch.cuda.is_available()


def sync():
    if CUDA:
        torch.cuda.synchronize()


def prefill(model, inputs):
    with torch.inference_mode():
        model(**inputs, logits_to_keep=1, use_cache=True)


def wall_ms(model, inputs, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        prefill(model, inputs)
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def torch_profile(model, inputs) -> str:
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if CUDA else [])
    with torch.profiler.profile(activities=acts) as prof:
        prefill(model, inputs)
        sync()
    events = prof.key_averages()
    syncs = sum(e.count for e in events if "Synchronize" in e.key or e.key in ("aten::item", "aten::_local_scalar_dense"))
    table = events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
    return f"device syncs and scalar reads: {syncs}\n{table}"


def python_profile(model, inputs) -> str:
    prof = cProfile.Profile()
    prof.enable()
    prefill(model, inputs)
    sync()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats("mmaccel", 30)
    return out.getvalue()


def profile_method(model, inputs, method: str | None, retention: float, out: Path) -> float:
    ctx = accelerate_vlm(model, method=method, retention=retention) if method else None
    with ctx if ctx else torch.inference_mode():
        for _ in range(3):
            prefill(model, inputs)
        ms = wall_ms(model, inputs)
        name = method or "none"
        (out / f"{name}_torch.txt").write_text(f"wall {ms:.2f} ms\n" + torch_profile(model, inputs))
        (out / f"{name}_python.txt").write_text(python_profile(model, inputs))
    return ms


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--llm", default="7b", choices=[*sorted(LLM_SHAPES), "small"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--retention", type=float, default=0.25)
    ap.add_argument("--methods", default="fastv,aim,mustdrop,visionzip")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = SMALL_TEXT if args.llm == "small" else LLM_SHAPES[args.llm]
    device, dtype = ("cuda", "bfloat16") if CUDA else ("cpu", "float32")
    model, inputs = build_llava15_shaped(text, image_size=112 if args.llm == "small" else 336, device=device,
                                         dtype=dtype, batch=args.batch)
    lines = [f"{args.llm} batch {args.batch} retention {args.retention} {torch.cuda.get_device_name() if CUDA else 'cpu'}"]
    for method in [None, *args.methods.split(",")]:
        ms = profile_method(model, inputs, method, args.retention, out)
        lines.append(f"{method or 'none'}: {ms:.2f} ms prefill (ViT + LLM, wall)")
        print(lines[-1], flush=True)
    (out / "summary.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
