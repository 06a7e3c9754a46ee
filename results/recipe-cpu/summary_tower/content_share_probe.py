"""Share of visual tokens that background dropout's detector flags as content, per model.

The detector (`mmaccel.embedded.dropout.content_tokens`) calls a token content when it lies far
from the blank canvas's token at the same place. It was built for models whose empty tokens
look like empty canvas; a scene-summary tower writes the scene into every token. Usage:
python results/recipe-cpu/summary_tower/content_share_probe.py NAME=MODEL_DIR [...]
(the shipped model when no argument is given). Same batches as the dropout tests (seed 4).
"""
import sys

import torch

from mmaccel.embedded import load_model
from mmaccel.embedded.dropout import MEDIA_KEYS, content_of, encoder_outputs
from mmaccel.embedded.train import GROUPS, TrainConfig, step_batch


def content_share(model, processor, group: str) -> float:
    cfg = TrainConfig(seed=4, batch_size=4, background_dropout=0.9)
    _, batch = step_batch(processor, cfg, 1, {group: GROUPS[group]})
    with torch.no_grad():
        outputs = encoder_outputs(model, {k: batch[k] for k in MEDIA_KEYS if k in batch})
        flags = content_of(model, outputs, batch["blank_media"], rows=batch["input_ids"].shape[0])
    return float(flags.float().mean())


def main(pairs):
    from mmaccel.embedded import DEFAULT_MODEL_DIR

    pairs = pairs or [f"shipped={DEFAULT_MODEL_DIR}"]
    print("| model | image | multi | video8 |\n| --- | --- | --- | --- |")
    for name, path in (p.split("=", 1) for p in pairs):
        model, processor = load_model(path)
        shares = [content_share(model.eval(), processor, g) for g in ("image", "multi", "video8")]
        print(f"| {name} | " + " | ".join(f"{s:.2f}" for s in shares) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
