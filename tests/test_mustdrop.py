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


def test_window_similarity_and_groups_by_hand():
    from mmaccel.vision.window_merge import merge_rows, window_groups, window_similarity

    side = 6
    x = torch.randn(side * side, 8)
    x.view(side, side, 8)[:3, :3] = torch.tensor([1.0] * 8)  # the top-left window is uniform
    sim = window_similarity(x, side)
    assert sim.shape == (2, 2) and sim[0, 0] > 0.999 and sim[1, 1] < 0.8
    groups = window_groups(x, side, 0.8)
    assert set(groups.view(side, side)[:3, :3].flatten().tolist()) == {0}
    assert torch.equal(groups.view(side, side)[3:, 3:], torch.arange(36).view(6, 6)[3:, 3:])
    batch = torch.stack([torch.cat([torch.zeros(1, 8), x]), torch.cat([torch.zeros(1, 8), torch.randn(36, 8)])])
    merged, assign, bias = merge_rows(batch, cls=True, threshold=0.8)
    assert merged.shape[1] == 37 and int(torch.isinf(bias[0]).sum()) == 8  # row 0 lost 8 tokens, padded
    assert torch.allclose(merged[0, assign[0, 1]], x[0]) and assign[0, 1] == assign[0, 1 + 2 * side + 2]


def test_window_merge_shortens_the_tower_and_keeps_one_token_per_window():
    from mmaccel.models import get_adapter
    from mmaccel.testing import tiny

    saved = tiny._clip_vision
    tiny._clip_vision = lambda **k: saved(image_size=84, layers=4)  # a 6x6 patch grid
    try:
        model, proc = tiny.build("llava", seed=6)
    finally:
        tiny._clip_vision = saved
    proc.patch_size, model.config.image_seq_length = 14, 36
    proc.image_processor.size, proc.image_processor.crop_size = {"shortest_edge": 84}, {"height": 84, "width": 84}
    inputs = make_inputs(proc)
    adapter = get_adapter(model)
    with accelerate_vlm(model, method="mustdrop", merge_threshold=-1.0) as handle, torch.no_grad():
        seen = []
        probe = adapter.vision_layers[1].register_forward_pre_hook(lambda m, a, k: seen.append(1), with_kwargs=True)
        model(**inputs)
        probe.remove()
        kept = handle.stats.visual_tokens_per_layer[0]
        prov = handle.provenance()[0]
    assert kept == 4  # threshold -1: every 3x3 window merges, 36 patches -> 4 tokens
    assert sorted(len(g) for g in prov.values()) == [9, 9, 9, 9]
