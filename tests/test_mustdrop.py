"""MustDrop: the dual filter by hand, depth scaling, key set protection and the cache policy."""
import pytest
import torch

from mmaccel import accelerate_vlm
from mmaccel.methods.mustdrop import MustDrop, dual_attention_keep, scaled_layers
from mmaccel.models import get_adapter
from mmaccel.runtime import merged_sources
from mmaccel.testing.tiny import build
from conftest import make_inputs


def test_layers_scale_with_depth():
    assert scaled_layers(32) == [2, 6, 10, 14]
    assert scaled_layers(4) == [1, 2]
    assert all(1 <= layer < 27 for layer in scaled_layers(28))
    # official: the filter reads layer 2's own attention and layer 3 is the first to see the cut
    assert [layer for layer, _ in MustDrop(retention=0.25).schedule(32)] == [3, 7, 11, 15]
    assert MustDrop().tap_layer(3) == 2


def test_a_decoder_too_shallow_for_a_cut_is_refused():
    model, _ = build("llava", text_layers=2)
    with pytest.raises(ValueError, match="at least 3 layers"):
        accelerate_vlm(model, method="mustdrop", retention=0.25)


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
    scoring = method_layers[0][0] - 1  # the first layer whose attention decides a cut
    lengths = [layer.keys.shape[-2] for layer in out.cache.layers]
    assert scoring >= 1 and final.valid.shape[1] < stage0.valid.shape[1]
    assert all(n == stage0.valid.shape[1] for n in lengths[:scoring])
    assert all(n == final.valid.shape[1] for n in lengths[scoring:])  # output-aware policy, official layers
    assert sum(k.numel() for k in kept) == handle.stats.visual_tokens_per_layer[-1]


def test_generation_runs_on_the_shrunken_cache():
    model, proc = build("llava", text_layers=8)
    inputs = make_inputs(proc)
    with accelerate_vlm(model, method="mustdrop", retention=0.25) as handle, torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        final_len = handle._runtime.request.stages[-1].valid.shape[1]
        scoring = MustDrop(retention=0.25).schedule(8)[0][0] - 1
        assert handle.stats.visual_tokens_kept < handle.stats.visual_tokens_in
    lengths = [layer.keys.shape[-2] for layer in gen.cache.layers]
    assert all(n == final_len + 2 for n in lengths[scoring:])  # two decoded tokens appended to each
    assert all(n > final_len + 2 for n in lengths[:scoring])
    assert all(torch.isfinite(l).all() for l in gen.logits)


def test_padded_batch_decodes_on_caches_cut_from_the_scoring_layer(tiny_models, family):
    """Every family, two padded samples: layer 0 keeps the prefill sequence, every layer from
    the first scoring layer on only the final set, and decoding appends to both."""
    model, proc = tiny_models(family)
    inputs = make_inputs(proc, batch=2)
    with accelerate_vlm(model, method="mustdrop", retention=0.25) as handle, torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        stages = handle._runtime.request.stages
        first_len, final_len = stages[0].valid.shape[1], stages[-1].valid.shape[1]
    scoring = MustDrop(retention=0.25).schedule(len(gen.cache.layers))[0][0] - 1
    lengths = [layer.keys.shape[-2] for layer in gen.cache.layers]
    assert final_len < first_len and stages[1].first_layer == scoring
    assert lengths[:scoring] == [first_len + 2] * scoring
    assert lengths[scoring:] == [final_len + 2] * (len(lengths) - scoring)
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


def test_merge_rows_proportional_bias_is_log_size_by_hand():
    from mmaccel.vision.window_merge import merge_rows

    side = 6
    x = torch.randn(side * side, 8)
    x.view(side, side, 8)[:3, :3] = 1.0  # only the top-left window merges: 36 patches -> 28 tokens
    batch = torch.stack([torch.cat([torch.zeros(1, 8), x]), torch.cat([torch.zeros(1, 8), torch.randn(36, 8)])])
    plain = merge_rows(batch, cls=True, threshold=0.8)[2][:, 0, 0]
    merged, assign, sized = merge_rows(batch, cls=True, threshold=0.8, proportional=True)
    sized = sized[:, 0, 0]
    slot = int(assign[0, 1])
    assert torch.isclose(sized[0, slot], torch.tensor(9.0).log())
    others = torch.ones(29, dtype=torch.bool)
    others[slot] = False
    assert torch.all(sized[0, :29][others] == 0) and torch.all(sized[1] == 0)  # unmerged tokens: size 1
    assert torch.equal(torch.isinf(sized), torch.isinf(plain)) and torch.all(plain[torch.isfinite(plain)] == 0)


@pytest.mark.parametrize("proportional", [True, False])
def test_merged_windows_attend_as_their_copies_would(proportional):
    """With proportional attention, ViT block 1 on the merged sequence gives each merged token
    what the same block gives its nine copies standing in their cells; without it (the official
    weighting) it does not."""
    model, proc = _six_by_six_llava()
    inputs = make_inputs(proc, batch=2)
    layer = get_adapter(model).vision_layers[1]
    seen = {}

    def probe(module, args, out):
        seen["x"], seen["out"] = args[0].detach(), (out[0] if isinstance(out, tuple) else out).detach()

    handle = layer.register_forward_hook(probe)
    try:
        with accelerate_vlm(model, method="mustdrop", retention=0.5, merge_threshold=-1.0,
                            proportional_attention=proportional) as acc, torch.no_grad():
            model(**inputs)
            assert acc.stats.visual_tokens_per_layer[0] == 4 * 2  # every window merged: 4 tokens an image
    finally:
        handle.remove()
    slots = torch.tensor([0] + [1 + (r // 3) * 2 + c // 3 for r in range(6) for c in range(6)])  # CLS, 4 windows
    assert seen["x"].shape[1] == 5
    with torch.no_grad():
        copies = layer(seen["x"][:, slots], None)
        copies = copies[0] if isinstance(copies, tuple) else copies
    expected = torch.stack([copies[:, slots == j].mean(1) for j in range(5)], 1)
    assert torch.allclose(copies, expected[:, slots], atol=1e-5)  # a window's copies agree
    close = torch.allclose(seen["out"], expected, atol=1e-5, rtol=1e-4)
    assert close == proportional


def test_window_merge_shortens_the_tower_and_keeps_one_token_per_window():
    from mmaccel.models import get_adapter

    model, proc = _six_by_six_llava()
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


def _six_by_six_llava(seed=6):
    from mmaccel.testing import tiny

    saved = tiny._clip_vision
    tiny._clip_vision = lambda **k: saved(image_size=84, layers=4)  # a 6x6 patch grid
    try:
        model, proc = tiny.build("llava", seed=seed)
    finally:
        tiny._clip_vision = saved
    proc.patch_size, model.config.image_seq_length = 14, 36
    proc.image_processor.size, proc.image_processor.crop_size = {"shortest_edge": 84}, {"height": 84, "width": 84}
    return model, proc


def test_budget_counts_the_tokens_before_the_window_merge(monkeypatch):
    from mmaccel.vision import window_merge

    def top_left_window_only(x, side, threshold, window=3, cols=None):
        groups = torch.arange(side * (cols or side))
        groups[torch.tensor([0, 1, 2, side, side + 1, side + 2, 2 * side, 2 * side + 1, 2 * side + 2])] = 0
        return groups

    monkeypatch.setattr(window_merge, "window_groups", top_left_window_only)
    model, proc = _six_by_six_llava()
    inputs = make_inputs(proc, batch=2)
    with accelerate_vlm(model, method="mustdrop", retention=0.5) as handle, torch.no_grad():
        model(**inputs, use_cache=True)
        request = handle._runtime.request
    assert request.visual_orig == [36, 36] and request.visual_in == [28, 28]
    # 0.5 of the 36 the processor made, not of the 28 left after the merge (14)
    assert handle.stats.visual_tokens_per_layer[-1] == 2 * 18


def test_window_groups_on_a_rectangular_grid():
    from mmaccel.vision.window_merge import window_groups

    rows, cols = 3, 7  # two whole 3x3 windows and a last column left alone
    x = torch.randn(rows * cols, 8, generator=torch.Generator().manual_seed(0))
    grid = x.view(rows, cols, 8)
    grid[:, 3:6] = torch.tensor([1.0] + [0.0] * 7)  # the second window is uniform
    groups = window_groups(x, rows, 0.8, 3, cols).view(rows, cols)
    assert torch.all(groups[:, 3:6] == 3)  # merged into its first cell (row 0, col 3)
    assert torch.equal(groups[:, :3].flatten(), (torch.arange(3)[:, None] * cols + torch.arange(3)).flatten())
    assert torch.equal(groups[:, 6], torch.arange(3) * cols + 6)


def _blank_inputs(proc, batch):
    from PIL import Image

    texts = [proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                      add_generation_prompt=True) for q in ("what is it ?", "is it red ?")[:batch]]
    images = []
    for i in range(batch):
        im = Image.new("RGB", (112 + 28 * i, 112), (240, 240, 240))
        im.paste((200, 30, 30), (10, 10, 40, 40))
        images.append(im)
    return proc(text=texts, images=images, padding=True, return_tensors="pt")


def test_window_merge_on_qwen2_vl_merges_flat_regions_and_restores_the_last_block():
    from mmaccel.testing.tiny import tiny_qwen2_vl
    from test_core_pruning import _select

    model, proc = tiny_qwen2_vl(vision_depth=4)
    batch = _blank_inputs(proc, 2)
    blocks = model.model.visual.blocks
    seen = []
    probes = [b.attn.register_forward_pre_hook(lambda m, a, k: seen.append(k["cu_seqlens"].diff().tolist()),
                                               with_kwargs=True) for b in blocks]
    try:
        with accelerate_vlm(model, method="mustdrop", retention=0.5, merge_threshold=0.5) as handle, \
                torch.no_grad():
            both = model(**batch).logits[:, -1]
            merges = merged_sources(handle._runtime.request)  # per sample: {kept position: its window}
            first_layer, tokens_in = handle.stats.visual_tokens_per_layer[0], handle.stats.visual_tokens_in
            singles = torch.cat([model(**_select(batch, i, "qwen2_vl")).logits[:, -1] for i in range(2)])
    finally:
        for p in probes:
            p.remove()
    full = batch["image_grid_thw"].prod(-1).tolist()
    assert seen[0] == full and seen[3] == full  # block 0 and the last block see every patch
    assert seen[1] == seen[2] and all(m < f for m, f in zip(seen[1], full))  # merged in between
    merged_groups = [g for groups in merges for g in groups.values() if g.numel() > 1]
    assert merged_groups and all(g.numel() == 9 for g in merged_groups)  # whole 3x3 blocks of tokens
    assert first_layer == tokens_in - 8 * len(merged_groups)  # one token per block left
    torch.testing.assert_close(both, singles, atol=2e-5, rtol=1e-4)


def test_window_merge_on_qwen2_5_vl_stays_inside_attention_windows():
    """Real-sized windows (4x4 merge windows): a flat 112 px image is one window with one 3x3 block;
    a 112 x 84 image is one 4x3 window, one block too. Windowed blocks see each window shrink
    by 8 merge windows, the full-attention block the per-image sums; batch equals singles."""
    from PIL import Image

    from mmaccel.methods.tome_qwen import attention_windows
    from mmaccel.testing.tiny import tiny_qwen2_5_vl
    from test_core_pruning import _select

    model, proc = tiny_qwen2_5_vl(vision_depth=4, window_size=112)
    batch = _flat_inputs(proc)
    visual = model.model.visual
    seen = []
    probes = [b.attn.register_forward_pre_hook(lambda m, a, k: seen.append(k["cu_seqlens"].diff().tolist()),
                                               with_kwargs=True) for b in visual.blocks]
    try:
        with accelerate_vlm(model, method="mustdrop", retention=0.5, merge_threshold=0.5) as handle, \
                torch.no_grad():
            both = model(**batch).logits[:, -1]
            merges = merged_sources(handle._runtime.request)
            blocks = seen[:4]
            singles = torch.cat([model(**_select(batch, i, "qwen2_5_vl")).logits[:, -1] for i in range(2)])
    finally:
        for p in probes:
            p.remove()
    windows = attention_windows(visual, batch["image_grid_thw"])[0].diff().tolist()
    assert windows == [64, 48]  # one window per image: 4x4 and 3x4 merge windows of 4 patches
    assert blocks[0] == windows and blocks[3] == windows  # before the merge / after the copy-back
    assert blocks[1] == blocks[2] == [64 - 32, 48 - 32]  # full block (per image) = windowed here
    groups = [g for per_sample in merges for g in per_sample.values() if g.numel() > 1]
    assert len(groups) == 2 and all(g.numel() == 9 for g in groups)
    torch.testing.assert_close(both, singles, atol=2e-5, rtol=1e-4)


def _flat_inputs(proc):
    from PIL import Image

    images = [Image.new("RGB", size, (240, 240, 240)) for size in ((112, 112), (112, 84))]
    texts = [proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                      add_generation_prompt=True) for q in ("what is it ?", "is it red ?")]
    return proc(text=texts, images=images, padding=True, return_tensors="pt")


@pytest.mark.parametrize("version", ["2", "2.5"])
def test_window_merge_never_crosses_small_attention_windows(version):
    """The same flat images: Qwen2-VL merges a 3x3 block per image; Qwen2.5-VL with 2x2 attention
    windows has no whole 3x3 block inside any window, so nothing merges."""
    from mmaccel.testing.tiny import tiny_qwen2_vl

    model, proc = tiny_qwen2_vl(version=version, vision_depth=4, window_size=56)
    with accelerate_vlm(model, method="mustdrop", retention=0.5, merge_threshold=0.5) as handle, torch.no_grad():
        model(**_flat_inputs(proc))
        groups = [g for per_sample in merged_sources(handle._runtime.request) for g in per_sample.values() if g.numel() > 1]
    assert len(groups) == (2 if version == "2" else 0)


def test_window_grids_follow_the_towers_tiling():
    from mmaccel.methods.tome_qwen import window_grids

    # 6 x 10 patches = 3 x 5 merge windows, attention windows of 2: a 2 x 3 tiling with short edges
    assert window_grids(torch.tensor([[1, 6, 10]]), 2, 2) == [(2, 2), (2, 2), (2, 1), (1, 2), (1, 2), (1, 1)]
    # a 2-slice video of 8 x 8 patches with windows of 4: one whole window per slice
    assert window_grids(torch.tensor([[2, 8, 8]]), 2, 4) == [(4, 4), (4, 4)]


def test_key_set_is_a_share_of_the_tokens_left_after_the_window_merge():
    """Official clip_encoder: ``ceil(0.08 * (N - 1))`` with N the sequence after the layer-0 merge.
    Every window merges here (36 patches -> 4 tokens): one key token per sample, not ceil(0.08 * 36) = 3."""
    model, proc = _six_by_six_llava()
    inputs = make_inputs(proc, batch=2)
    with accelerate_vlm(model, method="mustdrop", retention=0.5, merge_threshold=-1.0) as handle, torch.no_grad():
        model(**inputs, use_cache=True)
        protected = handle._runtime.request.stages[0].protected
    assert protected.sum(1).tolist() == [1, 1]


def test_clip_tower_runs_merged_to_the_end_and_the_key_set_scores_merged_tokens():
    """As in the official code, every block after the window merge runs on the merged tokens
    (the feature block and the last, key-set block included); the projector still gets one
    copy per source patch, and the key-set scores are the last block's CLS attention over the
    merged tokens (one merged token = one key: each head's row sums to 1 over them)."""
    model, proc = _six_by_six_llava()
    inputs = make_inputs(proc, batch=2)
    layers = get_adapter(model).vision_layers
    lengths, projected = [], []
    probes = [layer.self_attn.q_proj.register_forward_hook(lambda m, a, out: lengths.append(out.shape[1])) for layer in layers]
    probes.append(model.model.multi_modal_projector.register_forward_pre_hook(lambda m, a: projected.append(a[0])))
    try:
        with accelerate_vlm(model, method="mustdrop", retention=0.5, merge_threshold=-1.0) as handle, torch.no_grad():
            model(**inputs)
            call = handle._runtime.records[0][2]
    finally:
        for p in probes:
            p.remove()
    assert lengths == [37, 5, 5, 5]  # CLS + 36 patches; every 3x3 window merged: CLS + 4
    windows = projected[0].view(2, 2, 3, 2, 3, -1).permute(0, 1, 3, 2, 4, 5).reshape(2, 4, 9, -1)
    assert torch.equal(windows, windows[:, :, :1].expand_as(windows))  # nine copies of each merged token
    cls_rows = call["_vision_scores"][3][0][:, :, 0]  # (B, H, 37) over CLS + patches
    firsts = torch.tensor([0, 1, 4, 19, 22])  # CLS and the first cell of each window
    torch.testing.assert_close(cls_rows[..., firsts].sum(-1), torch.ones(2, cls_rows.shape[1]))
    window_scores = cls_rows[..., 1:].reshape(2, -1, 2, 3, 2, 3).permute(0, 1, 2, 4, 3, 5).reshape(2, -1, 4, 9)
    assert torch.equal(window_scores, window_scores[..., :1].expand_as(window_scores))


def test_clip_tower_merged_rows_of_different_lengths_give_each_sample_its_own_result():
    """A flat image merges most windows and a noisy one none: in a batch their merged rows are
    padded through the feature and key-set blocks, and each sample still gets what it gets alone."""
    import numpy as np
    from PIL import Image

    from test_core_pruning import _select

    model, proc = _six_by_six_llava()
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (84, 84, 3), dtype=np.uint8))
    texts = [proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                      add_generation_prompt=True) for q in ("what is it ?", "is there a red circle ?")]
    batch = proc(text=texts, images=[Image.new("RGB", (84, 84), (240, 240, 240)), noise], padding=True, return_tensors="pt")
    with accelerate_vlm(model, method="mustdrop", retention=0.5, merge_threshold=0.9) as handle, torch.no_grad():
        both = model(**batch).logits[:, -1]
        kept_both = handle.kept_visual_positions()
        request = handle._runtime.request
        singles, kept_alone = [], []
        for i in range(2):
            singles.append(model(**_select(batch, i, "llava")).logits[:, -1])
            kept_alone.append(handle.kept_visual_positions()[0])
    assert request.visual_in[0] < request.visual_in[1] == 36  # the flat image merged windows, the noisy one none
    torch.testing.assert_close(both, torch.cat(singles), atol=2e-5, rtol=1e-4)
    offset = batch["attention_mask"].shape[1] - batch["attention_mask"].sum(1)  # left padding
    assert all(torch.equal(kept_both[i] - offset[i], kept_alone[i]) for i in range(2))


def test_siglip_tower_merged_to_the_end_counts_only_real_queries_in_a_batch():
    """LLaVA-OneVision's SigLIP (no CLS): the key set is the mean attention a token receives in
    the last block, which now runs merged. A flat image merges a window and a noisy one none, so
    their rows are padded; padded query rows must not count, or a sample's key-set scores would
    depend on its batch."""
    import numpy as np
    from PIL import Image

    from test_core_pruning import _select

    model, proc = build("llava_onevision", seed=3, vision_layers=4)
    layers = get_adapter(model).vision_layers
    lengths = []
    probe = layers[-1].self_attn.q_proj.register_forward_hook(lambda m, a, out: lengths.append(out.shape[1]))
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 255, (56, 56, 3), dtype=np.uint8))
    texts = [proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                      add_generation_prompt=True) for q in ("what is it ?", "is there a red circle ?")]
    batch = proc(text=texts, images=[Image.new("RGB", (56, 56), (240, 240, 240)), noise], padding=True,
                 return_tensors="pt")
    try:
        with accelerate_vlm(model, method="mustdrop", retention=0.5, merge_threshold=0.9) as handle, torch.no_grad():
            both = model(**batch).logits[:, -1]
            key_scores = [handle._runtime.records[0][2]["_vision_scores"][3][0]]  # (tiles, H, patches)
            singles = []
            for i in range(2):
                singles.append(model(**_select(batch, i, "llava_onevision")).logits[:, -1])
                key_scores.append(handle._runtime.records[0][2]["_vision_scores"][3][0])
    finally:
        probe.remove()
    # tiles of 4x4 patches, one 3x3 window each: the flat image's tiles merge to 8 tokens, the
    # noisy one's keep 16, so in the batch the flat rows are padded to 16 in the last block
    assert lengths == [16, 8, 16]
    flat_tiles = key_scores[1].shape[0]
    torch.testing.assert_close(key_scores[0][:flat_tiles], key_scores[1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(both, torch.cat(singles), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("proportional", [True, False])
def test_qwen_window_merge_weighs_merged_blocks_by_size(proportional):
    """On Qwen2-VL the merged 3x3 blocks get log(9) in the attention of the blocks after the
    merge when ``proportional_attention`` is on (the official weighting: no bias)."""
    from mmaccel.testing.tiny import tiny_qwen2_vl

    model, proc = tiny_qwen2_vl(vision_depth=4)
    attn = model.model.visual.blocks[1].attn
    queued = []
    probe = attn.register_forward_pre_hook(lambda m, a, k: queued.append(list(getattr(m, "_mmaccel_bias_queue", []))),
                                           with_kwargs=True)
    try:
        with accelerate_vlm(model, method="mustdrop", retention=0.5, merge_threshold=0.5,
                            proportional_attention=proportional), torch.no_grad():
            model(**_blank_inputs(proc, 2))
    finally:
        probe.remove()
    biases = torch.cat([b.flatten() for b in queued[0]]) if queued[0] else torch.zeros(0)
    assert bool(queued[0]) == proportional
    if proportional:
        assert torch.isclose(biases.max(), torch.tensor(9.0).log()) and biases.min() == 0
