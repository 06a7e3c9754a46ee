"""Does stc's score still point at objects on the summary-trained models? On the scenes of
probe 1 of ``results/fidelity/keep_sets.py`` (base tile, 100 still scenes), the share of the 9
lowest STC-Pruner scores on an object: the official score (the low-variance half of the
channels), and the same kernel score on the high-variance half and on all channels.

Usage (from the repository root):
    python results/recipe-cpu/summary_tower/stc_channels_probe.py MODEL_DIR [MODEL_DIR ...]
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fidelity"))
from keep_sets import precision_at, probe_scenes  # noqa: E402

from mmaccel.embedded import load_model  # noqa: E402
from mmaccel.embedded.pretrain import projected_tokens  # noqa: E402
from mmaccel.methods.stc import gaussian_similarity, stc_scores  # noqa: E402


def anchor_score(frame: torch.Tensor, half: str) -> torch.Tensor:
    """stc's kernel score of one image (a one-frame video: temporal anchor = frame anchor) on
    the ``half`` ("high" or "all") of its channels by variance over the tokens."""
    by_var = frame.var(0).argsort()
    channels = by_var[frame.shape[1] // 2:] if half == "high" else by_var
    f = F.normalize(frame[:, channels], dim=-1)
    return 2 * gaussian_similarity(f, f.mean(0))


def main(paths: list[str]) -> None:
    torch.set_num_threads(2)
    for path in paths:
        model, processor = load_model(path)
        pix, on_object = probe_scenes(processor)
        with torch.no_grad():
            feats = projected_tokens(model, pix).float()
        scores = {"low (official)": [stc_scores(f, [])[0] for f in feats],
                  "high": [anchor_score(f, "high") for f in feats], "all": [anchor_score(f, "all") for f in feats]}
        shares = {k: precision_at(-torch.stack(v), on_object) for k, v in scores.items()}
        print(path, {k: round(v, 3) for k, v in shares.items()}, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
