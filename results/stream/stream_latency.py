"""What streaming buys: question latency against video length, StreamSession vs offline stc.

A LLaVA-OneVision-shaped random-weight model (Qwen2-0.5B-shaped decoder: 24 layers x 896; a
2-block SigLIP-shaped tower at 384 px, 729 patches -> 196 pooled tokens a frame) with a
video-first chat template, so a session prefills each frame's kept tokens as it arrives.
For N frames: the session's per-frame cost (vision + append) and its question latency
(prefill of the question on the cache + 1 token), against offline `stc` through
accelerate_vlm (the whole prompt prefilled at question time, same 60/196 share), median of 3.
Run: python results/stream/stream_latency.py [threads]"""
import json
import platform
import statistics
import sys
import time

import numpy as np
import torch
import transformers


def build():
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageProcessor,
                              LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor, Qwen2Config, SiglipVisionConfig)

    from mmaccel.testing.tiny import _LLAVA_TEMPLATE, make_tokenizer

    tok = make_tokenizer()
    text = Qwen2Config(vocab_size=len(tok), hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = SiglipVisionConfig(image_size=384, patch_size=14, hidden_size=1152, intermediate_size=4304,
                                num_hidden_layers=2, num_attention_heads=16)
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                               video_token_id=tok.convert_tokens_to_ids("<video>"), vision_feature_layer=-1,
                               vision_feature_select_strategy="full")
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    proc = LlavaOnevisionProcessor(image_processor=LlavaOnevisionImageProcessor(size={"height": 384, "width": 384}),
                                   video_processor=LlavaOnevisionVideoProcessor(size={"height": 384, "width": 384}),
                                   tokenizer=tok, num_image_tokens=729, vision_feature_select_strategy="full",
                                   chat_template=_LLAVA_TEMPLATE)
    return model, proc


def stream_point(model, proc, frames, question):
    from mmaccel.stream import StreamSession

    session = StreamSession(model, proc)
    start = time.perf_counter()
    for f in frames:
        session.add_frame(f)
    per_frame = (time.perf_counter() - start) / len(frames)
    assert session.incremental
    start = time.perf_counter()
    session.ask(question, max_new_tokens=1)
    return per_frame, time.perf_counter() - start


def offline_point(model, proc, frames, question):
    from mmaccel import accelerate_vlm

    content = [{"type": "video"}, {"type": "text", "text": question}]
    text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = proc(text=[text], videos=[frames], return_tensors="pt")
    with accelerate_vlm(model, method="stc", retention=60 / 196), torch.no_grad():
        start = time.perf_counter()
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
        return time.perf_counter() - start


def main(threads: int = 2, make=build, size: int = 384, out: str = "results/stream/stream_latency.json") -> None:
    """Time ``make()``'s model on 4, 16 and 64 random ``size`` px frames; write ``out``."""
    torch.set_num_threads(threads)
    model, proc = make()
    question = "what is the color ?"
    rng = np.random.default_rng(0)
    rows = []
    for n in (4, 16, 64):
        frames = rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8)
        stream = [stream_point(model, proc, frames, question) for _ in range(3)]
        offline = [offline_point(model, proc, frames, question) for _ in range(3)]
        rows.append({"frames": n, "stream_per_frame_s": statistics.median(s[0] for s in stream),
                     "stream_question_s": statistics.median(s[1] for s in stream),
                     "offline_question_s": statistics.median(offline)})
        print(json.dumps(rows[-1]), flush=True)
    env = dict(machine=platform.machine(), threads=threads, torch=torch.__version__,
               transformers=transformers.__version__, date=time.strftime("%Y-%m-%d %H:%M"))
    json.dump({"env": env, "rows": rows}, open(out, "w"), indent=1)


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
