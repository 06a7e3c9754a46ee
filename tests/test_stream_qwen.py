"""Streaming STC sessions on Qwen2-VL and Qwen2.5-VL: frames encoded in pairs as they arrive,
M-RoPE positions as the library numbers the whole video, questions on odd frames."""
import numpy as np
import pytest
import torch

from mmaccel.stream import StreamSession
from conftest import prompt, video
from test_stream import QUESTION_FIRST as OV_QUESTION_FIRST

QUESTION = "which direction does the red square move ?"
QWEN = ("qwen2_vl", "qwen2_5_vl")


def _stream(model, proc, frames, **options) -> StreamSession:
    session = StreamSession(model, proc, **options)
    for f in frames:
        session.add_frame(f)
    return session


def _processed(proc, frames, fps=None):
    """The processor's offline inputs for the whole video (``fps``: its frame rate, which the
    processor reads from the metadata)."""
    from transformers.video_utils import VideoMetadata

    extra = {}
    if fps is not None:
        extra["video_metadata"] = [VideoMetadata(total_num_frames=len(frames), fps=fps,
                                                 frames_indices=list(range(len(frames))))]
    return proc(text=[prompt(proc, QUESTION, ("video",))], videos=[frames], return_tensors="pt", **extra)


def _step_logits(model, run) -> list[torch.Tensor]:
    """The lm_head outputs at the last position of every forward ``run()`` makes."""
    seen = []
    probe = model.lm_head.register_forward_hook(lambda m, a, out: seen.append(out.reshape(-1, out.shape[-1])[-1]))
    try:
        run()
    finally:
        probe.remove()
    return seen


@pytest.mark.parametrize("family, frames, fps", [("qwen2_vl", 4, None), ("qwen2_vl", 5, None),
                                                 ("qwen2_vl", 27, None), ("qwen2_5_vl", 4, None),
                                                 ("qwen2_5_vl", 7, 1.0)])
def test_full_retention_stream_decodes_as_generate_on_the_whole_video(tiny_models, family, frames, fps):
    """Every token kept: each decode step's logits equal ``generate``'s on the processed video,
    for even and odd frame counts (the last frame waits for its pair and is paired with itself,
    as the processor pads) and with Qwen2.5-VL's temporal positions spaced by a frame rate. With
    27 frames of Qwen2-VL, or at 1 fps on Qwen2.5-VL, the last slice's time lies past the
    question's positions; ``generate`` numbers the answer after the question all the same."""
    model, proc = tiny_models(family)
    clip = video(5, frames=frames)
    session = _stream(model, proc, clip, retention=1.0, **({} if fps is None else {"fps": fps}))
    streamed = _step_logits(model, lambda: session.ask(QUESTION, max_new_tokens=5))
    inputs = _processed(proc, clip, fps)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=len(streamed), min_new_tokens=len(streamed), do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    assert len(streamed) == 5  # no end-of-sequence in these draws: five decode steps compared
    for mine, theirs in zip(streamed, out.logits):
        torch.testing.assert_close(mine, theirs[0], atol=1e-4, rtol=1e-4)
    grid = inputs["video_grid_thw"][0]
    assert session.tokens_seen == (frames // 2) * int(grid[1] * grid[2]) // 4
    assert len(session.pending) == frames % 2


QUESTION_FIRST = OV_QUESTION_FIRST.replace("<video>", "<|vision_start|><|video_pad|><|vision_end|>")


@pytest.mark.parametrize("family", QWEN)
@pytest.mark.parametrize("policy, frames, question_first", [("preserve", 6, False), ("compact", 6, False),
                                                            ("preserve", 5, False), ("preserve", 5, True)])
def test_pruned_stream_matches_offline_stc(tiny_models, family, policy, frames, question_first):
    """A pruned Qwen stream keeps offline stc's tokens per temporal slice and places them where
    offline stc does (3-D positions kept, or renumbered one after another): the answer's first
    logits match the offline forward's, also when the template puts the question first (the
    whole prompt is prefilled at the question). A third of 9 tokens a slice: the stream's budget
    per slice and offline stc's per video, shared out over its slices, agree."""
    import copy

    from mmaccel import accelerate_vlm

    model, proc = tiny_models(family)
    if question_first:
        proc = copy.deepcopy(proc)
        proc.chat_template = QUESTION_FIRST
    clip = video(8, frames=frames, size=(84, 84))
    session = _stream(model, proc, clip, retention=1 / 3, position_policy=policy)
    assert session.incremental != question_first
    inputs = _processed(proc, clip)
    with accelerate_vlm(model, method="stc", retention=1 / 3, position_policy=policy) as handle, torch.no_grad():
        offline = model(**inputs).logits[0, -1]
        kept = handle.kept_visual_positions()[0]
    per_slice = 9  # 84 px: 6x6 patches, 3x3 after the 2x2 merge
    first = (inputs["input_ids"][0] == model.config.video_token_id).nonzero()[0, 0]
    held = torch.cat([i + per_slice * s for s, i in enumerate(session.kept_index)])
    assert torch.equal(kept[:held.numel()] - first, held)  # the pending pair is picked at ask time
    session.ask(QUESTION, max_new_tokens=1)
    torch.testing.assert_close(session.first_logits, offline, atol=1e-4, rtol=1e-4)


def test_a_question_on_an_odd_frame_leaves_the_session_as_it_was(tiny_models):
    """Asking while a pair waits for its second frame encodes the waiting frame for that question
    only: the next frame completes the pair exactly as in a session that was never asked."""
    model, proc = tiny_models("qwen2_vl")
    clip = video(9, frames=6, size=(84, 84))
    asked, quiet = _stream(model, proc, clip[:3], retention=0.5), _stream(model, proc, clip[:3], retention=0.5)
    cached, memory = asked.cached, len(asked.memory)
    first = asked.ask(QUESTION, max_new_tokens=2)
    assert asked.cached == asked.cache.get_seq_length() == cached and len(asked.memory) == memory
    assert first.stats.visual_tokens_in == 2 * 9 and first.stats.visual_tokens_kept == 2 * round(0.5 * 9)
    for f in clip[3:]:
        asked.add_frame(f)
        quiet.add_frame(f)
    assert all(torch.equal(a, b) for a, b in zip(asked.kept_index, quiet.kept_index))
    assert all(torch.equal(a, b) for a, b in zip(asked.memory, quiet.memory))
    assert asked.ask(QUESTION, 3).text == quiet.ask(QUESTION, 3).text


def test_max_frames_holds_the_newest_pairs(tiny_models):
    """``max_frames=4`` on Qwen holds two temporal slices: the cache keeps the prompt prefix and
    the two newest slices' kept tokens, as a LLaVA-OneVision window keeps frames."""
    model, proc = tiny_models("qwen2_vl")
    clip = video(10, frames=8, size=(84, 84))
    full, window = _stream(model, proc, clip, retention=0.5), _stream(model, proc, clip, retention=0.5, max_frames=4)
    prefix, _ = window._split_prompt(QUESTION)
    assert len(window.kept) == 2 and window.frames == 8
    assert window.cached == window.cache.get_seq_length() == prefix.numel() + sum(k.shape[0] for k in full.kept[2:])
    assert all(torch.equal(a, b) for a, b in zip(window.kept_positions, full.kept_positions[2:]))
    assert window.ask(QUESTION, 2).text is not None


def test_qwen_stream_refuses_what_it_cannot_do(tiny_models):
    model, proc = tiny_models("qwen2_vl")
    for options, message in [({"max_frames": 3}, "max_frames must be a multiple of 2"),
                             ({"retrieve_frames": 3}, "retrieve_frames must be a multiple of 2"),
                             ({"fps": 2.0}, "only Qwen2.5-VL")]:
        with pytest.raises(ValueError, match=message):
            StreamSession(model, proc, **options)
    q25, q25_proc = tiny_models("qwen2_5_vl")
    with pytest.raises(ValueError, match="positive frame rate"):
        StreamSession(q25, q25_proc, fps=0.0)
    ov, ov_proc = tiny_models("llava_onevision")
    with pytest.raises(ValueError, match="LLaVA-OneVision's do not use it"):
        StreamSession(ov, ov_proc, fps=2.0)
    session = StreamSession(model, proc)
    session.add_frame(video(1, frames=1)[0])
    with pytest.raises(ValueError, match="share a size"):
        session.add_frame(video(1, frames=1, size=(84, 84))[0])
    assert session.frames == 1 and session.ask(QUESTION, 1).stats.visual_tokens_in == 4


@pytest.mark.parametrize("family", QWEN)
@pytest.mark.parametrize("policy", ["preserve", "compact"])
def test_retrieving_every_slice_answers_as_the_plain_session(tiny_models, family, policy):
    """ReKV on Qwen with K = 6 frames (3 slices) of 7 seen, the 7th waiting for its pair: every
    layer takes every slice at the positions it was encoded at, and the question sees what a
    session without retrieval shows it."""
    model, proc = tiny_models(family)
    clip = video(41, frames=7, size=(84, 84))
    plain = _stream(model, proc, clip, retention=0.5, position_policy=policy)
    retrieving = _stream(model, proc, clip, retention=0.5, position_policy=policy, retrieve_frames=6)
    expected = plain.ask(QUESTION, max_new_tokens=3)
    answer = retrieving.ask(QUESTION, max_new_tokens=3)
    torch.testing.assert_close(retrieving.first_logits, plain.first_logits, atol=1e-4, rtol=1e-4)
    assert answer.text == expected.text and answer.stats.visual_tokens_kept == expected.stats.visual_tokens_kept
    assert retrieving.last_retrieved == [[0, 1, 2]] * model.config.text_config.num_hidden_layers


@pytest.mark.parametrize("policy", ["preserve", "compact"])
def test_chosen_slices_sit_where_the_policy_puts_them(tiny_models, monkeypatch, policy):
    """``retrieve_frames=4`` (2 slices), every layer forced to slices 0 and 2 of 4: the answer's logits equal a forward on a cache
    of the prompt prefix and those two slices' KV, as cached (preserve) or turned by the model's
    own M-RoPE to consecutive positions right after the prompt (compact, the official ReKV)."""
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    from mmaccel import stream_retrieval

    model, proc = tiny_models("qwen2_5_vl")
    clip = video(42, frames=8, size=(84, 84))
    session = _stream(model, proc, clip, retention=0.5, position_policy=policy, retrieve_frames=4, fps=1.0)
    monkeypatch.setattr(stream_retrieval, "select_blocks", lambda scores, k: torch.tensor([0, 2]))
    session.ask(QUESTION, max_new_tokens=1)
    prefix, suffix = session._split_prompt(QUESTION)
    p, rotary, blocks = prefix.numel(), model.model.language_model.rotary_emb, session.frame_blocks()
    reference = StreamSession(model, proc, position_policy=policy, fps=1.0)
    with torch.no_grad():
        reference.cache = reference._new_cache()
        start = p
        for layer, cached in enumerate(session.cache.layers):
            k, v = cached.keys[..., :p, :], cached.values[..., :p, :]
            for b in (0, 2):
                keys = blocks[b].keys[layer]
                if policy == "compact":
                    delta = p + (0 if b == 0 else blocks[0].size) + torch.arange(blocks[b].size) - blocks[b].positions
                    cos, sin = rotary(keys, delta[:, None])
                    keys, _ = apply_rotary_pos_emb(keys, keys, cos, sin)
                k, v = torch.cat([k, keys], -2), torch.cat([v, blocks[b].values[layer]], -2)
            reference.cache.update(k, v, layer)
        after = p + (blocks[0].size + blocks[2].size if policy == "compact" else 3)  # 3x3 grid: max(rows, cols)
        tail = model.get_input_embeddings()(suffix)
        hidden = reference._forward(tail, after + torch.arange(tail.shape[0]))
    torch.testing.assert_close(session.first_logits, model.lm_head(hidden[-1]), atol=1e-4, rtol=1e-4)
    if policy == "preserve":  # slice 2 at 2 s (1 fps, 2 frames a slice): 2 x 2 x tokens_per_second later
        assert blocks[2].positions[0, 0] - blocks[0].positions[0, 0] == 4 * model.config.vision_config.tokens_per_second


@pytest.mark.parametrize("family, frames, units", [("llava_onevision", 3, 3), ("qwen2_vl", 5, 2)])
def test_stream_pictures_dim_the_cells_the_session_dropped(tiny_models, family, frames, units):
    """One picture per held unit (Qwen: on a pair's second frame; the waiting frame has none): a
    kept cell shows the frame as it is, a dropped cell is dimmed."""
    from mmaccel.vis import stream_pictures

    model, proc = tiny_models(family)
    clip = video(60, frames=frames, size=(84, 84))
    session = _stream(model, proc, clip, retention=0.5)
    pictures = stream_pictures(session, clip)
    assert len(pictures) == units
    per_unit = session.units.frames_per_unit
    for unit, (picture, index) in enumerate(zip(pictures, session.kept_index)):
        shown, frame = np.asarray(picture).astype(int), clip[(unit + 1) * per_unit - 1].astype(int)
        n = session.tokens_per_unit[unit]
        side = int(n ** 0.5)
        cell = 84 // side
        for token in range(n):
            r, c = divmod(token, side)
            centre = (r * cell + cell // 2, c * cell + cell // 2)
            same = (shown[centre] == frame[centre]).all()
            assert same == (token in index.tolist()), (unit, token)


def test_a_long_qwen_stream_holds_a_window_and_archives_the_rest(tiny_models):
    """``max_frames=4, retrieve_frames=4`` over 13 frames: the cache holds the prompt prefix and
    the 2 newest slices, the 4 older slices are archived copies, a question (with the 13th
    frame waiting) picks 2 slices per layer and leaves the session as it was."""
    model, proc = tiny_models("qwen2_vl")
    clip = video(70, frames=13, size=(84, 84))
    session = _stream(model, proc, clip, retention=0.5, max_frames=4, retrieve_frames=4)
    prefix, _ = session._split_prompt(QUESTION)
    assert len(session.kept) == 2 and len(session.blocks) == 6 and len(session.pending) == 1
    assert [b.keys is not None for b in session.blocks] == [True] * 4 + [False] * 2
    assert session.cached == session.cache.get_seq_length() == prefix.numel() + sum(k.shape[0] for k in session.kept)
    keys = [layer.keys.clone() for layer in session.cache.layers]
    first = session.ask(QUESTION, max_new_tokens=2)
    assert all(len(chosen) == 2 and chosen == sorted(chosen) for chosen in session.last_retrieved)
    assert all(torch.equal(a, layer.keys) for a, layer in zip(keys, session.cache.layers))
    assert first.stats.visual_tokens_kept == 3 * round(0.5 * 9)  # two slices and the waiting frame's pair
    layers = model.config.text_config.num_hidden_layers  # held K/V: the cache and 4 archived slices
    assert first.stats.kv_cache_tokens == layers * (session.cached + 4 * round(0.5 * 9))
    assert session.ask(QUESTION, max_new_tokens=2).text == first.text
