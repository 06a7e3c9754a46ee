"""What does MustDrop's window merge cost? (issue 4; ninth session)

MustDrop merges similar 3x3 windows after the tower's first layer (official threshold 0.8) and
then prunes in the language model down to ``retention`` of the tokens *at the LLM's input*, so
with the merge on it ends under the common budget (about 20 visual tokens per sample at 0.25
where the other methods keep 25). This runs mustdrop with the merge on (the official default)
and off at 0.25 and 0.11 on the same held-out samples and prints the share of full accuracy
kept, caption accuracy, the visual tokens left at the last layer and the analytic FLOP ratio.

Usage: python results/fidelity/mustdrop_window_merge.py MODEL_DIR [--n 450]
"""
import argparse

from mmaccel.api import accelerate_vlm
from mmaccel.bench.fidelity import compare, run_samples
from mmaccel.embedded import load_model
from mmaccel.embedded.evaluate import summarize
from mmaccel.world.samples import generate_samples
from mmaccel.world.spec import MODEL_FAMILIES


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--n", type=int, default=450)
    a = p.parse_args()
    model, processor = load_model(a.model)
    samples = generate_samples(a.n, seed=0, split="test", families=MODEL_FAMILIES)
    base = run_samples(model, processor, samples)
    full = summarize(samples, base.answers)["aggregates"]["all"]["accuracy"]
    print(f"model {a.model}, n={a.n}, full-token accuracy {full:.3f}")
    print("| retention | window merge | kept | caption | visual tokens, last layer | FLOP x |")
    print("| --- | --- | --- | --- | --- | --- |")
    for retention in (0.25, 0.11):
        for merge in (True, False):
            with accelerate_vlm(model, method="mustdrop", retention=retention, window_merge=merge) as handle:
                c = compare(samples, base, run_samples(model, processor, samples, handle=handle))
            print(f"| {retention} | {'on' if merge else 'off'} | {c['aggregates']['all'] / full:.3f} | "
                  f"{c['families']['caption']:.2f} | {c['visual_tokens_per_layer_per_sample'][-1]:.1f} | "
                  f"{c['flop_ratio']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
