"""Run 29 on its training-only order turns: the object count and the k-th object from the left,
asked as the main question of held-out caption scenes (seed 15), greedy answers.
Usage: python results/recipe-cpu/summary_tower/order_probe.py MODEL_DIR (eighteenth session)"""
import collections, sys
import torch
from dataclasses import replace
from mmaccel.embedded import load_model
from mmaccel.embedded.evaluate import evaluate_samples
from mmaccel.world import generate_samples
from mmaccel.world.followups import ORDER_ORDINALS, ORDER_TEMPLATE, TOTAL_COUNT_QUESTION
torch.set_num_threads(2)
model, processor = load_model(sys.argv[1]); model.eval()
caps = generate_samples(300, seed=15, split="test", families=["caption"])
probes = []
for i, s in enumerate(caps):
    objs = sorted(s.meta["objects"], key=lambda o: o["cx"])
    if i % 2:
        probes.append(replace(s, question=TOTAL_COUNT_QUESTION, answer=str(len(objs))))
    else:
        k = i // 2 % len(objs)
        probes.append(replace(s, question=ORDER_TEMPLATE.format(ordinal=ORDER_ORDINALS[k]),
                              answer=f"a {objs[k]['color']} {objs[k]['shape']}"))
res = evaluate_samples(model, processor, probes, return_answers=True)
right = collections.Counter(); n = collections.Counter()
for p, a in zip(probes, res["answers"]):
    kind = "count" if p.question == TOTAL_COUNT_QUESTION else "position"
    n[kind] += 1; right[kind] += a["gold"] == a["pred"]
print({k: f"{right[k]}/{n[k]} = {right[k]/n[k]:.3f}" for k in n})
