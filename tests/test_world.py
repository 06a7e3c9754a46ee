"""The synthetic world: determinism, answers recomputed from metadata, rendering, video io."""
import json

import numpy as np
import pytest

from mmaccel.world import (ALL_FAMILIES, COLORS, IMAGE_SIDE, SHAPES, VIDEO_FAMILIES, generate_samples,
                           make_sample, read_mp4, sample_rng, write_mp4)
from mmaccel.world.assets import SAMPLE_IMAGE, SAMPLE_VIDEO, load_sample_video


def _pixels(s):
    if s.frames is not None:
        return s.frames
    return np.stack([np.asarray(im) for im in s.images])


@pytest.fixture(scope="module")
def samples():
    return generate_samples(len(ALL_FAMILIES) * 12, seed=11, split="test")


def test_same_seed_same_samples():
    a = generate_samples(20, seed=5)
    b = generate_samples(20, seed=5)
    for x, y in zip(a, b):
        assert (x.question, x.answer, x.family) == (y.question, y.answer, y.family)
        assert np.array_equal(_pixels(x), _pixels(y))
        assert x.meta == y.meta


def test_different_seed_or_split_differs():
    base = generate_samples(20, seed=5)
    for other in (generate_samples(20, seed=6), generate_samples(20, seed=5, split="test")):
        same = sum(np.array_equal(_pixels(x), _pixels(y)) for x, y in zip(base, other)
                   if _pixels(x).shape == _pixels(y).shape)
        assert same == 0


def test_sample_can_be_regenerated_alone():
    full = generate_samples(12, seed=3, split="test")
    one = generate_samples(1, seed=3, split="test", start=7)[0]
    assert one.id == full[7].id and one.question == full[7].question
    assert np.array_equal(_pixels(one), _pixels(full[7]))


def test_families_balanced_and_kinds(samples):
    fams = [s.family for s in samples]
    assert {f: fams.count(f) for f in ALL_FAMILIES} == {f: 12 for f in ALL_FAMILIES}
    for s in samples:
        if s.family in VIDEO_FAMILIES:
            assert s.frames.dtype == np.uint8 and s.frames.shape[0] in (8, 12, 16)
            assert s.frames.shape[1:] == (IMAGE_SIDE, IMAGE_SIDE, 3) and not s.images
        else:
            assert s.frames is None and len(s.images) == (2 if s.family == "multi" else 1)


def _objs(meta):
    return meta["objects"]


def _expected_caption(objs):
    words = [f"a {o['color']} {o['shape']}" for o in sorted(objs, key=lambda o: o["cx"])]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _expected_where(o, side):
    dx, dy = o["cx"] - side / 2, o["cy"] - side / 2
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _parse(question):
    words = question.rstrip("?.").split()
    colors = [w for w in words if w in COLORS]
    shapes = [w.rstrip("s") for w in words if w.rstrip("s") in SHAPES]
    return (colors[0] if colors else None), (shapes[0] if shapes else None)


def _expected_image_answer(s):
    color, shape = _parse(s.question)
    objs = _objs(s.meta)
    match = [o for o in objs if o["shape"] == shape and color in (None, o["color"])]
    if s.family == "color":
        assert len(match) == 1
        return match[0]["color"]
    if s.family == "count":
        return str(len(match))
    if s.family == "exists":
        return "yes" if match else "no"
    if s.family == "where":
        assert len(match) == 1
        return _expected_where(match[0], s.meta["side"])
    if s.family == "caption":
        return _expected_caption(objs)
    if s.family == "digits":
        return s.meta["text"]
    raise AssertionError(s.family)


def _expected_video_answer(s):
    color, shape = _parse(s.question)
    objs = _objs(s.meta)
    if s.family == "appear":
        late = [o for o in objs if not o["visible"][0]]
        assert len(late) == 1 and late[0]["visible"][-1]
        return late[0]["shape"]
    (o,) = [o for o in objs if (o["shape"], o["color"]) == (shape, color)]
    if s.family == "motion":
        dx, dy = np.subtract(o["end"], o["start"])
        if abs(dx) > abs(dy):
            return "left" if dx < 0 else "right"
        return "up" if dy < 0 else "down"
    vis = np.array(o["visible"])
    return str(int(np.sum(vis[1:] < vis[:-1])))  # visible -> hidden transitions


def test_answers_follow_from_metadata(samples):
    for s in samples:
        if s.family == "multi":
            color, shape = _parse(s.question)
            has = [any((o["shape"], o["color"]) == (shape, color) for o in sc["objects"])
                   for sc in s.meta["scenes"]]
            assert sum(has) == 1 and s.answer == ("first", "second")[has.index(True)]
        elif s.family in VIDEO_FAMILIES:
            assert s.answer == _expected_video_answer(s), s.id
        else:
            assert s.answer == _expected_image_answer(s), s.id


def test_answers_are_lowercase_words_or_digits(samples):
    for s in samples:
        assert s.answer == s.answer.lower() and s.answer.strip() == s.answer
        if s.family != "caption":
            assert s.answer.isalnum()


def test_rendering_matches_metadata(samples):
    for s in (x for x in samples if x.kind == "image"):
        img = np.asarray(s.image)
        side = s.meta["side"]
        assert img.shape == (side, side, 3)
        assert tuple(img[0, 0]) == (s.meta["background"],) * 3
        for o in _objs(s.meta):
            assert tuple(img[int(o["cy"]), int(o["cx"])]) == COLORS[o["color"]], (s.id, o)


def test_scene_invariants(samples):
    for s in (x for x in samples if x.kind == "image"):
        objs = _objs(s.meta)
        assert 0 <= len(objs) <= 6
        if s.family != "digits":
            assert len(objs) >= 1
        xs = sorted(o["cx"] for o in objs)
        assert all(b - a >= 0.04 * s.meta["side"] - 1e-6 for a, b in zip(xs, xs[1:]))
        for i, a in enumerate(objs):
            for b in objs[i + 1:]:
                assert np.hypot(a["cx"] - b["cx"], a["cy"] - b["cy"]) > (a["size"] + b["size"]) / 2


def test_high_resolution_share():
    hs = generate_samples(100, seed=2, families=["caption"], hires_p=0.5)
    sides = {s.image.size[0] for s in hs if s.meta["hires"]}
    n_hi = sum(s.meta["hires"] for s in hs)
    assert sides == {2 * IMAGE_SIDE} and 25 <= n_hi <= 75


def test_video_flash_frames_hide_only_the_target():
    s = make_sample("flash", sample_rng(0, 1, "test"), num_frames=12)
    hidden = [t for t, v in enumerate(s.meta["objects"][0]["visible"]) if not v]
    assert len(hidden) == int(s.answer)
    bg = np.abs(s.frames.astype(int) - s.meta["background"]).sum(-1) > 0
    counts = bg.sum((1, 2))
    assert all(counts[t] < counts[0] for t in hidden)


def test_mp4_round_trip(tmp_path):
    s = make_sample("motion", sample_rng(0, 2, "test"), num_frames=8)
    path = tmp_path / "clip.mp4"
    write_mp4(s.frames, path)
    back = read_mp4(path)
    assert back.shape == s.frames.shape
    assert np.abs(back.astype(int) - s.frames.astype(int)).mean() < 4.0


def test_bundled_assets_small_and_consistent():
    assert SAMPLE_VIDEO.exists() and SAMPLE_VIDEO.stat().st_size < 200_000
    frames, question, answer = load_sample_video()
    rec = json.loads(SAMPLE_VIDEO.with_suffix(".json").read_text())
    regen = make_sample(rec["family"], sample_rng(rec["seed"], rec["index"], rec["split"]), num_frames=16)
    assert (question, answer) == (regen.question, regen.answer)
    assert frames.shape == regen.frames.shape
    assert np.abs(frames.astype(int) - regen.frames.astype(int)).mean() < 4.0
    assert SAMPLE_IMAGE.exists()


def test_max_objects_caps_scenes_and_counts():
    for fam in ("color", "count", "exists", "where", "caption", "digits"):
        for i in range(30):
            s = make_sample(fam, sample_rng(3, i, "train"), hires=False, max_objects=2)
            assert len(s.meta["objects"]) <= 2
            if fam == "count":
                assert int(s.answer) <= 2
    with pytest.raises(ValueError, match="max_objects"):
        make_sample("color", sample_rng(3, 0, "train"), max_objects=7)


def test_caption_scenes_hold_at_most_four_objects():
    from mmaccel.world.spec import CAPTION_MAX_OBJECTS

    counts = {len(s.meta["objects"]) for s in generate_samples(120, seed=4, families=["caption"])}
    assert counts == set(range(1, CAPTION_MAX_OBJECTS + 1))


def _family_of(question: str) -> str:
    from mmaccel.world.spec import TEMPLATES

    heads = {t.split("{")[0]: f for f, t in TEMPLATES.items()}
    # longest head first: "How many times does the" (flash) also starts with "How many " (count)
    return next(heads[h] for h in sorted(heads, key=len, reverse=True) if h and question.startswith(h))


def test_followups_answer_the_same_scene_exactly():
    """Every derived follow-up answer equals what the scene metadata says (the same
    independent checkers as the main questions), none repeats the main question, and
    both answers of exists come up."""
    from dataclasses import replace

    seen = set()
    for i in range(160):
        fam = ("color", "count", "exists", "where", "caption", "multi", "motion", "flash")[i % 8]
        extra = ("flash", "caption") if i % 16 >= 8 else ()
        s = make_sample(fam, sample_rng(4, i, "test"), followups=6, extra_followups=extra)
        assert len(s.followups) <= 6 and s.question not in [q for q, _ in s.followups]
        for q, a in s.followups:
            f = _family_of(q)
            probe = replace(s, family=f, question=q, answer=a)
            if f == "multi":
                color, shape = _parse(q)
                has = [any((o["shape"], o["color"]) == (shape, color) for o in sc["objects"])
                       for sc in s.meta["scenes"]]
                assert sum(has) == 1 and a == ("first", "second")[has.index(True)]
            elif f in ("motion", "flash"):
                assert a == _expected_video_answer(probe)
            else:
                assert a == _expected_image_answer(probe), (q, a)
            seen.add((f, a) if f == "exists" else f)
            if f in ("flash", "caption"):
                assert extra, "opt-in follow-up kinds came up without being asked for"
                seen.add((f, a) if f == "flash" else f)
    assert {("exists", "yes"), ("exists", "no"), "count", "color", "where", "multi", "motion"} <= seen
    assert {("flash", "0"), "caption"} <= seen


def test_unknown_followup_kind_is_refused():
    from mmaccel.embedded.train import TrainConfig

    with pytest.raises(ValueError, match="unknown follow-up kinds"):
        make_sample("color", sample_rng(4, 0, "test"), followups=2, extra_followups=("digits",))
    with pytest.raises(ValueError, match="unknown follow-up kinds"):  # at start-up, before stage 1
        TrainConfig(extra_followups=("captions",))


def test_followups_leave_the_main_sample_unchanged():
    for fam in ("exists", "multi", "motion", "flash"):
        plain = make_sample(fam, sample_rng(2, 7, "train"))
        extra = make_sample(fam, sample_rng(2, 7, "train"), followups=4)
        assert (plain.question, plain.answer, plain.meta) == (extra.question, extra.answer, extra.meta)
        assert plain.followups == []
        assert (extra.followups == []) if fam == "flash" else (fam == "motion" or extra.followups)


def test_shuffled_turns_keep_every_pair_and_move_the_main_question():
    """The shuffle reorders the (question, answer) pairs of a sample and nothing else; over
    flash videos the first turn asks a never-vanishing object (answer 0) as often as the
    per-video share of such objects says, so its position no longer gives the answer away."""
    from mmaccel.world.samples import shuffled_turns

    rng = np.random.default_rng(0)
    first_zero = expected_zero = 0.0
    for i in range(120):
        s = make_sample("flash", sample_rng(6, i, "train"), followups=8, extra_followups=("flash",))
        assert s.answer != "0"  # unshuffled, the first turn always asks the vanishing object
        t = shuffled_turns(s, rng)
        before = [(s.question, s.answer), *s.followups]
        after = [(t.question, t.answer), *t.followups]
        assert sorted(before) == sorted(after) and len(after) == len(before)
        assert t.frames is s.frames and t.meta is s.meta and t.family == s.family
        first_zero += t.answer == "0"
        expected_zero += sum(a == "0" for _, a in before) / len(before)
    assert expected_zero > 20
    assert abs(first_zero - expected_zero) < 4 * np.sqrt(expected_zero)


def test_shuffle_turns_option_reorders_training_batches_only():
    """--shuffle-turns keeps each step's samples, media and answer tokens; only the order
    of the turns (so the token sequence) changes."""
    import torch

    from mmaccel.embedded.build import build_processor, build_tokenizer
    from mmaccel.embedded.train import CURRICULUM, TrainConfig, step_batch

    proc = build_processor(build_tokenizer("question-both"), "question-both")
    groups = CURRICULUM[-1].groups
    runs = [[step_batch(proc, TrainConfig(followups=4, order="question-both", shuffle_turns=on), k, groups)
             for k in range(3)] for on in (False, True)]
    for (fa, a), (fb, b) in zip(*runs):
        pix = "pixel_values_videos" if "pixel_values_videos" in a else "pixel_values"
        assert fa == fb and torch.equal(a[pix], b[pix])
        assert sorted(a["labels"][a["labels"] != -100].tolist()) == sorted(b["labels"][b["labels"] != -100].tolist())
    assert any(not torch.equal(a["input_ids"], b["input_ids"]) for (_, a), (_, b) in zip(*runs))


def test_video_max_objects_caps_videos_and_keeps_the_default_stream():
    from mmaccel.world.samples import make_sample, sample_rng

    for fam in ("flash", "motion", "appear"):
        solo = [make_sample(fam, sample_rng(3, i), num_frames=8, max_objects=1) for i in range(12)]
        assert all(len(s.meta["objects"]) == 1 for s in solo)
        capped = [make_sample(fam, sample_rng(3, i), num_frames=8, max_objects=3) for i in range(6)]
        plain = [make_sample(fam, sample_rng(3, i), num_frames=8) for i in range(6)]
        assert any(len(s.meta["objects"]) > 1 for s in plain)
        # videos hold at most 3 objects: a cap of 3 draws exactly what no cap draws
        assert all(np.array_equal(a.frames, b.frames) and a.answer == b.answer for a, b in zip(capped, plain))
    flash = [make_sample("flash", sample_rng(4, i), num_frames=8, max_objects=1) for i in range(20)]
    hidden = [len(s.meta["objects"][0]["visible"]) - sum(s.meta["objects"][0]["visible"]) for s in flash]
    assert hidden == [int(s.answer) for s in flash]
    with pytest.raises(ValueError, match="max_objects"):
        make_sample("flash", sample_rng(3, 0), max_objects=0)


def test_order_followups_name_the_objects_left_to_right():
    """The opt-in ``order`` turns: the object count and "Which object is {ordinal} from the
    left?" answered by the scene's objects sorted by centre x, on caption-sized scenes only,
    and only when asked for; the answers agree with the scene's own caption."""
    from mmaccel.world.followups import ORDER_ORDINALS, TOTAL_COUNT_QUESTION
    from mmaccel.world.spec import CAPTION_MAX_OBJECTS

    asked = 0
    for i in range(80):
        fam = ("color", "count", "exists", "where", "caption")[i % 5]
        s = make_sample(fam, sample_rng(5, i, "test"), followups=20, extra_followups=("caption", "order"))
        objects = sorted(s.meta["objects"], key=lambda o: o["cx"])
        caption_items = [f"a {o['color']} {o['shape']}" for o in objects]
        for q, a in s.followups:
            if q == TOTAL_COUNT_QUESTION:
                assert a == str(len(objects)) and len(objects) <= CAPTION_MAX_OBJECTS
            elif q.startswith("Which object is "):
                position = ORDER_ORDINALS.index(q.split()[3])
                assert a == caption_items[position]
                asked += 1
        plain = make_sample(fam, sample_rng(5, i, "test"), followups=20, extra_followups=("caption",))
        assert not [q for q, _ in plain.followups if q == TOTAL_COUNT_QUESTION or q.startswith("Which object")]
    assert asked >= 30
