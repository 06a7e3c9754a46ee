"""Proportional attention in the LLM: a token merged before the LLM from s tokens weighs log(s)
in every decoder layer's attention, in prefill and at every decode step."""
import math

import pytest
import torch

from mmaccel import accelerate_vlm
from mmaccel.scoring import with_key_bias
from mmaccel.testing.tiny import build
from conftest import make_inputs

MIN = torch.finfo(torch.float32).min


def _qk(tq: int, tk: int):
    return torch.zeros(1, 2, tq, 4), torch.zeros(1, 1, tk, 4)


def test_key_bias_builds_causality_where_the_model_left_it_to_sdpa():
    query, key = _qk(3, 3)
    mask = with_key_bias(None, torch.tensor([[0.0, math.log(4), 0.0]]), query, key, causal=True)
    assert mask.shape == (1, 1, 3, 3)
    expected = torch.tensor([[0.0, MIN, MIN], [0.0, math.log(4), MIN], [0.0, math.log(4), 0.0]])
    torch.testing.assert_close(mask[0, 0], expected)


def test_key_bias_reaches_only_the_prefill_keys_at_decode():
    """Two tokens decoded since the prefill of three: their keys get 0, one query needs no causality."""
    query, key = _qk(1, 5)
    mask = with_key_bias(None, torch.tensor([[0.0, 1.0, 2.0]]), query, key, causal=True)
    torch.testing.assert_close(mask[0, 0, 0], torch.tensor([0.0, 1.0, 2.0, 0.0, 0.0]))


def test_key_bias_keeps_a_bool_mask_and_stays_finite_on_a_row_that_sees_nothing():
    query, key = _qk(2, 3)
    visible = torch.tensor([[[[False, False, False], [False, True, True]]]])
    mask = with_key_bias(visible, torch.tensor([[5.0, 1.0, 2.0]]), query, key, causal=True)
    assert torch.isfinite(mask).all()
    assert mask[0, 0, 1, 0] == MIN and mask[0, 0, 1, 1] == 1.0 and mask[0, 0, 1, 2] == 2.0
    additive = with_key_bias(torch.zeros(1, 1, 2, 4), torch.tensor([[1.0, 1.0, 1.0]]), query, key, causal=True)
    assert additive.shape[-1] == 3  # a mask longer than the keys is cut to them, as SDPA would


def _run_and_capture(model, inputs, method, **knobs):
    """Generate two tokens under ``method``; return (step logits, the LLM's calls' kwargs, the
    prefill's per-token sizes, each checked against the number of tokens merged into it)."""
    calls = []
    gen = dict(max_new_tokens=2, min_new_tokens=2, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with accelerate_vlm(model, method=method, retention=0.25, **knobs) as handle, torch.no_grad():
        probe = model.model.language_model.register_forward_pre_hook(  # after mmaccel's own: sees its splice
            lambda m, a, k: calls.append({n: k.get(n) for n in ("inputs_embeds", "position_ids")}), with_kwargs=True)
        try:
            out = model.generate(**inputs, **gen)
        finally:
            probe.remove()
        stage, sources = handle._runtime.last_call()[1].stages[0], handle.provenance()[0]
    if stage.key_bias is None:
        return out.logits, calls, None
    sizes = stage.key_bias.exp().round().long()[0]
    size_at = dict(zip(stage.orig[0].tolist(), sizes.tolist()))
    assert {p: size_at[p] for p in sources} == {p: s.numel() for p, s in sources.items()}, "sizes != group sizes"
    return out.logits, calls, sizes


def _copies_reference(model, calls, sizes):
    """The plain language model on the prefill with every merged token repeated ``size`` times at
    its own position, then the same decode step: the logits of both steps."""
    from transformers import DynamicCache

    lm, cache = model.model.language_model, DynamicCache(config=model.config.text_config)
    prefill, step = calls
    embeds = prefill["inputs_embeds"].repeat_interleave(sizes, dim=1)
    positions = prefill["position_ids"].repeat_interleave(sizes, dim=-1)
    logits = []
    with torch.no_grad():
        for e, p in ((embeds, positions), (step["inputs_embeds"], step["position_ids"])):
            length = cache.get_seq_length() + e.shape[1]
            hidden = lm(inputs_embeds=e, position_ids=p, attention_mask=torch.ones(1, length, dtype=torch.long),
                        cache=cache, use_cache=True).last_hidden_state
            logits.append(model.lm_head(hidden[:, -1]))
    return logits


@pytest.mark.parametrize("family, method, attn, media", [
    ("llava_onevision", "aim", "sdpa", "image"), ("llava_onevision", "aim", "eager", "image"),
    ("llava_onevision", "pool", "sdpa", "image"), ("llava_onevision", "tome", "sdpa", "image"),
    ("llava_onevision", "aim", "sdpa", "video"), ("qwen2_vl", "aim", "sdpa", "image"),
    ("qwen2_vl", "visionzip", "sdpa", "image"), ("qwen2_vl", "tome", "sdpa", "image"),
    ("qwen2_vl", "pool", "sdpa", "video")])
def test_a_merged_token_weighs_what_its_copies_weigh_in_prefill_and_decode(family, method, attn, media):
    """One decoder layer (so the keys of copies are identical, as they are not after a layer in
    which each copy saw a different causal prefix): a token merged from s weighs exactly what s
    copies of it at its position weigh, in the prefill and at the decode step after it."""
    model, proc = build(family, text_layers=1, vision_layers=4)  # tome merges in the blocks before the last
    model.config.text_config._attn_implementation_internal = attn
    inputs = make_inputs(proc, batch=1, media=(media,))
    logits, calls, sizes = _run_and_capture(model, inputs, method, proportional_attention=True)
    assert sizes is not None and sizes.max() > 1 and len(calls) == 2
    reference = _copies_reference(model, calls, sizes)
    for got, ref in zip(logits, reference):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    plain, _, no_sizes = _run_and_capture(model, inputs, method, proportional_attention=False)
    assert no_sizes is None and not torch.allclose(plain[0], logits[0], rtol=1e-4, atol=1e-5)


def test_restore_removes_the_key_bias_and_the_attention_wrapper():
    model, proc = build("llava_onevision", text_layers=2)
    inputs = make_inputs(proc, batch=1)
    attn_before = model.config.text_config._attn_implementation
    with torch.no_grad():
        before = model(**inputs).logits[:, -1]
        with accelerate_vlm(model, method="pool", retention=0.25, proportional_attention=True):
            merged = model(**inputs).logits[:, -1]
            assert all(l.self_attn._mmaccel_key_bias is not None for l in model.model.language_model.layers)
        after = model(**inputs).logits[:, -1]
    assert not torch.allclose(merged, before)
    assert torch.equal(after, before) and model.config.text_config._attn_implementation == attn_before
    assert not any(hasattr(l.self_attn, "_mmaccel_key_bias") for l in model.model.language_model.layers)


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl"])
def test_the_biased_prefill_stays_causal(tiny_models, family):
    """Two prompts that differ in one question word: every position before it gets the same
    logits (a bias that replaced the model's is_causal mask would let them see the word). No
    in-LLM pruning here: the question rightly decides what that keeps."""
    from conftest import image, prompt

    model, proc = tiny_models(family)
    runs = []
    for question in ("what is the color ?", "what is the circle ?"):
        inputs = proc(text=[prompt(proc, question)], images=[image(3)], return_tensors="pt")
        with accelerate_vlm(model, method="aim", retention=0.25, proportional_attention=True, prune=False) as handle, \
                torch.no_grad():
            runs.append((inputs["input_ids"][0], model(**inputs).logits[0], handle.stats))
    (ids_a, logits_a, stats), (ids_b, logits_b, _) = runs
    differ = (ids_a != ids_b).nonzero().flatten()
    assert differ.numel() == 1 and stats.visual_tokens_kept < stats.visual_tokens_in
    first = int(differ) - (ids_a.numel() - logits_a.shape[0])  # the merge removed tokens before it
    torch.testing.assert_close(logits_a[:first], logits_b[:first], rtol=0, atol=0)
    assert not torch.allclose(logits_a[first:], logits_b[first:])


def test_a_bias_longer_than_the_keys_is_an_error_not_a_silent_crop():
    query, key = _qk(1, 2)
    with pytest.raises(RuntimeError, match="3 tokens for 2 keys"):
        with_key_bias(None, torch.zeros(1, 3), query, key, causal=True)


def test_proportional_attention_refuses_attention_kernels_without_an_additive_mask(tiny_models):
    model, _ = tiny_models("llava_onevision")
    cfg = model.config.text_config
    saved = cfg._attn_implementation_internal
    cfg._attn_implementation_internal = "flash_attention_2"
    try:
        with pytest.raises(ValueError, match="attn_implementation 'sdpa' or 'eager'"):
            accelerate_vlm(model, method="aim", retention=0.25)
        accelerate_vlm(model, method="aim", retention=0.25, proportional_attention=False).restore()
        accelerate_vlm(model, method="mustdrop", retention=0.25).restore()  # its knob weighs the tower only
    finally:
        cfg._attn_implementation_internal = saved
    assert getattr(model, "_mmaccel_handle", None) is None


@pytest.mark.parametrize("fam", ["llava_next", "qwen2_5_vl"])
@pytest.mark.parametrize("method", ["pool", "visionzip", "tome"])
def test_cached_decode_with_the_bias_equals_recomputing_every_step(deep_tower_models, method, fam):
    """A padded batch, four decoder layers: decoding on the cache (the prefill's bias, 0 for each
    token decoded since) gives the tokens that a full recompute gives at every step with
    ``use_cache=False``, where each decoded token is a prompt token of size 1."""
    model, proc = deep_tower_models(fam)
    inputs = make_inputs(proc, batch=2)
    with accelerate_vlm(model, method=method, retention=0.25, proportional_attention=True) as handle, \
            torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert handle._runtime.last_call()[1].stages[0].key_bias is not None
        uncached = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(uncached, cached)
