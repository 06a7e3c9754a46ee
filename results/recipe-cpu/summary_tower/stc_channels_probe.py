"""Does stc's score still point at objects on the summary-trained models? On the base tile of
100 still scenes (the keep_sets.py probe set), the share of the 9 lowest STC-Pruner scores on an
object, with the official low-variance half of the channels, the high-variance half, and all.

Usage (from the repository root): python results/recipe-cpu/summary_tower/stc_channels_probe.py MODEL_DIR...
"""
import sys; sys.path.insert(0,'results/fidelity')
import numpy as np, torch, torch.nn.functional as F
torch.set_num_threads(2)
from keep_sets import precision_at
from mmaccel.embedded import load_model
from mmaccel.embedded.pretrain import object_targets, projected_tokens
from mmaccel.methods.stc import gaussian_similarity
from mmaccel.world.samples import SPLIT_KEY, make_sample
rng = np.random.default_rng(np.random.SeedSequence([SPLIT_KEY["test"], 3, 7]))
samples = [make_sample(f, rng, hires=False) for f in ["color", "count", "exists", "where"] * 25]
for path in sys.argv[1:]:
    m, p = load_model(path)
    pix = p.image_processor([s.image for s in samples], return_tensors="pt")["pixel_values"][:, 0]
    on = np.stack([object_targets(s.meta, 6)[:, 0] >= 0 for s in samples])
    with torch.no_grad(): feats = projected_tokens(m, pix).float()
    def score(f, low):
        idx = f.var(0).argsort()
        idx = idx[: f.shape[1] // 2] if low == "low" else (idx[f.shape[1] // 2:] if low == "high" else idx)
        g = F.normalize(f[:, idx], dim=-1); return -(2 * gaussian_similarity(g, g.mean(0)))
    out = {k: precision_at(torch.stack([score(f, k) for f in feats]), on) for k in ("low", "high", "all")}
    print(path, {k: round(v, 3) for k, v in out.items()}, flush=True)
