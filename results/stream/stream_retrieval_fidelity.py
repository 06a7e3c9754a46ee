"""ReKV retrieval on the shipped model's video questions, with a video-first template.

The shipped model's template asks the question before the video and again after it
("Q? <video> Q?"), so a session cannot prefill frames before the question and retrieval is
refused there. This probe gives its processor a video-first template ("<video> Q?": the same
text with the first copy of the question left out) and asks held-out video questions
(test split) from a StreamSession at STC's 60/196 tokens a frame, each decoder layer retrieving
K frames (K = every frame, 4, 2, 1), beside the shipped template (question-both, prefilled at
the question) at full and at 60/196. Run: python results/stream/stream_retrieval_fidelity.py [n] [seed]"""
import copy
import json
import platform
import sys
import time

import torch
import transformers

sys.path.insert(0, "results/stream")
from stream_positions import RETENTION, score, streamed  # noqa: E402

from mmaccel import load_default_model  # noqa: E402
from mmaccel.world.samples import generate_samples  # noqa: E402


def video_first(proc):
    """The shipped template without the question before the media."""
    proc = copy.deepcopy(proc)
    first_text = ("{%- for c in message['content'] -%}{%- if c['type'] == 'text' -%}{{ c['text'] }}{{ ' ' }}"
                  "{%- endif -%}{%- endfor -%}")
    assert proc.chat_template.count(first_text) == 2
    proc.chat_template = proc.chat_template.replace(first_text, "", 1)
    return proc


def main(n: int = 300, seed: int = 0) -> None:
    torch.set_num_threads(2)
    model, proc = load_default_model()
    vf = video_first(proc)
    samples = generate_samples(n, seed=seed, split="test", kinds=["video"])
    runs = [("question-both", proc, dict(retention=1.0)), ("question-both", proc, dict(retention=RETENTION)),
            ("video-first", vf, dict(retention=1.0)), ("video-first", vf, dict(retention=RETENTION))]
    runs += [("video-first", vf, dict(retention=RETENTION, retrieve_frames=k)) for k in (4, 2, 1)]
    rows = []
    for template, p, kw in runs:
        start = time.perf_counter()
        answers, _ = streamed(model, p, samples, **kw)
        rows.append(dict(template=template, **kw, wall_s=time.perf_counter() - start, **score(samples, answers)))
        print(json.dumps(rows[-1]), flush=True)
    env = dict(machine=platform.machine(), threads=torch.get_num_threads(), torch=torch.__version__,
               transformers=transformers.__version__, n=n, seed=seed, split="test", date=time.strftime("%Y-%m-%d"))
    json.dump({"env": env, "rows": rows}, open(f"results/stream/stream_retrieval_fidelity_n{n}_s{seed}.json", "w"),
              indent=1)


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
