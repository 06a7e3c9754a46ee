"""Visual-token dropout for stage-2 training (the shipped model used background dropout 0.9).

Three kinds, all as attention-mask holes with positions kept (what the runtime's
``preserve`` position policy does with removed tokens):

- :func:`drop_visual` (``--visual-dropout``): any visual token, uniformly. Some of the
  hidden tokens carry the answer, so part of the training signal asks the impossible.
- background dropout (``--background-dropout``): only tokens that look like the empty
  canvas, i.e. whose projected feature is close to the token a blank image gives at
  the same place. Every answer stays answerable; the model learns that missing empty
  tokens mean nothing, which is what a reduction method that keeps the objects needs
  (a model trained on whole grids reads the grid's layout, see
  ``results/fidelity/keep_sets.md``).
- stop rows (``--stop-rows``, on top of background dropout, :func:`plan_stop_rows`): a share
  of rows hide most tokens, content included, and learn only their eos, so that a finished
  answer ends whatever tokens a reduction left (twelfth session, RECIPE.md).

Randomness is drawn with the batch (:func:`plan_background_dropout`, in ``step_batch``);
which tokens are empty needs the model's features, so it is decided in the training
forward (:func:`forward_with_background_dropout`), from one encoder pass whose output is
handed to the model (``mm_encoder_outputs``) instead of being computed twice.
"""
from __future__ import annotations

import numpy as np

MEDIA_KEYS = ("pixel_values", "image_sizes", "batch_num_images", "pixel_values_videos")
PLAN_KEYS = ("blank_media", "drop_fraction", "drop_priority", "content_fraction")


def check_dropout(max_fraction: float) -> None:
    """Visual dropout must hide less than every token: [0, 1)."""
    if not 0.0 <= max_fraction < 1.0:
        raise ValueError(f"visual dropout must be in [0, 1), got {max_fraction}")


def drop_visual(input_ids, attention_mask, media_ids: list[int], max_fraction: float,
                rng: np.random.Generator, share: float = 0.5):
    """Visual-token dropout: hide a random part of some rows' visual tokens from attention.

    input_ids, attention_mask (B, L). Each row, with probability ``share``, masks a fraction
    u ~ U(0, max_fraction) of its visual positions (``media_ids`` tokens); positions and
    labels stay put, as under the ``preserve`` position policy at inference. Returns a new
    mask (B, L). Why: a language model that always saw every visual token treats any reduced
    set as unfamiliar input (see RECIPE.md); large VLMs tolerate reduction, a tiny one must
    be shown it.
    """
    import torch

    check_dropout(max_fraction)
    mask = attention_mask.clone()
    visual = torch.isin(input_ids, torch.tensor(media_ids))
    for b in range(input_ids.shape[0]):
        if rng.random() >= share:
            continue
        pos = visual[b].nonzero().flatten().numpy()
        n = int(round(float(rng.uniform(0.0, max_fraction)) * len(pos)))
        mask[b, rng.choice(pos, size=n, replace=False)] = 0
    return mask


def plan_background_dropout(processor, samples, batch, max_fraction: float, rng: np.random.Generator,
                            share: float = 0.5) -> None:
    """Add the random part of background dropout to an encoded ``batch`` (in place).

    ``blank_media``: the first sample's media as a blank canvas, encoded alone (every row
    of a batch has the same token layout: one group per batch). ``drop_fraction`` (B,):
    u ~ U(0, max_fraction) for a ``share`` of the rows, else 0. ``drop_priority`` (B, L):
    uniform numbers; the lowest-priority empty tokens of a row are hidden first.
    """
    import torch

    from .data import blanked, encode_prompts

    check_dropout(max_fraction)
    blank = encode_prompts(processor, [blanked(samples[0])])
    rows, length = batch["input_ids"].shape
    picked = rng.random(rows) < share
    batch["blank_media"] = {k: blank[k] for k in MEDIA_KEYS if k in blank}
    batch["drop_fraction"] = torch.tensor(np.where(picked, rng.uniform(0.0, max_fraction, rows), 0.0))
    batch["drop_priority"] = torch.from_numpy(rng.random((rows, length)))
    batch["content_fraction"] = torch.zeros(rows, dtype=torch.float64)


def plan_stop_rows(batch, eos_id: int, share: float, rng: np.random.Generator,
                   content_max: float = 0.9) -> None:
    """Stop rows (``--stop-rows``), on a batch planned by :func:`plan_background_dropout`.

    A ``share`` of the rows hide 80-100% of their empty tokens and a share U(0, content_max) of
    their content tokens (at least one content token stays), and keep only their eos labels:
    those rows teach the language model to end a finished answer whatever visual tokens are
    left, without asking it to answer from evidence that may be gone. Why: on reduced token
    sets that keep a few object tokens and no background (hired, stc at low retention) the
    models answered the first word right and then ran on without an eos (twelfth session,
    RECIPE.md). Own random stream, so the other rows' plan is unchanged.
    """
    import torch

    picked = torch.from_numpy(rng.random(len(batch["drop_fraction"])) < share)
    background = torch.from_numpy(rng.uniform(0.8, 1.0, len(picked)))
    content = torch.from_numpy(rng.uniform(0.0, content_max, len(picked)))
    batch["drop_fraction"] = torch.where(picked, background, batch["drop_fraction"])
    batch["content_fraction"] = torch.where(picked, content, batch["content_fraction"])
    labels = batch["labels"]
    labels[picked[:, None] & (labels != eos_id)] = -100


def encoder_outputs(model, media: dict) -> dict:
    """The model's own encoder call (tower + projector) on ``media`` (the processor's pixel
    keys), as the ``mm_encoder_outputs`` its forward accepts: {"image" | "video": output}."""
    inner = model.model
    if "pixel_values_videos" in media:
        return {"video": inner.get_video_features(media["pixel_values_videos"], return_dict=True)}
    return {"image": inner.get_image_features(media["pixel_values"], media["image_sizes"],
                                              batch_num_images=media.get("batch_num_images"), return_dict=True)}


def flat_tokens(outputs: dict):
    """(N, D) visual tokens in the order the model scatters them into the sequence."""
    kind, out = next(iter(outputs.items()))
    if kind == "video":
        return out.pooler_output.flatten(0, 1)
    import torch

    return torch.cat(list(out.pooler_output), dim=0)


def content_tokens(tokens, blank, rows: int, rel: float = 0.15):
    """Bool (N,): tokens (N, D) that differ from the blank canvas's token at the same place.

    ``blank`` (N / rows, D) is one row's blank tokens. The cut is relative (``rel`` x the
    95th percentile of the distances) because token norms grow during training. On the
    shipped model empty tokens lie 0.1-1.3 from their blank token, object tokens 4-29.
    """
    dist = (tokens - blank.repeat(rows, 1)).norm(dim=-1)
    return dist > rel * dist.float().quantile(0.95)


def content_of(model, outputs: dict, blank_media: dict, rows: int):
    """Bool (N,) content flags of the visual tokens in ``outputs`` (see :func:`encoder_outputs`),
    against the encoded ``blank_media`` of one row (no gradients)."""
    import torch

    with torch.no_grad():
        blank = flat_tokens(encoder_outputs(model, blank_media))
        return content_tokens(flat_tokens(outputs).detach(), blank, rows)


def media_token_ids(model) -> list[int]:
    """The image and video placeholder ids of ``model``."""
    return [model.config.image_token_id, model.config.video_token_id]


def background_mask(input_ids, attention_mask, media_ids: list[int], content, fraction, priority,
                    content_fraction=None):
    """Attention mask (B, L) with ``fraction[b]`` of row b's empty visual tokens hidden, and
    ``content_fraction[b]`` of its content tokens (all but at least one; stop rows).

    content (N,) flags the visual tokens in row-major order; fraction, content_fraction (B,);
    priority (B, L).
    """
    import torch

    visual = torch.isin(input_ids, torch.tensor(media_ids, device=input_ids.device))
    empty = torch.zeros_like(visual)
    empty[visual] = ~content
    filled = visual & ~empty
    mask = attention_mask.clone()
    for b in range(input_ids.shape[0]):
        _hide(mask[b], empty[b], float(fraction[b]), priority[b])
        if content_fraction is not None:
            _hide(mask[b], filled[b], float(content_fraction[b]), priority[b], keep=1)
    return mask


def _hide(mask_row, candidates, fraction: float, priority_row, keep: int = 0) -> None:
    """Zero ``fraction`` of the ``candidates`` (L,) bool positions of ``mask_row`` (L,), lowest
    ``priority_row`` first, leaving at least ``keep`` of them."""
    pos = candidates.nonzero().flatten()
    n = min(int(round(fraction * len(pos))), max(0, len(pos) - keep))
    if n:
        mask_row[pos[priority_row[pos].argsort()[:n]]] = 0


def forward_with_background_dropout(model, batch):
    """Model output on ``batch`` (planned by :func:`plan_background_dropout`, labels
    removed) with the planned share of each row's empty visual tokens hidden."""
    plan = {k: batch.pop(k) for k in PLAN_KEYS}
    batch = batch.to(model.device)
    media = {k: batch.pop(k) for k in MEDIA_KEYS if k in batch}
    blank_media = {k: v.to(model.device) for k, v in plan["blank_media"].items()}
    outputs = encoder_outputs(model, media)  # gradients reach the projector through these
    content = content_of(model, outputs, blank_media, rows=batch["input_ids"].shape[0])
    mask = background_mask(batch["input_ids"], batch["attention_mask"], media_token_ids(model),
                           content, plan["drop_fraction"], plan["drop_priority"].to(model.device),
                           plan["content_fraction"])
    return model(input_ids=batch["input_ids"], attention_mask=mask, mm_encoder_outputs=outputs, use_cache=False)
