"""Motion answers by gold direction (seed 15's motion test samples): is a plateau at a loss of
ln(4)/2 the axis or the sign? (twenty-second session; run 35: neither, 0.305 exact, axis 0.50)
Usage: python results/recipe-cpu/summary_tower/motion_confusion.py MODEL [N]"""
import collections, sys
from mmaccel.embedded import load_model
from mmaccel.embedded.evaluate import evaluate_samples
from mmaccel.world import generate_samples
model, processor = load_model(sys.argv[1]); model.eval()
n = int(sys.argv[2]) if len(sys.argv) > 2 else 200
res = evaluate_samples(model, processor, generate_samples(n, seed=15, split="test", families=["motion"]), return_answers=True)
conf = collections.Counter((a["gold"], a["pred"]) for a in res["answers"])
dirs = ["left", "right", "up", "down"]
print("gold \\ pred", *dirs, "other")
for g in dirs:
    row = [conf[(g, p)] for p in dirs]
    print(g, *row, sum(v for (gg, p), v in conf.items() if gg == g and p not in dirs))
axis = lambda d: "h" if d in ("left", "right") else "v"
ok_axis = sum(v for (g, p), v in conf.items() if p in dirs and axis(g) == axis(p))
print("exact", sum(v for (g, p), v in conf.items() if g == p) / n, "axis right", ok_axis / n)
