"""ToMe inside the vision tower: matching and merging by hand, shorter ViT, one token per group."""
import pytest
import torch

from mmaccel import accelerate_vlm
from mmaccel.methods.tome import _representatives, tome_match, tome_merge
from mmaccel.models import get_adapter
from mmaccel.runtime import merged_sources
from mmaccel.testing import tiny
from conftest import make_inputs


def test_match_merges_identical_tokens_and_protects_cls():
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.3]]])
    src, dst = tome_match(metric, 1, protect_first=True)
    # slot 0 (CLS) is identical to slot 1 but protected; slot 2 is identical to slot 3
    assert src.tolist() == [[2]] and dst.tolist() == [[3]]


def test_merge_is_size_weighted_and_tracks_sources():
    x = torch.tensor([[[0.0], [2.0], [4.0], [10.0]]])
    size = torch.tensor([[1.0, 1.0, 3.0, 1.0]])
    assign = torch.arange(4)[None]
    out, size2, assign2 = tome_merge(x, size, assign, torch.tensor([[2]]), torch.tensor([[3]]))
    assert out.flatten().tolist() == [0.0, 2.0, (3 * 4.0 + 10.0) / 4] and size2.tolist() == [[1.0, 1.0, 4.0]]
    assert assign2.tolist() == [[0, 1, 2, 2]] and _representatives(assign2).tolist() == [[0, 1, 2, 2]]


@pytest.fixture(scope="module")
def deep_tower_llava():
    return tiny.build("llava_next", seed=5, vision_layers=5)


def test_tower_runs_shorter_and_each_group_keeps_one_token(deep_tower_llava):
    model, proc = deep_tower_llava
    inputs = make_inputs(proc, batch=2)
    adapter = get_adapter(model)
    seen = []
    probe = adapter.vision_layers[2].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    try:
        with torch.no_grad():
            model(**inputs)
            with accelerate_vlm(model, method="tome", retention=0.5) as handle:
                model(**inputs)
                provenance = handle.provenance()
                stats = handle.stats
    finally:
        probe.remove()
    assert seen[1] < seen[0]  # the ViT block after a merge sees fewer tokens
    assert stats.visual_tokens_kept < stats.visual_tokens_in
    image_id = model.config.image_token_id
    for b, groups in enumerate(provenance):
        sources = torch.cat(list(groups.values()))
        assert sources.unique().numel() == sources.numel()  # groups do not overlap
        assert torch.all(inputs["input_ids"][b, sources] == image_id)
    assert "_mmaccel_bias" not in vars(adapter.attention_of(adapter.vision_layers[1]))


def test_tome_on_qwen2_5_vl_merges_inside_attention_windows():
    """Qwen2.5-VL (block 1 attends per image, blocks 0, 2, 3 per 2x2-unit window): merges stay
    inside one attention window, windowed blocks get the shrunken windows and the full block
    the per-image sums, one proportional bias per attention chunk, all consumed; batch equals
    singles; generate runs."""
    from mmaccel.methods.tome_qwen import attention_windows
    from mmaccel.testing.tiny import tiny_qwen2_5_vl
    from test_core_pruning import _select

    model, proc = tiny_qwen2_5_vl(vision_depth=4)
    batch = make_inputs(proc, batch=2)
    visual = model.model.visual
    seen, left = [], []
    probes = [b.attn.register_forward_pre_hook(lambda m, a, k: seen.append(
        (k["cu_seqlens"].diff().tolist(), len(getattr(m, "_mmaccel_bias_queue", [])))), with_kwargs=True)
        for b in visual.blocks]
    probes += [b.attn.register_forward_hook(lambda m, a, out: left.append(len(getattr(m, "_mmaccel_bias_queue", []))))
               for b in visual.blocks]
    try:
        with accelerate_vlm(model, method="tome", retention=0.25) as handle, torch.no_grad():
            both = model(**batch).logits[:, -1]
            merges = merged_sources(handle._runtime.request)
            blocks = seen[:4]
            singles = torch.cat([model(**_select(batch, i, "qwen2_5_vl")).logits[:, -1] for i in range(2)])
            out = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    finally:
        for p in probes:
            p.remove()
    cu_windows, image_of = attention_windows(visual, batch["image_grid_thw"])
    windows = cu_windows.diff().tolist()
    # 6 x 10 patches = 3 x 5 units per image, windows of 4, 4, 2, 2, 2, 1 units (16 patches max)
    assert windows == [16, 16, 8, 8, 8, 4] * 2 and image_of.tolist() == [0] * 6 + [1] * 6
    assert blocks[0] == (windows, 0)
    # block 1's attention (full), after block 0 merged: windows of 4 units lose 1, of 2 units 1, of 1 none
    assert blocks[1] == ([4 * (3 + 3 + 1 + 1 + 1 + 1)] * 2, 2)
    assert blocks[2] == ([4 * n for n in (2, 2, 1, 1, 1, 1)] * 2, 12)
    assert blocks[3] == ([4] * 12, 12)  # every window reaches max(1, round(0.25 x its units))
    assert set(left) == {0}
    torch.testing.assert_close(both, singles, atol=2e-5, rtol=1e-4)
    assert out.shape[1] == batch["input_ids"].shape[1] + 3
    image_id = model.config.image_token_id
    for b, per_sample in enumerate(merges):
        slots = {int(p): i for i, p in enumerate((batch["input_ids"][b] == image_id).nonzero().flatten())}
        window_of = lambda pos: ((slots[int(pos)] // 5) // 2, (slots[int(pos)] % 5) // 2)  # noqa: E731
        groups = [g for g in per_sample.values() if g.numel() > 1]
        assert groups
        for g in groups:
            assert len({window_of(p) for p in g}) == 1


def test_qwen_window_merge_by_hand():
    """Windows 0 and 1 have the same keys, so window 0 (A set) merges into window 1 (B set):
    slot-wise mean, size 2, rotary rows of the surviving windows, sources mapped."""
    from mmaccel.methods.tome_qwen import merge_windows, tome_into

    unit = 4
    metric = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.6, -0.8], [-1.0, 0.0]])  # one row per window
    x = (torch.arange(4)[:, None] * 10 + torch.arange(unit)).float().reshape(-1, 1)  # window w: 10w..10w+3
    cos = torch.arange(16, dtype=torch.float32)[:, None]
    st = {"size": torch.ones(4), "assign": torch.arange(4)}
    into = tome_into(metric, 1)
    assert into.tolist() == [1, 1, 2, 3]
    out, c, s = merge_windows(x, cos, -cos, st, into, unit)
    assert out.flatten().tolist() == [5, 6, 7, 8, 20, 21, 22, 23, 30, 31, 32, 33]
    assert c.flatten().tolist() == list(range(4, 16)) and torch.equal(s, -c)
    assert st["size"].tolist() == [2, 1, 1] and st["assign"].tolist() == [0, 0, 1, 2]


@pytest.mark.parametrize("fam", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_vision_block_restatement_is_the_library_block(tiny_models, fam):
    """The re-stated Qwen vision block with nothing between attention and MLP is the library's
    block, bit for bit; what ``between`` returns is what the MLP runs on."""
    from mmaccel.methods.tome_qwen import vision_block_forward

    model, _ = tiny_models(fam)
    visual = model.model.visual
    block, dim = visual.blocks[0], visual.blocks[0].norm1.weight.shape[0]
    x, cu = torch.randn(12, dim), torch.tensor([0, 8, 12], dtype=torch.int32)
    head_dim = dim // block.attn.num_heads
    angles = torch.randn(12, head_dim // 2)
    rotary = (torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin())
    with torch.no_grad():
        assert torch.equal(vision_block_forward(block, x, cu, rotary), block(x, cu_seqlens=cu, position_embeddings=rotary))
        kept = vision_block_forward(block, x, cu, rotary, between=lambda x_in, h: h[:4])
        h = x + block.attn(block.norm1(x), cu_seqlens=cu, position_embeddings=rotary)
        torch.testing.assert_close(kept, h[:4] + block.mlp(block.norm2(h[:4])))


def test_tome_on_qwen2_vl_merges_windows_inside_the_tower(tiny_models):
    model, proc = tiny_models("qwen2_vl")
    inputs = make_inputs(proc, batch=2)
    adapter = get_adapter(model)
    seen = []
    probe = adapter.attention_of(adapter.vision_layers[-1]).register_forward_pre_hook(  # inside the block
        lambda m, a, k: seen.append((a[0].shape[0], k["cu_seqlens"].tolist(),
                                     len(getattr(m, "_mmaccel_bias_queue", [])))), with_kwargs=True)
    left = []  # proportional-attention biases still queued after the block's attention ran
    after = adapter.attention_of(adapter.vision_layers[-1]).register_forward_hook(
        lambda m, a, out: left.append(len(getattr(m, "_mmaccel_bias_queue", []))))
    try:
        with torch.no_grad():
            model(**inputs)
            with accelerate_vlm(model, method="tome", retention=0.5) as handle:
                model(**inputs)
                provenance = handle.provenance()
                stats = handle.stats
    finally:
        probe.remove()
        after.remove()
    (n_full, cu_full, _), (n_merged, cu_merged, queued) = seen
    assert queued == 2 and left == [0, 0]  # one bias per image, each consumed by its attention call
    assert n_merged < n_full and len(cu_merged) == len(cu_full) and cu_merged[-1] == n_merged
    assert all(b - a < d - c for a, b, c, d in zip(cu_merged, cu_merged[1:], cu_full, cu_full[1:]))
    assert stats.visual_tokens_kept < stats.visual_tokens_in
    image_id = model.config.image_token_id
    for b, groups in enumerate(provenance):
        sources = torch.cat(list(groups.values()))
        assert sources.unique().numel() == sources.numel()
        assert torch.all(inputs["input_ids"][b, sources] == image_id)
    assert "_mmaccel_bias_queue" not in vars(adapter.attention_of(adapter.vision_layers[1]))


def test_tome_on_qwen2_vl_batch_equals_singles_generates_and_restores(tiny_models):
    from test_core_pruning import _select

    model, proc = tiny_models("qwen2_vl")
    batch = make_inputs(proc, batch=2)
    with torch.no_grad():
        before = model(**batch).logits[:, -1]
    with accelerate_vlm(model, method="tome", retention=0.25) as handle, torch.no_grad():
        both = model(**batch).logits[:, -1]
        kept_batch = handle.stats.visual_tokens_kept
        singles, kept_single = [], 0
        for i in range(2):
            singles.append(model(**_select(batch, i, "qwen2_vl")).logits[:, -1])
            kept_single += handle.stats.visual_tokens_kept
        out = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert kept_batch == kept_single < handle.stats.visual_tokens_in
    torch.testing.assert_close(both, torch.cat(singles), atol=2e-5, rtol=1e-4)
    assert out.shape == (2, batch["input_ids"].shape[1] + 4)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits[:, -1], before)


def test_tome_on_a_deeper_qwen2_vl_tower_shrinks_block_by_block():
    """Four blocks: windows merge inside every block, between its attention and its MLP (block
    0 included), each image reaching its target (retention x its windows) in the last block's
    MLP; the next block's attention gets what the MLP got; the merger gets every patch back."""
    from mmaccel.testing.tiny import tiny_qwen2_vl
    from test_core_pruning import _select

    model, proc = tiny_qwen2_vl(vision_depth=4)
    batch = make_inputs(proc, batch=2)
    visual = model.model.visual
    seen, mlp_rows, merger_in = [], [], []
    probes = [b.attn.register_forward_pre_hook(lambda m, a, k: seen.append(k["cu_seqlens"].diff().tolist()),
                                               with_kwargs=True) for b in visual.blocks]
    probes += [b.mlp.register_forward_pre_hook(lambda m, a: mlp_rows.append(a[0].shape[0])) for b in visual.blocks]
    probes.append(visual.merger.register_forward_hook(lambda m, a, out: merger_in.append(out.shape[0])))
    try:
        with accelerate_vlm(model, method="tome", retention=0.25) as handle, torch.no_grad():
            both = model(**batch).logits[:, -1]
            singles = torch.cat([model(**_select(batch, i, "qwen2_vl")).logits[:, -1] for i in range(2)])
    finally:
        for p in probes:
            p.remove()
    full = (batch["image_grid_thw"].prod(-1)).tolist()
    attended, mlp = [sum(lengths) for lengths in seen[:4]], mlp_rows[:4]
    assert seen[0] == full and mlp[0] < attended[0]  # block 0 merges after its attention
    assert attended[1:] == mlp[:3] and all(b < a for a, b in zip(mlp, mlp[1:]))
    assert mlp[-1] == sum(4 * max(1, round(0.25 * n / 4)) for n in full)
    assert merger_in[0] == sum(full) // 4  # one token per 2x2 window of the full image
    torch.testing.assert_close(both, singles, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["tome", "mustdrop"])
def test_qwen2_vl_tower_merging_on_video_slices(method):
    """A video's temporal slices are separate attention chunks: each merges its own windows,
    generation runs, and merged groups stay inside one sample's video tokens."""
    from mmaccel.testing.tiny import tiny_qwen2_vl

    from conftest import prompt, video

    model, proc = tiny_qwen2_vl(vision_depth=4)
    texts = [prompt(proc, q, ("video",)) for q in ("what moves ?", "is it red ?")]
    clips = [video(s, frames=4, size=(112, 112)) for s in (0, 1)]  # 4x4 windows per slice
    inputs = proc(text=texts, videos=clips, padding=True, return_tensors="pt")
    seen = []
    probe = model.model.visual.blocks[2].attn.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["cu_seqlens"].diff().tolist()), with_kwargs=True)
    params = {"merge_threshold": -1.0} if method == "mustdrop" else {}  # merge every whole 3x3 block
    try:
        with accelerate_vlm(model, method=method, retention=0.5, **params) as handle, torch.no_grad():
            model(**inputs)
            merges = merged_sources(handle._runtime.request)
            out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    finally:
        probe.remove()
    thw = inputs["video_grid_thw"].tolist()
    slices = [h * w for t, h, w in thw for _ in range(t)]
    assert len(seen[0]) == len(slices) and all(m < f for m, f in zip(seen[0], slices))
    video_id = model.config.video_token_id
    groups = [g for per_sample in merges for g in per_sample.values() if g.numel() > 1]
    assert groups
    for b, per_sample in enumerate(merges):
        for g in per_sample.values():
            assert torch.all(inputs["input_ids"][b, g] == video_id)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_merge_to_budget_joins_identical_tokens_first():
    from mmaccel.methods.tome import merge_to_budget

    feats = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.2]])
    red = merge_to_budget(feats, 4)
    # even slots match odd ones: 0 = 1 and 2 = 3 are the best edges, each pair one token at its first slot
    assert red.keep.tolist() == [0, 2, 4, 5]
    assert [g.tolist() for g in red.group_list()] == [[0, 1], [2, 3], [4], [5]]
    torch.testing.assert_close(red.features, feats[[0, 2, 4, 5]])
    assert merge_to_budget(feats, 0).keep.numel() == 1


def test_tome_on_llava_onevision_video_merges_in_the_tower_and_per_pooled_frame():
    """Video frames are tower rows: blocks after a merge see fewer tokens per frame; the pooled
    frames then merge to their budgets, groups never leave a frame; batch equals singles."""
    from test_core_pruning import _select

    model, proc = tiny.build("llava_onevision", seed=3, vision_layers=5)
    inputs = make_inputs(proc, batch=2, media=("video",))
    layers = get_adapter(model).vision_layers
    seen = []
    probe = layers[3].register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape[:2])))
    try:
        with accelerate_vlm(model, method="tome", retention=0.25) as handle, torch.no_grad():
            both = model(**inputs).logits[:, -1]
            merges, stats = merged_sources(handle._runtime.request), handle.stats
            singles = torch.cat([model(**_select(inputs, i, "llava_onevision")).logits[:, -1] for i in range(2)])
            out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    finally:
        probe.remove()
    frames, patches = inputs["pixel_values_videos"].shape[1], 16  # 56 px / 14 = 4 x 4 patches
    assert seen[0][0] == 2 * frames and seen[0][1] < patches
    per_video = frames * 4 + 1  # 2 x 2 pooled tokens per frame and one newline
    assert stats.visual_tokens_in == 2 * per_video
    assert stats.visual_tokens_kept == 2 * (frames * 1 + 1)  # one token per frame at 0.25, the newline
    video_id = model.config.video_token_id
    for b, per_sample in enumerate(merges):
        first = int((inputs["input_ids"][b] == video_id).nonzero()[0])
        for pos, g in per_sample.items():
            assert torch.all(inputs["input_ids"][b, g] == video_id)
            assert len({(int(p) - first) // 4 for p in g}) == 1  # inside one frame
    torch.testing.assert_close(both, singles, atol=2e-5, rtol=1e-4)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


@pytest.mark.parametrize("fam", ["llava", "llava_onevision"])
def test_tome_block_is_the_library_block_and_size_is_proportional_attention(tiny_models, fam):
    """The re-stated CLIP/SigLIP block with nothing to merge is the library's block, and a
    token of size 2 attends and is attended like two copies of itself (proportional attention)."""
    from mmaccel.methods.tome import tome_block_forward

    model, _ = tiny_models(fam)
    layer = get_adapter(model).vision_layers[0]
    x = torch.randn(2, 5, layer.layer_norm1.normalized_shape[0])
    ones = {"size": torch.ones(2, 5), "assign": torch.arange(5).expand(2, -1).clone(), "cls": False}
    with torch.no_grad():
        torch.testing.assert_close(tome_block_forward(layer, x, dict(ones), 0), layer(x, None), atol=1e-5, rtol=1e-5)
        sized = dict(ones, size=torch.tensor([[1.0, 2.0, 1.0, 1.0, 1.0]] * 2))
        copies = layer(x[:, [0, 1, 1, 2, 3, 4]], None)
        torch.testing.assert_close(tome_block_forward(layer, x, sized, 0), copies[:, [0, 1, 3, 4, 5]], atol=1e-5, rtol=1e-5)


def test_tome_merges_from_the_first_block_between_attention_and_mlp(deep_tower_llava):
    """Block 0 already merges (the official ToMe merges in every block), after its attention:
    the tokens leaving block 0 are fewer, and its attention still saw them all."""
    model, proc = deep_tower_llava
    inputs = make_inputs(proc)
    layers = get_adapter(model).vision_layers
    entering, attended = [], []
    probes = [layers[i].register_forward_pre_hook(lambda m, a: entering.append(a[0].shape[1])) for i in range(3)]
    probes.append(layers[0].self_attn.q_proj.register_forward_hook(lambda m, a, out: attended.append(out.shape[1])))
    try:
        with accelerate_vlm(model, method="tome", retention=0.5), torch.no_grad():
            model(**inputs)
    finally:
        for p in probes:
            p.remove()
    n0 = entering[0]
    assert attended == [n0] and entering[1] < n0 and entering[2] < entering[1]


def test_tome_refuses_a_tower_with_no_block_before_the_feature_layer(tiny_models):
    """The tiny LLaVA tower has 2 blocks and takes block 0's output: tome would silently keep
    every token, so it says why instead (at full retention it has nothing to do anyway)."""
    model, _ = tiny_models("llava_next")
    with pytest.raises(ValueError, match="nothing could be merged"):
        accelerate_vlm(model, method="tome", retention=0.25)
    accelerate_vlm(model, method="tome", retention=1.0).restore()
