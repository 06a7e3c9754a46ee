"""Invariants: no reduction -> bit-identical logits; restore() -> bit-identical model."""
import pytest
import torch

from mmaccel import accelerate_vlm, list_methods
from conftest import make_inputs


def last_logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits[:, -1].clone()


@pytest.mark.parametrize("batch", [1, 2])
def test_every_method_at_full_retention_is_bit_identical(tiny_models, family, batch):
    model, proc = tiny_models(family)
    inputs = make_inputs(proc, batch=batch)
    if batch == 2:
        assert (inputs["attention_mask"] == 0).any(), "the batch must really be padded"
    reference = last_logits(model, inputs)
    for method in list_methods():
        retention = None if method == "none" else 1.0
        with accelerate_vlm(model, method=method, retention=retention) as handle:
            got = last_logits(model, inputs)
            if method != "none":
                # the splice really ran: every layer saw every visual token
                assert handle.stats.visual_tokens_per_layer == [handle.stats.visual_tokens_in] * len(
                    handle.stats.visual_tokens_per_layer)
        assert torch.equal(got, reference), f"{family} {method} batch={batch} differs"


def test_restore_gives_back_the_untouched_model(tiny_models, family):
    model, proc = tiny_models(family)
    inputs = make_inputs(proc, batch=2)
    before = last_logits(model, inputs)
    hooks_before = (len(model._forward_pre_hooks), len(model.model.language_model.layers[0]._forward_pre_hooks))
    attn_before = model.config.text_config._attn_implementation
    handle = accelerate_vlm(model, method="fastv", retention=0.25)
    pruned = last_logits(model, inputs)
    assert not torch.equal(pruned, before)  # the method did something
    handle.restore()
    assert torch.equal(last_logits(model, inputs), before)
    assert "generate" not in vars(model) and "get_image_features" not in vars(model.model)
    assert (len(model._forward_pre_hooks), len(model.model.language_model.layers[0]._forward_pre_hooks)) == hooks_before
    assert model.config.text_config._attn_implementation == attn_before
    handle.restore()  # idempotent


def test_context_manager_restores_on_error(tiny_models):
    model, proc = tiny_models("llava")
    inputs = make_inputs(proc)
    before = last_logits(model, inputs)
    with pytest.raises(RuntimeError):
        with accelerate_vlm(model, method="pool", retention=0.25):
            raise RuntimeError("boom")
    assert torch.equal(last_logits(model, inputs), before)


@pytest.mark.parametrize("family, method", [("llava_onevision", "random"), ("llava_onevision", "stc"),
                                            ("llava_onevision", "hired"), ("qwen2_vl", "random"),
                                            ("qwen2_vl", "stc"), ("qwen2_5_vl", "random")])
def test_selection_equals_generating_on_the_kept_tokens_alone(tiny_models, family, method):
    """A pre-LLM selection with compact positions must equal a plain, hook-free generate on the
    prompt with the dropped visual tokens cut out (prefill and every decode step). For Qwen's
    M-RoPE, compact positions are 0..n-1 on all three axes, which is what the model itself
    gives a prompt of embeddings with no media."""
    model, proc = tiny_models(family)
    inputs = make_inputs(proc, batch=1)
    seen = []
    probe = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["inputs_embeds"].clone()), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)  # the full spliced embeddings, unaccelerated
    probe.remove()
    gen = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with accelerate_vlm(model, method=method, retention=0.25, position_policy="compact") as h, torch.no_grad():
        fast = model.generate(**inputs, **gen)
        kept = h.kept_visual_positions()[0]
    ids = inputs["input_ids"][0]
    keep = (ids != model.config.image_token_id).clone()
    keep[kept] = True
    assert 0 < keep.sum() < ids.numel()
    embeds = seen[0][:, keep]
    with torch.no_grad():
        ref = model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long), **gen)
    assert torch.equal(fast.sequences[0, ids.numel():], ref.sequences[0, -8:])
    for step_fast, step_ref in zip(fast.logits, ref.logits):  # prefill and every decode step
        torch.testing.assert_close(step_fast, step_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fam", ["llava_onevision", "qwen2_vl", "qwen2_5_vl"])
def test_every_method_at_full_retention_generates_bit_identically_on_image_and_video(tiny_models, fam):
    """An image and a video in each of two padded prompts, three generated tokens: with nothing
    to drop every method gives the plain model's tokens and logits bit for bit."""
    model, proc = tiny_models(fam)
    inputs = make_inputs(proc, batch=2, media=("image", "video"))
    gen = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        reference = model.generate(**inputs, **gen)
    for method in list_methods():
        with accelerate_vlm(model, method=method, retention=None if method == "none" else 1.0), torch.no_grad():
            out = model.generate(**inputs, **gen)
        assert torch.equal(out.sequences, reference.sequences), method
        assert all(torch.equal(a, b) for a, b in zip(out.logits, reference.logits)), method
