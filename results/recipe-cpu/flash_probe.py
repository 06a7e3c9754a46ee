"""Does the flashing object's absence reach the language model? (issue 3, `flash` at chance)

For held-out flash videos, take the pooled video token (3 x 3 per frame, what the LM reads)
of the cell holding the flashing object's centre, in every frame, and ask whether the frames
where the object is hidden stand out: (a) AUROC of the token's distance from that cell's
median token over the video (no training); (b) a linear probe present / absent on the token,
fitted on 150 videos and scored on 150 others. Also the same for the tokens of a cell with no
object (control: should be at 0.5 / the majority share).

Usage: python results/recipe-cpu/flash_probe.py [MODEL_DIR]
"""
import sys

import numpy as np
import torch

from mmaccel.embedded import DEFAULT_MODEL_DIR, load_model
from mmaccel.embedded.probe import linear_probe
from mmaccel.world.samples import SPLIT_KEY, make_sample


def pooled_frames(model, processor, frames) -> torch.Tensor:
    """(T, 9, D) projected and pooled tokens of one video, as get_video_features builds them."""
    pix = processor.video_processor([frames], return_tensors="pt")["pixel_values_videos"][0]
    with torch.no_grad():
        hidden = model.model.vision_tower(pix, output_hidden_states=True).hidden_states[-1]
        return model.model.apply_pooling(model.model.multi_modal_projector(hidden)).float()


def cell_of(centre, side: float) -> int:
    """Row-major index of the 3 x 3 pooled cell holding the (x, y) ``centre`` (objects are static)."""
    x, y = centre
    return int(y * 3 // side) * 3 + int(x * 3 // side)


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a positive scores above a negative), ties half."""
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def collect(model, processor, n: int, seed: int):
    rng = np.random.default_rng(np.random.SeedSequence([SPLIT_KEY["test"], seed, 11]))
    rows = {"x": [], "hidden": [], "dist": [], "ctrl_dist": []}
    for _ in range(n):
        s = make_sample("flash", rng)
        obj = s.meta["objects"][0]
        tok = pooled_frames(model, processor, s.frames)
        side = s.meta["side"]
        cell = cell_of(obj["start"], side)
        used = {cell_of(o["start"], side) for o in s.meta["objects"]}
        free = [c for c in range(9) if c not in used]
        x = tok[:, cell]
        rows["x"].append(x)
        rows["hidden"].append(~np.asarray(obj["visible"], bool))
        rows["dist"].append((x - x.median(0).values).norm(dim=-1).numpy())
        if free:
            y = tok[:, free[0]]
            rows["ctrl_dist"].append((y - y.median(0).values).norm(dim=-1).numpy())
    return rows


if __name__ == "__main__":
    torch.set_num_threads(2)
    model, processor = load_model(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_MODEL_DIR)
    tr, te = (collect(model, processor, 150, seed) for seed in (0, 1))
    hid = np.concatenate(te["hidden"])
    dist = np.concatenate(te["dist"])
    print(f"frames {hid.size}, hidden share {hid.mean():.3f}")
    print(f"(a) distance from the cell's median token, AUROC hidden vs shown: {auroc(dist[hid], dist[~hid]):.3f}")
    ctrl = np.concatenate(te["ctrl_dist"])
    print(f"    control cell (no object) distance: mean {ctrl.mean():.4f} vs object cell shown "
          f"{dist[~hid].mean():.4f} / hidden {dist[hid].mean():.4f}")
    pred = linear_probe(torch.cat(tr["x"]), np.concatenate(tr["hidden"]).astype(int), torch.cat(te["x"]))
    acc = (np.asarray(pred) == hid.astype(int)).mean()
    print(f"(b) linear probe present/absent on the object cell's token: accuracy {acc:.3f} "
          f"(majority {max(hid.mean(), 1 - hid.mean()):.3f})")
