"""MustDrop: the dual filter by hand, depth scaling, key set protection and the cache policy."""
import torch

from mmaccel import accelerate_vlm
from mmaccel.methods.mustdrop import MustDrop, dual_attention_keep, scaled_layers
from mmaccel.testing.tiny import build
from conftest import make_inputs


def test_layers_scale_with_depth():
    assert scaled_layers(32) == [2, 6, 10, 14]
    assert scaled_layers(4) == [1, 2]
    assert all(1 <= layer < 28 for layer in scaled_layers(28))


def test_dual_filter_drops_only_tokens_under_both_thresholds():
    valid = torch.ones(1, 5, dtype=torch.bool)
    visual = torch.tensor([[False, True, True, True, True]])
    attn = torch.tensor([[[0.5, 0.001, 0.3, 0.004, 0.195],
                          [0.5, 0.001, 0.3, 0.001, 0.198]]])  # (B, Q, L)
    keep = dual_attention_keep(attn, valid, visual, global_thr=0.01, individual_thr=0.003)
    # token 1: small sum and small peak -> dropped; token 3: small sum but peak 0.004 > 0.003 -> kept
    assert keep.tolist() == [[False, False, True, True, True]]


def test_budget_mode_protects_the_key_set_and_shrinks_the_cache():
    model, proc = build("llava_onevision", text_layers=8)
    inputs = make_inputs(proc, batch=2)
    method_layers = MustDrop(retention=0.25).schedule(8)
    with accelerate_vlm(model, method="mustdrop", retention=0.25, key_ratio=0.1) as handle, torch.no_grad():
        out = model(**inputs, use_cache=True)
        runtime = handle._runtime
        final = runtime.request.stages[-1]
        stage0 = runtime.request.stages[0]
        kept = handle.kept_visual_positions()
    assert torch.all(final.protected <= final.valid)
    assert int(stage0.protected.sum()) == int(final.protected.sum()) > 0  # every key token survived
    first = method_layers[0][0]
    lengths = [layer.keys.shape[-2] for layer in out.cache.layers]
    assert all(n == stage0.valid.shape[1] for n in lengths[:first])
    assert all(n == final.valid.shape[1] for n in lengths[first:])  # output-aware policy
    assert sum(k.numel() for k in kept) == handle.stats.visual_tokens_per_layer[-1]


def test_generation_runs_on_the_shrunken_cache():
    model, proc = build("llava", text_layers=8)
    inputs = make_inputs(proc)
    with accelerate_vlm(model, method="mustdrop", retention=0.25) as handle, torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        final_len = handle._runtime.request.stages[-1].valid.shape[1]
        first = MustDrop(retention=0.25).schedule(8)[0][0]
        assert handle.stats.visual_tokens_kept < handle.stats.visual_tokens_in
    lengths = [layer.keys.shape[-2] for layer in gen.cache.layers]
    assert all(n == final_len + 2 for n in lengths[first:])  # two decoded tokens appended to each
    assert all(torch.isfinite(l).all() for l in gen.logits)
