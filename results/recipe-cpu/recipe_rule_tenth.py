"""Apply the tenth-session rule (RECIPE.md) to the seed-13 evaluations."""
import json, sys
runs = {9: "run 9 (shipped)", 10: "run 10 (bg, seed 0)", 12: "run 12 (bg, seed 1)", 13: "run 13 (bg, seed 2)"}
ev = {r: json.load(open(f"results/recipe-cpu/eval_tenth_seed13_n1800_run{r}.json")) for r in runs}
def acc(e, k):
    return (e["families"].get(k) or e["aggregates"][k])["accuracy"]
fams = list(ev[9]["families"])
rows = fams + ["image_questions", "video", "all"]
bg = [10, 12, 13]
print("| family | " + " | ".join(runs.values()) + " | bg mean |")
print("|---" * (len(runs) + 2) + "|")
for k in rows:
    vals = [acc(ev[r], k) for r in runs]
    print(f"| {k} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {sum(acc(ev[r], k) for r in bg) / 3:.3f} |")
base = {k: acc(ev[9], k) for k in rows}
mean = {k: sum(acc(ev[r], k) for r in bg) / 3 for k in rows}
a = mean["all"] >= base["all"] - 0.010
b = all(mean[k] >= base[k] - 0.030 for k in ("image_questions", "video", "caption"))
print(f"\n(a) mean overall {mean['all']:.4f} >= {base['all'] - 0.01:.4f}: {a}")
print("(b) " + ", ".join(f"{k} {mean[k]:.3f} >= {base[k] - 0.03:.3f}" for k in ("image_questions", "video", "caption")) + f": {b}")
if a and b:
    ok = [r for r in bg if all(acc(ev[r], k) >= base[k] - 0.050 for k in fams)]
    for r in bg:
        worst = min(fams, key=lambda k: acc(ev[r], k) - base[k])
        print(f"run {r}: worst family vs run 9: {worst} {acc(ev[r], worst) - base[worst]:+.3f}; qualifies: {r in ok}")
    print("ship:", max(ok, key=lambda r: acc(ev[r], "all")) if ok else "run 9 stays (no seed qualifies)")
else:
    print("ship: run 9 stays (the recipe fails the rule)")
