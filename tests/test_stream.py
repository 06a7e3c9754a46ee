"""Streaming STC sessions: faithful at full retention, independent of each other."""
import pytest
import torch

from mmaccel.stream import StreamSession
from conftest import make_inputs, prompt, video


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
    model, proc = tiny_models("qwen2_vl")
    with pytest.raises(ValueError, match="LlavaOnevision"):
        StreamSession(model, proc)
    ov, ov_proc = tiny_models("llava_onevision")
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        StreamSession(ov, ov_proc).add_frame(torch.zeros(4, 4).numpy())
