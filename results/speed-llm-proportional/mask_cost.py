"""What the proportional-attention mask costs a prefill, isolated from everything else.

The decoder of `mmaccel bench speed` (LLaVA-1.5-shaped, 0.5B) runs on random embeddings of the
lengths an accelerated prefill has (aim's input at retention 0.25 / 0.11 and the full prompt),
once as transformers runs it (no padding: SDPA's `is_causal`, no mask) and once through
mmaccel's attention wrapper with a per-key log(size) bias (the additive mask
`scoring.with_key_bias` builds), alternating, 1 thread. Prints and writes `mask_cost.json`.
Run from the repository root: `python results/speed-llm-proportional/mask_cost.py`.
"""
import json
import statistics
import time
from pathlib import Path

import torch

from mmaccel.bench.speed import LLAVA15_TEXT, build_llava15_shaped, environment
from mmaccel.scoring import register_wrapper

LENGTHS = {"aim input at 0.25": 184, "aim input at 0.11": 103, "full prompt": 616}
REPEATS = 7


def prefill_ms(lm, embeds, bias: bool) -> float:
    for layer in lm.layers:  # the wrapper reads the bias off each attention module, as in a run
        layer.self_attn._mmaccel_key_bias = torch.full(embeds.shape[:2], 1.0986) if bias else None
    start = time.perf_counter()
    with torch.no_grad():
        lm(inputs_embeds=embeds, use_cache=False)
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    torch.set_num_threads(1)
    model, _ = build_llava15_shaped(LLAVA15_TEXT)
    cfg = model.config.text_config
    cfg._attn_implementation_internal = register_wrapper(cfg._attn_implementation or "sdpa")
    lm, rows = model.model.language_model, []
    for label, length in LENGTHS.items():
        embeds = torch.randn(1, length, cfg.hidden_size)
        plain, biased = [], []
        prefill_ms(lm, embeds, False)  # warm-up
        prefill_ms(lm, embeds, True)
        for _ in range(REPEATS):
            plain.append(prefill_ms(lm, embeds, False))
            biased.append(prefill_ms(lm, embeds, True))
        row = {"case": label, "tokens": length, "plain_ms": statistics.median(plain),
               "bias_ms": statistics.median(biased)}
        row["cost"] = row["bias_ms"] / row["plain_ms"] - 1
        rows.append(row)
        print(f"{label} ({length} tokens): plain {row['plain_ms']:.1f} ms, with the bias "
              f"{row['bias_ms']:.1f} ms ({100 * row['cost']:+.1f}%)")
    out = {"environment": environment(1), "repeats": REPEATS, "rows": rows}
    Path(__file__).with_name("mask_cost.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
