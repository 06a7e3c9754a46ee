"""Visual-token dropout for stage-2 training (the shipped model used background dropout 0.9).

Four kinds, all as attention-mask holes with positions kept (what the runtime's
``preserve`` position policy does with removed tokens):

- :func:`drop_visual` (``--visual-dropout``): any visual token, uniformly. Some of the
  hidden tokens carry the answer, so part of the training signal asks the impossible.
- background dropout (``--background-dropout``): only tokens that look like the empty
  canvas. Two detectors (``--content-from``): ``features`` (runs 13-23) calls a token empty
  when its projected feature is close to the token a blank image gives at the same place;
  ``pixels`` calls it empty when every pixel of the patches it is built from has its
  image's background colour. The feature test fails on scene-summary towers, which write
  the scene into every token (it flags 92-99% of tokens there, sixteenth session); the
  pixel test does not depend on the model's weights. Every answer stays answerable; the model learns that missing empty
  tokens mean nothing, which is what a reduction method that keeps the objects needs
  (a model trained on whole grids reads the grid's layout, see
  ``results/fidelity/keep_sets.md``).
- stop rows (``--stop-rows``, on top of background dropout, :func:`plan_stop_rows`): a share
  of rows hide most tokens, content included, and learn only their eos, so that a finished
  answer ends whatever tokens a reduction left (twelfth session, RECIPE.md).
- content dropout (``--content-dropout``, on top of background dropout,
  :func:`plan_content_dropout`): a share of rows hide part of their content tokens and keep
  their answers (twenty-eighth session).

Randomness is drawn with the batch (:func:`plan_background_dropout`, in ``step_batch``);
which tokens are empty needs the model's features, so it is decided in the training
forward (:func:`forward_with_background_dropout`), from one encoder pass whose output is
handed to the model (``mm_encoder_outputs``) instead of being computed twice.
"""
from __future__ import annotations

import numpy as np

MEDIA_KEYS = ("pixel_values", "image_sizes", "batch_num_images", "pixel_values_videos")
PLAN_KEYS = ("blank_media", "drop_fraction", "drop_priority", "content_fraction", "content_from")
CONTENT_FROM = ("features", "pixels")


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
                            share: float = 0.5, content_from: str = "features") -> None:
    """Add the random part of background dropout to an encoded ``batch`` (in place).

    ``content_from``: which detector the forward uses (see the module docstring).
    ``blank_media`` (features only): the first sample's media as a blank canvas, encoded
    alone (every row of a batch has the same token layout: one group per batch). ``drop_fraction`` (B,):
    u ~ U(0, max_fraction) for a ``share`` of the rows, else 0. ``drop_priority`` (B, L):
    uniform numbers; the lowest-priority empty tokens of a row are hidden first.
    """
    import torch

    from .data import blanked, encode_prompts

    check_dropout(max_fraction)
    check_content_from(content_from)
    rows, length = batch["input_ids"].shape
    picked = rng.random(rows) < share
    if content_from == "features":
        blank = encode_prompts(processor, [blanked(samples[0])])
        batch["blank_media"] = {k: blank[k] for k in MEDIA_KEYS if k in blank}
    batch["content_from"] = content_from
    batch["drop_fraction"] = torch.tensor(np.where(picked, rng.uniform(0.0, max_fraction, rows), 0.0))
    batch["drop_priority"] = torch.from_numpy(rng.random((rows, length)))
    batch["content_fraction"] = torch.zeros(rows, dtype=torch.float64)


def plan_content_dropout(batch, max_fraction: float, share: float, rng: np.random.Generator) -> None:
    """Content dropout (``--content-dropout``), on a batch planned by :func:`plan_background_dropout`:
    a ``share`` of the rows hide a share u ~ U(0, max_fraction) of their content tokens (at least
    one stays) and keep every label, so the model answers from a scene with part of its objects'
    tokens gone, as it must under a reduction that keeps a quarter of the tokens (most scenes
    hold more content than that). In a 15-minute fine-tune of run 31 this lifted the kept share of
    random, aim and fastv by 2-5 points and left the content-rich selectors (hired, visionzip,
    stc, mustdrop) where they were (``results/recipe-cpu/summary_tower/content_dropout/``).
    Own random stream; stop rows planned after it override their rows."""
    import torch

    check_dropout(max_fraction)
    rows = len(batch["drop_fraction"])
    picked = rng.random(rows) < share
    batch["content_fraction"] = torch.tensor(np.where(picked, rng.uniform(0.0, max_fraction, rows), 0.0))


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


def check_content_from(name: str) -> None:
    """Background dropout's detector must be one of :data:`CONTENT_FROM`."""
    if name not in CONTENT_FROM:
        raise ValueError(f"content detector must be one of {CONTENT_FROM}, got {name!r}")


def patch_content(pixels, patch: int, tol: float = 0.02):
    """Float (n, P) 1.0 where a patch holds a pixel off its image's background colour.

    pixels (n, C, H, W), processor-normalised, one image or frame per row; P = (H / patch) x
    (W / patch) in row-major order, as the vision tower flattens its patches. The background
    is each row's most frequent colour (objects cover under half of any world image), counted
    on a grid of about 36 x 36 pixels (counting every pixel cost a tenth of run 24's training
    steps); ``tol`` absorbs resampling's rounding on the base tile of a high-resolution image.
    """
    n, c, h, w = pixels.shape
    stride = max(1, min(h, w) // 36)
    background = _mode_colour(pixels[:, :, ::stride, ::stride])  # (n, C)
    off = (pixels - background[:, :, None, None]).abs().amax(1) > tol  # (n, H, W)
    cells = off.view(n, h // patch, patch, w // patch, patch).any(4).any(2)
    return cells.flatten(1).float()


def _mode_colour(pixels):
    """(n, C) the most frequent colour of each image (n, C, H, W), counted on 8-bit codes of
    its channels (one integer per pixel, so ``torch.mode`` sorts scalars, not rows)."""
    import torch

    lo, hi = pixels.amin(), pixels.amax()
    levels = ((pixels - lo) / (hi - lo).clamp_min(1e-6) * 255).round().long()  # (n, C, H, W)
    code = torch.zeros_like(levels[:, 0])
    for ch in range(pixels.shape[1]):
        code = code * 256 + levels[:, ch]
    where = (code.flatten(1) == code.flatten(1).mode(dim=1).values[:, None]).float().argmax(1)
    return pixels.flatten(2)[torch.arange(len(pixels)), :, where]


def pixel_content(model, media: dict):
    """Bool (N,) content flags of the visual tokens of ``media`` (the processor's pixel keys),
    from pixels alone, in the order the model scatters its tokens (:func:`flat_tokens`).

    The patch flags go through the model's own layout code (anyres packing and unpadding for
    images, 2 x 2 pooling for video) in place of features, with a 0 newline; a pooled token is
    content when any of its patches is.
    """
    import torch

    inner, vision = model.model, model.config.vision_config
    if "pixel_values_videos" in media:
        video = media["pixel_values_videos"]
        flags = patch_content(video.flatten(0, 1).float(), vision.patch_size)
        pooled = inner.apply_pooling(flags[..., None]).reshape(video.shape[0], -1)
        newline = pooled.new_zeros(video.shape[0], 1)
        return torch.cat([pooled, newline], dim=1).flatten() > 0
    crops = _image_crops(model, media)
    flags = [patch_content(c.float(), vision.patch_size)[..., None] for c in crops]
    packed, _ = inner.pack_image_features(flags, media["image_sizes"], image_newline=flags[0].new_zeros(1),
                                          vision_aspect_ratio=model.config.vision_aspect_ratio)
    return torch.cat(packed).flatten() > 0


def _image_crops(model, media: dict) -> list:
    """Per image, its (crops, C, H, W) pixels as the model's ``get_image_features`` splits them."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    sizes, counts = media["image_sizes"], media.get("batch_num_images")
    patching = [True] * len(sizes) if counts is None else [int(n) == 1 for n in counts for _ in range(int(n))]
    num = [image_size_to_num_patches(image_size=s, grid_pinpoints=model.config.image_grid_pinpoints,
                                     patch_size=model.config.vision_config.image_size) if p else 1
           for s, p in zip(sizes, patching)]
    pixels = media["pixel_values"]
    if pixels.dim() == 5:
        return [p[:k] for p, k in zip(pixels, num)]
    return list(pixels.split(num))


def planned_content(model, media: dict, plan: dict, outputs: dict | None = None):
    """Bool (N,) content flags of ``media``'s visual tokens by the detector a batch was planned
    with (``plan["content_from"]``, :func:`plan_background_dropout`; features when absent).
    ``outputs``: the encoder's output on ``media`` if already computed (features only)."""
    if plan.get("content_from") == "pixels":
        return pixel_content(model, media)
    if outputs is None:
        import torch

        with torch.no_grad():
            outputs = encoder_outputs(model, media)
    blank_media = {k: v.to(model.device) for k, v in plan["blank_media"].items()}
    return content_of(model, outputs, blank_media, rows=len(plan["drop_fraction"]))


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
    plan = {k: batch.pop(k, None) for k in PLAN_KEYS}
    batch = batch.to(model.device)
    media = {k: batch.pop(k) for k in MEDIA_KEYS if k in batch}
    outputs = encoder_outputs(model, media)  # gradients reach the projector through these
    content = planned_content(model, media, plan, outputs)
    mask = background_mask(batch["input_ids"], batch["attention_mask"], media_token_ids(model),
                           content, plan["drop_fraction"], plan["drop_priority"].to(model.device),
                           plan["content_fraction"])
    return model(input_ids=batch["input_ids"], attention_mask=mask, mm_encoder_outputs=outputs, use_cache=False)
