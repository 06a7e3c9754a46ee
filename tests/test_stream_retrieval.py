"""ReKV-style frame retrieval in StreamSession: scoring, positions, per-layer choice, isolation."""
import copy

import pytest
import torch

from mmaccel import stream_retrieval
from mmaccel.stream import StreamSession
from mmaccel.stream_retrieval import Rotary, block_scores, rotate, select_blocks
from conftest import run_in_threads, video
from test_stream import QUESTION_FIRST

QUESTION = "what is the color ?"


def _stream(model, proc, frames, **options) -> StreamSession:
    session = StreamSession(model, proc, retention=0.5, **options)
    for f in frames:
        session.add_frame(f)
    return session


def test_block_scores_expand_grouped_heads_and_select_keeps_temporal_order():
    # 2 key heads serve 4 query heads: head h reads key head h // 2
    block_keys = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]]])
    queries = torch.tensor([[1.0, 0, 1, 0, 0, 0, 0, 2], [1.0, 0, 1, 0, 0, 0, 0, 0]])  # mean: [1,0,1,0,0,0,0,1]
    assert block_scores(block_keys, queries, num_heads=4).tolist() == [2.0, 1.0, 3.0]
    assert select_blocks(torch.tensor([2.0, 1.0, 3.0]), 2).tolist() == [0, 2]  # best two, oldest first
    assert select_blocks(torch.tensor([2.0, 1.0]), 5).tolist() == [0, 1]


def test_rotate_matches_the_models_rotary_embedding_and_undoes_itself(tiny_models):
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    model, _ = tiny_models("llava_onevision")
    rotary = model.model.language_model.rotary_emb
    head_dim = model.model.language_model.layers[0].self_attn.head_dim
    x, positions = torch.randn(1, 2, 5, head_dim), torch.tensor([0, 3, 7, 8, 40])
    cos, sin = rotary(x, positions[None])
    expected, _ = apply_rotary_pos_emb(x, x, cos, sin)
    spec = Rotary.of(model.model.language_model)
    assert spec.sections is None
    torch.testing.assert_close(rotate(x, positions, spec), expected)
    torch.testing.assert_close(rotate(rotate(x, positions, spec), -positions, spec), x)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_rotate_matches_m_rope_and_undoes_itself(tiny_models, family):
    """M-RoPE: each frequency turns with its section's row (temporal, height, width), as the
    model's own rotary embedding lays them out; one row stands for three equal ones."""
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    model, _ = tiny_models(family)
    lm = model.model.language_model
    x = torch.randn(1, 2, 5, lm.layers[0].self_attn.head_dim)
    positions = torch.tensor([[0, 3, 7, 7, 40], [0, 1, 2, 9, 11], [0, 5, 1, 4, 2]])
    cos, sin = lm.rotary_emb(x, positions[:, None])
    expected, _ = apply_rotary_pos_emb(x, x, cos, sin)
    spec = Rotary.of(lm)
    assert spec.sections is not None and len(set(spec.sections)) > 1  # rows really differ in width
    torch.testing.assert_close(rotate(x, positions, spec), expected)
    torch.testing.assert_close(rotate(rotate(x, positions, spec), -positions, spec), x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rotate(x, positions[0], spec), rotate(x, positions[0].expand(3, -1), spec))


@pytest.mark.parametrize("policy", ["preserve", "compact"])
def test_retrieving_every_frame_answers_as_the_plain_session(tiny_models, policy):
    """With K >= the frames seen, every layer retrieves every frame in order, at the positions
    they were encoded at: the question sees what a session without retrieval shows it."""
    model, proc = tiny_models("llava_onevision")
    frames = video(31, frames=4)
    plain = _stream(model, proc, frames, position_policy=policy)
    retrieving = _stream(model, proc, frames, position_policy=policy, retrieve_frames=4)
    expected = plain.ask(QUESTION, max_new_tokens=3)
    answer = retrieving.ask(QUESTION, max_new_tokens=3)
    torch.testing.assert_close(retrieving.first_logits, plain.first_logits, atol=1e-4, rtol=1e-4)
    assert answer.text == expected.text
    assert retrieving.last_retrieved == [[0, 1, 2, 3]] * model.config.text_config.num_hidden_layers


@pytest.mark.parametrize("family, frames", [("llava_onevision", 5), ("qwen2_vl", 10), ("qwen2_5_vl", 10)])
def test_layer_zero_picks_the_frame_whose_mean_key_meets_the_question(tiny_models, family, frames):
    """Layer 0's choice, recomputed from scratch: its input is the token embeddings, so the
    pre-RoPE keys of a frame (Qwen: a slice of 2, its keys turned by M-RoPE's three rows) are
    k_proj(norm(frame features)) and the question's queries q_proj(norm(question embeddings))."""
    model, proc = tiny_models(family)
    per_unit = 2 if family.startswith("qwen") else 1  # Qwen's blocks are slices of 2 frames
    session = _stream(model, proc, video(32, frames=frames), retrieve_frames=2 * per_unit)
    session.ask(QUESTION, max_new_tokens=1)
    layer = model.model.language_model.layers[0]
    heads, kv_heads = model.config.text_config.num_attention_heads, model.config.text_config.num_key_value_heads
    ids = proc.tokenizer(QUESTION, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    with torch.no_grad():
        queries = layer.self_attn.q_proj(layer.input_layernorm(model.get_input_embeddings()(ids)))
        keys = torch.stack([layer.self_attn.k_proj(layer.input_layernorm(f)).mean(0).view(kv_heads, -1)
                            for f in session.kept])
    torch.testing.assert_close(torch.stack([b.mean_keys[0] for b in session.blocks]), keys, atol=1e-5, rtol=1e-4)
    expected = select_blocks(block_scores(keys, queries, heads), 2).tolist()
    assert session.last_retrieved[0] == expected and len(expected) == 2


def test_chosen_frames_are_all_the_question_sees(tiny_models, monkeypatch):
    """Every layer forced to frames 1 and 3 of a 2-frame window stream: the answer's logits equal
    the full sequence under a mask where each frame saw the prompt, the two frames before it and
    itself, and the question sees the prompt and frames 1 and 3 only."""
    model, proc = tiny_models("llava_onevision")
    frames = video(33, frames=5)
    full = _stream(model, proc, frames)
    session = _stream(model, proc, frames, max_frames=2, retrieve_frames=2)
    monkeypatch.setattr(stream_retrieval, "select_blocks", lambda scores, k: torch.tensor([1, 3]))
    session.ask(QUESTION, max_new_tokens=1)
    prefix, suffix = session._split_prompt(QUESTION)
    embed, p = model.get_input_embeddings(), prefix.numel()
    with torch.no_grad():
        embeds = torch.cat([embed(prefix), *full.kept, model.model.image_newline[None], embed(suffix)])
        positions = torch.cat([torch.arange(p), *[q[0] + p for q in full.kept_positions],
                               p + full.video_span + torch.arange(1 + suffix.numel())])
        n = embeds.shape[0]
        edges = (p + torch.tensor([0] + [k.shape[0] for k in full.kept]).cumsum(0)).tolist()
        allowed = torch.ones(n, n).tril().bool()
        for j in range(5):
            allowed[edges[j]: edges[j + 1], p: edges[max(0, j - 2)]] = False
        for j in (0, 2, 4):
            allowed[edges[5]:, edges[j]: edges[j + 1]] = False
        mask = torch.zeros(1, 1, n, n).masked_fill(~allowed, float("-inf"))
        hidden = model.model.language_model(inputs_embeds=embeds[None], position_ids=positions[None],
                                            attention_mask=mask).last_hidden_state
    torch.testing.assert_close(session.first_logits, model.lm_head(hidden[0, -1]), atol=1e-4, rtol=1e-4)
    assert session.last_retrieved == [[1, 3]] * model.config.text_config.num_hidden_layers


def test_compact_retrieval_renumbers_the_chosen_frames_after_the_prompt(tiny_models, monkeypatch):
    """The official positions: retrieved frames at consecutive positions right after the prompt,
    the question after them, whatever gap lay between the frames."""
    model, proc = tiny_models("llava_onevision")
    frames = video(34, frames=4)
    session = _stream(model, proc, frames, position_policy="compact", retrieve_frames=2)
    monkeypatch.setattr(stream_retrieval, "select_blocks", lambda scores, k: torch.tensor([0, 2]))
    session.ask(QUESTION, max_new_tokens=1)
    prefix, suffix = session._split_prompt(QUESTION)
    embed, p = model.get_input_embeddings(), prefix.numel()
    # each frame's KV as the stream made it (frame 2 saw frames 0 and 1), its keys turned by
    # the model's own rotary embedding to the new positions
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    reference = _stream(model, proc, frames[:1], position_policy="compact")
    prefix_kv = [(layer.keys[..., :p, :], layer.values[..., :p, :]) for layer in reference.cache.layers]
    rotary = model.model.language_model.rotary_emb
    with torch.no_grad():
        reference.cache = reference._new_cache()
        blocks = session.frame_blocks()
        new_start = {0: p, 2: p + blocks[0].size}
        for layer, (k, v) in enumerate(prefix_kv):
            for b in (0, 2):
                block = blocks[b]
                delta = new_start[b] + torch.arange(block.size) - block.positions[0]
                cos, sin = rotary(block.keys[layer], delta[None])
                turned, _ = apply_rotary_pos_emb(block.keys[layer], block.keys[layer], cos, sin)
                k, v = torch.cat([k, turned], -2), torch.cat([v, block.values[layer]], -2)
            reference.cache.update(k, v, layer)
        tail = torch.cat([model.model.image_newline[None], embed(suffix)])
        start = reference.cache.get_seq_length()
        hidden = reference._forward(tail, start + torch.arange(tail.shape[0]))
    torch.testing.assert_close(session.first_logits, model.lm_head(hidden[-1]), atol=1e-4, rtol=1e-4)
    assert torch.equal(session.blocks[2].positions[0], p + torch.arange(2 * 2, 3 * 2))  # compact: frame 2 was at 4..5


def test_questions_leave_the_session_as_it_was(tiny_models):
    model, proc = tiny_models("llava_onevision")
    frames = video(35, frames=6)
    session = _stream(model, proc, frames[:4], max_frames=2, retrieve_frames=1)
    cached, keys = session.cached, [layer.keys.clone() for layer in session.cache.layers]
    first = session.ask(QUESTION, max_new_tokens=3)
    assert session.cached == cached == session.cache.get_seq_length()
    assert all(torch.equal(a, layer.keys) for a, layer in zip(keys, session.cache.layers))
    assert session.ask(QUESTION, max_new_tokens=3).text == first.text
    assert first.stats.visual_tokens_kept == 2 + 1  # one frame of 2 kept tokens and the newline
    for f in frames[4:]:  # frames keep arriving after a question
        session.add_frame(f)
    assert len(session.blocks) == 6 and len(session.kept) == 2
    # only the 4 frames the window dropped hold copies; the 2 held are read from the cache
    assert [b.keys is not None for b in session.blocks] == [True] * 4 + [False] * 2
    assert all(b.keys is None for b in _stream(model, proc, frames[:3], retrieve_frames=1).blocks)
    session.ask(QUESTION, max_new_tokens=1)
    assert all(len(chosen) == 1 for chosen in session.last_retrieved)


def test_retrieval_is_refused_where_it_cannot_work(tiny_models):
    model, proc = tiny_models("llava_onevision")
    with pytest.raises(ValueError, match="retrieve_frames"):
        StreamSession(model, proc, retrieve_frames=0)
    question_first = copy.deepcopy(proc)
    question_first.chat_template = QUESTION_FIRST
    with pytest.raises(ValueError, match="video before the question"):
        StreamSession(model, question_first, retrieve_frames=4)


def test_retrieving_sessions_in_threads_get_what_they_get_alone(tiny_models):
    """The retrieval hooks sit on the shared decoder; a plain session's and another retrieving
    session's calls from other threads pass through them untouched."""
    model, proc = tiny_models("llava_onevision")
    videos = [video(40 + i, frames=6) for i in range(3)]
    options = [{"retrieve_frames": 2}, {}, {"retrieve_frames": 1, "max_frames": 3}]

    def run(i):
        session = _stream(model, proc, videos[i], **options[i])
        answer = session.ask(QUESTION, max_new_tokens=3)
        return answer.text, session.first_logits.clone()

    expected = [run(i) for i in range(3)]
    for (text, logits), (text_ref, logits_ref) in zip(run_in_threads(run, 3), expected):
        assert text == text_ref
        torch.testing.assert_close(logits, logits_ref, atol=1e-5, rtol=1e-5)
