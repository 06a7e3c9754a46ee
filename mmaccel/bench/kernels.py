"""Kernel benchmark: the Triton ``query_scores`` kernel against its torch reference on CUDA.

``python -m mmaccel.bench.kernels [--json out.json]`` times both backends (CUDA events,
median of repeats after warm-up) on the shapes the scorers use (a few query rows of a
LLaVA-1.5-7B-sized or 0.5B-sized LM against its whole prompt), checks they agree, and
prints a Markdown table. Needs a CUDA device; it is a benchmark, not a test.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys

# (name, batch, heads, kv heads, query rows, keys, head dim)
SHAPES = (
    ("llava7b-last-row", 1, 32, 32, 1, 650, 128),
    ("llava7b-text-rows", 1, 32, 32, 32, 650, 128),
    ("llava7b-batch8", 8, 32, 32, 16, 650, 128),
    ("qwen0.5b-gqa-video", 1, 14, 2, 32, 6000, 64),
    ("qwen0.5b-gqa-batch4", 4, 14, 2, 64, 3000, 64),
)


def time_ms(fn, repeats: int = 50, warmup: int = 10) -> float:
    """Median milliseconds of ``fn()`` by CUDA events."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def bench_shape(name, b, h, hkv, q_rows, t, d, dtype) -> dict:
    import torch

    from ..kernels import query_scores, query_scores_reference

    q = torch.randn(b, h, q_rows, d, device="cuda", dtype=dtype)
    k = torch.randn(b, hkv, t, d, device="cuda", dtype=dtype)
    bias = torch.zeros(b, 1, q_rows, t, device="cuda")
    bias[..., : t // 10] = float("-inf")  # left padding of a batch
    scale = d ** -0.5
    ref = query_scores_reference(q, k, bias, scale)
    err = (query_scores(q, k, bias, scale, backend="triton") - ref).abs().max().item()
    torch_ms = time_ms(lambda: query_scores_reference(q, k, bias, scale))
    triton_ms = time_ms(lambda: query_scores(q, k, bias, scale, backend="triton"))
    return {"shape": name, "dtype": str(dtype).removeprefix("torch."), "B": b, "H": h, "Hkv": hkv,
            "Q": q_rows, "T": t, "D": d, "torch_ms": torch_ms, "triton_ms": triton_ms,
            "speedup": torch_ms / triton_ms, "max_abs_err": err}


def environment() -> dict:
    import torch
    import triton

    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version()}


def main(argv=None) -> list[dict]:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("mmaccel.bench.kernels needs a CUDA device")
    rows = [bench_shape(*s, dtype=dt) for dt in (torch.bfloat16, torch.float32) for s in SHAPES]
    print("| shape | dtype | torch ms | triton ms | speedup | max abs err |\n| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['shape']} | {r['dtype']} | {r['torch_ms']:.4f} | {r['triton_ms']:.4f} | "
              f"{r['speedup']:.2f}x | {r['max_abs_err']:.1e} |")
    env = environment()
    print(json.dumps(env))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
