"""What streaming buys on Qwen2-VL: question latency against video length, StreamSession vs
offline stc, as `stream_latency.py` measures it for LLaVA-OneVision.

A Qwen2-VL-shaped random-weight model: the same Qwen2-0.5B-shaped decoder (24 layers x 896;
M-RoPE sections 8/12/12 of its 64-wide heads, Qwen2-VL's 16/24/24 of 128 halved) and a
2-block Qwen2-VL tower (1280 wide, patch 14, 2x2 merge) on 336 px frames: 24x24 patches, 144 tokens per temporal slice of 2 frames. The chat template
puts the video first, so a session prefills each pair's kept tokens as its second frame
arrives. Both sides keep STC-Pruner's 60/196 share of each slice. For N frames: the session's
per-frame cost (vision + append, averaged over all N frames) and its question latency
(prefill of the question on the cache + 1 token), against offline `stc` through
accelerate_vlm (everything at question time), median of 3.
Run: python results/stream/stream_latency_qwen.py [threads]"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from stream_latency import main as run  # noqa: E402


def build():
    from transformers import (Qwen2Config, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen2VLProcessor, Qwen2VLVideoProcessor)

    from mmaccel.testing.tiny import _QWEN_TEMPLATE, make_tokenizer

    tok = make_tokenizer()
    text = Qwen2Config(vocab_size=len(tok), hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]},
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = dict(depth=2, embed_dim=1280, hidden_size=896, num_heads=16, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, in_chans=3)
    cfg = Qwen2VLConfig(vision_config=vision, text_config=text.to_dict(),
                        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
                        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
                        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
                        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"))
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    px = dict(min_pixels=336 * 336, max_pixels=336 * 336)
    proc = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2, **px),
                            video_processor=Qwen2VLVideoProcessor(patch_size=14, merge_size=2, temporal_patch_size=2, **px),
                            tokenizer=tok, chat_template=_QWEN_TEMPLATE)
    return model, proc


def main(threads: int = 2) -> None:
    run(threads, build, 336, "results/stream/stream_latency_qwen.json")


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
