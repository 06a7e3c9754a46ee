"""aim's in-LLM schedule against flash (twenty-first session; output in video_event_probe.md).
Usage: python results/fidelity/video_event_aim_schedule.py MODEL_DIR (the figures: run 34's model)."""
import sys, torch
from mmaccel.bench.fidelity import evaluate, run_samples
from mmaccel.embedded import load_model
from mmaccel.world import generate_samples
from mmaccel.methods.aim import aim_schedule
torch.set_num_threads(2)
print(aim_schedule(4), aim_schedule(4, 0.5, 1.0), aim_schedule(4, 0.75, 1.0))
model, processor = load_model(sys.argv[1]); model.eval()
samples = generate_samples(300, seed=0, split="test", families=["motion", "flash", "appear"])
base = run_samples(model, processor, samples)
for spec in ("aim:prune_end=1.0", "aim:prune_start=0.75:prune_end=1.0", "aim:prune_start=0.75"):
    p = evaluate(model, processor, samples, spec, 0.25, base)
    print(spec, p["families"]["flash"], round(p["flop_ratio"], 2), flush=True)
