"""How precisely do object-centre visual tokens carry their object's x? Ridge probe from the
projected base-tile token of the cell holding an object's centre to the object's x (px, 144 px
images), fitted on train scenes, scored on test scenes.
Usage: python results/recipe-cpu/summary_tower/x_probe.py MODEL_DIR [...] (eighteenth session)"""
import sys
import numpy as np
import torch
from mmaccel.embedded import load_model
from mmaccel.world import generate_samples
torch.set_num_threads(2)

def rows(model, processor, samples):
    feats, xs, offs = [], [], []
    for k in range(0, len(samples), 32):
        chunk = samples[k:k + 32]
        pix = processor.image_processor([s.image for s in chunk], return_tensors="pt")["pixel_values"][:, 0]
        with torch.no_grad():
            h = model.model.vision_tower(pix).last_hidden_state
            t = model.model.multi_modal_projector(h)  # (B, 36, D)
        for s, tok in zip(chunk, t):
            side = s.meta["side"]
            for o in s.meta["objects"]:
                cx, cy = o["cx"] * 144 / side, o["cy"] * 144 / side
                cell = int(cy // 24) * 6 + int(cx // 24)
                feats.append(tok[cell].numpy()); xs.append(cx); offs.append(cx - (int(cx // 24) * 24 + 12))
    return np.array(feats), np.array(xs), np.array(offs)

for path in sys.argv[1:]:
    model, processor = load_model(path); model.eval()
    fams = ["caption", "count", "color"]
    tr = rows(model, processor, generate_samples(900, seed=21, split="train", families=fams))
    te = rows(model, processor, generate_samples(300, seed=15, split="test", families=fams))
    X = np.c_[tr[0], np.ones(len(tr[0]))]; w = np.linalg.solve(X.T @ X + 1e-2 * np.eye(X.shape[1]), X.T @ tr[2])
    pred = np.c_[te[0], np.ones(len(te[0]))] @ w
    err = np.abs(pred - te[2])
    print(path, f"objects train {len(tr[0])} test {len(te[0])}; in-cell x offset: MAE {err.mean():.1f} px, "
          f"median {np.median(err):.1f}, 90th pct {np.percentile(err, 90):.1f} (offset spread {np.abs(te[2]).mean():.1f} px)", flush=True)
