"""Streaming video QA with STC-Pruner: frames arrive one at a time, questions come at any time.

``StreamSession`` encodes each frame as it arrives (vision tower, projector and the model's own
2x2 frame pooling), keeps the ``retention`` share of its tokens that STC-Pruner finds most novel
against the frame anchor and the session's running temporal anchor, and appends only those to
the session's KV cache right away. ``ask`` then
prefills just the question's tokens on top of that cache, decodes greedily, and crops the cache
back, so a question costs the question and never the video again. All state lives in the
session object: sessions never share anything, so several streams can run side by side on one
model. LLaVA-OneVision (the official target), Qwen2-VL and Qwen2.5-VL: Qwen's tower encodes
frames in pairs (``temporal_patch_size``), so a Qwen session encodes a pair when its second frame
arrives, and a question asked on an odd frame sees it paired with itself, as the processor pads
an odd video (:mod:`mmaccel.stream_units`; that pair is encoded in full, without STC-Cacher,
and forgotten after the question). ``cacher=True`` runs STC-Cacher on the tower, one unit a
chunk (``mmaccel/vision/stc_cacher.py``, ``stc_cacher_qwen.py``).

Long streams: ``max_frames=N`` holds only the newest N frames (a sliding window over the KV
cache: each new frame is encoded seeing the prompt and the frames held, the oldest is then
dropped; the prompt prefix stays as a sink), so memory stays bounded. The official STC stream
keeps every frame and answers from ReKV's retrieval of the frame blocks most relevant to the
question: ``retrieve_frames=K`` (official ``topk=64``; on Qwen a block is a slice of 2 frames,
so K frames are K/2 slices, and the slices' keys are turned back through M-RoPE's three rows)
does that (``mmaccel/stream_retrieval.py``):
every frame's KV is kept as a block, and at each question every decoder layer attends to the
prompt prefix and the K frames it finds most relevant, so a question costs K frames however long
the stream. A frame's KV is read from the cache while the cache holds it and copied out when
``max_frames`` drops it (the official code offloads every frame to host memory), so with
``max_frames`` the frames are still encoded against a bounded window while the archive of
dropped frames grows by one frame's KV per frame.

Positions: by default (``position_policy="preserve"``) each kept token sits at the position it
would hold in the full video, so the language model sees the same positions as offline ``stc``
with its default policy. The official STC/ReKV stream appends kept tokens at consecutive
positions (``"compact"``); on the shipped model that costs 15 points of video accuracy at 60/196
tokens (`results/stream/stream_positions.md`), as renumbered positions cost grounding elsewhere
(GAP, arXiv 2506.21873).
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import numpy as np
import torch

from .methods.stc import STCPruner, stc_scores
from .pipeline import Answer
from .stats import Stats, prefill_flops
from .stream_retrieval import FrameBlock, Retriever, Rotary
from .stream_units import stream_units


class StreamSession:
    """One stream. ``add_frame(frame)`` -> kept token count (0 while a Qwen pair waits for its
    second frame); ``ask(question)`` -> Answer. ``fps``: the stream's frame rate, which sets
    Qwen2.5-VL's temporal positions (None: the processor's 24 for frames without metadata)."""

    def __init__(self, model, processor, retention: float = 60 / 196, cacher: bool = False,
                 cache_interval: int = 2, update_ratio: float = 0.25, similarity_threshold: float | None = None,
                 position_policy: str = "preserve", max_frames: int | None = None,
                 retrieve_frames: int | None = None, fps: float | None = None):
        self.units = stream_units(model, processor, fps)
        if not 0.0 < retention <= 1.0:
            raise ValueError(f"retention must be in (0, 1], got {retention}")
        if position_policy not in ("preserve", "compact"):
            raise ValueError(f"position_policy must be 'preserve' or 'compact', got {position_policy!r}")
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"max_frames must be a positive frame count or None, got {max_frames}")
        if retrieve_frames is not None and retrieve_frames < 1:
            raise ValueError(f"retrieve_frames must be a positive frame count or None, got {retrieve_frames}")
        self._check_family_options(max_frames, retrieve_frames)
        self.max_frames, self.retrieve_frames = max_frames, retrieve_frames
        self.model, self.processor, self.retention = model, processor, retention
        self.position_policy = position_policy
        self._check_plain()
        self.cacher, self._cacher_args = cacher, (cache_interval, update_ratio, similarity_threshold)
        self.reset()
        if retrieve_frames is not None and not self.incremental:
            raise ValueError("retrieve_frames needs a chat template that puts the video before the question "
                             "(the frames' KV must not depend on it); this processor's template does not")

    def _check_family_options(self, max_frames: int | None, retrieve_frames: int | None) -> None:
        """Frame counts must fill whole units."""
        per_unit = self.units.frames_per_unit
        for name, count in (("max_frames", max_frames), ("retrieve_frames", retrieve_frames)):
            if count is not None and count % per_unit:
                raise ValueError(f"{name} must be a multiple of {per_unit}: this model encodes frames {per_unit} at a time")

    def _check_plain(self) -> None:
        """The session prunes frames itself and runs the model's parts directly; an
        ``accelerate_vlm`` runtime on the same model would take those calls for its own."""
        if getattr(self.model, "_mmaccel_handle", None) is not None:
            raise ValueError("this model is accelerated (accelerate_vlm): StreamSession prunes frames itself; call "
                             "restore() on the handle first, or stream on a model of its own")

    def reset(self) -> None:
        """Forget every frame (a new video)."""
        self.kept: list[torch.Tensor] = []  # per unit (frame; Qwen: pair of frames): (k, D) kept features
        self.kept_index: list[torch.Tensor] = []  # per unit: kept token indices
        self.kept_positions: list[torch.Tensor] = []  # per unit: (R, k) kept tokens' positions from the video's start
        self.memory: list[torch.Tensor] = []  # STC temporal memory: raw unit means seen so far
        self.pending: list[np.ndarray] = []  # frames waiting for the rest of their unit (Qwen: a pair's first)
        self.grids: list = []  # per unit: its token grid (Qwen's text after the video depends on it)
        self.tokens_per_unit: list[int] = []  # per unit seen: its tokens before pruning
        self.cache_spans: list[int] = []  # per held unit: its tokens in the KV cache (incremental mode)
        self.vision_seconds = self.append_seconds = 0.0
        self.cache, self.prefix_ids = None, None  # the KV cache of prompt prefix + kept frame tokens
        self.cached = 0  # tokens held by the cache
        self.video_span = 0  # positions the video takes so far (its kept tokens when compact)
        self._incremental = None
        self.blocks: list[FrameBlock] = []  # with retrieve_frames: every frame's KV, oldest first
        self.last_retrieved: list[list[int]] | None = None  # per layer: the blocks (frames; Qwen: slices) used
        self.first_logits = None  # (vocab,) the latest answer's first-token logits (e.g. for a KL)
        self._prefill_seconds = 0.0  # the latest question's prefill (the whole prompt when not incremental)
        from .vision.stc_cacher import CacherState

        self.cacher_state = CacherState(*self._cacher_args) if self.cacher else None

    @property
    def units_seen(self) -> int:
        """Units (frames; Qwen: pairs) encoded so far."""
        return len(self.tokens_per_unit)

    @property
    def tokens_seen(self) -> int:
        """Visual tokens of every unit encoded so far, before pruning."""
        return sum(self.tokens_per_unit)

    @property
    def frames(self) -> int:
        """Frames seen so far (with ``max_frames``, only the newest ones are still held)."""
        return self.units_seen * self.units.frames_per_unit + len(self.pending)

    @torch.inference_mode()
    def add_frame(self, frame: np.ndarray) -> int:
        """frame: (H, W, 3) uint8 RGB. Returns how many tokens of the unit it completed were kept
        (0 while it waits for the rest of its unit)."""
        from .vision.io import check_frames

        self._check_plain()
        frame = np.asarray(frame)
        if frame.ndim != 3:
            raise ValueError(f"a frame must be (H, W, 3) RGB, got shape {frame.shape}")
        frame = check_frames(frame, "a frame")
        if self.pending and frame.shape != self.pending[0].shape:
            raise ValueError(f"the frames of one unit must share a size: got {frame.shape} after {self.pending[0].shape}")
        self.pending.append(np.array(frame))  # a copy: a camera may reuse its buffer for the next frame
        if len(self.pending) < self.units.frames_per_unit:
            return 0
        frames, self.pending = np.stack(self.pending), []
        return self._add_unit(frames)

    def _add_unit(self, frames: np.ndarray) -> int:
        """Encode, prune and append one unit of frames (F, H, W, 3); -> its kept token count."""
        start = time.perf_counter()
        feats, grid = self.units.encode(frames, self._cacher_encoder())
        index = self._select(feats, self.memory)
        positions, self.video_span = self._place(feats.shape[0], grid, index)
        self.kept.append(feats[index])
        self.kept_index.append(index)
        self.kept_positions.append(positions)
        self.grids.append(grid)
        self.tokens_per_unit.append(feats.shape[0])
        self.vision_seconds += time.perf_counter() - start
        self._append(feats[index], positions)
        if self.max_frames is not None and len(self.kept) > self.max_frames // self.units.frames_per_unit:
            self._evict_oldest_frame()
        return int(index.numel())

    def _select(self, feats: torch.Tensor, memory: list[torch.Tensor]) -> torch.Tensor:
        """STC-Pruner: indices (sorted, on the CPU) of the ``retention`` share of ``feats`` (n, D)
        most novel against the unit's anchor and the temporal anchor of ``memory`` (which grows)."""
        k = max(1, round(self.retention * feats.shape[0]))
        if k >= feats.shape[0]:
            return torch.arange(feats.shape[0])
        scores, _ = stc_scores(feats, memory)
        return scores.topk(k, largest=False).indices.sort().values.cpu()

    def _place(self, n: int, grid, index: torch.Tensor, base: int | None = None) -> tuple[torch.Tensor, int]:
        """Positions (R, k) from the video's start of the kept tokens ``index`` of the next unit of
        ``n`` tokens, and the video's span once it is added (``base``: the span before it under
        compact positions; None: the session's)."""
        if self.position_policy == "compact":
            base = self.video_span if base is None else base
            return (base + torch.arange(index.numel())).expand(self.units.rows, -1), base + index.numel()
        positions = self.units.unit_positions(self.units_seen, self.video_span, n, grid)[:, index]
        return positions, self.video_span + n

    def _evict_oldest_frame(self) -> None:
        """Forget the oldest held unit: its kept tokens and, when frames are prefilled as they
        arrive, its span of every layer's KV cache (the prompt prefix before it stays, as a
        sink; later tokens keep the positions they were encoded at)."""
        oldest_held = len(self.blocks) - len(self.kept)
        for held in (self.kept, self.kept_index, self.kept_positions):
            held.pop(0)
        if self.cache is None:
            return
        start, n = self.prefix_ids.numel(), self.cache_spans.pop(0)
        if self.retrieve_frames is not None:  # the archive keeps it for retrieval
            self.blocks[oldest_held].archive(self.cache, start)
        for layer in self.cache.layers:
            layer.keys = torch.cat([layer.keys[..., :start, :], layer.keys[..., start + n:, :]], dim=-2)
            layer.values = torch.cat([layer.values[..., :start, :], layer.values[..., start + n:, :]], dim=-2)
        self.cached -= n

    def _append(self, feats: torch.Tensor, video_positions: torch.Tensor) -> None:
        """Run the language model on one unit's kept tokens (k, D) at ``video_positions`` (R, k)
        from the video's start, extending the cache. The first unit also carries the prompt
        text before the video marker."""
        if not self.incremental:
            return
        start = time.perf_counter()
        n_prefix = self.prefix_ids.numel()
        positions = video_positions + n_prefix
        if self.cache is None:
            self.cache = self._new_cache()
            feats = torch.cat([self._embed(self.prefix_ids), feats])
            positions = torch.cat([self._text_positions(0, n_prefix), positions], 1)
        self._forward(feats, positions)
        self.cache_spans.append(video_positions.shape[1])
        if self.retrieve_frames is not None:
            self.blocks.append(FrameBlock.summarize(self.cache, positions[:, -video_positions.shape[1]:], self._rotary))
        self.append_seconds += time.perf_counter() - start

    def _text_positions(self, start: int, n: int) -> torch.Tensor:
        """(R, n): text tokens one after another from ``start``, the same in every M-RoPE row."""
        return (start + torch.arange(n)).expand(self.units.rows, -1)

    @property
    def incremental(self) -> bool:
        """Whether frames can be prefilled as they arrive: the chat template's text before
        the video must not depend on the question (a template that puts the question first
        makes ``ask`` prefill the whole prompt instead)."""
        if self._incremental is None:
            self.prefix_ids = self._split_prompt("?")[0]
            self._incremental = torch.equal(self.prefix_ids, self._split_prompt("a b ?")[0])
        return self._incremental

    def _new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config.text_config)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids.to(self.model.device))

    def _forward(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(n, D) embeddings at ``positions`` ((n,) or (R, n)) -> (n, D) last hidden states."""
        lm = self.model.model.language_model
        pos = positions.to(embeds.device)
        pos = pos[None] if pos.dim() == 1 else pos  # (1, n): one row is the batch of one
        pos = pos[:, None] if self.units.rows == 3 else pos  # M-RoPE: (3, batch, n)
        out = lm(inputs_embeds=embeds[None].to(self.model.dtype), position_ids=pos, cache=self.cache, use_cache=True)
        self.cached += embeds.shape[0]
        return out.last_hidden_state[0]

    def _cacher_encoder(self):
        """None, or a wrapper that runs a tower call under this session's STC-Cacher."""
        if self.cacher_state is None:
            return None

        def encoder(encode):
            with self.units.cacher(self.cacher_state):
                return encode()

        return encoder

    def _split_prompt(self, question: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (1-D) of the chat prompt before and after its one video marker."""
        proc = self.processor
        content = [{"type": "video"}, {"type": "text", "text": question}]
        text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        ids = proc.tokenizer(text, return_tensors="pt")["input_ids"][0]
        at = (ids == self.model.config.video_token_id).nonzero().flatten()
        if at.numel() != 1:
            raise ValueError("the chat template must place exactly one video marker")
        return ids[:at], ids[at + 1:]

    @torch.inference_mode()
    def ask(self, question: str, max_new_tokens: int = 32) -> Answer:
        """Answer from the frames so far (greedy); the session's cache is left as it was."""
        if not self.kept and not self.pending:
            raise ValueError("no frames yet: add_frame() first")
        if not isinstance(question, str) or not question.strip():
            raise ValueError("the question must be a non-empty string")
        self._check_plain()
        prefix, suffix = self._split_prompt(question)
        start = time.perf_counter()
        retrieving = self.retrieve_frames is not None and self.cache is not None
        span = self._retrieved_span(self._retrieve_count) if retrieving else None
        q = self._question_input(prefix.numel(), suffix, span if self.position_policy == "compact" else None)
        if self.cache is None:
            tokens, length = self._ask_from_scratch(prefix, q, max_new_tokens)
        elif retrieving:
            tokens, length = self._ask_retrieved(prefix, question, q, span, max_new_tokens)
        else:
            tokens, length = self._ask_on_cache(prefix, q, max_new_tokens)
        elapsed = time.perf_counter() - start
        text = self.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        trailing = self.units.trailing_tokens
        kept, seen = self._tokens_seen_by_question() + q.kept + trailing, self.tokens_seen + q.seen + trailing
        return Answer(text, self._stats(length, kept, seen, elapsed, len(tokens)), {"kind": "stream", "frames": self.frames})

    def _question_input(self, n_prefix: int, suffix: torch.Tensor, compact_span: int | None = None) -> "_QuestionInput":
        """What a question prefills after the cached video: an unfinished unit (a Qwen pair's
        first frame, paired with itself as the processor pads an odd video), the tokens that end
        the video (LLaVA-OneVision's newline) and the prompt after the video marker.
        ``compact_span``: the video tokens before it when compact positions do not count the
        session's (retrieval: the retrieved frames')."""
        feats, positions, seen, span, grids = self._pending_unit(compact_span)
        after = span if self.position_policy == "compact" else self.units.text_after(span, grids)
        tail = torch.cat([self.units.tail(), self._embed(suffix)])
        return _QuestionInput(torch.cat([feats, tail]),
                              torch.cat([positions + n_prefix, self._text_positions(n_prefix + after, tail.shape[0])], 1),
                              feats.shape[0], seen, n_prefix + after)

    def _pending_unit(self, base: int | None = None):
        """(kept features (k, D), their positions (R, k) from the video's start, the unit's token
        count, and the video's span and unit grids counting it) for the frames waiting for the
        rest of their unit, without changing the session; k = 0 without any. ``base``: the span
        before it under compact positions (None: the session's)."""
        base = self.video_span if base is None else base
        if not self.pending:
            empty = self._embed(torch.zeros(0, dtype=torch.long))
            return empty, torch.zeros(self.units.rows, 0, dtype=torch.long), 0, base, self.grids
        frames = np.stack(self.pending + self.pending[-1:] * (self.units.frames_per_unit - len(self.pending)))
        feats, grid = self.units.encode(frames)
        index = self._select(feats, list(self.memory))
        positions, span = self._place(feats.shape[0], grid, index, base)
        return feats[index], positions, feats.shape[0], span, self.grids + [grid]

    def _ask_on_cache(self, prefix, q: "_QuestionInput", max_new_tokens: int) -> tuple[list[int], int]:
        """Decode after the question's input on the session cache, then crop it back.
        -> (tokens, prompt length)."""
        if not torch.equal(prefix, self.prefix_ids):
            raise ValueError("the chat template's text before the video changed")
        before = self.cached
        try:
            return self._decode(q.embeds, q.positions, max_new_tokens), before + q.embeds.shape[0]
        finally:
            if self.cached > before:  # transformers 5: a negative count removes the newest tokens
                self.cache.crop(before - self.cached)
            self.cached = before

    def _ask_retrieved(self, prefix, question: str, q: "_QuestionInput", span: int,
                       max_new_tokens: int) -> tuple[list[int], int]:
        """ReKV: a pass over the question's own tokens picks each layer's frames (its KV is then
        dropped), and the answer is decoded on the prefix and those frames (``span`` tokens; an
        unfinished unit comes in the question's input); the session's cache is left as it was.
        -> (tokens, prompt length)."""
        if not torch.equal(prefix, self.prefix_ids):
            raise ValueError("the chat template's text before the video changed")
        k, n_prefix = self._retrieve_count, prefix.numel()
        blocks = self.frame_blocks()
        prefix_kv, retrieved = self._retrieval_cache(n_prefix, span)
        ids = self.processor.tokenizer(question, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        session_cache, session_cached = self.cache, self.cached
        self.cache, self.cached = retrieved, n_prefix + span
        try:
            compact_from = n_prefix if self.position_policy == "compact" else None
            with Retriever(self.model.model.language_model, retrieved, prefix_kv, blocks, k, compact_from) as r:
                self._forward(self._embed(ids), self._text_positions(q.text_start, ids.numel()))
            self.last_retrieved = r.chosen
            retrieved.crop(-ids.numel())
            self.cached -= ids.numel()
            return self._decode(q.embeds, q.positions, max_new_tokens), n_prefix + span + q.embeds.shape[0]
        finally:
            self.cache, self.cached = session_cache, session_cached

    def frame_blocks(self) -> list[FrameBlock]:
        """Every frame seen (with ``retrieve_frames``), oldest first, with its KV: copies for the
        frames ``max_frames`` dropped, views of the session cache for the frames it holds."""
        first_held = len(self.blocks) - len(self.kept)
        starts = (self.prefix_ids.numel() + torch.tensor([0] + self.cache_spans[:-1]).cumsum(0)).tolist()
        return self.blocks[:first_held] + [b.view(self.cache, s) for b, s in zip(self.blocks[first_held:], starts)]

    def _retrieval_cache(self, n_prefix: int, span: int):
        """(the prompt prefix's [keys, values] per layer, a cache sized for the prefix and ``span``
        retrieved tokens at every layer): the attention mask is built from the cache's length
        before the first layer runs, and each layer writes its own prefix and frames into it
        (:class:`Retriever`) before it attends, so nothing is copied in here."""
        prefix_kv = [[layer.keys[..., :n_prefix, :] for layer in self.cache.layers],
                     [layer.values[..., :n_prefix, :] for layer in self.cache.layers]]
        retrieved = self._new_cache()
        for idx, (keys, values) in enumerate(zip(*prefix_kv)):
            shape = (*keys.shape[:2], n_prefix + span, keys.shape[-1])
            retrieved.update(keys.new_empty(shape), values.new_empty(shape), idx)
        return prefix_kv, retrieved

    @property
    def _retrieve_count(self) -> int:
        """Blocks (frames; Qwen: slices of 2) a question retrieves: ``retrieve_frames`` worth, or
        every block there is."""
        return min(self.retrieve_frames // self.units.frames_per_unit, len(self.blocks))

    def _retrieved_span(self, k: int) -> int:
        """Tokens in the ``k`` frames a question retrieves: every layer must hold as many (one
        attention mask serves them all), which equal frame sizes give."""
        sizes = {b.size for b in self.blocks}
        if len(sizes) != 1:
            raise RuntimeError(f"retrieval needs frames of one token count, got {sorted(sizes)}")
        return k * sizes.pop()

    def _tokens_seen_by_question(self) -> int:
        """Visual tokens the latest question attended to."""
        if self.retrieve_frames is not None and self.cache is not None:
            return self._retrieved_span(self._retrieve_count)
        return sum(k.shape[0] for k in self.kept)

    @property
    def _rotary(self) -> Rotary:
        return Rotary.of(self.model.model.language_model)

    def _ask_from_scratch(self, prefix, q: "_QuestionInput", max_new_tokens: int) -> tuple[list[int], int]:
        """Question-dependent prefix: prefill prefix + kept tokens + the question's input in a
        throwaway cache."""
        n = prefix.numel()
        embeds = torch.cat([self._embed(prefix), *self.kept, q.embeds])
        positions = torch.cat([self._text_positions(0, n), *[p + n for p in self.kept_positions], q.positions], 1)
        self.cache = self._new_cache()
        try:
            return self._decode(embeds, positions, max_new_tokens), embeds.shape[0]
        finally:
            self.cache, self.cached = None, 0

    def _decode(self, embeds: torch.Tensor, positions, max_new_tokens: int) -> list[int]:
        """Greedy tokens after ``embeds`` (n, D) at ``positions`` ((R, n), or an int: the first of
        n consecutive ones), stopping at an end-of-sequence id. Generated tokens follow the
        prompt's last token, as ``generate`` numbers them (on Qwen a video's temporal positions
        can lie past the question's; ``generate`` does not skip to them)."""
        eos = self.model.generation_config.eos_token_id
        stop = set(eos if isinstance(eos, (list, tuple)) else [eos])
        tokens: list[int] = []
        if isinstance(positions, int):
            positions = self._text_positions(positions, embeds.shape[0])
        next_position = int(positions[:, -1].max()) + 1
        for step in range(max_new_tokens):
            start = time.perf_counter()
            logits = self.model.lm_head(self._forward(embeds, positions)[-1])
            if step == 0:
                self.first_logits = logits.float()
                self._prefill_seconds = time.perf_counter() - start  # the question's prefill
            nxt = int(logits.argmax())
            if nxt in stop:
                break
            tokens.append(nxt)
            embeds, positions = self._embed(torch.tensor([nxt])), self._text_positions(next_position, 1)
            next_position += 1
        return tokens

    def _held_kv_tokens(self) -> int:
        """Tokens whose K/V the session holds per layer: its cache, and the archived copies of
        the frames ``max_frames`` dropped (with retrieval)."""
        return self.cached + sum(b.size for b in self.blocks if b.keys is not None)

    def _stats(self, length: int, kept: int, seen: int, seconds: float, new_tokens: int) -> Stats:
        cfg = self.model.config.text_config
        full_length = length - kept + seen
        return Stats(method="stc-stream", batch_size=1, visual_tokens_in=seen,
                     visual_tokens_per_layer=[kept] * cfg.num_hidden_layers,
                     tokens_per_layer=[length] * cfg.num_hidden_layers,
                     prefill_flops=prefill_flops(cfg, [[length]] * cfg.num_hidden_layers),
                     prefill_flops_full=prefill_flops(cfg, [[full_length]] * cfg.num_hidden_layers),
                     new_tokens=int(new_tokens),
                     kv_cache_tokens=self._held_kv_tokens() * cfg.num_hidden_layers,
                     timings={"vision": self.vision_seconds, "append": self.append_seconds,
                              "prefill": self._prefill_seconds, "total": seconds})


@dataclass
class _QuestionInput:
    """A question's input after the cached video: ``embeds`` (n, D) at absolute ``positions``
    (R, n); ``kept`` / ``seen`` the visual tokens of an unfinished unit in it (kept / before
    pruning); ``text_start`` the position of the first text token after the video."""
    embeds: torch.Tensor
    positions: torch.Tensor
    kept: int
    seen: int
    text_start: int


# stc's knobs that a session takes as arguments (retention travels on its own): what
# ``video-qa --stream`` may pass on from ``--method stc:...`` / a preset
SESSION_KNOBS = tuple(sorted(set(inspect.signature(StreamSession).parameters) & set(STCPruner.field_defaults())
                             - {"retention"}))
