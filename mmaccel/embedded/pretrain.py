"""Stage 1: dense patch pre-training of the vision tower and projector.

Before the VLM is trained end to end, the SigLIP tower and the projector learn to
describe each patch of a tile, from labels computed from the scene metadata:

- ``cls`` (G*G,): 0 = empty, 1 + shape * 4 + color for the object whose centre lies in
  the cell, 13 = part of an object whose centre is elsewhere, 14 = part of a digit
  string, 15 + d for the cell holding the centre of digit ``d``;
- ``pos`` (G*G, 2): where the cell's content is, as (x, y) / side in [0, 1]: the object
  centre for object-centre cells, else the cell centre (so tokens carry 2-D position).

A temporary linear head reads the projected features (the tokens the language model
will see); it is discarded afterwards, so the saved model stays a stock checkpoint.
An alignment term also scores each object-centre (digit-centre) token against the
language model's own word embeddings of its color and shape (digit), so that visual
tokens start out close to the words that name them (a dense form of LLaVA's
alignment stage). This shortens the "ignore the image" plateau of training from scratch.
"""
from __future__ import annotations

import time

import numpy as np

from ..world.images import COLOR_NAMES
from ..world.samples import SPLIT_KEY, make_sample
from ..world.spec import SHAPES

N_CLASSES = 25


def digit_centres(meta: dict) -> list[tuple[str, float, float]]:
    """(digit, x, y) pixel centres of each character of the scene's digit string."""
    from ..world.scene import font

    if not meta.get("text"):
        return []
    fnt, text = font(meta["text_px"]), meta["text"]
    x0, y0, x1, y1 = meta["text_box"]
    bx0 = fnt.getbbox(text)[0]
    out = []
    for i, ch in enumerate(text):
        left = x0 - bx0 + fnt.getlength(text[:i])
        out.append((ch, left + fnt.getlength(ch) / 2, (y0 + y1) / 2))
    return out


def cell_of(x: float, y: float, side: int, grid: int) -> int:
    """Row-major index of the grid cell that holds pixel (x, y)."""
    cx, cy = min(int(x * grid / side), grid - 1), min(int(y * grid / side), grid - 1)
    return cy * grid + cx


def patch_targets(meta: dict, grid: int):
    """(cls (G*G,) int64, pos (G*G, 2) float32) for one still scene."""
    side, cell = meta["side"], meta["side"] / grid
    cls = np.zeros(grid * grid, np.int64)
    centers = np.stack(np.meshgrid(np.arange(grid), np.arange(grid)), -1).reshape(-1, 2) * cell + cell / 2
    pos = (centers / side).astype(np.float32)
    if meta.get("text_box"):
        x0, y0, x1, y1 = meta["text_box"]
        inside = (centers[:, 0] >= x0 - cell / 2) & (centers[:, 0] <= x1 + cell / 2) & \
                 (centers[:, 1] >= y0 - cell / 3) & (centers[:, 1] <= y1 + cell / 3)
        cls[inside] = 14
    for o in meta["objects"]:
        near = np.abs(centers - [o["cx"], o["cy"]]).max(1) < o["size"] / 2 + cell / 2 - 2
        cls[near & (cls == 0)] = 13
    for o in meta["objects"]:
        i = cell_of(o["cx"], o["cy"], side, grid)
        cls[i] = 1 + SHAPES.index(o["shape"]) * len(COLOR_NAMES) + COLOR_NAMES.index(o["color"])
        pos[i] = [o["cx"] / side, o["cy"] / side]
    for ch, x, y in digit_centres(meta):
        i = cell_of(x, y, side, grid)
        cls[i], pos[i] = 15 + int(ch), [x / side, y / side]
    return cls, pos


def vision_batch(processor, rng: np.random.Generator, n: int, grid: int):
    """Pixel tiles (n, 3, S, S) with stacked patch targets from random normal-size scenes."""
    import torch

    samples = [make_sample("caption", rng, hires=False) for _ in range(n)]
    pix = processor.image_processor([s.image for s in samples], return_tensors="pt")["pixel_values"][:, 0]
    tg = [patch_targets(s.meta, grid) for s in samples]
    return pix, *(torch.from_numpy(np.stack(t)) for t in zip(*tg))


def word_ids(tokenizer) -> dict[str, list[int]]:
    """Token ids of the color, shape and digit words, in class order."""
    ids = lambda words: tokenizer.convert_tokens_to_ids(list(words))  # noqa: E731
    return {"color": ids("\u2581" + c for c in COLOR_NAMES), "shape": ids("\u2581" + s for s in SHAPES),
            "digit": ids(str(d) for d in range(10))}


def word_targets(cls):
    """Per-cell color / shape / digit class (-1 where none) from the cell classes (n, G*G)."""
    import torch

    obj = (cls >= 1) & (cls <= 12)
    none = torch.full_like(cls, -1)
    color = torch.where(obj, (cls - 1) % len(COLOR_NAMES), none)
    shape = torch.where(obj, (cls - 1) // len(COLOR_NAMES), none)
    digit = torch.where(cls >= 15, cls - 15, none)
    return {"color": color, "shape": shape, "digit": digit}


def alignment_loss(model, feats, cls, words: dict) -> "torch.Tensor":
    """CE of token features against the word embeddings naming their content."""
    import torch.nn.functional as F

    emb = model.get_input_embeddings().weight
    loss = 0.0
    for kind, target in word_targets(cls).items():
        if (target >= 0).any():
            logits = feats @ emb[words[kind]].T  # (n, G*G, n_words)
            loss = loss + F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-1)
    return loss


def projected_tokens(model, pix):
    """(n, 3, S, S) tiles -> (n, G*G, D) projected tokens: what the LLM will read (LLaVA-OV's
    feature layer -1 is the last hidden state before SigLIP's post-layernorm)."""
    hidden = model.model.vision_tower(pix, output_hidden_states=True).hidden_states[-1]
    return model.model.multi_modal_projector(hidden)


def patch_loss(model, head, pix, cls, pos, words=None):
    """Cross-entropy on cell classes, 4 x L1 on content positions, word alignment."""
    import torch.nn.functional as F

    feats = projected_tokens(model, pix)
    out = head(feats)  # (n, G*G, N_CLASSES + 2)
    ce = F.cross_entropy(out[..., :N_CLASSES].flatten(0, 1), cls.flatten())
    l1 = 4.0 * (out[..., N_CLASSES:].sigmoid() - pos).abs().sum(-1).mean()
    align = alignment_loss(model, feats, cls, words) if words else 0.0
    acc = (out[..., :N_CLASSES].argmax(-1) == cls).float().mean()
    return ce + l1 + align, acc.item(), l1.item() / 4.0


def pretrain_vision(model, processor, seed: int, steps: int, batch_size: int = 48, lr: float = 2e-3,
                    log=print) -> float:
    """Train tower + projector for ``steps`` on patch targets; returns final cell accuracy."""
    import torch

    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    head = torch.nn.Linear(model.config.text_config.hidden_size, N_CLASSES + 2)
    params = list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())
    params.append(model.get_input_embeddings().weight)
    words = word_ids(processor.tokenizer)
    opt = torch.optim.AdamW(params + list(head.parameters()), lr=lr, weight_decay=0.01)
    t0, accs, errs = time.time(), [], []
    for step in range(steps):
        rng = np.random.default_rng(np.random.SeedSequence([SPLIT_KEY["train"], seed, step, 2]))
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + np.cos(np.pi * step / steps))
        loss, acc, err = patch_loss(model, head, *vision_batch(processor, rng, batch_size, grid), words=words)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        accs.append(acc)
        errs.append(err)
        if (step + 1) % 50 == 0:
            log(f"vision pretrain step {step + 1}/{steps} loss {loss.item():.4f} "
                f"cell acc {np.mean(accs[-50:]):.3f} pos err {np.mean(errs[-50:]):.4f} "
                f"t {time.time() - t0:.0f}s")
    return float(np.mean(accs[-50:])) if accs else 0.0


def rescale_projector(model, processor, seed: int, target_norm: float = 1.0, n: int = 32) -> float:
    """Scale the projector's output layer so visual tokens have mean L2 norm ``target_norm``.

    The alignment term grows the projected features to norms of 20-40, against about
    0.3 for the word embeddings. Tokens that large are nearly frozen in the language
    model's residual stream (each layer adds an O(1) update), so the LM could not
    write question information into them. One linear rescale keeps every direction.
    Returns the factor applied.
    """
    import torch

    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    rng = np.random.default_rng(np.random.SeedSequence([SPLIT_KEY["train"], seed, 3]))
    pix = vision_batch(processor, rng, n, grid)[0]
    proj = model.model.multi_modal_projector
    with torch.no_grad():
        factor = target_norm / projected_tokens(model, pix).norm(dim=-1).mean().item()
        proj.linear_2.weight.mul_(factor)
        if proj.linear_2.bias is not None:
            proj.linear_2.bias.mul_(factor)
    return factor
