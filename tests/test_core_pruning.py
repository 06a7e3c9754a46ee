"""Reduction really shortens what the decoder sees, positions stay right, batches and media work."""
import pytest
import torch

from mmaccel import accelerate_vlm, list_methods
from mmaccel.testing.tiny import build
from conftest import VIDEO_FAMILIES, make_inputs, run_in_threads


class LayerLengths:
    """The test's own hooks: sequence length each decoder layer receives, and its KV length."""

    def __init__(self, model):
        self.lengths, self.handles = {}, []
        for i, layer in enumerate(model.model.language_model.layers):
            self.handles.append(layer.register_forward_pre_hook(self._hook(i), with_kwargs=True))

    def _hook(self, i):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self.lengths.setdefault(i, hidden.shape[1])

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def prefill_lengths(model, inputs):
    probe = LayerLengths(model)
    try:
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
    finally:
        probe.remove()
    kv = [layer.keys.shape[-2] for layer in out.cache.layers]
    return probe.lengths, kv


@pytest.mark.parametrize("method", ["fastv", "pool", "random", "aim"])
def test_quarter_retention_shortens_the_sequence_and_cache(tiny_models, family, method):
    model, proc = tiny_models(family)
    inputs = make_inputs(proc, batch=1)
    full, full_kv = prefill_lengths(model, inputs)
    n_visual = int(sum((inputs["input_ids"] == t).sum() for t in _placeholder_ids(model)))
    with accelerate_vlm(model, method=method, retention=0.25) as handle:
        short, short_kv = prefill_lengths(model, inputs)
        stats = handle.stats
    first = 2 if method == "fastv" else 0  # fastv prunes at layer K=2
    for layer, length in short.items():
        expected_drop = n_visual - stats.visual_tokens_per_layer[layer] if layer >= first else 0
        assert length == full[layer] - expected_drop, (layer, length, full[layer])
        assert short_kv[layer] == length  # the cache holds only what the layer saw
    assert stats.visual_tokens_per_layer[-1] <= round(0.25 * n_visual) + 3  # pool keeps newline tokens too
    assert stats.visual_tokens_per_layer[-1] < n_visual
    assert stats.prefill_flops < stats.prefill_flops_full


def capture(module, store: list, pick):
    """Register the test's own pre-hook on ``module`` that appends ``pick(kwargs)`` to ``store``."""
    def hook(mod, args, kwargs):
        store.append(pick(kwargs))

    return module.register_forward_pre_hook(hook, with_kwargs=True)


def _placeholder_ids(model):
    ids = [model.config.image_token_id]
    if getattr(model.config, "video_token_id", None) is not None:
        ids.append(model.config.video_token_id)
    return ids


def test_fastv_keeps_the_top_scored_visual_tokens(tiny_models):
    """The kept set at layer K is the top of layer K-1's last-query attention (eager reference)."""
    model, proc = tiny_models("llava")
    inputs = make_inputs(proc)
    with torch.no_grad():
        model.set_attn_implementation("eager")
        try:
            attn = model(**inputs, output_attentions=True).attentions[1]  # (B, H, T, T) at layer K-1
        finally:
            model.set_attn_implementation("sdpa")
    visual = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    scores = attn[0, :, -1, visual].mean(0)
    expected = visual[scores.topk(round(0.25 * visual.numel())).indices].sort().values
    seen = []
    with accelerate_vlm(model, method="fastv", retention=0.25), torch.no_grad():
        # registered after accelerate_vlm, so it sees what the layer really receives
        probe = capture(model.model.language_model.layers[2], seen, lambda k: k["position_ids"].clone())
        model(**inputs)
        probe.remove()
    kept_positions = seen[0][0]  # preserve policy: positions are the original indices here
    kept_visual = kept_positions[(kept_positions >= visual.min()) & (kept_positions <= visual.max())]
    assert torch.equal(kept_visual, expected)


@pytest.mark.parametrize("policy", ["preserve", "compact"])
def test_position_policy_llava(tiny_models, policy):
    model, proc = tiny_models("llava")
    inputs = make_inputs(proc)
    seen = []
    with accelerate_vlm(model, method="random", retention=0.25, position_policy=policy), torch.no_grad():
        probe = capture(model.model.language_model, seen, lambda k: k["position_ids"].clone())
        model(**inputs)
        probe.remove()
    pos = seen[0][0]
    assert torch.all(pos.diff() > 0)  # sorted, strictly increasing
    if policy == "compact":
        assert torch.equal(pos, torch.arange(pos.numel()))
    else:
        assert pos[-1] == inputs["input_ids"].shape[1] - 1 and pos.numel() < inputs["input_ids"].shape[1]


def _decode_positions(model, inputs, steps: int) -> list[torch.Tensor]:
    """The M-RoPE position ids the language model gets at each forward of a greedy generate."""
    seen = []
    probe = capture(model.model.language_model, seen, lambda k: k["position_ids"][-3:].clone())
    try:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    finally:
        probe.remove()
    return seen


@pytest.mark.parametrize("fam", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("method", ["fastv", "pool"])
def test_qwen_preserve_decode_positions_equal_unpruned(tiny_models, fam, method):
    model, proc = tiny_models(fam)
    inputs = make_inputs(proc, batch=2)
    full = _decode_positions(model, inputs, 4)
    with accelerate_vlm(model, method=method, retention=0.25) as handle:
        pruned = _decode_positions(model, inputs, 4)
        kept_len = handle._runtime.request.stages[0].valid.sum(1)
        deltas = model.model.rope_deltas.flatten()
        assert handle.stats.visual_tokens_kept < handle.stats.visual_tokens_in
    if method == "pool":
        assert pruned[0].shape[-1] < full[0].shape[-1]  # the language model's input really is shorter
    assert len(full) == len(pruned) == 4
    for a, b in zip(full[1:], pruned[1:]):
        assert torch.equal(a, b)
    # repaired rope_deltas: first decoded position = cached (physical) length + delta
    assert torch.equal(kept_len + deltas, full[1][0, :, 0])


@pytest.mark.parametrize("fam, frames, fps", [("qwen2_vl", 27, None), ("qwen2_5_vl", 7, 1.0)])
def test_qwen_video_decode_follows_the_question_not_the_latest_frame(tiny_models, fam, frames, fps):
    """A long video (or Qwen2.5-VL at 1 fps) puts its last slice's time past the question's
    positions. ``generate`` numbers the answer after the question's last token, so a pruned
    prefill must too (it once skipped to the largest position of the prompt)."""
    from transformers.video_utils import VideoMetadata

    from conftest import prompt, video

    model, proc = tiny_models(fam)
    clip = video(3, frames=frames)
    extra = {} if fps is None else {"video_metadata": [VideoMetadata(total_num_frames=frames, fps=fps,
                                                                      frames_indices=list(range(frames)))]}
    inputs = proc(text=[prompt(proc, "what ?", ("video",))], videos=[clip], return_tensors="pt", **extra)
    full = _decode_positions(model, inputs, 3)
    assert full[0].max() > full[0][:, 0, -1].max()  # the video reaches past the question
    with accelerate_vlm(model, method="stc", retention=0.5) as handle:
        pruned = _decode_positions(model, inputs, 3)
        assert handle.stats.visual_tokens_kept < handle.stats.visual_tokens_in
    assert len(full) == len(pruned) == 3
    for a, b in zip(full[1:], pruned[1:]):
        assert torch.equal(a, b)


def test_padded_batch_matches_single_samples(deep_tower_models, family):
    """Per-sample budgets, every method: a sample keeps the same tokens and answer alone and in
    a padded batch, with images of other shapes (other crop grids) and 4-block towers, so the
    tower-stage merges run too."""
    from conftest import image, prompt

    model, proc = deep_tower_models(family)
    texts = [prompt(proc, "what is the color ?"), prompt(proc, "how many circle are there in the image on the left ?")]
    batch = proc(text=texts, images=[image(1, size=(90, 130)), image(2, size=(140, 70))], padding=True,
                 return_tensors="pt")
    left_pad = batch["attention_mask"].shape[1] - batch["attention_mask"].sum(1)
    for method, knobs in _every_method_and_knob_variant():
        with accelerate_vlm(model, method=method, retention=0.25, **knobs) as handle, torch.no_grad():
            both = model(**batch).logits[:, -1]
            per_layer_batch, kept_batch = handle.stats.visual_tokens_per_layer, handle.kept_visual_positions()
            singles, per_layer_single = [], []
            for i in range(2):
                singles.append(model(**_select(batch, i, family)).logits[:, -1])
                per_layer_single.append(handle.stats.visual_tokens_per_layer)
                assert torch.equal(kept_batch[i] - left_pad[i], handle.kept_visual_positions()[0]), (method, knobs, i)
        assert per_layer_batch == [a + b for a, b in zip(*per_layer_single)], (method, knobs)
        torch.testing.assert_close(both, torch.cat(singles), atol=2e-5, rtol=1e-4, msg=f"{method} {knobs}")


@pytest.mark.parametrize("fam", VIDEO_FAMILIES)
def test_padded_video_batch_matches_single_samples(deep_tower_models, fam):
    """The batch invariant on video prompts, every method (frames, pooled or slice-merged)."""
    model, proc = deep_tower_models(fam)
    batch = make_inputs(proc, batch=2, media=("video",))
    left_pad = batch["attention_mask"].shape[1] - batch["attention_mask"].sum(1)
    for method, knobs in _every_method_and_knob_variant():
        with accelerate_vlm(model, method=method, retention=0.25, **knobs) as handle, torch.no_grad():
            both, kept_batch = model(**batch).logits[:, -1], handle.kept_visual_positions()
            singles = []
            for i in range(2):
                singles.append(model(**_select(batch, i, fam)).logits[:, -1])
                assert torch.equal(kept_batch[i] - left_pad[i], handle.kept_visual_positions()[0]), (method, knobs, i)
        torch.testing.assert_close(both, torch.cat(singles), atol=2e-5, rtol=1e-4, msg=f"{method} {knobs}")


def _every_method_and_knob_variant() -> list[tuple[str, dict]]:
    """Every method at its defaults, plus the knobs that change what reaches the LLM."""
    defaults = [(m, {}) for m in list_methods() if m != "none"]
    return defaults + [("hired", {"merge_dropped": True}), ("stc", {"merge_dropped": True})]


def _select(batch, i, family):
    """Sample ``i`` of a processor batch, without its padding."""
    keep = batch["attention_mask"][i].bool()
    out = {"input_ids": batch["input_ids"][i:i + 1, keep], "attention_mask": batch["attention_mask"][i:i + 1, keep]}
    if "mm_token_type_ids" in batch:
        out["mm_token_type_ids"] = batch["mm_token_type_ids"][i:i + 1, keep]
    if family.startswith("qwen"):  # patches of all samples in one flat tensor, split by the grids
        for pixels, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
            if grid in batch:
                per = batch[grid].prod(-1).tolist()
                start = sum(per[:i])
                out[pixels] = batch[pixels][start:start + per[i]]
                out[grid] = batch[grid][i:i + 1]
        if "second_per_grid_ts" in batch:
            out["second_per_grid_ts"] = batch["second_per_grid_ts"][i:i + 1]
    else:
        for key in ("pixel_values", "pixel_values_videos"):
            if key in batch:
                out[key] = batch[key][i:i + 1]
        for key in ("image_sizes", "batch_num_images"):
            if key in batch:
                out[key] = batch[key][i:i + 1]
    return out


@pytest.mark.parametrize("fam", VIDEO_FAMILIES)
@pytest.mark.parametrize("method", ["fastv", "pool"])
def test_video_generate(tiny_models, fam, method):
    model, proc = tiny_models(fam)
    inputs = make_inputs(proc, batch=2, media=("video",))
    with torch.no_grad():
        full = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    with accelerate_vlm(model, method=method, retention=0.25) as handle, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        stats = handle.stats
    assert out.shape == full.shape
    assert stats.visual_tokens_in == int((inputs["input_ids"] == model.config.video_token_id).sum())
    assert stats.visual_tokens_per_layer[-1] < stats.visual_tokens_in
    assert stats.new_tokens == 6 and stats.timings["decode"] > 0


def test_llava_onevision_video_frames_are_segments(tiny_models):
    model, proc = tiny_models("llava_onevision")
    inputs = make_inputs(proc, media=("video",))
    with accelerate_vlm(model, method="pool", retention=0.25) as handle, torch.no_grad():
        model(**inputs)
        stats = handle.stats
    frames = inputs["pixel_values_videos"].shape[1]
    # 4x4 pooled frame grids of side 2 pool to 1x1 each, plus the video's closing newline token
    assert stats.visual_tokens_per_layer[0] == frames * 1 + 1


@pytest.mark.parametrize("fam", ["llava_onevision", "qwen2_vl", "llava"])
def test_several_images_per_prompt(tiny_models, fam):
    model, proc = tiny_models(fam)
    inputs = make_inputs(proc, batch=2, media=("image", "image"))
    with accelerate_vlm(model, method="random", retention=0.5) as handle, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        runtime = handle._runtime
    assert out.shape[0] == 2
    n_in = handle.stats.visual_tokens_in
    assert abs(handle.stats.visual_tokens_per_layer[0] - n_in / 2) <= 2
    del runtime


def test_sampling_generate_runs_and_is_seeded(tiny_models):
    model, proc = tiny_models("llava_onevision")
    inputs = make_inputs(proc, batch=2)
    with accelerate_vlm(model, method="fastv", retention=0.25), torch.no_grad():
        torch.manual_seed(0)
        a = model.generate(**inputs, max_new_tokens=5, do_sample=True, temperature=1.0)
        torch.manual_seed(0)
        b = model.generate(**inputs, max_new_tokens=5, do_sample=True, temperature=1.0)
    assert torch.equal(a, b) and a.shape[1] == inputs["input_ids"].shape[1] + 5


def test_stats_record_is_json_serialisable(tiny_models):
    import json

    model, proc = tiny_models("qwen2_vl")
    inputs = make_inputs(proc)
    with accelerate_vlm(model, method="fastv", retention=0.25) as handle, torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        d = json.loads(json.dumps(handle.stats.to_dict()))
    assert len(d["visual_tokens_per_layer"]) == model.config.text_config.num_hidden_layers
    assert d["visual_tokens_in"] > d["visual_tokens_kept"] > 0
    assert {"vision", "prefill", "decode", "total"} <= set(d["timings"])
    assert d["flop_ratio"] > 1.0


def test_save_pretrained_reload_accelerate_generate(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model, proc = build("llava_onevision", seed=3)
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    proc2 = AutoProcessor.from_pretrained(tmp_path)
    inputs = make_inputs(proc2, batch=2)
    with torch.no_grad():
        reference = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    with accelerate_vlm(loaded, method="fastv", retention=1.0), torch.no_grad():
        again = loaded.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(reference, again)
    with accelerate_vlm(loaded, method="pool", retention=0.25) as handle, torch.no_grad():
        loaded.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert handle.stats.visual_tokens_kept < handle.stats.visual_tokens_in


@pytest.mark.parametrize("method", ["pool", "fastv", "random", "none"])
def test_kept_positions_and_provenance(tiny_models, method):
    model, proc = tiny_models("llava_next")
    inputs = make_inputs(proc, batch=2)
    retention = None if method == "none" else 0.25
    with accelerate_vlm(model, method=method, retention=retention) as handle, torch.no_grad():
        model(**inputs)
        kept = handle.kept_visual_positions()
        prov = handle.provenance()
        stats = handle.stats
    image_id = model.config.image_token_id
    assert sum(k.numel() for k in kept) == stats.visual_tokens_per_layer[-1]
    for b, positions in enumerate(kept):
        assert torch.all(inputs["input_ids"][b, positions] == image_id)
        assert torch.all(positions.diff() > 0)
        sources = torch.cat(list(prov[b].values()))
        assert torch.all(inputs["input_ids"][b, sources] == image_id)
        if method == "pool":  # every visual token is accounted for exactly once (newlines of dropped rows aside)
            assert sources.unique().numel() == sources.numel()
            assert sources.numel() > 3 * positions.numel()
        else:
            assert torch.equal(sources.sort().values, positions)


@pytest.mark.parametrize("method, knobs", [("aim", {"prune": False}), ("visionzip", {})])
def test_merging_provenance_accounts_for_every_visual_token_once(tiny_models, method, knobs):
    """Merging methods record their groups lazily; provenance() must still give every visual
    token to exactly one kept token, each kept token among its own sources."""
    model, proc = tiny_models("llava")
    inputs = make_inputs(proc, batch=2)
    with accelerate_vlm(model, method=method, retention=0.25, **knobs) as handle, torch.no_grad():
        model(**inputs)
        kept, prov = handle.kept_visual_positions(), handle.provenance()
    image_id = model.config.image_token_id
    for b, positions in enumerate(kept):
        assert sorted(prov[b]) == positions.tolist() and positions.numel() < (inputs["input_ids"][b] == image_id).sum()
        sources = torch.cat(list(prov[b].values())).sort().values
        assert torch.equal(sources, (inputs["input_ids"][b] == image_id).nonzero().flatten())
        assert all(p in prov[b][p].tolist() for p in positions.tolist())


def test_beam_search_and_static_cache(tiny_models):
    model, proc = tiny_models("llava_onevision")
    inputs = make_inputs(proc, batch=2)
    with torch.no_grad():
        reference = model.generate(**inputs, max_new_tokens=3, do_sample=False, num_beams=2)
    with accelerate_vlm(model, method="fastv", retention=1.0), torch.no_grad():
        assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False, num_beams=2), reference)
    with accelerate_vlm(model, method="fastv", retention=0.25) as handle, torch.no_grad():
        model.generate(**inputs, max_new_tokens=3, do_sample=False, num_beams=2)
        assert handle.stats.visual_tokens_per_layer[-1] < handle.stats.visual_tokens_per_layer[0]
        with pytest.raises(ValueError, match="dynamic cache"):
            model.generate(**inputs, max_new_tokens=3, cache_implementation="static")


@pytest.mark.parametrize("method", ["random", "fastv", "aim", "hired", "visionzip", "mustdrop", "stc", "tome"])
def test_beam_copies_keep_what_their_prompt_keeps(deep_tower_models, family, method):
    """generate() encodes the media once and repeats each prompt's media group per beam and
    returned sequence: every copy must get its prompt's layout (crops, frames, tower scores),
    so it keeps the tokens the prompt keeps alone (tap methods used to find no scores for the
    copies, the others fell back to one segment per placeholder run)."""
    model, proc = deep_tower_models(family)
    media = ("image", "video") if family in VIDEO_FAMILIES else ("image", "image")
    inputs = make_inputs(proc, batch=2, media=media)
    with accelerate_vlm(model, method=method, retention=0.25) as handle, torch.no_grad():
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
        alone = handle.kept_visual_positions()
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False, num_beams=2, num_return_sequences=2)
        copies = handle.kept_visual_positions()
    assert out.shape[0] == 4 and len(copies) == 4
    for row, kept in enumerate(copies):
        assert torch.equal(kept, alone[row // 2]), row


@pytest.mark.parametrize("fam, policy", [("llava_next", "preserve"), ("qwen2_5_vl", "preserve"), ("qwen2_5_vl", "compact")])
@pytest.mark.parametrize("method", ["hired", "visionzip", "tome", "pool"])
def test_generate_without_cache_reduces_every_step_like_the_cached_run(deep_tower_models, method, fam, policy):
    """use_cache=False: every step is a new prefill of the media generate() encoded once; each
    must be reduced the same way (tap methods used to crash on the second step, tome ran it
    unreduced), so pre-LLM methods answer exactly as with the cache: the cached decode's
    positions (M-RoPE included, either policy) are the ones a full recompute gives."""
    model, proc = deep_tower_models(fam)
    inputs = make_inputs(proc, batch=2)
    with accelerate_vlm(model, method=method, retention=0.25, position_policy=policy) as handle, torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        kept = handle.kept_visual_positions()
        uncached = model.generate(**inputs, max_new_tokens=3, do_sample=False, use_cache=False)
        assert all(torch.equal(a, b) for a, b in zip(handle.kept_visual_positions(), kept))  # the last step's
    assert torch.equal(uncached, cached)


def test_chunked_prefill_is_refused_with_a_clear_error(tiny_models):
    model, proc = tiny_models("llava")
    inputs = make_inputs(proc, batch=2)
    with accelerate_vlm(model, method="fastv", retention=0.25), torch.no_grad():
        with pytest.raises(ValueError, match="chunked prefill"):
            model.generate(**inputs, max_new_tokens=2, prefill_chunk_size=8)
        model.generate(**inputs, max_new_tokens=2)  # the handle still works afterwards


@pytest.mark.parametrize("method", ["hired", "fastv"])
def test_generate_from_several_threads_equals_one_after_another(deep_tower_models, method):
    """An accelerated model served from a thread pool: the runtime's per-call state is shared,
    so calls take turns and each gets what it gets alone (before, a thread's placeholders met
    another's image features)."""
    import time

    model, proc = deep_tower_models("llava_next")
    prompts = [make_inputs(proc, batch=1 + i % 2, seed=i) for i in range(4)]
    with accelerate_vlm(model, method=method, retention=0.25) as handle, torch.no_grad():
        expected = []
        for p in prompts:
            expected.append((model.generate(**p, max_new_tokens=3, do_sample=False), handle.kept_visual_positions()))

        def call(i):
            out = model.generate(**prompts[i], max_new_tokens=3, do_sample=False)
            time.sleep(0.01)  # let other threads' calls run before this one reads its own record
            return out, handle.kept_visual_positions(), handle.stats.batch_size

        results = run_in_threads(call, 4)
    for i, ((out, kept, batch), (out_ref, kept_ref)) in enumerate(zip(results, expected)):
        assert torch.equal(out, out_ref) and batch == 1 + i % 2  # each thread reads its own call's record
        assert all(torch.equal(a, b) for a, b in zip(kept, kept_ref))
