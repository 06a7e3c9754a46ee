"""Why a short sequence runs under its FLOP ratio at batch 1 on a CPU: time per decoder layer
against the tokens it runs on.

The LLaVA-1.5-shaped random model of ``mmaccel bench speed`` (24 Llama layers x 1024, 616
tokens). Each decoder layer is timed by hooks, in a full prefill and in accelerated prefills
(aim and random at retention 0.11), batch 1 and 4, median of 3 after one warm-up. A straight line
t = a + b * tokens through the calls on at most 128 tokens gives the fixed cost of a layer (a: reading its weights,
~67 MB in float32, whatever the sequence) beside the cost per token (b). The analytic FLOP ratio
counts only b. Run: python results/speed-batch/layer_times.py [threads]"""
import json
import statistics
import sys
import time

import torch

from mmaccel.api import accelerate_vlm
from mmaccel.bench.speed import build_llava15_shaped, environment


def _tokens(hidden: torch.Tensor) -> int:
    return hidden.shape[0] * hidden.shape[1]


def layer_times(model, inputs, method=None, retention=None, repeats=3):
    """Median ms per layer call and the tokens (batch x length) it ran on."""
    records, handles = [], []
    for layer in model.model.language_model.layers:
        handles.append(layer.register_forward_pre_hook(
            lambda m, a, k: records.append([_tokens(a[0] if a else k["hidden_states"]), time.perf_counter()]),
            with_kwargs=True))
        handles.append(layer.register_forward_hook(lambda m, a, o: records[-1].append(time.perf_counter())))
    runs = []
    try:
        for _ in range(repeats + 1):
            records.clear()
            with torch.inference_mode():
                if method is None:
                    model(**inputs, logits_to_keep=1, use_cache=True)
                else:
                    with accelerate_vlm(model, method=method, retention=retention):
                        model(**inputs, logits_to_keep=1, use_cache=True)
            runs.append([(n, (e - s) * 1e3) for n, s, e in records])
    finally:
        for h in handles:
            h.remove()
    runs = runs[1:]
    return [(runs[0][i][0], statistics.median(r[i][1] for r in runs)) for i in range(len(runs[0]))]


def main(threads: int = 2) -> None:
    torch.set_num_threads(threads)
    out = {"environment": environment(threads), "points": []}
    for batch in (1, 4):
        model, inputs = build_llava15_shaped(batch=batch)
        for method, retention in ((None, None), ("aim", 0.11), ("random", 0.11)):
            for tokens, ms in layer_times(model, inputs, method, retention):
                out["points"].append({"batch": batch, "method": method or "none", "tokens": tokens, "ms": ms})
    summarize(out)
    json.dump(out, open("results/speed-batch/layer_times.json", "w"), indent=1)


def summarize(out: dict, short: int = 128) -> None:
    """Fit t = a + b * tokens over the layer calls on at most ``short`` tokens (where the
    attention's quadratic term is negligible) and print each token count's share of fixed cost."""
    small = [p for p in out["points"] if p["tokens"] <= short]
    xs = torch.tensor([p["tokens"] for p in small], dtype=torch.float64)
    ys = torch.tensor([p["ms"] for p in small], dtype=torch.float64)
    fit = torch.linalg.lstsq(torch.stack([torch.ones_like(xs), xs], 1), ys[:, None]).solution.flatten()
    out["fit_ms"] = {"fixed_per_layer": float(fit[0]), "per_token": float(fit[1]), "fit_over_tokens_up_to": short}
    for tokens in sorted({p["tokens"] for p in out["points"]}):
        ms = statistics.median(p["ms"] for p in out["points"] if p["tokens"] == tokens)
        print(f"| {tokens} | {ms:.1f} | {100 * float(fit[0]) / ms:.0f}% |")
    print(json.dumps(out["fit_ms"]))


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
