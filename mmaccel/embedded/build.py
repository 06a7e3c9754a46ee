"""Build the embedded VLM from scratch: tokenizer, processor, config, model.

The model is a stock ``LlavaOnevisionForConditionalGeneration`` (SigLIP vision tower,
Qwen2 text model) with a word-level tokenizer over the world's vocabulary.

Visual tokens (tile 144 px, patch 24 -> 6 x 6 = 36 tokens per tile):
- one 144 px image: base tile 36 + one crop 36 + 6 row newlines = 78 tokens;
- one 288 px (high-res) image: base 36 + 2x2 crops (12 x 12 = 144) + 12 newlines = 192;
- several images in one prompt: 36 + 1 newline = 37 tokens each (no crops);
- a video of T frames: T x (3 x 3 pooled) + 1 newline = 9 T + 1 tokens.
"""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from ..world.followups import EXTRA_VOCABULARY
from ..world.spec import (COLORS, DIRECTIONS_2D, HIRES_SIDE, IMAGE_SIDE, MOTIONS, ORDINALS, SHAPES,
                          TEMPLATES)

PATCH = 24
TOKENS_PER_TILE = (IMAGE_SIDE // PATCH) ** 2
SPECIAL_TOKENS = ["<pad>", "[UNK]", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
GRID_PINPOINTS = [[IMAGE_SIDE, IMAGE_SIDE], [IMAGE_SIDE, HIRES_SIDE], [HIRES_SIDE, IMAGE_SIDE],
                  [HIRES_SIDE, HIRES_SIDE]]
VISION_ASPECT_RATIO = "anyres_max_9"
# Pixel normalisation centred on the light backgrounds (white -> 0.16, grey 222 -> -0.1):
# background patches embed to ~0, so object patches carry the signal from step one.
IMAGE_MEAN = [0.92, 0.92, 0.92]
IMAGE_STD = [0.5, 0.5, 0.5]

def _each_item(body: str) -> str:
    return "{%- for c in message['content'] -%}" + body + "{%- endfor -%}"


_MEDIA = _each_item("{%- if c['type'] == 'image' -%}<image>{{ ' ' }}"
                    "{%- elif c['type'] == 'video' -%}<video>{{ ' ' }}{%- endif -%}")
_TEXT = _each_item("{%- if c['type'] == 'text' -%}{{ c['text'] }}{{ ' ' }}{%- endif -%}")
# the repeat only where the turn has media: a text-only (follow-up) turn says its text once
_TEXT_AGAIN = ("{%- if message['content'] | selectattr('type', 'in', ['image', 'video']) | list -%}"
               + _TEXT + "{%- endif -%}")
# Where a user turn's text goes relative to its images / videos. "question-first" lets every
# visual token attend to the question (causal attention), so a token can flag "I match the
# asked color and shape" itself; "question-both" also repeats the text after the media, so
# methods that score visual tokens by text-to-visual attention still have text to score with.
CONTENT_ORDERS = {
    "image-first": (_MEDIA, _TEXT),
    "question-first": (_TEXT, _MEDIA),
    "question-both": (_TEXT, _MEDIA, _TEXT_AGAIN),
}


def chat_template(order: str = "image-first") -> str:
    """The Jinja chat template with the user content emitted in ``order`` (see CONTENT_ORDERS)."""
    if order not in CONTENT_ORDERS:
        raise ValueError(f"unknown content order {order!r}; choose from {sorted(CONTENT_ORDERS)}")
    return ("{%- for message in messages -%}"
            "<|im_start|>{{ message['role'] }}{{ ' ' }}"
            "{%- if message['content'] is string -%}{{ message['content'] }}{{ ' ' }}"
            "{%- else -%}" + "".join(CONTENT_ORDERS[order]) + "{%- endif -%}<|im_end|>"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}<|im_start|>assistant{%- endif -%}")


CHAT_TEMPLATE = chat_template()

TEXT_DEFAULTS = dict(hidden_size=192, intermediate_size=576, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=4)
VISION_DEFAULTS = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                       num_attention_heads=4)


def vocabulary_corpus() -> list[str]:
    """Every word the world can produce (questions, answers, roles)."""
    lines = ["user", "assistant", "a , and", " ".join(str(d) for d in range(10))]
    lines += [" ".join(x) for x in (list(COLORS), SHAPES, DIRECTIONS_2D, MOTIONS, ORDINALS, ("yes", "no"))]
    for t in TEMPLATES.values():
        for s in SHAPES:
            lines.append(t.format(shape=s, color="red"))
    return lines


def build_tokenizer_object(extra: tuple[str, ...] = ()) -> Tokenizer:
    """A word-level ``tokenizers.Tokenizer``: Metaspace words, split punctuation and digits;
    ``extra``: opt-in follow-up kinds whose words join the vocabulary."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Strip()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always"),
        pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)])
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1)
    tok.train_from_iterator(vocabulary_corpus(), trainer)
    words = [w for kind in extra for line in EXTRA_VOCABULARY.get(kind, ())
             for w, _ in tok.pre_tokenizer.pre_tokenize_str(line)]
    new = [w for w in dict.fromkeys(words) if tok.token_to_id(w) is None]
    if new:  # appended after the world's words, whose ids stay what they are without ``extra``
        vocab = tok.get_vocab()
        tok.model = models.WordLevel({**vocab, **{w: len(vocab) + i for i, w in enumerate(new)}}, unk_token="[UNK]")
    return tok


def build_tokenizer(order: str = "image-first", extra: tuple[str, ...] = ()):
    """``PreTrainedTokenizerFast`` with pad/eos/unk and <image>/<video> special tokens;
    ``extra``: opt-in follow-up kinds whose words join the vocabulary (default none)."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer_object(extra), pad_token="<pad>", eos_token="<|im_end|>",
        unk_token="[UNK]", extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
        chat_template=chat_template(order), padding_side="left", model_max_length=4096)
    return tok


def build_processor(tokenizer=None, order: str = "image-first"):
    """``LlavaOnevisionProcessor`` for 128 px tiles with 128/256 px grid pinpoints."""
    from transformers import (LlavaOnevisionImageProcessor, LlavaOnevisionProcessor,
                              LlavaOnevisionVideoProcessor)

    size = {"height": IMAGE_SIDE, "width": IMAGE_SIDE}
    norm = {"image_mean": IMAGE_MEAN, "image_std": IMAGE_STD}
    image_proc = LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=GRID_PINPOINTS, **norm)
    video_proc = LlavaOnevisionVideoProcessor(size=size, **norm)
    return LlavaOnevisionProcessor(
        image_processor=image_proc, tokenizer=tokenizer or build_tokenizer(order), video_processor=video_proc,
        num_image_tokens=TOKENS_PER_TILE, vision_feature_select_strategy="full",
        chat_template=chat_template(order), vision_aspect_ratio=VISION_ASPECT_RATIO)


def base_vocab_size() -> int:
    """Tokens of the world's own vocabulary (no opt-in follow-up words)."""
    return build_tokenizer_object().get_vocab_size()


def build_config(tokenizer, text: dict | None = None, vision: dict | None = None, vocab_size: int | None = None):
    """A tiny ``LlavaOnevisionConfig``; ``text``/``vision`` override the default sizes;
    ``vocab_size`` defaults to the tokenizer's length."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    vcfg = SiglipVisionConfig(image_size=IMAGE_SIDE, patch_size=PATCH, vision_use_head=False,
                              **{**VISION_DEFAULTS, **(vision or {})})
    tcfg = Qwen2Config(vocab_size=vocab_size or len(tokenizer), max_position_embeddings=2048,
                       tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id, **{**TEXT_DEFAULTS, **(text or {})})
    return LlavaOnevisionConfig(
        vision_config=vcfg, text_config=tcfg, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"), vision_feature_select_strategy="full",
        vision_feature_layer=-1, image_grid_pinpoints=GRID_PINPOINTS, vision_aspect_ratio=VISION_ASPECT_RATIO,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)


def build_model(tokenizer, seed: int = 0, text: dict | None = None, vision: dict | None = None):
    """A freshly initialised model (fp32) with generation defaults for greedy answers.

    Words of opt-in follow-up kinds (ids after the world's own) get their embedding rows from
    a side generator after the model is built, so the rest of the model, and torch's random
    stream afterwards, are those of the same seed without them."""
    import torch
    from transformers import LlavaOnevisionForConditionalGeneration

    torch.manual_seed(seed)
    base = min(len(tokenizer), base_vocab_size())
    model = LlavaOnevisionForConditionalGeneration(build_config(tokenizer, text, vision, vocab_size=base))
    if len(tokenizer) > base:
        with torch.random.fork_rng():
            torch.manual_seed(seed + 1)
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    gc = model.generation_config
    gc.pad_token_id, gc.eos_token_id, gc.bos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id, None
    gc.max_new_tokens, gc.do_sample = 32, False
    return model
