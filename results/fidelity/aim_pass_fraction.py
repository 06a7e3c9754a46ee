"""aim on the shipped model, n=900 seed 0 (the sweep's samples): official pass_fraction 0.5 vs 0.25,
with its in-LLM prune as users run it. Usage: python results/fidelity/aim_pass_fraction.py
(eighteenth session; output in aim_pass_fraction.md)."""
import torch
from mmaccel.api import accelerate_vlm
from mmaccel.bench.fidelity import run_samples, compare
from mmaccel.embedded import load_default_model
from mmaccel.world import generate_samples
from mmaccel.world.spec import MODEL_FAMILIES
torch.set_num_threads(2)
model, processor = load_default_model(); model.eval()
samples = generate_samples(900, seed=0, split="test", families=list(MODEL_FAMILIES))
base = run_samples(model, processor, samples)
full = compare(samples, base, base)["aggregates"]["all"]
print("full", round(full, 3))
for retention in (0.25, 0.11):
    for frac in (0.5, 0.25):
        with accelerate_vlm(model, method="aim", retention=retention, pass_fraction=frac) as h:
            run = run_samples(model, processor, samples, handle=h)
        c = compare(samples, base, run)
        print(f"retention {retention} pass_fraction {frac}: all {c['aggregates']['all']:.3f} kept {c['aggregates']['all'] / full:.3f} "
              f"flop x {c['flop_ratio']:.2f} small {c['subsets']['small_objects']:.3f} counting {c['subsets']['counting']:.3f}", flush=True)
