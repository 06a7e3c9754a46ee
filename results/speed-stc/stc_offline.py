"""Offline STC-Cacher (`accelerate_vlm(model, method="stc", cacher=True)`): the vision stage's
time on a mostly static video against plain `stc`, in one process.

The random-weight models of `results/stream/stream_latency.py` (LLaVA-OneVision-shaped: 2-block
SigLIP-shaped tower, 384 px, 729 patches a frame) and `stream_latency_qwen.py` (Qwen2-VL-shaped:
2-block tower, 336 px, 576 patches a slice of 2 frames), on `mostly_static_video` (16 frames).
The time is the runtime's "vision" timing (the feature call: tower, projector, pooling) of one
forward after a warm-up one, plain and cached alternating, median of 5 rounds; the official
setting (interval 2, a quarter recomputed).
Run: python results/speed-stc/stc_offline.py"""
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parents[1] / "stream"))
import stream_latency  # noqa: E402
import stream_latency_qwen  # noqa: E402

from mmaccel import accelerate_vlm  # noqa: E402
from mmaccel.bench.speed import mostly_static_video  # noqa: E402


def vision_seconds(model, inputs, **options) -> float:
    """The vision timing of one forward (after a warm-up one) under ``options``."""
    with accelerate_vlm(model, method="stc", **options) as handle, torch.no_grad():
        model(**inputs)
        model(**inputs)
        return handle.stats.timings["vision"]


def interleaved(model, inputs, rounds: int = 5) -> tuple[float, float]:
    """Medians over ``rounds`` of (plain, cached), the two alternating so that drift on a shared
    machine hits both alike."""
    pairs = [(vision_seconds(model, inputs), vision_seconds(model, inputs, cacher=True)) for _ in range(rounds)]
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


def main(threads: int = 2) -> None:
    torch.set_num_threads(threads)
    rows = []
    for name, make, size in (("llava_onevision", stream_latency.build, 384), ("qwen2_vl", stream_latency_qwen.build, 336)):
        model, proc = make()
        content = [{"type": "video"}, {"type": "text", "text": "what is the color ?"}]
        text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        inputs = proc(text=[text], videos=[mostly_static_video(16, size)], return_tensors="pt")
        plain, cached = interleaved(model, inputs)
        rows.append({"model": name, "plain_vision_s": plain, "cacher_vision_s": cached, "vision_time_cut": 1 - cached / plain})
        print(json.dumps(rows[-1]), flush=True)
    env = dict(machine=platform.machine(), threads=threads, torch=torch.__version__,
               transformers=transformers.__version__, date=time.strftime("%Y-%m-%d %H:%M"))
    json.dump({"env": env, "rows": rows}, open("results/speed-stc/stc_offline.json", "w"), indent=1)


if __name__ == "__main__":
    main()
