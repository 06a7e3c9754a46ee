"""Tiny random-weight VLMs of the real transformers classes, built from configs (no downloads).

Every builder returns ``(model, processor)`` where the processor is the family's stock
processor class with a word-level tokenizer made on the fly, so tests exercise the same
placeholder expansion, anyres crops and M-RoPE bookkeeping as real checkpoints.
"""
from __future__ import annotations

import torch

FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl")

_WORDS = (
    "user assistant system what is the color of shape how many are there describe image video "
    "a an and in on left right top bottom red green blue yellow circle square triangle yes no "
    "which direction does move up down one two three four five six seven eight nine zero ? . , :"
).split()
_SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<video>",
            "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

_LLAVA_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% elif c['type'] == 'video' %}<video> "
    "{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)
_QWEN_TEMPLATE = _LLAVA_TEMPLATE.replace(
    "<image> ", "<|vision_start|><|image_pad|><|vision_end|> ").replace(
    "<video> ", "<|vision_start|><|video_pad|><|vision_end|> ")


def make_tokenizer(extra_words=()):
    """A word-level ``PreTrainedTokenizerFast`` over a small vocabulary plus VLM special tokens."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(_SPECIAL + list(_WORDS) + list(extra_words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"[?.,:]"), behavior="isolated")])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=_SPECIAL[4:], padding_side="left",
    )
    return fast


def _text_config(kind: str, vocab_size: int, hidden: int = 64, layers: int = 4, **kw):
    from transformers import LlamaConfig, Qwen2Config

    cls = LlamaConfig if kind == "llama" else Qwen2Config
    return cls(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2, **kw)


def _clip_vision(image_size=56, patch=14, hidden=32, layers=2):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(image_size=image_size, patch_size=patch, hidden_size=hidden,
                            intermediate_size=2 * hidden, num_hidden_layers=layers,
                            num_attention_heads=2, projection_dim=hidden)


def _siglip_vision(image_size=56, patch=14, hidden=32, layers=2):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(image_size=image_size, patch_size=patch, hidden_size=hidden,
                              intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=2)


def _finish(model, seed):
    model.eval()
    return model


def tiny_llava(seed: int = 0, text_layers: int = 4, vision_layers: int = 2):
    """LLaVA-1.5 shaped: CLIP tower (56 px, patch 14 -> 16 tokens) + Llama decoder."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = make_tokenizer()
    cfg = LlavaConfig(vision_config=_clip_vision(layers=vision_layers), text_config=_text_config("llama", len(tok), layers=text_layers),
                      image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                      vision_feature_select_strategy="default", image_seq_length=16)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    ip = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                          chat_template=_LLAVA_TEMPLATE, num_additional_image_tokens=1)
    return _finish(model, seed), proc


_PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112]]


def tiny_llava_next(seed: int = 0, text_layers: int = 4, vision_layers: int = 2):
    """LLaVA-NeXT shaped: any-resolution crops of a 56 px CLIP tower, newline tokens."""
    from transformers import (LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessor,
                              LlavaNextProcessor)

    tok = make_tokenizer()
    cfg = LlavaNextConfig(vision_config=_clip_vision(layers=vision_layers), text_config=_text_config("llama", len(tok), layers=text_layers),
                          image_token_id=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=_PINPOINTS,
                          vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=16)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(cfg)
    ip = LlavaNextImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                 image_grid_pinpoints=_PINPOINTS)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                              chat_template=_LLAVA_TEMPLATE, num_additional_image_tokens=1)
    return _finish(model, seed), proc


def tiny_llava_onevision(seed: int = 0, text_layers: int = 4, vision_layers: int = 2):
    """LLaVA-OneVision shaped: SigLIP tower, anyres images, pooled video frames, Qwen2 decoder."""
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor)

    tok = make_tokenizer()
    cfg = LlavaOnevisionConfig(vision_config=_siglip_vision(layers=vision_layers), text_config=_text_config("qwen2", len(tok), layers=text_layers),
                               image_token_id=tok.convert_tokens_to_ids("<image>"),
                               video_token_id=tok.convert_tokens_to_ids("<video>"), image_grid_pinpoints=_PINPOINTS,
                               vision_feature_layer=-1, vision_feature_select_strategy="full")
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(cfg)
    ip = LlavaOnevisionImageProcessor(size={"height": 56, "width": 56}, image_grid_pinpoints=_PINPOINTS)
    vp = LlavaOnevisionVideoProcessor(size={"height": 56, "width": 56})
    proc = LlavaOnevisionProcessor(image_processor=ip, video_processor=vp, tokenizer=tok,
                                   num_image_tokens=16, vision_feature_select_strategy="full",
                                   chat_template=_LLAVA_TEMPLATE)
    return _finish(model, seed), proc


def _qwen_vision_kwargs(hidden=32, depth=2):
    return dict(depth=depth, embed_dim=hidden, hidden_size=64, num_heads=2, patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2, in_chans=3)


def tiny_qwen2_vl(seed: int = 0, text_layers: int = 4, version: str = "2", vision_depth: int = 2,
                  window_size: int = 56):
    """Qwen2-VL (or Qwen2.5-VL with ``version="2.5"``, attention windows of ``window_size`` px)
    shaped: native-resolution ViT, 2x2 merge, M-RoPE."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    if version == "2.5":
        from transformers import (Qwen2_5_VLConfig as Cfg, Qwen2_5_VLForConditionalGeneration as Model,
                                  Qwen2_5_VLProcessor as Proc)
        vis = dict(depth=vision_depth, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                   patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=window_size,
                   fullatt_block_indexes=[1])
    else:
        from transformers import Qwen2VLConfig as Cfg, Qwen2VLForConditionalGeneration as Model, Qwen2VLProcessor as Proc
        vis = _qwen_vision_kwargs(depth=vision_depth)
    tok = make_tokenizer()
    text = _text_config("qwen2", len(tok), layers=text_layers,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    cfg = Cfg(vision_config=vis, text_config=text.to_dict(),
              image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
              video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
              vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
              vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"))
    torch.manual_seed(seed)
    model = Model(cfg)
    px = dict(min_pixels=56 * 56, max_pixels=112 * 112)
    ip = Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2, **px)
    vp = Qwen2VLVideoProcessor(patch_size=14, merge_size=2, temporal_patch_size=2, **px)
    proc = Proc(image_processor=ip, video_processor=vp, tokenizer=tok, chat_template=_QWEN_TEMPLATE)
    return _finish(model, seed), proc


def tiny_qwen2_5_vl(seed: int = 0, text_layers: int = 4, vision_depth: int = 2, window_size: int = 56):
    """Qwen2.5-VL shaped: windowed tower (block 1 attends per image, the others per attention
    window: 2x2 merge windows at the default 56 px, 4x4 as in the real model at 112 px)."""
    return tiny_qwen2_vl(seed, text_layers, version="2.5", vision_depth=vision_depth, window_size=window_size)


def build(family: str, seed: int = 0, text_layers: int = 4, vision_layers: int = 2):
    """Build ``(model, processor)`` for one of :data:`FAMILIES` (``vision_layers``: tower depth;
    in-tower merging needs more than 2 blocks to act)."""
    builders = {"llava": tiny_llava, "llava_next": tiny_llava_next, "llava_onevision": tiny_llava_onevision,
                "qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl}
    if family not in builders:
        raise ValueError(f"unknown tiny family {family!r}; choose from {', '.join(FAMILIES)}")
    depth = {"vision_depth" if family.startswith("qwen") else "vision_layers": vision_layers}
    return builders[family](seed=seed, text_layers=text_layers, **depth)


def save_tiny(family: str, path, seed: int = 0):
    """Build a tiny ``family`` model and write it with its processor to ``path`` (safetensors)."""
    model, proc = build(family, seed=seed)
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path
