"""StreamSession on the shipped model: held-out video questions answered from a frame stream.

Position policy (preserve = full-video positions, the default; compact = the official STC/ReKV
append) x STC-Cacher off/on, at full tokens and at STC's 60/196; offline `stc` (batched
generate) at 60/196 beside it. Run: python results/stream/stream_positions.py [n] [seed]"""
import json
import platform
import sys
import time
from collections import defaultdict

import torch
import transformers

from mmaccel import accelerate_vlm, load_default_model
from mmaccel.embedded.evaluate import generate_answers
from mmaccel.stream import StreamSession
from mmaccel.world.samples import generate_samples

RETENTION = 60 / 196


def score(samples, answers) -> dict:
    per = defaultdict(list)
    for s, a in zip(samples, answers):
        per[s.family].append(a.strip().lower() == s.answer)
    return {"all": sum(sum(v) for v in per.values()) / len(samples)} | {k: sum(v) / len(v) for k, v in per.items()}


def streamed(model, proc, samples, **kw) -> tuple[list[str], float]:
    answers, vision = [], 0.0
    for s in samples:
        session = StreamSession(model, proc, **kw)
        for frame in s.frames:
            session.add_frame(frame)
        answers.append(session.ask(s.question, max_new_tokens=8).text)
        vision += session.vision_seconds
    return answers, vision


def main(n: int = 600, seed: int = 0) -> None:
    torch.set_num_threads(2)
    model, proc = load_default_model()
    samples = generate_samples(n, seed=seed, split="test", kinds=["video"])
    rows = []
    for retention in (1.0, RETENTION):
        for policy in ("preserve", "compact"):
            for cacher in (False, True):
                start = time.perf_counter()
                answers, vision = streamed(model, proc, samples, retention=retention, position_policy=policy, cacher=cacher)
                rows.append(dict(mode="stream", retention=retention, policy=policy, cacher=cacher, vision_s=vision,
                                 wall_s=time.perf_counter() - start, **score(samples, answers)))
                print(json.dumps(rows[-1]), flush=True)
    for policy in ("preserve", "compact"):
        with accelerate_vlm(model, method="stc", retention=RETENTION, position_policy=policy):
            rows.append(dict(mode="offline stc", retention=RETENTION, policy=policy, cacher=False,
                             **score(samples, generate_answers(model, proc, samples))))
        print(json.dumps(rows[-1]), flush=True)
    env = dict(machine=platform.machine(), threads=torch.get_num_threads(), torch=torch.__version__,
               transformers=transformers.__version__, n=n, seed=seed, split="test", date=time.strftime("%Y-%m-%d"))
    json.dump({"env": env, "rows": rows}, open(f"results/stream/stream_positions_n{n}_s{seed}.json", "w"), indent=1)


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
