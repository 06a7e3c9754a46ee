"""Which stage of a method loses the video event questions (flash, motion, appear)?
Usage: python results/fidelity/video_event_probe.py MODEL_DIR [N [SPECS]] (twenty-first session;
output in video_event_probe.md). The video families of seed 0's test split (the sweep's generator),
each method at retention 0.25 as users run it and with its in-LLM stage off, beside pool and
random; SPECS, a comma list of method specs (``aim:prune_end=1.0,...``), replaces that list."""
import sys

import torch

from mmaccel.bench.fidelity import compare, evaluate, run_samples
from mmaccel.embedded import load_model
from mmaccel.world import generate_samples

SPECS = ("random", "pool", "fastv", "aim", "aim:prune=false", "aim:pass_fraction=0.25:prune=false",
         "hired", "visionzip", "stc", "mustdrop")
specs = sys.argv[3].split(",") if len(sys.argv) > 3 else SPECS
torch.set_num_threads(2)
model, processor = load_model(sys.argv[1]); model.eval()
samples = generate_samples(int(sys.argv[2]) if len(sys.argv) > 2 else 300, seed=0, split="test",
                           families=["motion", "flash", "appear"])
base = run_samples(model, processor, samples)
full = compare(samples, base, base)["families"]
print("| method | retention | motion | flash | appear | FLOP x |\n|---|---|---|---|---|---|")
print(f"| full | 1.0 | {full['motion']:.3f} | {full['flash']:.3f} | {full['appear']:.3f} | 1.00 |", flush=True)
for spec in specs:
    p = evaluate(model, processor, samples, spec, 0.25, base)
    f = p["families"]
    print(f"| {spec} | 0.25 | {f['motion']:.3f} | {f['flash']:.3f} | {f['appear']:.3f} | {p['flop_ratio']:.2f} |", flush=True)
