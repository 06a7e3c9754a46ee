"""Streaming STC sessions: faithful at full retention, independent of each other."""
import numpy as np
import pytest
import torch

from mmaccel.stream import StreamSession
from conftest import make_inputs, prompt, run_in_threads, video


def test_full_retention_stream_equals_the_offline_video_answer(tiny_models):
    model, proc = tiny_models("llava_onevision")
    frames = video(3, frames=4)
    question = "which direction does the red square move ?"
    session = StreamSession(model, proc, retention=1.0)
    for f in frames:
        session.add_frame(f)
    streamed = session.ask(question, max_new_tokens=4)
    inputs = proc(text=[prompt(proc, question, ("video",))], videos=[frames], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    offline = proc.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
    assert streamed.text == offline
    assert streamed.stats.visual_tokens_kept == streamed.stats.visual_tokens_in


def test_sessions_do_not_share_state(tiny_models):
    model, proc = tiny_models("llava_onevision")
    a_frames, b_frames = video(1, frames=5), video(2, frames=5)
    alone = StreamSession(model, proc, retention=0.5)
    for f in a_frames:
        alone.add_frame(f)
    a, b = StreamSession(model, proc, retention=0.5), StreamSession(model, proc, retention=0.5)
    for fa, fb in zip(a_frames, b_frames):  # interleaved streams
        a.add_frame(fa)
        b.add_frame(fb)
    assert all(torch.equal(x, y) for x, y in zip(a.kept_index, alone.kept_index))
    assert a.ask("what is the color ?", 2).text == alone.ask("what is the color ?", 2).text
    assert a.frames == b.frames == 5 and a.tokens_seen == 5 * 4
    ans = b.ask("what is the color ?", 2)
    assert ans.stats.visual_tokens_kept < ans.stats.visual_tokens_in and ans.stats.flop_ratio > 1.0
    b.reset()
    with pytest.raises(ValueError, match="no frames yet"):
        b.ask("what ?")


def test_stream_rejects_other_families_and_bad_frames(tiny_models):
    model, proc = tiny_models("llava")
    with pytest.raises(ValueError, match="supports LlavaOnevision.*Qwen2VL.*not LlavaForConditionalGeneration"):
        StreamSession(model, proc)
    ov, ov_proc = tiny_models("llava_onevision")
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        StreamSession(ov, ov_proc).add_frame(torch.zeros(4, 4).numpy())
    session = StreamSession(ov, ov_proc)
    for frame, message in [(np.zeros((8, 8, 3), np.float32), "must be uint8"),  # floats were rescaled silently
                           (np.zeros((8, 8, 4), np.uint8), r"\(H, W, 3\)"), (np.zeros((0, 8, 3), np.uint8), "empty")]:
        with pytest.raises(ValueError, match=message):
            session.add_frame(frame)
    assert session.frames == 0
    session.add_frame(video(1, frames=1)[0])
    for question in ("", "   ", None):
        with pytest.raises(ValueError, match="non-empty string"):
            session.ask(question)


def _layers(model):
    from mmaccel.models import get_adapter

    return get_adapter(model).vision_layers


@pytest.mark.parametrize("fam", ["llava_onevision", "llava"])
def test_cacher_reference_chunk_matches_the_library_layer(tiny_models, fam):
    from mmaccel.vision.stc_cacher import CacherState, STCCacher

    model, proc = tiny_models(fam)
    tower = get_tower(model)
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        expected = tower(pixels).last_hidden_state
        with STCCacher(_layers(model), CacherState()):
            got = tower(pixels).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def get_tower(model):
    from mmaccel.models import get_adapter

    return get_adapter(model).vision_tower


def test_cacher_reuses_exactly_on_static_frames_and_recomputes_a_quarter(tiny_models):
    from mmaccel.vision.stc_cacher import CacherState, STCCacher

    model, _ = tiny_models("llava_onevision")
    tower, layers = get_tower(model), _layers(model)
    frame = torch.randn(1, 3, 56, 56)
    state = CacherState(cache_interval=4, update_ratio=0.25)
    with torch.no_grad():
        expected = tower(frame).last_hidden_state
        outs = []
        for _ in range(4):
            with STCCacher(layers, state):
                outs.append(tower(frame).last_hidden_state)
    for out in outs:  # a static video: reused rows are exactly what would be recomputed
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    n = expected.shape[1]
    assert state.recomputed == len(layers) * (n + 3 * round(0.25 * n))


def test_cacher_full_update_ratio_equals_full_compute_on_moving_frames(tiny_models):
    from mmaccel.vision.stc_cacher import CacherState, STCCacher

    model, _ = tiny_models("llava_onevision")
    tower, layers = get_tower(model), _layers(model)
    state = CacherState(cache_interval=3, update_ratio=1.0)
    torch.manual_seed(1)
    for _ in range(3):
        frame = torch.randn(1, 3, 56, 56)
        with torch.no_grad():
            expected = tower(frame).last_hidden_state
            with STCCacher(layers, state):
                got = tower(frame).last_hidden_state
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_stream_sessions_with_cacher_are_independent(tiny_models):
    model, proc = tiny_models("llava_onevision")
    a_frames, b_frames = video(4, frames=4), video(5, frames=4)
    alone = StreamSession(model, proc, retention=0.5, cacher=True)
    for f in a_frames:
        alone.add_frame(f)
    a, b = StreamSession(model, proc, retention=0.5, cacher=True), StreamSession(model, proc, retention=0.5, cacher=True)
    for fa, fb in zip(a_frames, b_frames):
        a.add_frame(fa)
        b.add_frame(fb)
    assert all(torch.equal(x, y) for x, y in zip(a.kept, alone.kept))
    assert a.cacher_state.recomputed < a.cacher_state.total
    assert "forward" not in vars(_layers(model)[0])  # the tower is untouched between frames


def test_questions_leave_the_cache_as_it_was(tiny_models):
    model, proc = tiny_models("llava_onevision")
    frames = video(4, frames=6)
    live, fresh = StreamSession(model, proc, retention=0.5), StreamSession(model, proc, retention=0.5)
    for f in frames[:3]:
        live.add_frame(f)
    held = live.cached
    first = live.ask("what is the color ?", 3)
    assert live.cached == held == live.cache.get_seq_length()
    assert live.ask("what is the color ?", 3).text == first.text
    for f in frames[3:]:
        live.add_frame(f)  # frames after a question extend the same cache
    for f in frames:
        fresh.add_frame(f)
    assert live.cached == fresh.cached
    for a, b in zip(live.cache.layers, fresh.cache.layers):
        assert torch.allclose(a.keys, b.keys, atol=1e-5) and torch.allclose(a.values, b.values, atol=1e-5)
    assert live.ask("which shape ?", 3).text == fresh.ask("which shape ?", 3).text


QUESTION_FIRST = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                  "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}\n{% endif %}{% endfor %}"
                  "{% for c in m['content'] %}{% if c['type'] == 'video' %}<video>{% endif %}{% endfor %}"
                  "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_question_first_template_prefills_at_ask_time(tiny_models):
    import copy

    model, proc = tiny_models("llava_onevision")
    proc = copy.deepcopy(proc)
    proc.chat_template = QUESTION_FIRST
    frames, question = video(5, frames=3), "which direction does the red square move ?"
    session = StreamSession(model, proc, retention=1.0)
    for f in frames:
        session.add_frame(f)
    assert not session.incremental and session.cache is None
    streamed = session.ask(question, max_new_tokens=4)
    assert session.cache is None and session.cached == 0
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}],
                                    add_generation_prompt=True)
    assert text.index(question) < text.index("<video>")
    inputs = proc(text=[text], videos=[frames], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert streamed.text == proc.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()


def test_fast_cached_layer_equals_the_plain_restatement_bit_for_bit(tiny_models):
    from mmaccel.vision.stc_cacher import CacherState, STCCacher, cached_layer_reference

    model, _ = tiny_models("llava_onevision")
    tower, layers = get_tower(model), _layers(model)
    torch.manual_seed(3)
    frames = torch.randn(4, 1, 3, 56, 56)
    runs = []
    for fn in (None, cached_layer_reference):
        state, outs = CacherState(cache_interval=4, update_ratio=0.25), []
        with torch.no_grad():
            for f in frames:
                with STCCacher(layers, state, layer_fn=fn):
                    outs.append(tower(f).last_hidden_state)
        runs.append(outs)
    full = tower(frames[1]).last_hidden_state
    assert not torch.allclose(runs[0][1], full, atol=1e-3)  # moving frames: the cache really changed them
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def _encode_chunks(tower, layers, state, frames):
    from mmaccel.vision.stc_cacher import STCCacher

    outs = []
    with torch.no_grad():
        for f in frames:
            with STCCacher(layers, state):
                outs.append(tower(f).last_hidden_state)
    return outs


def test_threshold_rule_recomputes_only_changed_tokens(tiny_models):
    from mmaccel.vision.stc_cacher import CacherState

    model, _ = tiny_models("llava_onevision")
    tower, layers = get_tower(model), _layers(model)
    torch.manual_seed(4)
    frame = torch.randn(1, 3, 56, 56)
    static = CacherState(cache_interval=4, similarity_threshold=0.85)
    outs = _encode_chunks(tower, layers, static, [frame] * 4)
    with torch.no_grad():
        expected = tower(frame).last_hidden_state
    for out in outs:
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    n = expected.shape[1]
    assert static.recomputed == len(layers) * (n + 3 * 1)  # nothing changed: one row per layer
    moving = CacherState(cache_interval=4, update_ratio=0.25, similarity_threshold=1.0)
    frames = torch.randn(3, 1, 3, 56, 56)
    outs = _encode_chunks(tower, layers, moving, frames)
    assert moving.recomputed == moving.total  # every key changed: every row recomputed, not a quarter
    with torch.no_grad():
        for f, out in zip(frames, outs):
            torch.testing.assert_close(out, tower(f).last_hidden_state, atol=1e-5, rtol=1e-5)


def test_threshold_rule_batch_rows_equal_their_single_runs(tiny_models):
    from mmaccel.vision.stc_cacher import CacherState

    model, _ = tiny_models("llava_onevision")
    tower, layers = get_tower(model), _layers(model)
    torch.manual_seed(5)
    still, first = torch.randn(1, 3, 56, 56), torch.randn(1, 3, 56, 56)
    second = first.clone()
    second[..., :20, :20] = torch.randn(1, 3, 20, 20)  # one corner changes
    rows = [[still, still], [first, second]]
    singles = [_encode_chunks(tower, layers, CacherState(similarity_threshold=0.9), r) for r in rows]
    batch_state = CacherState(similarity_threshold=0.9)
    batch = _encode_chunks(tower, layers, batch_state, [torch.cat(pair) for pair in zip(*rows)])
    for b, single in enumerate(singles):
        torch.testing.assert_close(batch[1][b:b + 1], single[1], atol=1e-5, rtol=1e-5)
    n = batch[0].shape[1]
    # the changed corner needs more than one row per layer, but far from all of them
    assert 2 * len(layers) * (n + 1) < batch_state.recomputed < 4 * n * len(layers)


@pytest.mark.parametrize("threshold", [1.5, -2.0])
def test_threshold_out_of_range_is_refused(tiny_models, threshold):
    model, proc = tiny_models("llava_onevision")
    with pytest.raises(ValueError, match="similarity_threshold"):
        StreamSession(model, proc, cacher=True, similarity_threshold=threshold)


@pytest.mark.parametrize("policy, question_first", [("preserve", False), ("compact", False), ("preserve", True)])
def test_stream_matches_offline_stc_under_the_same_position_policy(tiny_models, policy, question_first):
    """A pruned stream keeps offline stc's tokens and puts them where offline stc does: at
    their full-video positions (preserve, the default) or one after another (compact, the
    official stream's append), so the answer's logits match the offline forward's; also when
    the template puts the question first (the whole prompt is prefilled at ask time)."""
    import copy

    from mmaccel import accelerate_vlm

    model, proc = tiny_models("llava_onevision")
    if question_first:
        proc = copy.deepcopy(proc)
        proc.chat_template = QUESTION_FIRST
    frames, question = video(7, frames=4), "which direction does the red square move ?"
    session = StreamSession(model, proc, retention=0.5, position_policy=policy)
    for f in frames:
        session.add_frame(f)
    inputs = proc(text=[prompt(proc, question, ("video",))], videos=[frames], return_tensors="pt")
    with accelerate_vlm(model, method="stc", retention=0.5, position_policy=policy) as handle, torch.no_grad():
        offline = model(**inputs).logits[0, -1]
        kept = handle.kept_visual_positions()[0]
    first = (inputs["input_ids"][0] == model.config.video_token_id).nonzero()[0, 0]
    per_frame = torch.cat([i + 4 * f for f, i in enumerate(session.kept_index)])
    assert torch.equal(kept[:-1] - first, per_frame)  # the last kept token: the video's newline
    streamed = session.ask(question, max_new_tokens=1)
    torch.testing.assert_close(session.first_logits, offline, atol=1e-4, rtol=1e-4)
    assert streamed.text == proc.tokenizer.decode([int(offline.argmax())], skip_special_tokens=True).strip()


@pytest.mark.parametrize("cacher", [False, True])
def test_sessions_in_threads_get_what_they_get_one_after_another(tiny_models, cacher):
    """Streams served from several threads on one model: each session's kept tokens and answer
    equal a sequential run's (STC-Cacher swaps the shared tower's layer forwards, so cached
    chunks take turns)."""
    model, proc = tiny_models("llava_onevision")
    videos = [video(20 + i, frames=8) for i in range(3)]

    def run(frames):
        session = StreamSession(model, proc, retention=0.5, cacher=cacher)
        for f in frames:
            session.add_frame(f)
        return [k.clone() for k in session.kept], session.ask("what is the color ?", 3).text

    expected = [run(v) for v in videos]
    results = run_in_threads(lambda i: run(videos[i]), 3)
    for (kept, text), (kept_ref, text_ref) in zip(results, expected):
        assert text == text_ref and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(kept, kept_ref))


def test_a_session_refuses_an_accelerated_model_and_works_after_restore(tiny_models):
    """accelerate_vlm's runtime would take the session's tower and decoder calls for its own
    (it raised a placeholder mismatch); the session says so, and works once restored."""
    from mmaccel import accelerate_vlm

    model, proc = tiny_models("llava_onevision")
    frames = video(3, frames=3)
    session = StreamSession(model, proc, retention=0.5)
    session.add_frame(frames[0])
    handle = accelerate_vlm(model, method="fastv", retention=0.25)
    try:
        with pytest.raises(ValueError, match="accelerated"):
            session.add_frame(frames[1])
        with pytest.raises(ValueError, match="accelerated"):
            StreamSession(model, proc)
    finally:
        handle.restore()
    for f in frames[1:]:
        session.add_frame(f)
    assert session.frames == 3 and session.ask("what is the color ?", 2).text


@pytest.mark.parametrize("policy", ["preserve", "compact"])
def test_max_frames_holds_only_the_newest_frames_in_the_cache(tiny_models, policy):
    """A long stream with ``max_frames=2``: the cache holds the prompt prefix and the two newest
    frames' kept tokens, a sliding window: each frame was encoded seeing the prompt, the two
    frames before it and itself, and the question sees the prompt and the last two frames. The
    full stream's sequence under exactly that attention mask gives the same logits."""
    model, proc = tiny_models("llava_onevision")
    frames, question = video(11, frames=5), "what is the color ?"
    full, window = (StreamSession(model, proc, retention=0.5, position_policy=policy, max_frames=m) for m in (None, 2))
    for f in frames:
        full.add_frame(f)
        window.add_frame(f)
    prefix, suffix = window._split_prompt(question)
    held = sum(k.shape[0] for k in full.kept[3:])
    assert window.frames == 5 and len(window.kept) == 2 and window.cached == window.cache.get_seq_length() == prefix.numel() + held
    assert all(torch.equal(a, b) for a, b in zip(window.kept, full.kept[3:]))  # the same tokens kept per frame
    window.ask(question, max_new_tokens=1)
    embed = model.get_input_embeddings()
    with torch.no_grad():
        embeds = torch.cat([embed(prefix), *full.kept, model.model.image_newline[None], embed(suffix)])
        tail = prefix.numel() + full.video_span + torch.arange(1 + suffix.numel())
        positions = torch.cat([torch.arange(prefix.numel()), *[p[0] + prefix.numel() for p in full.kept_positions], tail])
        n = embeds.shape[0]
        edges = (prefix.numel() + torch.tensor([0] + [k.shape[0] for k in full.kept]).cumsum(0)).tolist()
        allowed = torch.ones(n, n).tril().bool()
        for j in range(6):  # frame j saw frames j-2 .. j; the question (rows from edges[5]) frames 3 and 4
            allowed[edges[j]: edges[j + 1] if j < 5 else n, prefix.numel(): edges[max(0, j - 2)]] = False
        mask = torch.zeros(1, 1, n, n).masked_fill(~allowed, float("-inf"))
        hidden = model.model.language_model(inputs_embeds=embeds[None], position_ids=positions[None],
                                            attention_mask=mask).last_hidden_state
        expected = model.lm_head(hidden[0, -1])
    torch.testing.assert_close(window.first_logits, expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="max_frames"):
        StreamSession(model, proc, max_frames=0)
