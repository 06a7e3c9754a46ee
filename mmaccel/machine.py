"""Which CPU a figure came from: the model name and the flags that decide its speed.

Benchmarks and training logs record it because the same command runs at very different speeds
on the CPU types our machines draw (an AVX-512 Xeon, a Zen 3 EPYC without AVX-512, a Zen 4 EPYC
with AVX512-BF16: ``results/recipe-cpu/summary_tower/README.md``, runs 42 and 43), and
``platform.processor()`` says only "x86_64" on Linux. Standard library only (``import mmaccel``
stays light).
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # native bfloat16 on a CPU
SPEED_FLAGS = ("avx512f", *BF16_FLAGS)


def cpuinfo() -> dict[str, str]:
    """The first processor's fields of :data:`CPUINFO` (empty where there is none, e.g. macOS)."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out.setdefault(key.strip(), value.strip())
    return out


def cpu_flags(info: dict[str, str] | None = None) -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is missing), from ``info`` when the
    caller has already read :func:`cpuinfo`."""
    return set((cpuinfo() if info is None else info).get("flags", "").split())


def machine_line() -> str:
    """'AMD EPYC, 2 cores; avx512f no, avx512_bf16 no, amx_bf16 no': which CPU a run's steps
    or timings came from."""
    info = cpuinfo()
    flags = cpu_flags(info)
    have = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in SPEED_FLAGS)
    name = info.get("model name") or platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores; {have}"
