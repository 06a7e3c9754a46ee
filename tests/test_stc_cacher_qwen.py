"""STC-Cacher on Qwen2-VL / Qwen2.5-VL towers: a reference slice is the library's own encoding,
static slices are reused exactly, and streams with the cacher stay independent."""
import numpy as np
import pytest
import torch

from mmaccel.stream import StreamSession
from mmaccel.vision.stc_cacher import CacherState
from mmaccel.vision.stc_cacher_qwen import QwenSTCCacher
from conftest import run_in_threads, video

QWEN = ("qwen2_vl", "qwen2_5_vl")


def _slice(proc, seed: int):
    out = proc.video_processor(videos=[video(seed, frames=2, size=(112, 112))], return_tensors="pt")
    return out["pixel_values_videos"], out["video_grid_thw"]


def _encode(model, pixels, grid, state=None) -> torch.Tensor:
    with torch.no_grad():
        if state is None:
            return model.model.get_video_features(pixels, grid).pooler_output[0]
        with QwenSTCCacher(model.model.visual.blocks, state):
            return model.model.get_video_features(pixels, grid).pooler_output[0]


@pytest.mark.parametrize("family", QWEN)
def test_reference_slice_equals_the_library_tower(deep_tower_models, family):
    """The reference pass re-states the block (attention under a mask per ``cu_seqlens`` chunk:
    the slice, or Qwen2.5-VL's 4 attention windows of a 112 px slice)."""
    model, proc = deep_tower_models(family)
    pixels, grid = _slice(proc, 1)
    torch.testing.assert_close(_encode(model, pixels, grid, CacherState()), _encode(model, pixels, grid),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", QWEN)
def test_static_slices_are_reused_exactly_and_a_quarter_recomputed(deep_tower_models, family):
    model, proc = deep_tower_models(family)
    pixels, grid = _slice(proc, 2)
    state = CacherState(cache_interval=4, update_ratio=0.25)
    expected = _encode(model, pixels, grid)
    for _ in range(4):  # a static video: the reused rows are exactly what would be recomputed
        torch.testing.assert_close(_encode(model, pixels, grid, state), expected, atol=1e-5, rtol=1e-5)
    n, blocks = pixels.shape[0], len(model.model.visual.blocks)
    assert state.total == 4 * blocks * n and state.recomputed == blocks * (n + 3 * round(0.25 * n))


@pytest.mark.parametrize("family", QWEN)
def test_moving_slices_reuse_a_quarter_or_recompute_everything(deep_tower_models, family):
    """On changing slices a quarter recomputed is an approximation (the output moves), and the
    full update ratio is the plain encoding again."""
    model, proc = deep_tower_models(family)
    quarter, full = CacherState(update_ratio=0.25), CacherState(update_ratio=1.0)
    for seed in (3, 4):
        pixels, grid = _slice(proc, seed)
        expected = _encode(model, pixels, grid)
        torch.testing.assert_close(_encode(model, pixels, grid, full), expected, atol=1e-5, rtol=1e-5)
        approximate = _encode(model, pixels, grid, quarter)
    assert not torch.allclose(approximate, expected, atol=1e-3)


def test_a_slice_of_another_size_is_refused(deep_tower_models):
    model, proc = deep_tower_models("qwen2_vl")
    state = CacherState()
    _encode(model, *_slice(proc, 5), state)
    out = proc.video_processor(videos=[video(6, frames=2, size=(56, 56))], return_tensors="pt")
    with pytest.raises(ValueError, match="share a size"):
        _encode(model, out["pixel_values_videos"], out["video_grid_thw"], state)
    assert "forward" not in vars(model.model.visual.blocks[0])  # the block forwards were put back


@pytest.mark.parametrize("family", QWEN)
def test_cached_streams_in_threads_get_what_they_get_alone(deep_tower_models, family):
    """Streams with the cacher on one Qwen model from several threads: each keeps the tokens and
    gives the answer of a sequential run; at update ratio 1 a cached stream is the plain one."""
    model, proc = deep_tower_models(family)
    clips = [video(50 + i, frames=6, size=(84, 84)) for i in range(3)]

    def run(i, **options):
        session = StreamSession(model, proc, retention=0.5, cacher=True, **options)
        for frame in clips[i]:
            session.add_frame(frame)
        return [k.clone() for k in session.kept], session.ask("what is the color ?", 3).text, session

    expected = [run(i)[:2] for i in range(3)]
    for (kept, text, _), (kept_ref, text_ref) in zip(run_in_threads(run, 3), expected):
        assert text == text_ref and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(kept, kept_ref))
    exact, plain = run(0, update_ratio=1.0)[2], StreamSession(model, proc, retention=0.5)
    for frame in clips[0]:
        plain.add_frame(frame)
    plain.ask("what is the color ?", 1)
    exact.ask("what is the color ?", 1)
    torch.testing.assert_close(exact.first_logits, plain.first_logits, atol=1e-4, rtol=1e-4)
    assert exact.cacher_state.chunk == 3  # one per slice of 2 frames


@pytest.mark.parametrize("family", QWEN)
def test_changed_tokens_are_recomputed_at_their_own_positions(deep_tower_models, family):
    """One block, a slice whose last 6 tokens changed and ``update_ratio`` 6/N: exactly those
    are dynamic (the others' pre-rotary keys match the reference), their rows are the library
    attention's (the block's own qkv, its rotary embedding at their positions, the reference's
    values elsewhere, two packed chunks), and every other row is the reference's output plus
    the current residual."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    from mmaccel.vision.stc_cacher_qwen import qwen_cached_block, qwen_reference_block

    model, _ = deep_tower_models(family)
    block = model.model.visual.blocks[0]
    torch.manual_seed(7)
    n, dim = 16, block.norm1.weight.shape[0]
    x_ref = torch.randn(n, dim)
    x = x_ref.clone()
    x[-6:] += torch.randn(6, dim)
    cos, sin = torch.randn(n, block.attn.head_dim).cos(), torch.randn(n, block.attn.head_dim).sin()
    cu = torch.tensor([0, 8, 16], dtype=torch.int32)
    store = {}
    with torch.no_grad():
        qwen_reference_block(block, x_ref, cu, (cos, sin), store)
        out, n_dyn = qwen_cached_block(block, x, cu, (cos, sin), store, ratio=6 / n)
        heads = block.attn.num_heads
        q, k, v = block.attn.qkv(block.norm1(x)).view(n, 3, heads, -1).unbind(1)
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        v = torch.cat([store["v"][:10], v[10:]])
        scores = torch.einsum("qhd,khd->hqk", q[10:], k) * block.attn.scaling
        scores[:, :, :8] = float("-inf")  # rows 10..15 sit in the second chunk
        attended = block.attn.proj(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(6, -1))
        mid = x[10:] + attended
        expected = mid + block.mlp(block.norm2(mid))
    assert n_dyn == 6
    torch.testing.assert_close(out[10:], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:10], x[:10] + store["attn"][:10] + store["mlp"][:10])


@pytest.mark.parametrize("family, side, retention", [("llava_onevision", 84, 0.5), ("qwen2_vl", 112, 0.25),
                                                     ("qwen2_5_vl", 112, 0.25)])
def test_offline_stc_with_cacher_gives_the_streams_answer(deep_tower_models, family, side, retention):
    """``accelerate_vlm(model, method="stc", cacher=True)``: each video's frames (Qwen: slices)
    chain references and cached units as a stream's do, so the first logits equal a cached
    stream's (budgets whole per unit); the cacher really acts (the plain stc forward differs),
    and at update ratio 1 it is the plain forward again."""
    from mmaccel import accelerate_vlm
    from conftest import prompt

    model, proc = deep_tower_models(family)
    clip, question = video(8, frames=6, size=(side, side)), "what is the color ?"
    inputs = proc(text=[prompt(proc, question, ("video",))], videos=[clip], return_tensors="pt")

    def offline(**options):
        with accelerate_vlm(model, method="stc", retention=retention, **options), torch.no_grad():
            return model(**inputs).logits[0, -1]

    session = StreamSession(model, proc, retention=retention, cacher=True)
    for frame in clip:
        session.add_frame(frame)
    session.ask(question, max_new_tokens=1)
    cached = offline(cacher=True)
    torch.testing.assert_close(cached, session.first_logits, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(cached, offline(), atol=1e-3)
    torch.testing.assert_close(offline(cacher=True, update_ratio=1.0), offline(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family, first_frames", [("llava_onevision", 4), ("qwen2_vl", 6), ("qwen2_5_vl", 6)])
def test_offline_cacher_chains_each_video_of_a_batch_on_its_own(deep_tower_models, family, first_frames):
    """Two videos in a padded batch (of different lengths on Qwen; LLaVA-OneVision's processor
    stacks equal ones only): each one's logits equal its own run (its chain starts at its own
    first frame or slice), and images never go through the cacher."""
    from mmaccel import accelerate_vlm
    from mmaccel.vision.stc_offline import chains
    from conftest import image, prompt

    assert chains([3, 4], 2) == [0, 0, 2, 3, 3, 5, 5]
    model, proc = deep_tower_models(family)
    clips = [video(9, frames=first_frames, size=(84, 84)), video(10, frames=4, size=(84, 84))]
    texts = [prompt(proc, "what is the color ?", ("video",)), prompt(proc, "how many circle are there ?", ("video",))]
    with accelerate_vlm(model, method="stc", retention=0.5, cacher=True), torch.no_grad():
        both = model(**proc(text=texts, videos=clips, padding=True, return_tensors="pt")).logits[:, -1]
        alone = [model(**proc(text=[t], videos=[c], return_tensors="pt")).logits[0, -1] for t, c in zip(texts, clips)]
        pic = proc(text=[prompt(proc, "what is the color ?")], images=[image(1)], return_tensors="pt")
        with_cacher = model(**pic).logits[0, -1]
    with accelerate_vlm(model, method="stc", retention=0.5), torch.no_grad():
        without = model(**pic).logits[0, -1]
    for row, single in zip(both, alone):
        torch.testing.assert_close(row, single, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(with_cacher, without)
