"""Streaming video QA with STC-Pruner: frames arrive one at a time, questions come at any time.

``StreamSession`` encodes each frame as it arrives (vision tower, projector and the model's own
2x2 frame pooling), keeps the ``retention`` share of its tokens that STC-Pruner finds most novel
against the frame anchor and the session's running temporal anchor, and stores only those.
``ask`` prefills the prompt with the kept tokens (compact positions, as STC appends them to the
cache) and generates. All state lives in the session object: sessions never share anything, so
several streams can run side by side on one model. LLaVA-OneVision only (the official target).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from .methods.stc import stc_scores
from .pipeline import Answer
from .stats import Stats, prefill_flops


class StreamSession:
    """One stream. ``add_frame(frame)`` -> kept token count; ``ask(question)`` -> Answer."""

    def __init__(self, model, processor, retention: float = 60 / 196, cacher: bool = False,
                 cache_interval: int = 2, update_ratio: float = 0.25):
        if type(model).__name__ != "LlavaOnevisionForConditionalGeneration":
            raise ValueError(f"StreamSession supports LlavaOnevisionForConditionalGeneration, not {type(model).__name__}")
        if not 0.0 < retention <= 1.0:
            raise ValueError(f"retention must be in (0, 1], got {retention}")
        self.model, self.processor, self.retention = model, processor, retention
        self.cacher, self._cacher_args = cacher, (cache_interval, update_ratio)
        self.reset()

    def reset(self) -> None:
        """Forget every frame (a new video)."""
        self.kept: list[torch.Tensor] = []  # per frame: (k, D) kept features, spatial order
        self.kept_index: list[torch.Tensor] = []  # per frame: kept token indices
        self.memory: list[torch.Tensor] = []  # STC temporal anchor: frame anchors seen so far
        self.tokens_seen = 0
        self.vision_seconds = 0.0
        from .vision.stc_cacher import CacherState

        self.cacher_state = CacherState(*self._cacher_args) if self.cacher else None

    @property
    def frames(self) -> int:
        return len(self.kept)

    @torch.inference_mode()
    def add_frame(self, frame: np.ndarray) -> int:
        """frame: (H, W, 3) uint8 RGB. Returns how many of its tokens were kept."""
        frame = np.asarray(frame)
        if frame.ndim != 3 or frame.shape[-1] != 3:
            raise ValueError(f"a frame must be (H, W, 3) RGB, got shape {frame.shape}")
        start = time.perf_counter()
        pixels = self.processor.video_processor(videos=[frame[None]], return_tensors="pt")["pixel_values_videos"]
        feats = self._encode(pixels.to(self.model.device, self.model.dtype))
        k = max(1, round(self.retention * feats.shape[0]))
        if k < feats.shape[0]:
            scores, _ = stc_scores(feats, self.memory)
            index = scores.topk(k, largest=False).indices.sort().values
        else:
            index = torch.arange(feats.shape[0])
        self.kept.append(feats[index])
        self.kept_index.append(index)
        self.tokens_seen += feats.shape[0]
        self.vision_seconds += time.perf_counter() - start
        return int(index.numel())

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(1, 1, 3, H, W) -> (n, D) projected, pooled tokens of one frame (STC-Cacher if on)."""
        encode = lambda: self.model.model.get_video_features(pixels).pooler_output[0, :-1]
        if self.cacher_state is None:
            return encode()
        from .models import get_adapter
        from .vision.stc_cacher import STCCacher

        with STCCacher(get_adapter(self.model).vision_layers, self.cacher_state):
            return encode()

    def _inputs(self, question: str):
        proc = self.processor
        content = [{"type": "video"}, {"type": "text", "text": question}]
        text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        ids = proc.tokenizer(text, return_tensors="pt")["input_ids"][0]
        video_id = self.model.config.video_token_id
        at = (ids == video_id).nonzero().flatten()
        if at.numel() != 1:
            raise ValueError("the chat template must place exactly one video marker")
        feats = torch.cat(self.kept + [self.model.model.image_newline[None].to(self.kept[0])])
        ids = torch.cat([ids[:at], torch.full((feats.shape[0],), video_id), ids[at + 1:]])[None]
        return ids, feats

    @torch.inference_mode()
    def ask(self, question: str, max_new_tokens: int = 32) -> Answer:
        """Answer from the frames so far (greedy)."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        if not self.kept:
            raise ValueError("no frames yet: add_frame() first")
        ids, feats = self._inputs(question)
        start = time.perf_counter()
        out = self.model.generate(input_ids=ids.to(self.model.device), attention_mask=torch.ones_like(ids).to(self.model.device),
                                  mm_encoder_outputs={"video": BaseModelOutputWithPooling(pooler_output=feats[None])},
                                  max_new_tokens=max_new_tokens, do_sample=False)
        elapsed = time.perf_counter() - start
        text = self.processor.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)[0].strip()
        return Answer(text, self._stats(ids.shape[1], feats.shape[0], elapsed, out.shape[1] - ids.shape[1]),
                      {"kind": "stream", "frames": self.frames})

    def _stats(self, length: int, kept: int, seconds: float, new_tokens: int) -> Stats:
        cfg = self.model.config.text_config
        full_length = length - kept + self.tokens_seen + 1
        return Stats(method="stc-stream", batch_size=1, visual_tokens_in=self.tokens_seen + 1,
                     visual_tokens_per_layer=[kept] * cfg.num_hidden_layers,
                     tokens_per_layer=[length] * cfg.num_hidden_layers,
                     prefill_flops=prefill_flops(cfg, [[length]] * cfg.num_hidden_layers),
                     prefill_flops_full=prefill_flops(cfg, [[full_length]] * cfg.num_hidden_layers),
                     new_tokens=int(new_tokens), timings={"vision": self.vision_seconds, "total": seconds})
