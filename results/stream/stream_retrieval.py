"""What ReKV retrieval buys a long stream: question latency and per-frame cost against length.

The LLaVA-OneVision-shaped random-weight model of ``stream_latency.py`` (Qwen2-0.5B-shaped
decoder, 196 pooled tokens a frame, STC-Pruner's 60/196 kept, video-first template). One stream
of 160 frames is fed to two sessions side by side:
- plain: every frame stays in the KV cache, and a question attends to all of them;
- retrieval: ``max_frames=16`` (frames encoded against the newest 16) and
  ``retrieve_frames=16`` (each decoder layer answers from the 16 frames it scores most relevant).
At 16, 64 and 160 frames each session is asked a question (prefill + 1 token, median of 3; a
question leaves the session as it was). Per-frame cost: mean over the 8 frames before each point.
Run: python results/stream/stream_retrieval.py [threads]"""
import json
import platform
import statistics
import sys
import time

import numpy as np
import torch
import transformers

sys.path.insert(0, "results/stream")
from stream_latency import build  # noqa: E402


def ask_seconds(session, question: str) -> float:
    times = []
    for _ in range(3):
        start = time.perf_counter()
        session.ask(question, max_new_tokens=1)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(threads: int = 2, make=build, size: int = 384, out: str = "results/stream/stream_retrieval.json") -> None:
    """Feed ``make()``'s model 160 random ``size`` px frames; write ``out``."""
    from mmaccel.stream import StreamSession

    torch.set_num_threads(threads)
    model, proc = make()
    question, points = "what is the color ?", (16, 64, 160)
    sessions = {"plain": StreamSession(model, proc),
                "retrieval": StreamSession(model, proc, max_frames=16, retrieve_frames=16)}
    rng = np.random.default_rng(0)
    frame_times = {name: [] for name in sessions}
    rows = []
    for n in range(1, points[-1] + 1):
        frame = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        for name, session in sessions.items():
            start = time.perf_counter()
            session.add_frame(frame)
            frame_times[name].append(time.perf_counter() - start)
        if n in points:
            row = {"frames": n}
            for name, session in sessions.items():
                row[f"{name}_question_s"] = ask_seconds(session, question)
                row[f"{name}_per_frame_s"] = statistics.mean(frame_times[name][-8:])
                row[f"{name}_cache_tokens"] = session.cached
            row["retrieved_frames_layer0"] = sessions["retrieval"].last_retrieved[0]
            rows.append(row)
            print(json.dumps(row), flush=True)
    env = dict(machine=platform.machine(), threads=threads, torch=torch.__version__,
               transformers=transformers.__version__, date=time.strftime("%Y-%m-%d %H:%M"))
    json.dump({"env": env, "rows": rows}, open(out, "w"), indent=1)


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
