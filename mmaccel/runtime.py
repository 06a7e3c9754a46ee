"""The hooks that run a method inside a stock transformers VLM.

Installed on one model instance and always removed by :meth:`Runtime.remove`:

* wrappers (instance attributes) around the model's ``generate`` and ``forward``: one call at a
  time under a lock (the per-call state here is shared by every thread), stats per call, and
  each thread's last call kept for it (:meth:`Runtime.last_call`);
* wrappers (instance attributes) around the inner model's ``get_image_features`` /
  ``get_video_features`` that record each media item's feature layout and vision time;
* a forward pre-hook on the inner model that starts a request at prefill;
* a forward pre-hook on the language model: at prefill it applies the pre-LLM reducer and
  splices the kept tokens (shorter ``inputs_embeds``, 2-D mask, positions); at decode it
  supplies the mask and positions that match the shortened cache;
* forward pre-hooks on the decoder layers: in-LLM pruning that shortens the hidden states
  (and so the KV cache of every later layer), and the per-stage masks and rotary embeddings;
* an attention tap (see :mod:`mmaccel.scoring`) on the layers whose scores a method needs.
"""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field, replace

import torch

from .methods.base import InLLMPruner, Method, PreLLMReducer
from .models.base import Segment, VLMAdapter
from .scoring import WRAPPER_PREFIX, TapRequest, register_wrapper
from .stats import Stats, clock, prefill_flops
from .tokens.splice import compact_positions, gather_positions, gather_tokens, pack_kept, to_device_async


@dataclass
class Stage:
    """The sequence as a group of decoder layers sees it during prefill (B, L)."""

    first_layer: int
    valid: torch.Tensor  # (B, L) bool, False on padding
    visual: torch.Tensor  # (B, L) bool
    positions: torch.Tensor  # (B, L) or (3, B, L)
    orig: torch.Tensor | None = None  # (B, L) index of each token in the original sequence
    protected: torch.Tensor | None = None  # (B, L) bool: tokens no later stage may drop
    layer_kwargs: dict = field(default_factory=dict)  # attention_mask, position_embeddings, position_ids
    counts: tuple | None = None  # (tokens per sample, visual tokens): read once per stage, see _count_layer
    key_bias: torch.Tensor | None = None  # (B, L) log(size) of each token: proportional attention, or None


@dataclass
class Request:
    """State of one prefill and the decode steps that follow it."""

    input_ids: torch.Tensor | None
    orig_len: int
    prefill: bool = True
    stages: list[Stage] = field(default_factory=list)
    next_pos: torch.Tensor | None = None  # (B,) next position of each sample
    decode_tail: torch.Tensor | None = None  # (B, n) mask of decoded tokens
    decode_masks: dict = field(default_factory=dict)  # stage index -> mask of this step
    full_tokens: list = field(default_factory=list)  # per sample: real tokens before any reduction
    visual_in: list = field(default_factory=list)  # per sample: visual tokens at the LLM input
    visual_orig: list = field(default_factory=list)  # per sample: visual tokens before any reduction
    segments: list = field(default_factory=list)  # the visual segments of the prefill
    # per sample: (kept positions, segment positions, Reduction) of each merging reduction
    sources: list = field(default_factory=list)
    final: Stage | None = None  # the stage the last decoder layer saw
    # (B, T) log of how many original tokens each input token stands for, where a method merged
    # before the LLM and asked for proportional attention; None when no kept token is merged
    log_size: torch.Tensor | None = None


def _cache_len(cache, layer: int = 0) -> int:
    if cache is None:
        return 0
    try:
        return int(cache.get_seq_length(layer))
    except (IndexError, TypeError):
        return 0


class Runtime:
    """Installs a method's hooks on one model; ``remove()`` restores it exactly."""

    def __init__(self, adapter: VLMAdapter, method: Method, position_policy: str = "preserve"):
        if position_policy not in ("preserve", "compact"):
            raise ValueError(f"position_policy must be 'preserve' or 'compact', got {position_policy!r}")
        method.check_model(adapter)
        self.adapter, self.method, self.policy = adapter, method, position_policy
        self.splicing = isinstance(method, (PreLLMReducer, InLLMPruner))
        # merged tokens weigh log(size) in the LLM's attention (only methods that merge before it)
        self.proportional = isinstance(method, PreLLMReducer) and method.llm_proportional()
        if self.proportional:
            _check_bias_capable(adapter.text_config, method.name)
        self.schedule = dict(method.schedule(len(adapter.layers))) if isinstance(method, InLLMPruner) else {}
        self.handles, self.patched, self.taps = [], [], {}
        self.request: Request | None = None
        self.records: list[tuple[str, list, dict]] = []
        self.stats = Stats(method=method.name)
        self._per_sample_layers: list[list[int]] = []
        self._in_generate = False
        self._records_used = False  # the recorded media fed a prefill already (see _wrap_features)
        self._pending_ids = None
        # one call at a time: the per-call state above is shared by every thread using the model
        self._lock = threading.RLock()
        self._mine = threading.local()  # each thread's own last call: its stats and request
        self._saved_attn = None
        self.vision_tap = None
        self._pack_calls: list[dict] = []
        self.vision_maps: dict = {}  # per-row maps a tower-stage method leaves for the pre-LLM step
        self.current_kind = "image"
        self.current_call = None  # (kind, its inputs by name) of the feature call running, if any

    # ------------------------------------------------------------------ install / remove
    def install(self) -> "Runtime":
        inner, lm = self.adapter.inner, self.adapter.language_model
        for name in self.adapter.feature_methods():
            if hasattr(inner, name):
                self._patch(inner, name, self._wrap_features(getattr(inner, name), name))
        self._install_vision_tap()
        if hasattr(self.method, "install_tower"):
            self.handles += self.method.install_tower(self)
            inner = self.adapter.inner
            if hasattr(inner, "pack_image_features") and "pack_image_features" not in vars(inner):
                self._patch(inner, "pack_image_features", self._wrap_pack(inner.pack_image_features))
        self._patch(self.adapter.model, "generate", self._wrap_generate(self.adapter.model.generate))
        self._patch(self.adapter.model, "forward", self._wrap_forward(self.adapter.model.forward))
        self.handles.append(inner.register_forward_pre_hook(self._on_inner, with_kwargs=True))
        self.handles.append(lm.register_forward_pre_hook(self._on_language_model, with_kwargs=True))
        for idx, layer in enumerate(self.adapter.layers):
            self.handles.append(layer.register_forward_pre_hook(self._layer_hook(idx), with_kwargs=True))
        self._install_taps()
        return self

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for layer in self.adapter.layers:
            vars(layer.self_attn).pop("_mmaccel_key_bias", None)
        for obj, name, had, old in reversed(self.patched):
            if had:
                setattr(obj, name, old)
            else:
                delattr(obj, name)
        for attn in self.taps.values():
            del attn._mmaccel_tap
        if self.vision_tap is not None:
            self.vision_tap.remove()
            self.vision_tap = None
        if self._saved_attn is not None:
            self.adapter.text_config._attn_implementation_internal = self._saved_attn
        self.handles, self.patched, self.taps, self.request = [], [], {}, None

    def _patch(self, obj, name, value) -> None:
        had = name in vars(obj)
        self.patched.append((obj, name, had, vars(obj).get(name)))
        setattr(obj, name, value)

    def _install_vision_tap(self) -> None:
        layers = self.method.vision_layers(self.adapter) if hasattr(self.method, "vision_layers") else []
        if not layers:
            return
        from .vision.taps import VisionTap

        self.vision_tap = VisionTap(self.adapter, layers, getattr(self.method, "vision_mode", "auto")).install()
        inner = self.adapter.inner
        if hasattr(inner, "pack_image_features"):
            self._patch(inner, "pack_image_features", self._wrap_pack(inner.pack_image_features))

    def _wrap_pack(self, fn):
        import inspect

        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            self._pack_calls.append(dict(signature.bind(*args, **kwargs).arguments))
            return fn(*args, **kwargs)

        return wrapper

    def _install_taps(self) -> None:
        tap_layers = {self.method.tap_layer(k) for k in self.schedule}
        if not tap_layers and not self.proportional:
            return
        cfg = self.adapter.text_config
        self._saved_attn = cfg._attn_implementation_internal
        cfg._attn_implementation_internal = register_wrapper(cfg._attn_implementation or "sdpa")
        for idx in tap_layers:
            attn = self.adapter.layers[idx].self_attn
            attn._mmaccel_tap = TapRequest(enabled=False)
            self.taps[idx] = attn

    # ------------------------------------------------------------------ call bookkeeping
    def _wrap_generate(self, generate):
        def wrapper(*args, **kwargs):
            with self._lock:
                try:
                    return self._generate(generate, args, kwargs)
                finally:
                    self._mine.call = (self.stats, self.request)

        return wrapper

    def _wrap_forward(self, forward):
        @functools.wraps(forward)  # generate() reads the forward's signature
        def wrapper(*args, **kwargs):
            with self._lock:
                self._on_call_start(args, kwargs)
                out = forward(*args, **kwargs)
                self._on_call_end(out)
                self._mine.call = (self.stats, self.request)
                return out

        return wrapper

    def last_call(self) -> tuple:
        """(stats, request) of the calling thread's last call (of the last call from any thread
        when this one made none)."""
        return getattr(self._mine, "call", (self.stats, self.request))

    def _generate(self, generate, args, kwargs):
        self._in_generate = True
        self._pending_ids = kwargs.get("input_ids", args[0] if args else None)
        self._new_stats()
        self.records, self._records_used = [], False
        start = clock()
        try:
            out = generate(*args, **kwargs)
        finally:
            self._in_generate = False
        self.stats.add_time("total", clock() - start)
        if isinstance(out, torch.Tensor) and self.request is not None:
            self.stats.new_tokens = int(out.shape[0] * (out.shape[1] - self.request.orig_len))
        return out

    def _new_stats(self) -> None:
        self.stats = Stats(method=self.method.name)
        self._per_sample_layers = []

    def _on_call_start(self, args, kwargs):
        if not self._in_generate and _cache_len(kwargs.get("cache", kwargs.get("past_key_values"))) == 0:
            self._new_stats()
            self.records, self._records_used = [], False
        self._t0 = clock()

    def _on_call_end(self, output):
        elapsed = clock() - self._t0
        phase = "prefill" if self.request is not None and self.request.prefill else "decode"
        self.stats.add_time(phase, elapsed)
        if self.request is not None and self.request.prefill:
            cache = getattr(output, "cache", None)
            if self.request.stages and cache is not None:
                self.method.after_prefill(self, cache)
            self._finish_prefill_stats(cache)
            self.request.prefill = False

    def _finish_prefill_stats(self, cache) -> None:
        scoring = sum(attn._mmaccel_tap.seconds for attn in self.taps.values())
        for attn in self.taps.values():
            attn._mmaccel_tap.seconds = 0.0
        if self.taps:
            self.stats.add_time("scoring", scoring)
        per_layer = self._per_sample_layers
        cfg = self.adapter.text_config
        self.stats.tokens_per_layer = [sum(x) for x in per_layer]
        self.stats.prefill_flops = prefill_flops(cfg, per_layer)
        full = self.request.full_tokens
        self.stats.prefill_flops_full = prefill_flops(cfg, [full] * len(per_layer)) if full else 0.0
        if cache is not None and hasattr(cache, "layers"):  # physical K/V entries, padding included
            self.stats.kv_cache_tokens = sum(int(l.keys.shape[0] * l.keys.shape[-2]) for l in cache.layers
                                             if getattr(l, "keys", None) is not None)
        else:
            self.stats.kv_cache_tokens = sum(self.stats.tokens_per_layer)

    # ------------------------------------------------------------------ vision features
    def _wrap_features(self, fn, name):
        kind = "video" if "video" in name else "image"

        @functools.wraps(fn)  # generate() inspects the signature to pre-encode media
        def wrapper(*args, **kwargs):
            if self.vision_tap is not None:
                self.vision_tap.clear()
            self._pack_calls, self.vision_maps, self.current_kind = [], {}, kind
            if self._records_used:
                self.records, self._records_used = [], False
            call = dict(kwargs)
            if args:
                call.setdefault("pixel_values_videos" if kind == "video" else "pixel_values", args[0])
                if len(args) > 1:
                    call.setdefault("video_grid_thw" if kind == "video" else "image_grid_thw", args[1])
            start = clock()
            self.current_call = (kind, call)  # what a tower-stage method may read while it runs
            try:
                out = fn(*args, **kwargs)
            finally:
                self.current_call = None
            self.stats.add_time("vision", clock() - start)
            if self.vision_tap is not None or self.vision_maps:
                taps = self.vision_tap.scores.items() if self.vision_tap is not None else []
                call["_vision_scores"] = {k: list(v) for k, v in taps} | self.vision_maps
                call["_pack"] = self._pack_calls
            feats = self.adapter.pooler_list(out)
            self._check_placeholders(kind, feats)
            self.records.append((kind, feats, call))
            return out

        return wrapper

    def _check_placeholders(self, kind: str, feats: list) -> None:
        ids = self._pending_ids if self._in_generate else getattr(self.request, "input_ids", None)
        token = self.adapter.placeholder_ids().get(kind)
        if ids is None or token is None:
            return
        have, need = int((ids == token).sum()), sum(int(f.shape[0]) for f in feats)
        if have != need:
            raise ValueError(
                f"the prompt has {have} {kind} placeholder tokens but the {kind}s give {need} features: build the "
                f"inputs with the model's own processor (processor(text=..., {kind}s=...)) so every {kind} marker "
                f"is expanded, and pass exactly one {kind} per marker")

    # ------------------------------------------------------------------ inner model
    def _on_inner(self, module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if getattr(cache, "is_compileable", False) and self.splicing:
            raise ValueError("mmaccel shortens the KV cache per layer, which a static cache cannot hold: "
                             "use the default dynamic cache (drop cache_implementation='static')")
        if _cache_len(cache) == 0:
            if input_ids is None and any(kwargs.get(k) is not None for k in ("pixel_values", "pixel_values_videos")):
                raise ValueError("mmaccel needs input_ids (not inputs_embeds) to locate the visual placeholders")
            length = input_ids.shape[1] if input_ids is not None else kwargs["inputs_embeds"].shape[1]
            self._refuse_chunked_prefill(length)
            self.request = Request(input_ids=input_ids, orig_len=length)
        elif self.request is None:
            raise ValueError("mmaccel: this cache was filled before accelerate_vlm was applied; start a new generation")
        return None

    def _refuse_chunked_prefill(self, length: int) -> None:
        """A generate() prefill shorter than its prompt is chunked (``prefill_chunk_size``): the
        reduction needs every visual token of a sample in one forward."""
        prompt = self._pending_ids
        if self.splicing and self._in_generate and prompt is not None and length < prompt.shape[-1]:
            raise ValueError(f"mmaccel reduces visual tokens over the whole prompt in one prefill, but generate() "
                             f"fed {length} of its {prompt.shape[-1]} tokens (chunked prefill): drop "
                             "prefill_chunk_size from the generation config")

    # ------------------------------------------------------------------ language model
    def _on_language_model(self, module, args, kwargs):
        req = self.request
        if req is None:
            return None
        if req.prefill:
            return self._prefill_splice(args, kwargs)
        return self._decode_inputs(args, kwargs) if req.stages else None

    def _segments(self, batch: int) -> list[Segment]:
        req, segments = self.request, []
        ids = req.input_ids
        if ids is None:
            return segments
        for kind, token_id in self.adapter.placeholder_ids().items():
            records = [(f, c) for k, f, c in self.records if k == kind]
            flat = (ids == token_id).nonzero()  # (N, 2) in (sample, position) order = masked_scatter order
            if flat.shape[0] == 0:
                continue
            feats = [f for fs, _ in records for f in fs]
            per_record = [self.adapter.media_parts(kind, fs, c) for fs, c in records]
            parts = [p for media in per_record for p in media]
            scores = [s for (fs, c), media in zip(records, per_record) for s in self._media_scores(kind, c, media)]
            parts, scores = _expand_for_copies(parts, scores, (ids == token_id).sum(1).tolist())
            segments += _place(flat, parts, kind, feats, scores)
        return segments

    def _media_scores(self, kind, call, media_parts) -> list:
        """Per media, per part: {vision layer: (n, H) scores}, or None without a vision tap."""
        if "_vision_scores" not in call:
            return [None] * len(media_parts)
        per_layer = {layer: self.adapter.media_scores(kind, entries, media_parts, call)
                     for layer, entries in call["_vision_scores"].items()}
        tiles = self.adapter.media_tiles(kind, media_parts, call)
        if tiles is not None:
            per_layer["tile"] = tiles
        return [[{layer: per_layer[layer][m][p] for layer in per_layer} for p in range(len(parts))]
                for m, parts in enumerate(media_parts)]

    def _prefill_splice(self, args, kwargs):
        start = clock()
        try:
            return self._prefill_splice_inner(args, kwargs)
        finally:
            self.stats.add_time("reduce", clock() - start)

    def _prefill_splice_inner(self, args, kwargs):
        req = self.request
        embeds = kwargs["inputs_embeds"]
        batch, length = embeds.shape[:2]
        segments = self._segments(batch)
        req.segments = segments
        # kept, not cleared: generate() encodes the media once, and with use_cache=False every step
        # is a new prefill of the same media; a new encoding replaces them (_wrap_features)
        self._records_used = True
        mask2d = kwargs.get("attention_mask")
        if mask2d is not None and not (isinstance(mask2d, torch.Tensor) and mask2d.dim() == 2) and self.splicing:
            raise ValueError("mmaccel needs the 2-D padding attention mask (batch, length) the processor returns, "
                             "not a prepared 4-D mask")
        mask2d = mask2d if isinstance(mask2d, torch.Tensor) and mask2d.dim() == 2 else None
        self.stats.visual_tokens_per_layer, self._per_sample_layers = [], []  # the latest prefill counts
        valid = mask2d.bool() if mask2d is not None else torch.ones(batch, length, dtype=torch.bool, device=embeds.device)
        visual = torch.zeros_like(valid)
        for seg in segments:
            visual[seg.sample, seg.positions] = True
        self.stats.batch_size = batch
        req.visual_orig = (visual & valid).sum(1).tolist()
        self.stats.visual_tokens_in = sum(req.visual_orig)
        req.full_tokens = valid.sum(1).tolist()
        positions = self._input_positions(kwargs.get("position_ids"), mask2d, batch, length, embeds.device)
        if not self.splicing:
            req.stages = []
            orig = torch.arange(length, device=embeds.device).expand(batch, -1)
            req.final = Stage(0, valid, visual, positions, orig)
            return None
        self._protected = torch.zeros_like(valid)
        keep, embeds = self._pre_llm(embeds, segments, valid, visual)
        index, new_valid = pack_kept(keep)
        stage = Stage(0, new_valid, gather_tokens(visual, index) & new_valid,
                      self._new_positions(positions, index, new_valid), index,
                      gather_tokens(self._protected, index) & new_valid,
                      key_bias=None if req.log_size is None else gather_tokens(req.log_size, index))
        req.stages, req.final = [stage], stage
        req.visual_in = (stage.visual & stage.valid).sum(1).tolist()
        req.next_pos = self._next_positions(positions, valid, new_valid)
        kwargs["inputs_embeds"] = gather_tokens(embeds, index)
        kwargs["attention_mask"] = new_valid.long()
        kwargs["position_ids"] = self._lm_position_ids(stage.positions, new_valid, kwargs.get("position_ids"))
        self._repair_rope_deltas(stage, new_valid)
        return args, kwargs

    def _input_positions(self, position_ids, mask2d, batch, length, device):
        """Positions the model would use, as (B, T) or (3, B, T) for M-RoPE."""
        if position_ids is None:  # the decoder's own default: arange, padding included
            base = torch.arange(length, device=device).unsqueeze(0).expand(batch, -1)
            return base.unsqueeze(0).expand(3, -1, -1) if self.adapter.uses_mrope else base
        if position_ids.dim() == 3:
            return position_ids[-3:]
        return position_ids.expand(batch, -1)

    def _new_positions(self, positions, index, valid):
        if self.policy == "compact":
            return compact_positions(valid, 3 if positions.dim() == 3 else None)
        return gather_positions(positions, index)

    def _next_positions(self, positions, valid, kept_valid) -> torch.Tensor:
        """(B,) the position of each sample's first generated token: right after the kept
        tokens when positions are compacted, after the original prompt's last token when
        preserved. The last token, not the largest position: ``generate`` numbers on from the
        question, and a Qwen video's temporal positions can lie past it."""
        if self.policy == "compact":
            return kept_valid.sum(1)
        pos = positions.amax(0) if positions.dim() == 3 else positions
        last = (valid.long() * torch.arange(1, valid.shape[1] + 1, device=valid.device)).argmax(1)
        return pos.gather(1, last[:, None])[:, 0] + 1

    def _lm_position_ids(self, positions, valid, original):
        """Shape the language model expects: (B, L) or M-RoPE (3|4, B, L) like the input."""
        if positions.dim() == 2:
            return positions
        if original is not None and original.dim() == 3 and original.shape[0] == 4:
            return torch.cat([compact_positions(valid).unsqueeze(0), positions], 0)
        return positions

    def _repair_rope_deltas(self, stage: Stage, valid) -> None:
        """Qwen2-VL keeps ``rope_deltas`` = next position - cached length; make it match the
        shortened sequence so positions derived from the cache length stay right."""
        if self.adapter.uses_mrope and hasattr(self.adapter.inner, "rope_deltas"):
            deltas = self.request.next_pos - valid.sum(1)
            self.adapter.inner.rope_deltas = deltas.unsqueeze(1)

    def _pre_llm(self, embeds, segments, valid, visual):
        keep = valid.clone()
        if not isinstance(self.method, PreLLMReducer) or not segments:
            return keep, embeds
        embeds = embeds.clone()
        self.request.sources = [[] for _ in range(embeds.shape[0])]
        frac = self.method.keep_fraction()
        for sample in range(embeds.shape[0]):
            media = _group_media([s for s in segments if s.sample == sample])
            sizes = [sum(s.n for s in segs) for segs in media]
            for segs, budget in zip(media, allocate(sizes, round(frac * sum(sizes)))):
                feats = [embeds[sample, s.positions] for s in segs]
                for seg, red in zip(segs, self.method.reduce_parts(feats, segs, budget)):
                    self._apply_reduction(embeds, keep, sample, seg, red)
        return keep, embeds

    def _apply_reduction(self, embeds, keep, sample, seg, red) -> None:
        keep[sample, seg.positions] = False
        kept_pos = seg.positions.to(embeds.device)[red.keep]
        keep[sample, kept_pos] = True
        if red.features is not None:
            embeds[sample, kept_pos] = red.features.to(embeds.dtype)
        if red.protected is not None:
            self._protected[sample, seg.positions.to(embeds.device)[red.protected]] = True
        if red.groups is not None:  # provenance is built only when asked for (see provenance())
            self.request.sources[sample].append((kept_pos, seg.positions, red))
        if self.proportional and red.sizes is not None and bool((red.sizes > 1).any()):
            if self.request.log_size is None:  # only once a token is merged: else the mask stays SDPA's own
                self.request.log_size = torch.zeros(keep.shape, device=embeds.device)
            self.request.log_size[sample, kept_pos] = red.sizes.to(embeds.device).float().log()

    def _decode_inputs(self, args, kwargs):
        req = self.request
        embeds = kwargs["inputs_embeds"]
        q = embeds.shape[1]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        stage0 = req.stages[0]
        total_new = _cache_len(cache, 0) + q - stage0.valid.shape[1]
        user = kwargs.get("attention_mask")
        if isinstance(user, torch.Tensor) and user.dim() == 2 and user.shape[1] >= total_new:
            tail = user[:, user.shape[1] - total_new:].long()
        else:
            tail = torch.ones(embeds.shape[0], total_new, dtype=torch.long, device=embeds.device)
        req.decode_tail, req.decode_masks = tail, {}
        kwargs["attention_mask"] = torch.cat([stage0.valid.long(), tail], 1)
        pos = req.next_pos[:, None] + torch.arange(q, device=embeds.device)[None]
        req.next_pos = req.next_pos + q
        if self.adapter.uses_mrope:
            rows = pos.unsqueeze(0).expand(3, -1, -1)
            orig = kwargs.get("position_ids")
            pos = torch.cat([pos.unsqueeze(0), rows], 0) if orig is not None and orig.shape[0] == 4 else rows
        kwargs["position_ids"] = pos
        return args, kwargs

    # ------------------------------------------------------------------ decoder layers
    def shrink_caches_to_final(self, cache, from_layer: int | None = None) -> None:
        """Output-aware cache policy: after prefill, every pruned stage's KV cache keeps only the
        tokens the last stage kept; layers before the first pruning layer keep everything, or,
        with ``from_layer`` (>= 1), only the layers before it (stage 0 is split there first)."""
        req = self.request
        if from_layer is not None and len(req.stages) > 1 and from_layer < req.stages[1].first_layer:
            if from_layer < 1:
                raise ValueError("layer 0's cache sets the decode length; from_layer must be >= 1")
            req.stages.insert(1, replace(req.stages[0], first_layer=from_layer))
        final = req.stages[-1]
        for s in range(1, len(req.stages) - 1):
            stage = req.stages[s]
            index = subset_index(stage, final)
            for layer in range(stage.first_layer, req.stages[s + 1].first_layer):
                cl = cache.layers[layer]
                gather = index[:, None, :, None].expand(-1, cl.keys.shape[1], -1, cl.keys.shape[-1])
                cl.keys, cl.values = torch.gather(cl.keys, 2, gather), torch.gather(cl.values, 2, gather)
            req.stages[s] = Stage(stage.first_layer, final.valid, final.visual, final.positions, final.orig,
                                  final.protected, key_bias=final.key_bias)

    def _layer_hook(self, idx: int):
        def hook(module, args, kwargs):
            req = self.request
            if req is None:
                return None
            if idx in self.taps:
                self.taps[idx]._mmaccel_tap.enabled = req.prefill
            if not req.prefill:
                if self.proportional:
                    self._set_key_bias(idx)
                return self._decode_layer(idx, args, kwargs)
            if idx in self.schedule:
                start = clock()
                args, kwargs = self._prune(idx, args, kwargs)
                self.stats.add_time("reduce", clock() - start)
            if self.proportional:  # after this layer's own pruning: the keys it will see
                self._set_key_bias(idx)
            if idx in self.taps:  # after this layer's own pruning: rows index what it will see
                self._set_query_rows(idx)
            stage = req.stages[-1] if req.stages else req.final
            self._count_layer(stage)
            if len(req.stages) > 1:
                kwargs.update(stage.layer_kwargs)
            return args, kwargs

        return hook

    def _stage_at(self, idx: int) -> int:
        """Index of the stage decoder layer ``idx`` runs in (0 when nothing was spliced)."""
        stages = self.request.stages
        return max(i for i, s in enumerate(stages) if s.first_layer <= idx) if stages else 0

    def _set_key_bias(self, idx: int) -> None:
        """Give layer ``idx``'s attention the log(size) of the keys it sees: its stage's tokens in
        prefill, its stage's cache in decode (the wrapper adds 0 for tokens decoded since)."""
        stages = self.request.stages
        self.adapter.layers[idx].self_attn._mmaccel_key_bias = stages[self._stage_at(idx)].key_bias if stages else None

    def _count_layer(self, stage: Stage) -> None:
        if stage.counts is None:  # one host sync per stage, not per layer: on a GPU each one
            # drains the queue and serialises kernel launches with compute (results/speed-gpu/)
            stage.counts = (stage.valid.sum(1).tolist(), int((stage.visual & stage.valid).sum()))
        self._per_sample_layers.append(stage.counts[0])
        self.stats.visual_tokens_per_layer.append(stage.counts[1])

    def _decode_layer(self, idx, args, kwargs):
        req = self.request
        stage_idx = self._stage_at(idx)
        if stage_idx == 0:
            return None
        if stage_idx not in req.decode_masks:
            stage = req.stages[stage_idx]
            mask2d = torch.cat([stage.valid.long(), req.decode_tail], 1)
            hidden = args[0] if args else None  # the layer's input: the mask's device and dtype
            req.decode_masks[stage_idx] = self._make_mask(kwargs, mask2d, stage.first_layer, hidden)
        kwargs["attention_mask"] = req.decode_masks[stage_idx]
        return args, kwargs

    def _make_mask(self, kwargs, mask2d, layer_idx, hidden=None):
        from transformers.masking_utils import create_causal_mask

        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        hidden = hidden if hidden is not None else kwargs.get("hidden_states")
        ref = hidden if hidden is not None else torch.empty(mask2d.shape[0], 1, 0, device=mask2d.device)
        return create_causal_mask(config=self.adapter.text_config, inputs_embeds=ref, attention_mask=mask2d,
                                  cache=cache, layer_idx=layer_idx)

    def _set_query_rows(self, idx: int) -> None:
        """Before a tap layer runs: which query rows of the current stage score the keys."""
        req = self.request
        tap = self.taps[idx]._mmaccel_tap
        if self.method.query == "last" or not req.stages:
            tap.rows, tap.extra = None, {}
            return
        stage = req.stages[-1]
        rows, valid = text_query_rows(stage.valid, stage.visual)
        tap.rows, tap.extra = rows, {"row_valid": valid}

    def _prune(self, idx, args, kwargs):
        req = self.request
        hidden = args[0] if args else kwargs["hidden_states"]
        stage = req.stages[-1]
        tap = self.taps[self.method.tap_layer(idx)]._mmaccel_tap
        probs = tap.probs[..., : stage.valid.shape[1]]
        rows, row_valid = tap.rows, tap.extra.get("row_valid")
        if rows is None:  # the last query of every sample
            rows = torch.full((probs.shape[0], 1), probs.shape[-1] - 1, dtype=torch.long, device=probs.device)
            row_valid = torch.ones_like(rows, dtype=torch.bool)
        base = req.visual_orig if self.method.budget_base == "original" else req.visual_in
        budgets = [self.method.layer_budget(n, self.schedule[idx]) for n in base]
        keep = self.method.select(probs, rows, row_valid, stage.valid, stage.visual, stage.protected, budgets)
        # one host read for the new length and this stage's counts (each read drains a GPU queue)
        *per_sample, n_visual = torch.cat([keep.sum(1), (keep & stage.visual).sum()[None]]).tolist()
        index, valid = pack_kept(keep, max(per_sample))
        new_hidden = gather_tokens(hidden, index)
        positions = self._new_positions(stage.positions, index, valid)
        new = Stage(idx, valid, gather_tokens(stage.visual, index) & valid, positions,
                    torch.gather(stage.orig, 1, index), gather_tokens(stage.protected, index) & valid,
                    counts=(per_sample, n_visual),
                    key_bias=None if stage.key_bias is None else torch.gather(stage.key_bias, 1, index))
        rotary = self.adapter.language_model.rotary_emb
        text_pos = positions if positions.dim() == 2 else compact_positions(valid)
        new.layer_kwargs = {
            "attention_mask": self._make_mask(kwargs, valid.long(), idx, new_hidden),
            "position_embeddings": rotary(new_hidden, positions),
            "position_ids": text_pos if kwargs.get("position_ids") is not None else None,
        }
        req.stages.append(new)
        req.final = new
        args = (new_hidden,) + tuple(args[1:]) if args else args
        if not args:
            kwargs["hidden_states"] = new_hidden
        return args, kwargs


def _check_bias_capable(text_config, method: str) -> None:
    """Proportional attention adds a per-key bias to an additive mask: SDPA and eager take one,
    kernels such as FlashAttention-2 take only a padding mask."""
    impl = (text_config._attn_implementation or "sdpa").removeprefix(WRAPPER_PREFIX)
    if impl not in ("sdpa", "eager"):
        raise ValueError(f"{method}'s proportional_attention adds log(size) to the language model's attention "
                         f"logits, which needs attn_implementation 'sdpa' or 'eager', not {impl!r}: load the model "
                         f"with attn_implementation='sdpa', or pass proportional_attention=False")


def subset_index(stage: Stage, final: Stage) -> torch.Tensor:
    """(B, L_final) index of each of ``final``'s tokens within ``stage``'s layout (0 on padding)."""
    orig = torch.where(stage.valid, stage.orig, torch.full_like(stage.orig, -1))
    index = torch.stack([torch.searchsorted(orig[b].contiguous(), final.orig[b].contiguous())
                         for b in range(orig.shape[0])])
    return torch.where(final.valid, index.clamp(max=orig.shape[1] - 1), torch.zeros_like(index))


def kept_visual_positions(request: Request | None) -> list[torch.Tensor]:
    """Per sample: original sequence positions of the visual tokens the last layer saw (sorted)."""
    if request is None or request.final is None:
        return []
    st = request.final
    return [st.orig[b][st.visual[b] & st.valid[b]].sort().values for b in range(st.orig.shape[0])]


def provenance(request: Request | None) -> list[dict[int, torch.Tensor]]:
    """Per sample: kept visual position -> original positions it stands for (itself, or the
    tokens merged into it by a pre-LLM merging method)."""
    merged = merged_sources(request)
    out = []
    for b, kept in enumerate(kept_visual_positions(request)):
        sources = merged[b] if b < len(merged) else {}
        out.append({p: sources.get(p, torch.tensor([p])) for p in kept.tolist()})
    return out


def merged_sources(request: Request | None) -> list[dict[int, torch.Tensor]]:
    """Per sample: each token a pre-LLM merge kept -> the original positions merged into it
    (all of the last prefill's merges, also of tokens later pruned inside the LLM)."""
    return [_merged_sources(recorded) for recorded in request.sources] if request is not None else []


def _merged_sources(recorded: list) -> dict[int, torch.Tensor]:
    """Kept position -> original positions, from the merging reductions the prefill recorded
    (per token Python work, so it runs here rather than in every prefill)."""
    out = {}
    for kept_pos, positions, red in recorded:
        for pos, group in zip(kept_pos.tolist(), red.group_list()):
            out[pos] = positions[group.cpu()]
    return out


def allocate(sizes: list[int], total: int) -> list[int]:
    """Split ``total`` over parts proportionally to ``sizes`` (largest remainder), each <= its size."""
    whole = sum(sizes)
    if whole == 0:
        return [0] * len(sizes)
    total = max(0, min(total, whole))
    exact = [s * total / whole for s in sizes]
    out = [int(e) for e in exact]
    order = sorted(range(len(sizes)), key=lambda i: exact[i] - out[i], reverse=True)
    for i in order[: total - sum(out)]:
        out[i] += 1
    return out


def text_query_rows(valid: torch.Tensor, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the valid text tokens after the first visual token (the question and the
    generation prompt), padded by repeating the last one. Returns rows (B, Q), row_valid (B, Q).
    One host sync (Q), no loop over rows."""
    pos = torch.arange(valid.shape[1], device=valid.device).expand_as(valid)
    first_visual = torch.where(visual, pos, valid.shape[1]).amin(1, keepdim=True)
    text = valid & ~visual & (pos > first_visual)
    text[:, -1] |= valid[:, -1]  # the last real token always scores
    counts = text.sum(1, keepdim=True)
    q = int(counts.max())
    # stable descending sort: each row's text positions first, in order
    picked = torch.sort(text.to(torch.uint8), dim=1, descending=True, stable=True).indices
    slot = torch.arange(q, device=valid.device)[None]
    rows = torch.gather(picked, 1, torch.minimum(slot, (counts - 1).clamp(min=0)))
    return rows, slot < counts


def select_visual(scores, valid, visual, budgets: list[int]) -> torch.Tensor:
    """Keep every valid text token and the top ``budgets[b]`` visual tokens of row b.

    scores: (B, L) importance; valid, visual: (B, L) bool. Returns keep (B, L) bool.
    One sort over the batch with the non-candidates at -inf, no host sync: the rank limit drops
    what exceeds a row's budget, the candidate mask what a short row filled up with. The sort is
    stable, so equal scores (protected tokens are +inf) go to the earlier position, the same on
    every device (top-k leaves ties to the backend).
    """
    keep = valid & ~visual
    candidates = valid & visual
    k = min(max(budgets, default=0), scores.shape[1])
    if k <= 0:
        return keep
    ranked = scores.float().masked_fill(~candidates, float("-inf"))
    top = torch.sort(ranked, dim=1, descending=True, stable=True).indices[:, :k]
    limit = to_device_async(torch.tensor(budgets, dtype=torch.long), scores.device)
    within = torch.arange(k, device=scores.device)[None] < limit[:, None]
    chosen = within & torch.gather(candidates, 1, top)
    return keep | torch.zeros_like(keep).scatter(1, top, chosen)


def _group_media(segments: list[Segment]) -> list[list[Segment]]:
    """Segments of one sample grouped by media item, in order."""
    groups: dict[tuple, list[Segment]] = {}
    for seg in segments:
        groups.setdefault((seg.part.kind, seg.media), []).append(seg)
    return list(groups.values())


def _place(flat: torch.Tensor, parts: list[list], kind: str, feats: list, scores=None) -> list[Segment]:
    """Map media parts (in feature order) onto placeholder positions ``flat`` (N, 2)."""
    if not parts or sum(p.length for media in parts for p in media) != flat.shape[0]:
        return _runs(flat, kind)
    scores = scores or [None] * len(parts)
    segments, offset = [], 0
    for media_idx, (media, media_scores) in enumerate(zip(parts, scores)):
        sample = int(flat[offset, 0])
        for part_idx, part in enumerate(media):
            rows = flat[offset: offset + part.length]
            part_scores = media_scores[part_idx] if media_scores is not None else None
            segments.append(Segment(sample, rows[:, 1].clone(), part, media_idx, part_idx, part_scores))
            offset += part.length
    return _renumber_media(segments)


def _expand_for_copies(parts: list[list], scores: list, per_row: list[int]) -> tuple[list[list], list]:
    """Media parts (and their scores) for a batch that generate() expanded after encoding.

    Beam search and ``num_return_sequences`` encode the media once, then repeat every prompt
    row k times (``repeat_interleave``) and each prompt's group of media with it. per_row: the
    placeholder count of every row of the expanded batch. Unexpanded input is returned as is."""
    encoded = sum(p.length for media in parts for p in media)
    if not parts or encoded == 0 or sum(per_row) == encoded or sum(per_row) % encoded:
        return parts, scores
    copies = sum(per_row) // encoded
    if len(per_row) % copies:
        return parts, scores
    out_parts, out_scores, start = [], [], 0
    for need in per_row[::copies]:  # one row per prompt: its media are the next ``need`` tokens
        end, got = start, 0
        while got < need and end < len(parts):
            got, end = got + sum(p.length for p in parts[end]), end + 1
        if got != need:
            return parts, scores  # the layout does not split by prompt: leave it to the fallback
        out_parts += parts[start:end] * copies
        out_scores += scores[start:end] * copies
        start = end
    return out_parts, out_scores


def _renumber_media(segments: list[Segment]) -> list[Segment]:
    """Media indices count within each sample, so a sample is treated alike alone or batched."""
    first: dict[tuple[int, int], int] = {}
    for seg in segments:
        first.setdefault((seg.sample, seg.media), len([k for k in first if k[0] == seg.sample]))
    for seg in segments:
        seg.media = first[(seg.sample, seg.media)]
    return segments


def _runs(flat: torch.Tensor, kind: str) -> list[Segment]:
    """Fallback when the layout is unknown: one segment per contiguous placeholder run."""
    from .models.base import Part

    segments = []
    for sample in flat[:, 0].unique().tolist():
        pos = flat[flat[:, 0] == sample, 1]
        breaks = (pos.diff() != 1).nonzero().flatten() + 1
        for i, run in enumerate(torch.tensor_split(pos, breaks.tolist())):
            segments.append(Segment(sample, run.clone(), Part(run.numel(), None, kind=kind), i, 0))
    return segments
