"""Turn world samples into model inputs with the stock LLaVA-OneVision processor."""
from __future__ import annotations

import numpy as np

from ..world.samples import Sample
from ..world.scene import blank_like

IGNORE = -100


def prompt_text(processor, sample: Sample) -> str:
    """The chat prompt of a sample, ending with the assistant turn opener."""
    return processor.apply_chat_template(sample.messages(), add_generation_prompt=True)


def blanked(sample: Sample) -> Sample:
    """The same question with every image / frame replaced by a white canvas."""
    from dataclasses import replace

    if sample.frames is not None:
        return replace(sample, frames=np.full_like(sample.frames, 255))
    return replace(sample, images=[blank_like(im.size[0]) for im in sample.images])


def media_kwargs(samples: list[Sample]) -> dict:
    """``images=`` / ``videos=`` keyword for the processor (samples share one kind)."""
    kinds = {s.kind for s in samples}
    if len(kinds) != 1:
        raise ValueError(f"mixed kinds in one batch: {kinds}")
    kind = kinds.pop()
    if kind == "video":
        return {"videos": [s.frames for s in samples]}
    if kind == "multi":
        return {"images": [list(s.images) for s in samples]}
    return {"images": [s.image for s in samples]}


def _call(processor, texts: list[str], samples: list[Sample], padding_side: str):
    """Run the processor with ``padding_side`` and restore the tokenizer's own setting."""
    tok = processor.tokenizer
    old, tok.padding_side = tok.padding_side, padding_side
    try:
        return processor(text=texts, padding=True, return_tensors="pt", **media_kwargs(samples))
    finally:
        tok.padding_side = old


def encode_prompts(processor, samples: list[Sample], padding_side: str = "left"):
    """Batch of prompts (no answers) for ``generate``; left padded by default.

    Returns a ``BatchFeature`` with input_ids / attention_mask (B, L) and pixel_values
    (B, P, 3, 144, 144) with image_sizes (B, 2) and batch_num_images (B,), or
    pixel_values_videos (B, T, 3, 144, 144).
    """
    return _call(processor, [prompt_text(processor, s) for s in samples], samples, padding_side)


def encode_for_training(processor, samples: list[Sample]):
    """Prompt + answer + eos (+ follow-up turns), right padded, with ``labels`` (B, L).

    Labels are -100 except on every assistant answer (its words and the closing eos).
    """
    texts = [training_text(processor, s) for s in samples]
    batch = _call(processor, texts, samples, "right")
    tok = processor.tokenizer
    batch["labels"] = answer_labels(batch["input_ids"], batch["attention_mask"], assistant_id(processor),
                                    tok.convert_tokens_to_ids("<|im_start|>"))
    return batch


def training_text(processor, sample: Sample) -> str:
    """The whole supervised conversation of a sample: main turn, then its follow-ups."""
    eos = processor.tokenizer.eos_token
    text = prompt_text(processor, sample) + " " + sample.answer + eos
    for q, a in sample.followups:
        turn = [{"role": "user", "content": [{"type": "text", "text": q}]}]
        text += processor.apply_chat_template(turn, add_generation_prompt=True) + " " + a + eos
    return text


def assistant_id(processor) -> int:
    """Id of the word that opens the assistant turn."""
    return processor.tokenizer.convert_tokens_to_ids("\u2581assistant")


def answer_labels(input_ids, attention_mask, marker_id: int, turn_id: int):
    """Labels (B, L): tokens inside assistant turns, else -100.

    A token is labelled when an assistant ``marker_id`` comes after the last turn opener
    ``turn_id`` before it, so each answer runs from its marker to the next turn.
    """
    import torch

    pos = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    last_marker = torch.where(input_ids == marker_id, pos, -1).cummax(dim=1).values
    last_turn = torch.where(input_ids == turn_id, pos, -1).cummax(dim=1).values
    keep = (last_marker > last_turn) & (pos > last_marker) & attention_mask.bool()
    return torch.where(keep, input_ids, torch.full_like(input_ids, IGNORE))
