"""The embedded default model: tokenizer, processor contract, training, shipped checkpoint."""
import copy
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from mmaccel.embedded import DEFAULT_MODEL_DIR, load_default_model, load_model
from mmaccel.embedded.build import build_model, build_processor, build_tokenizer
from mmaccel.embedded.data import encode_for_training, encode_prompts
from mmaccel.embedded.evaluate import evaluate_samples, generate_answers
from mmaccel.embedded.train import TrainConfig, train
from mmaccel.world import MODEL_FAMILIES, generate_samples, make_sample, sample_rng
from mmaccel.world.assets import load_sample_video
from conftest import COLOR_IMAGES, ONE_LAYER, tiny_train_config

HELD_OUT_SEED = 9090  # never used by the training recipe (train split) or the report (seed 0)


def _shipped_detector() -> str:
    """The background-dropout content detector the shipped model was trained with."""
    config = json.loads((DEFAULT_MODEL_DIR / "train_config.json").read_text())
    return config.get("content_from", "features")


@pytest.fixture(scope="module")
def processor():
    return build_processor(build_tokenizer())


@pytest.fixture(scope="module")
def shipped():
    torch.set_num_threads(2)
    return load_default_model()


def _answer(model, processor, msgs, **media):
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    inputs = processor(text=[text], return_tensors="pt", **media)
    out = model.generate(**inputs, max_new_tokens=32, do_sample=False)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()


def test_import_is_light():
    code = "import sys, mmaccel, mmaccel.embedded; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tokenizer_round_trips_every_answer(processor):
    tok = processor.tokenizer
    for s in generate_samples(60, seed=1, split="test"):
        ids = tok(s.answer + tok.eos_token, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids and ids[-1] == tok.eos_token_id
        assert tok.decode(ids, skip_special_tokens=True).strip() == s.answer
        q_ids = tok(s.question, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in q_ids


def test_chat_template_and_visual_token_counts(processor):
    img = make_sample("color", sample_rng(0, 0, "test"), hires=False)
    hi = make_sample("color", sample_rng(0, 1, "test"), hires=True)
    pair = make_sample("multi", sample_rng(0, 2, "test"))
    vid = make_sample("motion", sample_rng(0, 3, "test"), num_frames=12)
    text = processor.apply_chat_template(img.messages(), add_generation_prompt=True)
    assert text == f"<|im_start|>user <image> {img.question} <|im_end|><|im_start|>assistant"
    expect = {id(img): 36 + 36 + 6, id(hi): 36 + 144 + 12, id(pair): 2 * 37, id(vid): 12 * 9 + 1}
    for s in (img, hi, pair, vid):
        ids = encode_prompts(processor, [s])["input_ids"][0]
        token = processor.video_token_id if s.frames is not None else processor.image_token_id
        assert int((ids == token).sum()) == expect[id(s)]


def test_content_orders_place_the_question(tmp_path):
    from mmaccel.embedded import load_model

    img = make_sample("color", sample_rng(0, 0, "test"), hires=False)
    q, head, tail = img.question, "<|im_start|>user ", " <|im_end|><|im_start|>assistant"
    expect = {"image-first": f"<image> {q}", "question-first": f"{q} <image>",
              "question-both": f"{q} <image> {q}"}
    for order, body in expect.items():
        proc = build_processor(order=order)
        assert proc.apply_chat_template(img.messages(), add_generation_prompt=True) == head + body + tail
        text = proc.tokenizer.apply_chat_template(img.messages(), add_generation_prompt=True, tokenize=False)
        assert text == head + body + tail
    # a text-only (follow-up) turn is never repeated
    both = build_processor(order="question-both")
    turn = [{"role": "user", "content": [{"type": "text", "text": q}]}]
    assert both.apply_chat_template(turn, add_generation_prompt=True) == head + q + tail
    # the order travels with the saved processor
    build_model(both.tokenizer).save_pretrained(tmp_path)
    both.save_pretrained(tmp_path)
    _, loaded = load_model(tmp_path)
    assert loaded.apply_chat_template(img.messages(), add_generation_prompt=True) == head + expect["question-both"] + tail
    with pytest.raises(ValueError, match="content order"):
        build_processor(order="sideways")


def test_init_std_scales_the_language_model_only():
    from mmaccel.embedded.train import parse_args

    cfg, _ = parse_args(["--out", "x", "--init-std", "0.06"])
    tok = build_tokenizer()
    default, wide = build_model(tok), build_model(tok, text=cfg.text)

    def std(model, part):
        return float(dict(model.named_parameters())[part].detach().std())

    lm = "model.language_model.layers.0.self_attn.q_proj.weight"
    tower = "model.vision_tower.encoder.layers.0.self_attn.q_proj.weight"
    assert std(default, lm) == pytest.approx(0.02, rel=0.05)
    assert std(wide, lm) == pytest.approx(0.06, rel=0.05)
    assert std(wide, tower) == pytest.approx(std(default, tower), rel=0.05)


def test_training_labels_cover_only_the_answer(processor):
    samples = generate_samples(4, seed=0, families=["caption", "count"], hires=False)
    batch = encode_for_training(processor, samples)
    tok = processor.tokenizer
    for row, lab, s in zip(batch["input_ids"], batch["labels"], samples):
        ans = lab[lab != -100].tolist()
        assert ans[-1] == tok.eos_token_id
        assert tok.decode(ans, skip_special_tokens=True).strip() == s.answer


def test_followup_turns_are_labelled_answer_by_answer(processor):
    samples = [make_sample(f, sample_rng(3, i, "train"), hires=False, followups=3)
               for i, f in enumerate(("exists", "count", "where"))]
    batch = encode_for_training(processor, samples)
    tok = processor.tokenizer
    for row, lab, s in zip(batch["input_ids"], batch["labels"], samples):
        labelled = (lab != -100).nonzero().flatten().tolist()
        spans, cur = [], [labelled[0]]
        for p in labelled[1:]:
            if p == cur[-1] + 1:
                cur.append(p)
            else:
                spans.append(cur)
                cur = [p]
        spans.append(cur)
        answers = [s.answer] + [a for _, a in s.followups]
        assert len(spans) == len(answers) == 1 + len(s.followups) > 1
        for span, answer in zip(spans, answers):
            assert row[span[-1]] == tok.eos_token_id
            assert tok.convert_ids_to_tokens(int(row[span[0] - 1])) == "\u2581assistant"
            assert tok.decode(row[span], skip_special_tokens=True).strip() == answer


def _scored_pair(processor, first_family: str, first_index: int, seed: int):
    """A two-row training batch (first row: sample ``first_index`` of ``first_family`` with
    2 follow-ups) and random logits for it: (input_ids, labels, logits, turn index)."""
    from mmaccel.embedded.data import assistant_id
    from mmaccel.embedded.train import turn_index

    samples = [make_sample(first_family, sample_rng(5, first_index, "train"), hires=False, followups=2),
               make_sample("color", sample_rng(5, 1, "train"), hires=False)]
    batch = encode_for_training(processor, samples)
    ids, labels = batch["input_ids"], batch["labels"]
    logits = torch.randn(*ids.shape, len(processor.tokenizer), generator=torch.Generator().manual_seed(seed))
    return ids, labels, logits, turn_index(ids, assistant_id(processor))


def test_per_turn_loss_is_each_answers_mean_cross_entropy(processor):
    from mmaccel.embedded.data import assistant_id
    from mmaccel.embedded.train import per_turn_loss

    ids, labels, logits, turns = _scored_pair(processor, "count", 0, 0)
    losses, present = per_turn_loss(logits, labels, turns)
    assert present.tolist() == [[True, True, True], [True, False, False]]
    for b in range(2):
        marks = (ids[b] == assistant_id(processor)).nonzero().flatten().tolist() + [ids.shape[1]]
        for t in range(int(present[b].sum())):
            pos = [p for p in range(marks[t] + 1, marks[t + 1]) if labels[b, p] != -100]
            ce = torch.nn.functional.cross_entropy(logits[b, [p - 1 for p in pos]], labels[b, pos])
            torch.testing.assert_close(losses[b, t], ce)


def test_token_mean_objective_weighs_every_answer_token_once(processor):
    from mmaccel.embedded.train import objective, per_turn_loss

    ids, labels, logits, turns = _scored_pair(processor, "caption", 2, 1)
    losses, present, count = per_turn_loss(logits, labels, turns, with_counts=True)
    flat = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100)
    torch.testing.assert_close(objective(losses, present, count, "tokens"), flat)
    torch.testing.assert_close(objective(losses, present, count, "turns"), losses[present].mean())
    assert not torch.allclose(flat, losses[present].mean())  # the caption turn is long
    with pytest.raises(ValueError, match="loss_mean"):
        objective(losses, present, count, "samples")
    with pytest.raises(ValueError, match="loss_mean"):
        TrainConfig(loss_mean="samples")


def test_visual_dropout_hides_only_visual_tokens_and_equals_removing_them(processor):
    """Masked visual tokens act as if removed with their positions kept (the runtime's
    'preserve' policy); nothing else is masked, labels are untouched, and it is seeded."""
    from mmaccel.embedded.build import build_model
    from mmaccel.embedded.train import drop_visual, step_batch

    cfg = TrainConfig(seed=2, batch_size=6, visual_dropout=0.9)
    groups = COLOR_IMAGES
    fams, batch = step_batch(processor, cfg, 5, groups)
    _, plain = step_batch(processor, TrainConfig(seed=2, batch_size=6), 5, groups)
    _, again = step_batch(processor, cfg, 5, groups)
    assert torch.equal(batch["input_ids"], plain["input_ids"]) and torch.equal(batch["labels"], plain["labels"])
    assert torch.equal(batch["attention_mask"], again["attention_mask"])
    hidden = (plain["attention_mask"] == 1) & (batch["attention_mask"] == 0)
    visual = batch["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert hidden.any() and not (hidden & ~visual).any()
    assert (hidden.sum(1) <= 0.9 * visual.sum(1)).all() and (hidden.sum(1) == 0).any()
    with pytest.raises(ValueError, match="visual dropout"):
        drop_visual(batch["input_ids"], batch["attention_mask"], [1], 1.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="visual dropout"):
        TrainConfig(visual_dropout=1.0)

    lm = build_model(processor.tokenizer, seed=0, text={"num_hidden_layers": 2}).model.language_model.eval()
    row = int(hidden.sum(1).argmax())
    emb = torch.randn(1, batch["input_ids"].shape[1], lm.config.hidden_size, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(emb.shape[1])[None]
    keep = batch["attention_mask"][row].bool()
    with torch.no_grad():
        masked = lm(inputs_embeds=emb, attention_mask=batch["attention_mask"][row:row + 1], position_ids=pos)
        removed = lm(inputs_embeds=emb[:, keep], position_ids=pos[:, keep])
    torch.testing.assert_close(masked.last_hidden_state[0, keep], removed.last_hidden_state[0], atol=1e-4, rtol=1e-4)


def _content_of(model, batch):
    """Content flags (N,) of a planned batch's visual tokens, as the training forward finds them."""
    from mmaccel.embedded.dropout import MEDIA_KEYS, planned_content

    return planned_content(model, {k: batch[k] for k in MEDIA_KEYS if k in batch}, batch)


def test_patch_content_flags_cells_off_each_images_background_colour():
    """Two hand-made 8 x 8 images of 4 x 4 patches: the background is each image's most frequent
    colour, light or dark (not its corner pixel); one stray pixel makes its cell content, and so
    does a whole cell of another colour."""
    from mmaccel.embedded.dropout import patch_content

    img = torch.full((2, 3, 8, 8), 0.8)
    img[1] = -0.2
    img[0, :, 1, 6] = torch.tensor([0.9, -0.8, -0.8])
    img[1, :, 4:, :4] = 0.5
    img[1, :, 0, 0] = 0.3
    assert patch_content(img, 4).tolist() == [[0, 1, 0, 0], [1, 0, 1, 0]]
    img[1, :, :4, :] = 0.5  # 0.5 now covers 48 of the 64 pixels: it is the background
    assert patch_content(img, 4)[1].tolist() == [0, 0, 0, 1]


@pytest.mark.parametrize("hires", [False, True])
def test_pixel_content_flags_exactly_the_cells_an_object_touches(shipped, hires):
    """The pixel detector's flags, taken apart along the model's token layout (6 x 6 base tile,
    then the 12 x 12 crop grid with a newline per row for a 288 px image), are the cells that
    an object's box overlaps (centre cell always; box cells at most, 1 px slack)."""
    from mmaccel.embedded.dropout import MEDIA_KEYS, pixel_content

    model, processor = shipped
    samples = [make_sample("caption", sample_rng(HELD_OUT_SEED, i, "test"), hires=hires) for i in range(4)]
    batch = encode_for_training(processor, samples)
    per_row = pixel_content(model, {k: batch[k] for k in MEDIA_KEYS if k in batch}).view(len(samples), -1)
    side, cells = (288, 12) if hires else (144, 6)
    for row, sample in zip(per_row, samples):
        grid = row[36:].view(cells, cells + 1) if hires else row[:36].view(6, 6)
        if hires:
            assert not grid[:, -1].any()  # newlines
        _assert_object_cells(grid[:, :cells], sample, side / cells)


def _assert_object_cells(grid, sample, cell: float) -> None:
    """``grid`` (n, n) bool equals the cells overlapped by some object's box or the text box,
    up to the cells its boxes only graze (within 1 px)."""
    n = grid.shape[0]
    must = torch.zeros(n, n, dtype=torch.bool)
    may = torch.zeros(n, n, dtype=torch.bool)
    for o in sample.meta["objects"]:
        must[int(o["cy"] // cell), int(o["cx"] // cell)] = True
        r = o["size"] / 2
        _mark(may, o["cx"] - r, o["cy"] - r, o["cx"] + r, o["cy"] + r, cell)
    if sample.meta.get("text_box"):
        _mark(may, *sample.meta["text_box"], cell)
    assert (grid | ~must).all() and not (grid & ~may).any()


def _mark(cells, x0, y0, x1, y1, cell: float, slack: float = 1.0) -> None:
    n = cells.shape[0]
    lo = lambda v: int(max(0, min(n - 1, (v - slack) // cell)))
    cells[lo(y0):lo(y1 + 2 * slack) + 1, lo(x0):lo(x1 + 2 * slack) + 1] = True


def test_pixel_content_of_a_video_pools_each_frames_patches(shipped):
    """Video tokens: per frame a 3 x 3 grid pooled from the 6 x 6 patches (content when any of
    its 2 x 2 patches is), then one newline per video that is never content."""
    from mmaccel.embedded.dropout import MEDIA_KEYS, patch_content, pixel_content
    from mmaccel.embedded.train import GROUPS, step_batch

    model, processor = shipped
    _, batch = step_batch(processor, TrainConfig(seed=4, batch_size=4), 1, {"video8": GROUPS["video8"]})
    video = batch["pixel_values_videos"]
    got = pixel_content(model, {k: batch[k] for k in MEDIA_KEYS if k in batch}).view(video.shape[0], -1)
    patches = patch_content(video.flatten(0, 1), 24).view(*video.shape[:2], 3, 2, 3, 2).bool()
    want = patches.any(5).any(3).flatten(1)
    assert torch.equal(got[:, :-1], want) and not got[:, -1].any()
    assert 0 < want.float().mean() < 0.7


def test_background_dropout_flags_the_object_cells_of_the_base_grid(shipped):
    """Feature detector: content tokens of the 6 x 6 base tile (24 px cells) cover each object's
    centre cell and lie within one cell of an object's box; the rest are empty canvas."""
    from mmaccel.embedded.dropout import plan_background_dropout

    if _shipped_detector() != "features":
        pytest.skip("the shipped model was trained with the pixel detector; on its scene-summary tower the "
                    "feature detector flags most tokens (results/recipe-cpu/summary_tower/README.md)")
    model, processor = shipped
    samples = [make_sample("caption", sample_rng(HELD_OUT_SEED, i, "test"), hires=False) for i in range(4)]
    batch = encode_for_training(processor, samples)
    plan_background_dropout(processor, samples, batch, 0.5, np.random.default_rng(0))
    per_row = _content_of(model, batch).view(len(samples), -1)  # 78 = 36 base + 36 crop + 6 newlines
    for row, sample in zip(per_row, samples):
        base = row[:36].view(6, 6)
        near = torch.zeros(6, 6, dtype=torch.bool)
        for o in sample.meta["objects"]:
            assert base[int(o["cy"] // 24), int(o["cx"] // 24)], o
            r = o["size"] / 2 + 24
            y0, y1, x0, x1 = (int(max(0, min(5, v // 24))) for v in (o["cy"] - r, o["cy"] + r, o["cx"] - r, o["cx"] + r))
            near[y0:y1 + 1, x0:x1 + 1] = True
        assert not (base & ~near).any()


@pytest.mark.parametrize("content_from", ["features", "pixels"])
@pytest.mark.parametrize("group", ["image", "multi", "video8"])
def test_background_dropout_hides_only_empty_visual_tokens(shipped, group, content_from):
    """The planned share of each row's empty tokens is hidden and nothing else; the forward
    equals the plain model with that mask (and with no holes, the plain model). The pixel
    detector flags under 60% of the tokens on any model (the feature detector does on models
    without a scene-summary tower, see results/recipe-cpu/summary_tower)."""
    from mmaccel.embedded.dropout import (PLAN_KEYS, background_mask, forward_with_background_dropout,
                                          media_token_ids)
    from mmaccel.embedded.train import GROUPS, step_batch

    model, processor = shipped
    cfg = TrainConfig(seed=4, batch_size=4, background_dropout=0.9, content_from=content_from)
    _, batch = step_batch(processor, cfg, 1, {group: GROUPS[group]})
    batch.pop("labels")
    assert ("blank_media" in batch) == (content_from == "features")
    content = _content_of(model, batch)
    ids, attn, frac = batch["input_ids"], batch["attention_mask"], batch["drop_fraction"]
    mask = background_mask(ids, attn, media_token_ids(model), content, frac, batch["drop_priority"])
    visual = torch.isin(ids, torch.tensor(processor.tokenizer.convert_tokens_to_ids(["<image>", "<video>"])))
    empty = torch.zeros_like(visual)
    empty[visual] = ~content  # computed here, not by the helper under test
    hidden = (attn == 1) & (mask == 0)
    assert 0 < content.float().mean() < (0.6 if content_from == "pixels" else 1)
    assert hidden.any() and not (hidden & ~empty).any()
    assert hidden.sum(1).tolist() == [round(float(f) * int(n)) for f, n in zip(frac, empty.sum(1))]
    plain = {k: v for k, v in batch.items() if k not in PLAN_KEYS}
    with torch.no_grad():
        want = model(**{**plain, "attention_mask": mask}, use_cache=False).logits
        got = forward_with_background_dropout(model, copy.copy(batch)).logits
        whole = model(**plain, use_cache=False).logits
        none = forward_with_background_dropout(model, copy.copy(batch) | {"drop_fraction": torch.zeros_like(frac)}).logits
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep])
    torch.testing.assert_close(none, whole)


def test_stop_rows_hide_content_tokens_and_keep_only_eos_labels(shipped):
    """``--stop-rows``: a picked row hides 80-100% of its empty tokens and its planned share of
    content tokens (never the last one) and keeps only its eos labels; the rows not picked keep
    the plan and labels of a run without stop rows."""
    from mmaccel.embedded.dropout import background_mask, media_token_ids
    from mmaccel.embedded.train import GROUPS, step_batch

    model, processor = shipped
    eos = processor.tokenizer.eos_token_id
    plain_cfg = TrainConfig(seed=4, batch_size=8, background_dropout=0.9, followups=2,
                            content_from=_shipped_detector())
    _, plain = step_batch(processor, plain_cfg, 3, {"image": GROUPS["image"]})
    _, batch = step_batch(processor, TrainConfig(**{**asdict(plain_cfg), "stop_rows": 0.5}), 3,
                          {"image": GROUPS["image"]})
    picked = batch["content_fraction"] > 0
    assert 0 < picked.sum() < 8
    labels, ref = batch["labels"], plain["labels"]
    assert torch.equal(labels[~picked], ref[~picked])
    assert torch.equal(batch["drop_fraction"][~picked], plain["drop_fraction"][~picked])
    assert ((labels[picked] == eos) | (labels[picked] == -100)).all()
    assert torch.equal((labels[picked] == eos).sum(1), (ref[picked] == eos).sum(1))
    assert (batch["drop_fraction"][picked] >= 0.8).all()
    content = _content_of(model, batch)
    ids, attn = batch["input_ids"], batch["attention_mask"]
    mask = background_mask(ids, attn, media_token_ids(model), content, batch["drop_fraction"],
                           batch["drop_priority"], batch["content_fraction"])
    visual = torch.isin(ids, torch.tensor(media_token_ids(model)))
    filled = torch.zeros_like(visual)
    filled[visual] = content
    shown = (filled & (mask == 1)).sum(1)
    want = [n - min(round(float(f) * int(n)), int(n) - 1) for f, n in zip(batch["content_fraction"], filled.sum(1))]
    assert shown.tolist() == want and (shown[picked] >= 1).all()
    assert (shown[picked] < filled.sum(1)[picked]).any()


def _batches_around_start(processor, plain_cfg, always, start_field: str) -> list:
    """Step 3's still-image batch of: a run without the option (``plain_cfg``, at schedule
    position 0.5); a run starting it at 0.8 (``start_field``), just before (0.79) and at 0.8;
    and a run with it from the first step (``always``)."""
    from mmaccel.embedded.train import GROUPS, step_batch

    late = TrainConfig(**{**asdict(always), start_field: 0.8})
    runs = ((plain_cfg, 0.5), (late, 0.79), (late, 0.8), (always, 0.0))
    return [step_batch(processor, cfg, 3, {"image": GROUPS["image"]}, prog)[1] for cfg, prog in runs]


def test_stop_rows_start_at_their_schedule_position(shipped):
    """``--stop-rows-from F``: before schedule position F a step's batch is that of a run
    without stop rows; from F on it is that of a run with them from the first step."""
    plain_cfg = TrainConfig(seed=4, batch_size=8, background_dropout=0.9, followups=2)
    always = TrainConfig(**{**asdict(plain_cfg), "stop_rows": 0.5})
    plain, before, after, ref = _batches_around_start(shipped[1], plain_cfg, always, "stop_rows_from")
    assert (ref["content_fraction"] > 0).any()
    for key in ("labels", "drop_fraction", "content_fraction"):
        assert torch.equal(before[key], plain[key]) and torch.equal(after[key], ref[key])


def test_stop_rows_media_image_spares_video_batches(shipped):
    """``--stop-rows-media image``: a video batch is that of a run without stop rows, an image
    batch that of a run with them on every batch."""
    from mmaccel.embedded.train import GROUPS, step_batch

    _, processor = shipped
    plain_cfg = TrainConfig(seed=4, batch_size=4, background_dropout=0.9, followups=2)
    every = TrainConfig(**{**asdict(plain_cfg), "stop_rows": 0.75})
    images_only = TrainConfig(**{**asdict(every), "stop_rows_media": "image"})
    for group, want_cfg in (("video8", plain_cfg), ("image", every)):
        groups = {group: GROUPS[group]}
        _, got = step_batch(processor, images_only, 3, groups)
        _, want = step_batch(processor, want_cfg, 3, groups)
        _, stopped = step_batch(processor, every, 3, groups)
        assert (stopped["content_fraction"] > 0).any(), group
        for key in ("labels", "drop_fraction", "content_fraction"):
            assert torch.equal(got[key], want[key]), (group, key)


def test_hidden_share_leaves_the_last_content_token():
    """By hand: 2 content tokens at 90% would round to both; ``keep=1`` leaves the higher-priority
    one; empty tokens (``keep=0``) may all go."""
    from mmaccel.embedded.dropout import _hide

    mask = torch.ones(5, dtype=torch.long)
    priority = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.2])
    _hide(mask, torch.tensor([False, True, True, False, False]), 0.9, priority, keep=1)
    assert mask.tolist() == [1, 0, 1, 1, 1]
    _hide(mask, torch.tensor([True, False, False, True, True]), 1.0, priority)
    assert mask.tolist() == [0, 0, 1, 0, 0]


@pytest.mark.parametrize("kw, message", [
    ({"stop_rows": 0.25}, "stop_rows"),
    ({"stop_rows": 1.5, "background_dropout": 0.9}, "stop_rows"),
    ({"stop_rows": -0.1, "background_dropout": 0.9}, "stop_rows"),
    ({"stop_rows": 0.25, "background_dropout": 0.9, "stop_rows_from": 1.0}, "stop_rows_from"),
    ({"stop_rows": 0.25, "background_dropout": 0.9, "stop_rows_media": "images"}, "stop_rows_media"),
])
def test_stop_rows_config_is_checked_at_start_up(kw, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kw)
    assert TrainConfig(stop_rows=0.25, background_dropout=0.9).stop_rows == 0.25


def test_content_dropout_hides_object_tokens_and_keeps_every_label(shipped):
    """``--content-dropout 0.6``: about half the rows get a content share in [0, 0.6), the others
    0; labels and the background plan are those of a run without it; the mask hides that share
    of a row's content tokens and never its last one."""
    from mmaccel.embedded.dropout import background_mask, media_token_ids
    from mmaccel.embedded.train import GROUPS, step_batch

    model, processor = shipped
    plain_cfg = TrainConfig(seed=4, batch_size=8, background_dropout=0.9, followups=2,
                            content_from=_shipped_detector())
    groups = {"image": GROUPS["image"]}
    _, plain = step_batch(processor, plain_cfg, 3, groups)
    _, batch = step_batch(processor, TrainConfig(**{**asdict(plain_cfg), "content_dropout": 0.6}), 3, groups)
    fraction = batch["content_fraction"]
    assert 0 < (fraction > 0).sum() < 8 and (fraction < 0.6).all()
    for key in ("labels", "drop_fraction", "drop_priority", "input_ids"):
        assert torch.equal(batch[key], plain[key]), key
    content = _content_of(model, batch)
    ids = batch["input_ids"]
    mask = background_mask(ids, batch["attention_mask"], media_token_ids(model), content, batch["drop_fraction"],
                           batch["drop_priority"], fraction)
    filled = torch.zeros_like(ids, dtype=torch.bool)
    filled[torch.isin(ids, torch.tensor(media_token_ids(model)))] = content
    shown, total = (filled & (mask == 1)).sum(1), filled.sum(1)
    assert shown.tolist() == [n - min(round(float(f) * int(n)), int(n) - 1) for f, n in zip(fraction, total)]
    assert (shown < total).any() and (shown >= 1).all()


def test_content_dropout_starts_at_its_schedule_position_and_yields_to_stop_rows(shipped):
    """Before ``content_dropout_from`` a batch is that of a run without content dropout; a row that
    stop rows pick takes the stop-row plan, the other rows keep content dropout's."""
    from mmaccel.embedded.train import GROUPS, step_batch

    processor, groups = shipped[1], {"image": GROUPS["image"]}
    plain_cfg = TrainConfig(seed=4, batch_size=8, background_dropout=0.9, followups=2)
    always = TrainConfig(**{**asdict(plain_cfg), "content_dropout": 0.6, "content_dropout_share": 1.0})
    plain, before, after, ref = _batches_around_start(processor, plain_cfg, always, "content_dropout_from")
    assert (ref["content_fraction"] > 0).all()
    assert torch.equal(before["content_fraction"], plain["content_fraction"])
    assert torch.equal(after["content_fraction"], ref["content_fraction"])
    _, stops = step_batch(processor, TrainConfig(**{**asdict(plain_cfg), "stop_rows": 0.5}), 3, groups)
    _, both = step_batch(processor, TrainConfig(**{**asdict(always), "stop_rows": 0.5}), 3, groups)
    stopped = stops["drop_fraction"] != plain["drop_fraction"]
    assert 0 < stopped.sum() < 8
    assert torch.equal(both["content_fraction"][stopped], stops["content_fraction"][stopped])
    assert torch.equal(both["content_fraction"][~stopped], ref["content_fraction"][~stopped])
    assert torch.equal(both["labels"], stops["labels"])


@pytest.mark.parametrize("kw, message", [
    ({"content_dropout": 0.5}, "background dropout"),
    ({"content_dropout": 1.0, "background_dropout": 0.9}, r"\[0, 1\)"),
    ({"content_dropout": 0.5, "background_dropout": 0.9, "content_dropout_share": 1.5}, "content_dropout_share"),
    ({"content_dropout": 0.5, "background_dropout": 0.9, "content_dropout_from": 1.0}, "content_dropout_from"),
])
def test_content_dropout_config_is_checked_at_start_up(kw, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kw)
    assert TrainConfig(content_dropout=0.5, background_dropout=0.9).content_dropout == 0.5


def test_prefetched_batches_equal_inline_batches(processor):
    from mmaccel.embedded.train import CURRICULUM, phase_groups, prefetched, progress_of, step_batch

    cfg = TrainConfig(seed=3, steps=4, batch_size=3, warmup=1, followups=2, workers=2)
    for step, (fams, batch) in enumerate(prefetched(cfg, CURRICULUM)):
        groups = phase_groups(CURRICULUM, progress_of(step, cfg))
        fams0, batch0 = step_batch(processor, cfg, step, groups)
        assert fams == fams0 and batch.keys() == batch0.keys()
        assert all(torch.equal(batch[k], batch0[k]) for k in batch)


def _tiny_step_setup(processor, seed: int = 0):
    """A 1-layer model, its optimiser and a 3-row batch of counting questions with follow-ups."""
    from mmaccel.embedded.train import make_optimizer, step_batch

    cfg = TrainConfig(seed=seed, batch_size=3, followups=2)
    model = build_model(processor.tokenizer, seed=seed, **ONE_LAYER).train()
    _, batch = step_batch(processor, cfg, 0, {"image": (1.0, 1.0, {"hires": False}, {"count": 1.0})})
    return model, make_optimizer(model, cfg), batch


def _step(processor, batch, **kw):
    from mmaccel.embedded.data import assistant_id
    from mmaccel.embedded.train import train_step

    model, opt, _ = _tiny_step_setup(processor)
    losses, _ = train_step(model, opt, copy.copy(batch), assistant_id(processor), 1e-3, 1.0, **kw)
    return model, losses


def test_bf16_autocast_step_is_close_to_float32_and_keeps_float32_weights(processor):
    _, _, batch = _tiny_step_setup(processor)
    model32, loss32 = _step(processor, batch)
    model16, loss16 = _step(processor, batch, bf16=True)
    assert not np.array_equal(loss32, loss16)  # the bf16 path really ran
    np.testing.assert_allclose(loss16, loss32, rtol=0.03)
    assert all(p.dtype == torch.float32 for p in model16.parameters())
    fresh, _, _ = _tiny_step_setup(processor)
    moved = [n for n, p in model16.named_parameters() if not torch.equal(p, fresh.state_dict()[n])]
    assert any("language_model" in n for n in moved)


@pytest.mark.parametrize("flags, device, kept", [
    ({"avx512f", "avx512_bf16"}, "cpu", True), ({"amx_bf16"}, "cpu", True),
    ({"avx512f", "avx2"}, "cpu", False), (set(), "cpu", False), (set(), "cuda", True)])
def test_bf16_only_where_the_device_runs_it_natively(monkeypatch, flags, device, kept):
    """--bf16 on a CPU without AVX512-BF16/AMX falls back to float32 (2-3x faster there), says
    so in the log, and the returned config (the one train() saves) says bf16 false; float32 stays."""
    import mmaccel.embedded.train as train_mod

    monkeypatch.setattr(train_mod, "cpu_flags", lambda: flags)
    lines = []
    cfg = train_mod.resolved_precision(TrainConfig(bf16=True, device=device), lines.append)
    assert cfg.bf16 is kept and len(lines) == (0 if kept else 1)
    assert kept or "float32" in lines[0]
    assert train_mod.resolved_precision(TrainConfig(bf16=False, device=device), lines.append).bf16 is False


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_language_model_matches_eager_and_is_always_put_back(processor, backend):
    import shutil

    from mmaccel.embedded.data import assistant_id
    from mmaccel.embedded.train import compiled_language_model, train_step

    if backend == "inductor" and not shutil.which("cc"):
        pytest.skip("inductor needs a C compiler")
    _, _, batch = _tiny_step_setup(processor)
    _, eager_loss = _step(processor, batch)
    model, opt, _ = _tiny_step_setup(processor)
    plain, keys = model.model.language_model, list(model.state_dict())
    with compiled_language_model(model, backend=backend):
        assert model.model.language_model is not plain
        loss, _ = train_step(model, opt, copy.copy(batch), assistant_id(processor), 1e-3, 1.0)
    np.testing.assert_allclose(loss, eager_loss, rtol=1e-4)
    assert model.model.language_model is plain and list(model.state_dict()) == keys
    with pytest.raises(RuntimeError, match="boom"), compiled_language_model(model, backend=backend):
        raise RuntimeError("boom")
    assert model.model.language_model is plain
    with compiled_language_model(model, enabled=False):
        assert model.model.language_model is plain


@pytest.mark.slow
def test_short_training_lowers_loss(tmp_path):
    cfg = TrainConfig(seed=1, steps=40, minutes=0, batch_size=12, lr=1e-3, warmup=10, log_every=5,
                      eval_n=0, vision_steps=20, text={"num_hidden_layers": 2}, vision={"num_hidden_layers": 2})
    groups = {"image": (1.0, 1.0, {"hires": False}, {"count": 1.0, "exists": 1.0})}
    model, processor, hist = train(cfg, tmp_path / "m", groups=groups)
    assert len(hist) == 8 and hist[-1]["step"] == 40
    assert hist[-1]["loss"] < 0.6 * hist[0]["loss"]
    assert (tmp_path / "m" / "model.safetensors").exists()


def test_a_step_schedule_run_is_reproduced_from_its_seed():
    """Issue 3's "reproducible from a seed": with a step schedule (``--steps``), two runs of one
    seed train bit-identical weights, and another seed trains others. (``--minutes`` runs, like
    the shipped one, follow the seed in data and initialisation but wall time in the schedule.)"""
    def weights(seed):
        model, _, _ = train(tiny_train_config(seed=seed, steps=3, vision_steps=2), groups=COLOR_IMAGES)
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    first, again, other = weights(2), weights(2), weights(3)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not all(torch.equal(first[n], other[n]) for n in first)


def test_frozen_tower_keeps_stage_one_weights(monkeypatch):
    """--freeze-tower (with dense stage-1 labels): stage 2 leaves the tower as stage 1 left it
    while the projector and the language model still train."""
    import mmaccel.embedded.train as train_mod

    seen = {}
    real_loop = train_mod.run_loop

    def snapshot_then_run(model, *args, **kwargs):
        seen["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return real_loop(model, *args, **kwargs)

    monkeypatch.setattr(train_mod, "run_loop", snapshot_then_run)
    cfg = tiny_train_config(steps=3, vision_steps=2, vision_dense=True, freeze_tower=True)
    model, _, _ = train(cfg, groups=COLOR_IMAGES)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, seen["before"][n])}
    assert not any("vision_tower" in n for n in changed)
    assert any("multi_modal_projector" in n for n in changed) and any("language_model" in n for n in changed)


def _train_recording_stage1(monkeypatch, **flags):
    """Train a tiny model for one stage-2 step after 50 stage-1 steps with the stage-1 ``flags``;
    returns (the keywords train() gave pretrain_vision, the log lines)."""
    import mmaccel.embedded.train as train_mod

    seen, real = {}, train_mod.pretrain_vision

    def record(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "pretrain_vision", record)
    cfg = tiny_train_config(steps=1, vision_steps=50, **flags)
    lines = []
    train(cfg, log=lines.append, groups=COLOR_IMAGES)
    return seen, lines


def test_vision_ordinal_reaches_stage1(monkeypatch):
    """--vision-ordinal sets the config, and train() hands it to stage 1, which then makes the
    place head and logs its accuracy."""
    from mmaccel.embedded.train import parse_args

    cfg, _ = parse_args(["--out", "x", "--vision-ordinal", "--vision-steps", "50"])
    assert cfg.vision_ordinal and not parse_args(["--out", "x"])[0].vision_ordinal
    with pytest.raises(ValueError, match="--vision-ordinal"):
        parse_args(["--out", "x", "--vision-ordinal-channels", "64"])
    with pytest.raises(ValueError, match="--vision-ordinal"):
        parse_args(["--out", "x", "--vision-fact-weight", "0.3"])
    with pytest.raises(ValueError, match="weight > 0"):
        parse_args(["--out", "x", "--vision-ordinal", "--vision-fact-weight", "0"])
    assert parse_args(["--out", "x", "--vision-ordinal", "--vision-fact-weight", "0.3"])[0].vision_fact_weight == 0.3
    seen, lines = _train_recording_stage1(monkeypatch, vision_ordinal=True, vision_ordinal_channels=64,
                                          vision_fact_weight=0.3)
    assert seen["ordinal"] is True and seen["ordinal_channels"] == 64 and seen["where"] is False
    assert seen["fact_weight"] == 0.3
    assert any(line.startswith("vision pretrain step 50/50") and "place acc" in line for line in lines)
    assert not any("where acc" in line for line in lines)


def test_vision_where_reaches_stage1(monkeypatch):
    """--vision-where sets the config, and train() hands it to stage 1, which then makes the
    where head and logs its accuracy beside the place head's."""
    from mmaccel.embedded.train import parse_args

    assert parse_args(["--out", "x", "--vision-where"])[0].vision_where
    assert not parse_args(["--out", "x"])[0].vision_where
    with pytest.raises(ValueError, match="--vision-where"):
        parse_args(["--out", "x", "--vision-facts-from", "64"])
    seen, lines = _train_recording_stage1(monkeypatch, vision_ordinal=True, vision_where=True, vision_facts_from=64)
    assert seen["where"] is True and seen["facts_from"] == 64
    assert any(line.startswith("vision pretrain step 50/50") and " place acc " in line and " where acc " in line
               for line in lines)


def test_save_reload_round_trip(tmp_path, processor):
    model = build_model(processor.tokenizer, seed=3).eval()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    model2, proc2 = load_model(tmp_path)
    samples = generate_samples(2, seed=4, families=["caption"], hires=False)
    a, b = encode_prompts(processor, samples), encode_prompts(proc2, samples)
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert torch.equal(a["pixel_values"], b["pixel_values"])
    with torch.no_grad():
        assert torch.equal(model(**a).logits, model2(**b).logits)


def test_shipped_model_size_and_config():
    files = list(DEFAULT_MODEL_DIR.iterdir())
    assert sum(f.stat().st_size for f in files) <= 30 * 2**20
    assert (DEFAULT_MODEL_DIR / "model.safetensors").exists()


@pytest.mark.slow
def test_shipped_model_answers_held_out(shipped):
    model, processor = shipped
    samples = generate_samples(90, seed=HELD_OUT_SEED, split="test", families=MODEL_FAMILIES)
    agg = evaluate_samples(model, processor, samples)["aggregates"]
    accuracy = {k: agg[k]["accuracy"] for k in ("image_questions", "video", "caption")}
    assert accuracy["image_questions"] >= 0.95 and accuracy["video"] >= 0.9 and accuracy["caption"] >= 0.8, accuracy


def test_inference_contract_image_and_video(shipped):
    model, processor = shipped
    s = make_sample("color", sample_rng(HELD_OUT_SEED, 100, "test"), hires=False)
    assert _answer(model, processor, s.messages(), images=[s.image]) == s.answer
    frames, question, answer = load_sample_video()
    msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    assert _answer(model, processor, msgs, videos=[frames]) == answer


def _contract_batch(model, processor, pair):
    """The documented batch call: left padding, padding=True, decode new tokens."""
    processor.tokenizer.padding_side = "left"
    texts = [processor.apply_chat_template(s.messages(), add_generation_prompt=True) for s in pair]
    media = {"videos": [s.frames for s in pair]} if pair[0].frames is not None else {"images": [s.image for s in pair]}
    inputs = processor(text=texts, return_tensors="pt", padding=True, **media)
    assert (inputs["attention_mask"][:, 0] == 0).any()  # the prompts really differ in length
    out = model.generate(**inputs, max_new_tokens=32, do_sample=False)
    return [t.strip() for t in processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)]


@pytest.mark.slow
def test_batch2_left_padding_matches_batch1(shipped):
    model, processor = shipped
    pairs = [generate_samples(2, seed=HELD_OUT_SEED, split="test", start=10, families=f, hires=False)
             for f in (["caption", "count"], ["where", "digits"])]
    pairs.append(generate_samples(2, seed=HELD_OUT_SEED, start=20, split="test",
                                  families=["motion", "flash"], num_frames=8))
    for pair in pairs:
        batch = encode_prompts(processor, pair)
        assert (batch["attention_mask"][:, 0] == 0).any()  # left padded: prompts differ in length
        single = [generate_answers(model, processor, [s])[0] for s in pair]
        assert generate_answers(model, processor, pair, batch_size=2) == single
        assert _contract_batch(model, processor, pair) == single
    # (whether the answers are right is test_shipped_model_answers_held_out's job)


def test_patch_targets_mark_object_and_digit_centres():
    from mmaccel.embedded.pretrain import cell_of, digit_centres, patch_targets
    from mmaccel.world import COLORS, SHAPES

    s = generate_samples(1, seed=0, families=["digits"])[0]
    cls, pos = patch_targets(s.meta, 6)
    side = s.meta["side"]
    for o in s.meta["objects"]:
        i = cell_of(o["cx"], o["cy"], side, 6)
        assert cls[i] in (1 + SHAPES.index(o["shape"]) * 4 + list(COLORS).index(o["color"]), *range(15, 25))
    chars = digit_centres(s.meta)
    assert "".join(c for c, _, _ in chars) == s.answer
    assert all(cls[cell_of(x, y, side, 6)] == 15 + int(c) for c, x, y in chars)
    assert pos.min() >= 0 and pos.max() <= 1


def test_object_targets_by_hand():
    """Two overlapping objects on a 6 x 6 grid of 24 px cells (covered: the box overlaps the cell
    by more than 2 px, i.e. centre gap < 60 / 2 + 12 - 2 = 40 on both axes): every covered cell
    names the object with the nearest centre, each centre cell its own object, the rest -1."""
    from mmaccel.embedded.pretrain import object_targets

    meta = {"side": 144, "objects": [
        {"shape": "square", "color": "red", "cx": 40, "cy": 40, "size": 60},
        {"shape": "triangle", "color": "blue", "cx": 72, "cy": 72, "size": 60}]}
    obj = object_targets(meta, 6).reshape(6, 6, 2).tolist()
    red_square, blue_triangle, none = [1, 0], [2, 2], [-1, -1]
    assert obj[1][1] == red_square and obj[3][3] == blue_triangle  # the centre cells
    assert obj[2][2] == blue_triangle  # cell centre (60, 60): both cover, the triangle's centre is nearer
    assert obj[1][2] == red_square  # (60, 36): both cover (gaps 20 / 36), the square's centre is nearer
    assert obj[0][0] == red_square and obj[5][5] == none and obj[0][5] == none


def test_ordinal_targets_by_hand():
    """Every cell an object covers gets the object's place from the left (by centre x), the
    cells no object covers -1; the places are ranks of x, not the order the scene lists them."""
    from mmaccel.embedded.pretrain import ordinal_targets

    meta = {"side": 144, "objects": [
        {"shape": "circle", "color": "red", "cx": 132, "cy": 12, "size": 8},
        {"shape": "square", "color": "blue", "cx": 12, "cy": 132, "size": 8},
        {"shape": "triangle", "color": "green", "cx": 60, "cy": 60, "size": 40}]}
    place = ordinal_targets(meta, 6).reshape(6, 6)
    assert place[0, 5] == 2 and place[5, 0] == 0  # the small objects cover only their centre cells
    assert (place[1:4, 1:4] == 1).all()  # the large triangle: gap < 20 + 12 - 2 on both axes
    assert (place >= 0).sum() == 11 and place[0, 0] == -1


def test_ordinal_targets_follow_the_caption():
    """On drawn caption scenes the object whose centre cell has place k is the caption's k-th
    object: the target is the order the caption is written in."""
    from mmaccel.embedded.pretrain import cell_of, ordinal_targets

    rng = np.random.default_rng(5)
    for _ in range(20):
        s = make_sample("caption", rng, hires=False)
        place = ordinal_targets(s.meta, 6)
        named = {}
        for o in s.meta["objects"]:
            named[int(place[cell_of(o["cx"], o["cy"], s.meta["side"], 6)])] = f"a {o['color']} {o['shape']}"
        phrases = [named[k] for k in range(len(named))]
        written = ", ".join(phrases[:-1]) + " and " + phrases[-1] if len(phrases) > 1 else phrases[0]
        assert written == s.answer


def test_order_targets_spell_the_caption():
    """The scene-order target, kind by kind and padded with "none", names the caption's objects
    in the caption's order, on drawn caption and count scenes (up to 6 objects)."""
    from mmaccel.embedded.pretrain import NO_KIND, order_targets
    from mmaccel.world.images import COLOR_NAMES
    from mmaccel.world.spec import MAX_OBJECTS, SHAPES

    rng = np.random.default_rng(6)
    for family in ("caption", "count") * 10:
        s = make_sample(family, rng, hires=False)
        order = order_targets(s.meta).tolist()
        n = len(s.meta["objects"])
        assert len(order) == MAX_OBJECTS and order[n:] == [NO_KIND] * (MAX_OBJECTS - n)
        phrases = [f"a {COLOR_NAMES[k % 4]} {SHAPES[k // 4]}" for k in order[:n]]
        if family == "caption":
            written = ", ".join(phrases[:-1]) + " and " + phrases[-1] if n > 1 else phrases[0]
            assert written == s.answer
        xs = sorted(o["cx"] for o in s.meta["objects"])
        by_x = {o["cx"]: f"a {o['color']} {o['shape']}" for o in s.meta["objects"]}
        assert phrases == [by_x[x] for x in xs]


def test_scene_order_loss_reads_every_token_like_the_summary():
    """``--summary-order``: every token (mode "token") answers the kinds in order from the
    summary's channels; a scene right at every token scores 1, one wrong place makes it 0, the
    weight scales the loss only, and no gradient reaches the channels past the group."""
    from mmaccel.embedded.pretrain import MAX_OBJECTS, N_KINDS, NO_KIND, ORDER_OUT, scene_order_loss

    order = torch.tensor([[3, 7, NO_KIND, NO_KIND, NO_KIND, NO_KIND]] * 2)
    right = torch.full((MAX_OBJECTS, N_KINDS + 1), -20.0)
    right[torch.arange(MAX_OBJECTS), order[0]] = 20.0
    wrong = right.clone()
    wrong[1] = right[1].roll(1)  # the second place read as another kind
    outputs = torch.stack([right.flatten().expand(5, -1), wrong.flatten().expand(5, -1)])
    head = lambda x: x  # noqa: E731 (the "features" are the head's outputs here)
    loss, acc = scene_order_loss(outputs, order, head, "token")
    assert acc == 0.5 and loss > 0
    loss3, acc3 = scene_order_loss(outputs, order, head, "token", weight=3.0)
    assert acc3 == acc and torch.isclose(loss3, 3.0 * loss)
    feats = torch.randn(2, 5, 16, requires_grad=True)
    scene_order_loss(feats, order, torch.nn.Linear(8, ORDER_OUT), "token", channels=8)[0].backward()
    assert feats.grad[..., :8].abs().sum() > 0 and feats.grad[..., 8:].abs().sum() == 0


def test_summary_order_reaches_stage1(monkeypatch):
    """--summary-order sets the config (and needs a summary), and train() hands it to stage 1,
    which then makes the order head and logs its accuracy."""
    from mmaccel.embedded.train import parse_args

    assert parse_args(["--out", "x", "--summary", "token", "--summary-order"])[0].summary_order
    assert not parse_args(["--out", "x", "--summary", "token"])[0].summary_order
    with pytest.raises(ValueError, match="--summary-order"):
        parse_args(["--out", "x", "--summary-order"])
    seen, lines = _train_recording_stage1(monkeypatch, summary="token", summary_channels=64, summary_order=True)
    assert seen["summary_order"] is True
    assert any(line.startswith("vision pretrain step 50/50") and " order acc " in line for line in lines)
    seen, lines = _train_recording_stage1(monkeypatch, summary="token", summary_channels=64)
    assert seen["summary_order"] is False and not any(" order acc " in line for line in lines)


def test_stage1_refuses_an_order_without_a_summary(processor):
    """Called directly, stage 1 refuses --summary-order's head without the summary it reads as."""
    from mmaccel.embedded.pretrain import pretrain_vision

    model = build_model(processor.tokenizer, seed=0, **ONE_LAYER)
    with pytest.raises(ValueError, match="needs a summary"):
        pretrain_vision(model, processor, seed=0, steps=1, summary_order=True)


def test_fact_heads_read_only_their_channels():
    """A fact head given a channel slice sees those channels alone: changing the others leaves
    its loss as it was, changing one of its own does not."""
    from mmaccel.embedded.pretrain import fact_channels, object_fact_losses

    assert fact_channels(64, 64) == slice(64, 128) and fact_channels(64, 0) == slice(64, None)
    torch.manual_seed(0)
    feats, obj = torch.randn(2, 36, 192), torch.randint(-1, 4, (2, 36, 4))
    totals = {"dense_ordinal": torch.tensor(9.0), "dense_where": torch.tensor(9.0)}
    facts = {"ordinal": (torch.nn.Linear(64, 6), fact_channels(64, 64)), "where": (torch.nn.Linear(128, 4), fact_channels(64, 0))}
    loss = object_fact_losses(facts, feats, obj, totals)[0]
    others, own = feats.clone(), feats.clone()
    others[..., :64] += 1.0
    own[..., 100] += 1.0
    assert torch.equal(object_fact_losses(facts, others, obj, totals)[0], loss)
    assert not torch.equal(object_fact_losses(facts, own, obj, totals)[0], loss)


def test_where_targets_by_hand():
    """Every cell an object covers gets the side its object's centre lies on by the dominant
    axis (ties to the horizontal, as ``images.where``), the cells no object covers -1."""
    from mmaccel.embedded.pretrain import where_targets
    from mmaccel.world.images import WHERE_NAMES

    meta = {"side": 144, "objects": [
        {"shape": "circle", "color": "red", "cx": 132, "cy": 60, "size": 8},  # dx 60, dy -12: right
        {"shape": "square", "color": "blue", "cx": 60, "cy": 132, "size": 8},  # dx -12, dy 60: bottom
        {"shape": "triangle", "color": "green", "cx": 36, "cy": 36, "size": 40}]}  # dx = dy = -36: left
    side = where_targets(meta, 6).reshape(6, 6)
    names = lambda cells: {WHERE_NAMES[k] for k in cells.flatten().tolist()}  # noqa: E731
    assert names(side[2, 5]) == {"right"} and names(side[5, 2]) == {"bottom"}
    assert names(side[0:3, 0:3]) == {"left"}  # the large triangle covers 3 x 3 cells
    assert (side >= 0).sum() == 11 and side[5, 5] == -1


def test_where_targets_answer_the_where_question():
    """On drawn where scenes, the asked object's centre cell says the question's answer."""
    from mmaccel.embedded.pretrain import cell_of, where_targets
    from mmaccel.world.images import WHERE_NAMES

    rng = np.random.default_rng(6)
    for _ in range(30):
        s = make_sample("where", rng, hires=False)
        words = s.question.rstrip("?").split()
        o = next(o for o in s.meta["objects"] if (o["color"], o["shape"]) == (words[-2], words[-1]))
        side = where_targets(s.meta, 6)[cell_of(o["cx"], o["cy"], s.meta["side"], 6)]
        assert WHERE_NAMES[side] == s.answer


def test_stage1_batches_are_the_same_with_workers(processor):
    from mmaccel.embedded.pretrain import stage1_batches

    threads = torch.get_num_threads()
    alone = list(stage1_batches(processor, seed=3, steps=3, batch_size=2, grid=6, crowded=False))
    forked = list(stage1_batches(processor, seed=3, steps=3, batch_size=2, grid=6, crowded=False, workers=2))
    assert len(alone) == len(forked) == 3 and len(alone[0]) == 4  # pixels, cls, pos, obj
    assert all(torch.equal(a, b) for x, y in zip(alone, forked) for a, b in zip(x, y))
    assert not torch.equal(alone[0][0], alone[1][0])  # each step its own scenes
    assert torch.get_num_threads() == threads  # only the forked workers run on one thread


def test_stage1_ranks_render_shares_of_the_one_process_batch(processor):
    """Each rank renders its contiguous block of the step's batch (2 and 3 of 5 scenes), after
    drawing all of them, so the parts in order are the whole; the whole is make_sample's scenes."""
    from mmaccel.embedded.pretrain import vision_batch

    whole = vision_batch(processor, np.random.default_rng(9), 5, 6, crowded=True)
    rng = np.random.default_rng(9)
    drawn = [make_sample(("caption", "count")[i % 2], rng, hires=False) for i in range(5)]
    pixels = processor.image_processor([s.image for s in drawn], return_tensors="pt")["pixel_values"][:, 0]
    assert torch.equal(whole[0], pixels)
    parts = [vision_batch(processor, np.random.default_rng(9), 5, 6, crowded=True, part=(r, 2)) for r in range(2)]
    assert [len(p[0]) for p in parts] == [2, 3]
    assert len(parts[0]) == 7 and all(torch.equal(torch.cat([a, b]), w) for a, b, w in zip(*parts, whole))


def _stage1_setup(processor, seed=3):
    from mmaccel.embedded.pretrain import HEAD_OUT, SUMMARY_OUT, vision_batch, word_ids

    model = build_model(processor.tokenizer, seed=seed, **ONE_LAYER)
    torch.manual_seed(seed)
    heads = torch.nn.Linear(192, HEAD_OUT), torch.nn.Linear(64, SUMMARY_OUT)
    batch = vision_batch(processor, np.random.default_rng(seed), 5, 6, crowded=True)
    return model, heads, batch, word_ids(processor.tokenizer)


def test_stage1_objectives_of_unequal_shares_with_summed_denominators_add_up_to_the_whole(processor):
    """Every stage-1 term is a sum over the rows divided by the whole batch's count, so the
    ranks' objectives (3 and 2 scenes here) add up to the one-process objective."""
    from mmaccel.embedded.pretrain import ORDER_OUT, denominators, patch_loss

    model, (head, s_head), batch, words = _stage1_setup(processor)
    facts = {"ordinal": (torch.nn.Linear(64, 6), slice(0, 64)), "where": (torch.nn.Linear(128, 4), slice(64, None))}
    order_head = torch.nn.Linear(64, ORDER_OUT)
    kw = dict(words=words, dense=True, summary=("token", s_head, 3.0, 64), facts=facts, order_head=order_head)
    whole = patch_loss(model, head, *batch, **kw)[0]
    parts = [[t[r::2] for t in batch] for r in range(2)]
    counts = [denominators(p[1], p[3]) for p in parts]
    summed = {k: counts[0][k] + counts[1][k] for k in counts[0]}
    halves = [patch_loss(model, head, *p, totals=summed, **kw)[0] for p in parts]
    assert torch.allclose(halves[0] + halves[1], whole, rtol=1e-5)
    own = [patch_loss(model, head, *p, **kw)[0] for p in parts]
    assert not torch.allclose((own[0] + own[1]) / 2, whole, rtol=1e-3)  # means of unequal shares are not it



def test_fact_weight_scales_only_the_fact_terms(processor):
    """--vision-fact-weight multiplies the place and where terms and nothing else: the loss
    with the facts at weight w is the loss without them plus w times what they add."""
    from mmaccel.embedded.pretrain import patch_loss

    model, (head, s_head), batch, words = _stage1_setup(processor)
    facts = {"ordinal": (torch.nn.Linear(64, 6), slice(64, 128)), "where": (torch.nn.Linear(128, 4), slice(64, None))}
    kw = dict(words=words, dense=True, summary=("token", s_head, 3.0, 64))
    bare = patch_loss(model, head, *batch, **kw)[0]
    added = patch_loss(model, head, *batch, facts=facts, **kw)[0] - bare
    weighted = patch_loss(model, head, *batch, facts=facts, fact_weight=0.3, **kw)[0]
    assert added > 0.1
    assert torch.allclose(weighted, bare + 0.3 * added, rtol=1e-5)

def _stage1_params_after(processor, ranks):
    from mmaccel.embedded.pretrain import pretrain_vision, stage1_params

    model = build_model(processor.tokenizer, seed=4, **ONE_LAYER)
    before = torch.cat([p.detach().reshape(-1).clone() for p in stage1_params(model)])
    torch.manual_seed(0)  # the heads' initialisation
    pretrain_vision(model, processor, seed=4, steps=2, batch_size=5, lr=0.1, log=lambda *_: None,
                    summary="token", dense=True, summary_weight=3.0, summary_channels=64, ranks=ranks,
                    summary_order=True)
    return before, torch.cat([p.detach().reshape(-1) for p in stage1_params(model)])


def test_a_data_parallel_stage1_trains_as_one_process(processor):
    """Two forked ranks (2 and 3 of each step's 5 scenes) end where one process ends."""
    before, one = _stage1_params_after(processor, 1)
    _, two = _stage1_params_after(processor, 2)
    moved = (one - before).abs()
    assert moved.max() > 1e-3
    # a mean, not a max: Adam turns float noise in a gradient near 0 into a step of lr at a few of
    # the 0.5M parameters (a 1-thread and a 2-thread process differ as much there). Each rank on
    # its own share's mean gives 0.26 here, no gradient all-reduce 0.75, this code ~1e-6.
    assert (two - one).abs().mean() < 1e-3 * moved.mean()


def test_curriculum_phases_and_flat_then_cosine_lr():
    from mmaccel.embedded.train import CURRICULUM, GROUPS, curriculum, lr_at, phase_groups

    assert phase_groups(CURRICULUM, 0.0)["image"][2]["max_objects"] == 2
    assert phase_groups(CURRICULUM, 0.99) is GROUPS
    ends = [p.end for p in CURRICULUM]
    assert ends == sorted(ends) and ends[-1] == 1.0
    only = {"image": (1.0, 1.0, {}, {"color": 1.0})}
    assert phase_groups(curriculum(only), 0.5) is only
    cfg = TrainConfig(lr=1e-3, warmup=10, decay_from=0.5, min_lr_frac=0.1)
    assert lr_at(4, 0.0, cfg) == pytest.approx(5e-4)
    assert lr_at(50, 0.2, cfg) == lr_at(50, 0.5, cfg) == pytest.approx(1e-3)
    assert lr_at(50, 0.75, cfg) == pytest.approx(0.55e-3)
    assert lr_at(50, 1.0, cfg) == pytest.approx(1e-4)
    late = TrainConfig(lr=1e-3, lr_late=3e-4, lr_late_from=0.35, warmup=10, decay_from=0.6, min_lr_frac=0.1)
    assert lr_at(50, 0.34, late) == pytest.approx(1e-3) and lr_at(50, 0.36, late) == pytest.approx(3e-4)
    assert lr_at(50, 1.0, late) == pytest.approx(3e-5)


def test_projector_rescale_sets_visual_token_norm(processor):
    from mmaccel.embedded.pretrain import rescale_projector, vision_batch

    model = build_model(processor.tokenizer, seed=5, **ONE_LAYER)
    rescale_projector(model, processor, seed=0, target_norm=2.5)
    pix = vision_batch(processor, np.random.default_rng(0), 16, 6)[0]
    with torch.no_grad():
        hidden = model.model.vision_tower(pix, output_hidden_states=True).hidden_states[-1]  # LLaVA-OV's feature layer
        feats = model.model.multi_modal_projector(hidden)
    assert feats.norm(dim=-1).mean().item() == pytest.approx(2.5, rel=0.1)


def test_summary_subsets_small_objects_and_counting():
    from mmaccel.embedded.evaluate import summarize

    samples = generate_samples(40, seed=2, split="test", families=["count", "color", "flash"], hires_p=0.5)
    answers = [s.answer if i % 2 else "wrong" for i, s in enumerate(samples)]
    sub = summarize(samples, answers)["subsets"]
    counting = [i for i, s in enumerate(samples) if s.family in ("count", "flash")]
    small = [i for i, s in enumerate(samples) if s.meta.get("hires")]
    assert sub["counting"]["n"] == len(counting) and sub["small_objects"]["n"] == len(small) > 0
    assert sub["counting"]["correct"] == sum(i % 2 for i in counting)
    assert sub["small_objects"]["correct"] == sum(i % 2 for i in small)


def test_linear_probe_reads_what_tokens_carry_and_nothing_more():
    from mmaccel.embedded.probe import linear_probe

    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (300,), generator=gen)
    carried = torch.nn.functional.one_hot(y, 3).float() + 0.1 * torch.randn(300, 3, generator=gen)
    noise = torch.randn(300, 8, generator=gen)
    x = torch.cat([carried, noise], 1)
    assert (linear_probe(x[:200], y[:200].numpy(), x[200:]) == y[200:].numpy()).mean() == 1.0
    blind = (linear_probe(noise[:200], y[:200].numpy(), noise[200:]) == y[200:].numpy()).mean()
    assert blind < 0.6  # labels the tokens do not carry stay near chance (1/3)


def test_probe_on_the_shipped_model_reads_colour(shipped):
    from mmaccel.embedded.probe import probe

    model, processor = shipped
    res = probe(model, processor, train_scenes=120, test_scenes=60)
    assert res["objects_test"] > 60 and res["color"] > 0.9
    assert set(res["shape_by_size"]) <= {"0-12px", "12-18px", "18-26px", "26-40px"}


def test_flash_stretch_takes_its_share_inside_and_changes_nothing_outside():
    from mmaccel.embedded.train import CURRICULUM, parse_stretch, phase_groups, training_phases

    cfg = TrainConfig(flash_stretch=parse_stretch("0.25:0.55:0.4:1"))
    phases = training_phases(cfg)
    for prog in (0.0, 0.2, 0.6, 0.99):  # outside the stretch: the curriculum's groups
        assert phase_groups(phases, prog) == phase_groups(CURRICULUM, prog)
    for prog, before in ((0.3, 0.3), (0.5, 0.5)):  # inside: flash8 at 0.4, the rest scaled by 0.6
        groups, plain = phase_groups(phases, prog), phase_groups(CURRICULUM, before)
        assert groups["flash8"][0] == pytest.approx(0.4)
        assert groups["flash8"][2] == {"num_frames": 8, "max_objects": 1}
        assert groups["flash8"][3] == {"flash": 1.0}
        assert sum(g[0] for g in groups.values()) == pytest.approx(1.0)
        for name, g in plain.items():
            assert groups[name][0] == pytest.approx(0.6 * g[0]) and groups[name][1:] == g[1:]
    assert [p.end for p in phases] == [0.15, 0.25, 0.35, 0.55, 1.0]
    assert training_phases(TrainConfig()) == CURRICULUM


def test_caption_stretch_draws_captions_alone_inside_and_scales_an_overlapping_flash_stretch():
    from mmaccel.embedded.train import CURRICULUM, parse_stretch, phase_groups, training_phases

    cfg = TrainConfig(flash_stretch=parse_stretch("0.25:0.55:0.4"), caption_stretch=parse_stretch("0.5:0.9:0.75"))
    phases = training_phases(cfg)
    for prog in (0.1, 0.95):  # outside both stretches: the curriculum
        assert phase_groups(phases, prog) == phase_groups(CURRICULUM, prog)
    groups = phase_groups(phases, 0.7)  # captions alone at 0.75, the world's groups share the rest
    assert groups["caption144"] == (0.75, 1.0, {"hires": False, "followups": 0}, {"caption": 1.0})
    for name, g in phase_groups(CURRICULUM, 0.7).items():
        assert groups[name][0] == pytest.approx(0.25 * g[0])
    overlap = phase_groups(phases, 0.52)  # both: flash's 0.4 is scaled by the captions' 0.25 too
    assert overlap["caption144"][0] == 0.75 and overlap["flash8"][0] == pytest.approx(0.25 * 0.4)
    assert sum(g[0] for g in overlap.values()) == pytest.approx(1.0)
    assert [p.end for p in phases] == [0.15, 0.25, 0.35, 0.5, 0.55, 0.9, 1.0]


def test_motion_stretch_draws_motion_videos_alone_and_a_later_flash_stretch_scales_it():
    from mmaccel.embedded.train import CURRICULUM, draw_batch, parse_args, phase_groups, step_rng, training_phases

    cfg, _ = parse_args(["--out", "unused", "--motion-stretch", "0.15:0.35:0.25", "--flash-stretch", "0.3:0.56:0.25"])
    phases = training_phases(cfg)
    for prog in (0.1, 0.6):  # outside both stretches: the curriculum
        assert phase_groups(phases, prog) == phase_groups(CURRICULUM, prog)
    groups = phase_groups(phases, 0.2)
    assert groups["motion8"] == (0.25, 1.0, {"num_frames": 8}, {"motion": 1.0}) and "flash8" not in groups
    overlap = phase_groups(phases, 0.32)  # flash inserted after motion: motion's share is scaled by 0.75
    assert overlap["motion8"][0] == pytest.approx(0.75 * 0.25) and overlap["flash8"][0] == 0.25
    assert sum(g[0] for g in overlap.values()) == pytest.approx(1.0)
    assert [p.end for p in phases] == [0.15, 0.3, 0.35, 0.56, 1.0]
    name, batch = draw_batch(step_rng(0, 7), 4, {"motion8": groups["motion8"]}, followups=2)
    assert name == "motion8" and all(s.family == "motion" and len(s.frames) == 8 for s in batch)


def test_early_step_floor_leaves_a_fast_machine_on_wall_time_and_gives_a_slow_one_its_steps():
    from mmaccel.embedded.train import WallClock

    fast, plain = WallClock(200.0, (1000, 0.3)), WallClock(200.0)
    for t in (0, 30, 60, 100, 150, 199):  # 20 steps/s: step 1000 comes at 25% of the budget
        assert fast(20 * t, t) == pytest.approx(t / 200) == plain(20 * t, t)
    slow = WallClock(200.0, (1000, 0.3))  # 10 steps/s: step 1000 only at half the budget
    early = [slow(10 * t, t) for t in (0, 30, 60, 99)]
    assert early == pytest.approx([0.0, 0.09, 0.18, 0.297]) and max(early) < 0.3
    assert slow(1000, 100.0) == pytest.approx(0.3) and slow.early_end == 100.0
    assert slow(1500, 150.0) == pytest.approx(0.65)  # the rest, 0.3 -> 1, over the remaining 100 s
    assert slow(1990, 199.0) < 1.0 and slow(2000, 200.0) == 1.0
    crawl = WallClock(200.0, (1000, 0.3))  # the budget is a hard limit even before the floor is met
    assert crawl(400, 200.0) == 1.0


@pytest.mark.parametrize("spec", [(0, 0.3), (100, 0.0), (100, 1.0), (100,)])
def test_bad_early_steps_fail_at_start_up(spec):
    with pytest.raises(ValueError, match="early_steps"):
        TrainConfig(early_steps=spec)


def test_early_steps_parse_and_need_a_wall_clock_schedule():
    from mmaccel.embedded.train import parse_args, parse_early_steps

    assert parse_early_steps("2600:0.3") == (2600, 0.3) and parse_early_steps("") == ()
    cfg, _ = parse_args(["--out", "unused", "--early-steps", "2600:0.3"])
    assert cfg.early_steps == (2600, 0.3)
    with pytest.raises(ValueError, match="wall-clock"):
        TrainConfig(steps=500, early_steps=(100, 0.3))
    with pytest.raises(ValueError, match="early_steps"):
        parse_early_steps("2600")


def test_caption_stretch_batches_are_still_caption_scenes_without_followups():
    from mmaccel.embedded.train import draw_batch, phase_groups, step_rng, training_phases

    groups = phase_groups(training_phases(TrainConfig(caption_stretch=(0.0, 1.0, 1.0, 2))), 0.5)
    name, batch = draw_batch(step_rng(0, 3), 6, groups, followups=8, extra_followups=("caption",))
    assert name == "caption144" and len(batch) == 6 and not any(s.followups for s in batch)
    assert all(s.family == "caption" and s.frames is None and [i.size for i in s.images] == [(144, 144)] for s in batch)
    assert all(s.answer.count(" and ") <= 1 and s.answer.count(",") == 0 for s in batch)  # <= 2 objects


def test_bad_caption_stretch_in_a_config_fails_at_start_up():
    with pytest.raises(ValueError, match="stretch"):
        TrainConfig(caption_stretch=(0.9, 1.0, 0.0))


@pytest.mark.parametrize("text", ["0.5:0.4:0.3", "0.1:0.2", "0.1:0.2:0", "0.1:1.2:0.5", "a:b:c"])
def test_bad_flash_stretch_is_refused(text):
    from mmaccel.embedded.train import parse_stretch

    with pytest.raises(ValueError):
        parse_stretch(text)


def test_bad_flash_stretch_in_a_config_fails_at_start_up():
    with pytest.raises(ValueError, match="stretch"):
        TrainConfig(flash_stretch=(0.5, 0.4, 0.3))


def test_saved_step_count_is_the_last_step_not_the_last_log_line(tmp_path):
    cfg = tiny_train_config(steps=3, vision_steps=1, log_every=2)
    _, _, hist = train(cfg, tmp_path / "m", groups=COLOR_IMAGES)
    assert [h["step"] for h in hist] == [2, 3]
    assert json.loads((tmp_path / "m" / "train_config.json").read_text())["steps_done"] == 3


def test_scene_summary_loss_reads_every_token_and_scales_with_its_weight():
    """``--summary token``: every token answers the scene summary; a head that does so for every
    token of one scene and not the other scores half right; the weight scales the loss only."""
    from mmaccel.embedded.pretrain import MAX_SHAPE_COUNT, N_KINDS, SUMMARY_OUT, summary_loss

    present = torch.zeros(2, N_KINDS)
    present[:, 0] = 1.0
    counts = torch.tensor([[1, 0, 0], [1, 0, 0]])
    right = torch.full((SUMMARY_OUT,), -20.0)
    right[0] = 20.0  # kind 0 present, the rest absent
    for s, c in enumerate(counts[0].tolist()):
        right[N_KINDS + s * (MAX_SHAPE_COUNT + 1) + c] = 20.0
    outputs = torch.stack([right.expand(5, -1), -right.expand(5, -1)])  # scene 0 right, scene 1 wrong
    head = lambda x: x  # noqa: E731 (the "features" are the head's outputs here)
    loss, acc = summary_loss(outputs, present, counts, "token", head)
    assert acc == 0.5
    loss3, acc3 = summary_loss(outputs, present, counts, "token", head, weight=0.3)
    assert acc3 == acc and torch.isclose(loss3, 0.3 * loss)


def test_scene_summary_channel_group_reads_and_trains_only_its_channels():
    """``--summary-channels K``: the summary head sees the first K channels only, so the summary
    loss sends no gradient to the other channels, and a scene told apart only in a later channel
    cannot be read."""
    from mmaccel.embedded.pretrain import N_KINDS, SUMMARY_OUT, summary_loss

    torch.manual_seed(0)
    feats = torch.randn(2, 4, 8, requires_grad=True)
    present, counts = torch.zeros(2, N_KINDS), torch.zeros(2, 3, dtype=torch.long)
    head = torch.nn.Linear(3, SUMMARY_OUT)
    loss, _ = summary_loss(feats, present, counts, "token", head, channels=3)
    loss.backward()
    assert feats.grad[..., :3].abs().sum() > 0 and feats.grad[..., 3:].abs().sum() == 0
    with pytest.raises(RuntimeError):  # a head sized for all channels does not fit the group
        summary_loss(feats, present, counts, "token", torch.nn.Linear(8, SUMMARY_OUT), channels=3)
    full, _ = summary_loss(feats.detach(), present, counts, "token", torch.nn.Linear(8, SUMMARY_OUT))
    assert torch.isfinite(full)


def test_order_vocabulary_joins_only_when_asked(shipped):
    """Models trained without the ``order`` follow-ups keep the shipped vocabulary exactly; with
    them, every word of their questions is a known token (no [UNK])."""
    from mmaccel.embedded.build import build_tokenizer
    from mmaccel.world.followups import EXTRA_VOCABULARY

    _, processor = shipped
    base = build_tokenizer("question-both").get_vocab()
    assert base == processor.tokenizer.get_vocab()
    tok = build_tokenizer("question-both", ("caption", "order"))
    for line in EXTRA_VOCABULARY["order"]:
        assert tok.unk_token_id not in tok(line)["input_ids"], line
    extended = tok.get_vocab()
    assert len(extended) > len(base) and all(extended[w] == i for w, i in base.items())


def test_extra_words_leave_the_seeded_init_unchanged():
    """A model built with the ``order`` words has the same seeded weights as one without them
    (the new embedding rows come from a side generator) and leaves torch's random stream where
    the plain build leaves it, so a recipe that adds the kind changes its data, not its draw."""
    import torch

    from mmaccel.embedded.build import build_model, build_tokenizer

    plain_tok, extra_tok = build_tokenizer("question-both"), build_tokenizer("question-both", ("order",))
    plain = build_model(plain_tok, seed=3, text={"initializer_range": 0.06})
    after_plain = torch.rand(4)
    extra = build_model(extra_tok, seed=3, text={"initializer_range": 0.06})
    after_extra = torch.rand(4)
    assert torch.equal(after_plain, after_extra)
    a, b = plain.state_dict(), extra.state_dict()
    n = len(plain_tok)
    for name, w in a.items():
        assert torch.equal(w, b[name][:n] if b[name].shape != w.shape else b[name]), name
    rows = extra.get_input_embeddings().weight[n:]
    assert rows.shape[0] == len(extra_tok) - n and 0.03 < rows.std().item() < 0.09
    assert extra.get_output_embeddings().weight.data_ptr() == extra.get_input_embeddings().weight.data_ptr()


# --- data parallelism for stage 2 (mmaccel/embedded/parallel.py) ---

DP_GROUPS = {"image": (1.0, 1.0, {"hires": False}, {"count": 1.0, "color": 1.0})}


def test_data_parallel_config_is_checked():
    assert TrainConfig(data_parallel=2, batch_size=4).data_parallel == 2
    with pytest.raises(ValueError, match="process count"):
        TrainConfig(data_parallel=0)
    with pytest.raises(ValueError, match="no --workers"):
        TrainConfig(data_parallel=2, workers=1)
    with pytest.raises(ValueError, match="device 'cpu'"):
        TrainConfig(data_parallel=2, device="cuda")
    with pytest.raises(ValueError, match="2 rows per rank"):
        TrainConfig(data_parallel=2, batch_size=3)
    with pytest.raises(ValueError, match="no --workers or --stage1-workers"):
        TrainConfig(data_parallel=2, stage1_workers=1)


def test_ranks_share_out_the_samples_of_a_one_process_step(processor):
    """Rank r encodes rows r, r + ranks, ... of the step's drawn samples; (0, 1) is the plain step."""
    from mmaccel.embedded.train import step_batch

    cfg = TrainConfig(seed=4, batch_size=6, followups=2)
    fams, full = step_batch(processor, cfg, 7, DP_GROUPS)
    fams_alone, alone = step_batch(processor, cfg, 7, DP_GROUPS, part=(0, 1))
    assert fams_alone == fams and all(torch.equal(full[k], alone[k]) for k in full)
    parts = [step_batch(processor, cfg, 7, DP_GROUPS, part=(r, 2)) for r in range(2)]
    assert parts[0][0] == fams[0::2] and parts[1][0] == fams[1::2]
    assert torch.equal(parts[1][1]["pixel_values"], full["pixel_values"][1::2])


def test_split_objectives_with_global_totals_sum_to_the_one_batch_objective():
    from mmaccel.embedded.train import objective

    g = torch.Generator().manual_seed(0)
    losses, count = torch.rand(6, 3, generator=g), torch.randint(0, 4, (6, 3), generator=g).float()
    present = count > 0
    for kind in ("turns", "tokens"):
        whole = objective(losses, present, count, kind)
        totals = (present.sum().float(), count.sum())
        halves = [objective(losses[r::2], present[r::2], count[r::2], kind, totals) for r in range(2)]
        assert torch.allclose(halves[0] + halves[1], whole)
        assert not torch.allclose(halves[0] * 2, whole)  # the totals matter: a half alone is not it


def _tiny_dp_model(processor, seed):
    return build_model(processor.tokenizer, seed=seed, **ONE_LAYER).train()


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _sgd_step_params(processor, seed, rank=0, ranks=1):
    """One SGD step (lr 1, no effective clip) of a tiny model on rank ``rank``'s share of a step
    (all of it with one rank); its flattened parameters after the step."""
    from mmaccel.embedded.data import assistant_id
    from mmaccel.embedded.train import step_batch, train_step

    model = _tiny_dp_model(processor, seed)
    _, batch = step_batch(processor, TrainConfig(seed=seed, batch_size=4, followups=2), 0, DP_GROUPS,
                          part=(rank, ranks))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    train_step(model, opt, batch, assistant_id(processor), 1.0, 1e9, "tokens", ranks=ranks)
    return _flat(model)


def _dp_step_params(rank, ranks, processor, seed):
    """Every rank's parameters after :func:`_sgd_step_params` in a data-parallel group."""
    import torch.distributed as dist

    flat = _sgd_step_params(processor, seed, rank, ranks)
    every = [torch.empty_like(flat) for _ in range(ranks)]
    dist.all_gather(every, flat)
    return every


def test_a_data_parallel_step_is_the_one_process_step(processor):
    """Two forked ranks on halves of a step's rows take the step one process takes on all of
    them: the token-mean objective's denominator and the gradients are summed over the ranks."""
    from mmaccel.embedded.parallel import fork_ranks

    rank0, rank1 = fork_ranks(_dp_step_params, 2, processor, 5)
    assert torch.equal(rank0, rank1)
    one = _sgd_step_params(processor, 5)
    moved = (one - _flat(_tiny_dp_model(processor, 5))).abs().max()
    assert moved > 1e-3
    assert (rank0 - one).abs().max() < 1e-4 * moved


def test_a_failing_rank_raises_instead_of_hanging():
    from mmaccel.embedded.parallel import fork_ranks

    def fail_on_rank_1(rank, ranks):
        if rank == 1:
            raise SystemExit(3)
        import torch.distributed as dist
        dist.barrier()  # waits on rank 1 forever: the parent must not

    with pytest.raises(RuntimeError, match="ended without a result"):
        fork_ranks(fail_on_rank_1, 2)


def test_train_with_data_parallel_trains_and_saves(tmp_path):
    cfg = tiny_train_config(steps=4, batch_size=4, log_every=2, vision_steps=2, freeze_tower=True, data_parallel=2)
    lines = []
    model, _, hist = train(cfg, tmp_path / "m", log=lines.append, groups=DP_GROUPS)
    assert [h["step"] for h in hist] == [2, 4]
    assert any(line.startswith("stage 1 on 2 data-parallel ranks") for line in lines)
    saved = load_model(tmp_path / "m")[0]
    trained = dict(model.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in saved.named_parameters())
    # the initialisation train() starts from
    fresh = build_model(build_tokenizer(cfg.order, cfg.extra_followups), seed=2, **ONE_LAYER)
    assert any(not torch.equal(p, trained[n]) for n, p in fresh.named_parameters() if "language_model" in n)
    # the frozen tower moved in stage 1 only: the ranks' stage-1 state came back to the trainer
    assert any(not torch.equal(p, trained[n]) for n, p in fresh.named_parameters() if "vision_tower" in n)


def _schedule_seen(rank, ranks):
    from mmaccel.embedded.parallel import agreed_schedule
    import torch.distributed as dist

    seen = torch.tensor(agreed_schedule(0.1 * (rank + 1), stopping=rank == 1), dtype=torch.float64)
    every = [torch.empty_like(seen) for _ in range(ranks)]
    dist.all_gather(every, seen)
    return every


def test_every_rank_follows_rank_0s_wall_clock_schedule():
    """Ranks read their own clocks; rank 0's position and stop decision are the ones applied."""
    from mmaccel.embedded.parallel import fork_ranks

    every = fork_ranks(_schedule_seen, 2)
    assert all(torch.allclose(seen, torch.tensor([0.1, 0.0], dtype=torch.float64)) for seen in every)


def _pooled_window(rank, ranks):
    """Rank-specific log windows pooled by :func:`pool_log_window`: (family line, window, follow)."""
    from mmaccel.embedded.parallel import pool_log_window
    from mmaccel.embedded.train import FamilyLoss

    fam_loss = FamilyLoss()
    if rank == 0:
        fam_loss.add(["color", "count"], [1.0, 3.0])
        window, follow = [2.0, 4.0], [0.5, float("nan")]
    else:
        fam_loss.add(["color", "motion"], [2.0, 5.0])
        window, follow = [4.0, 6.0], [1.5, 2.0]
    pool_log_window(fam_loss, window, follow)
    return fam_loss.flush(), window, follow


def test_logged_losses_pool_every_ranks_rows():
    """A data-parallel log line speaks for all rows of a step, not rank 0's half: per-family
    means over both ranks' samples, the step's mean loss, follow-ups over the ranks that had any."""
    from mmaccel.embedded.parallel import fork_ranks
    import torch.distributed as dist

    def both(rank, ranks):
        mine = _pooled_window(rank, ranks)
        every = [None] * ranks
        dist.all_gather_object(every, mine)
        return every

    every = fork_ranks(both, 2)
    assert every[0] == every[1]
    line, window, follow = every[0]
    assert line == "color=1.500 count=3.000 motion=5.000"
    assert window == [3.0, 5.0] and follow == [1.0, 2.0]


def test_a_training_log_says_which_cpu_its_steps_came_from(tmp_path, monkeypatch):
    """Run 42's steps took 2.3x run 41's on another CPU type: every log now names its CPU."""
    import mmaccel.machine

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: Test CPU 9000\nflags\t\t: fpu avx2 avx512f amx_bf16\n")
    monkeypatch.setattr(mmaccel.machine, "CPUINFO", cpuinfo)
    lines = []
    cfg = tiny_train_config(steps=1, log_every=1, vision_steps=0)
    train(cfg, log=lines.append, groups=DP_GROUPS)
    assert lines[0] == (f"machine Test CPU 9000, {os.cpu_count()} cores; avx512f yes, avx512_bf16 no, "
                        "amx_bf16 yes")


def test_a_result_sent_just_before_the_ranks_exit_is_not_lost():
    """The parent polls the pipe, then looks at the exit codes: rank 0 may send its result and
    every rank exit between the two (a loaded CPU makes it likely). That is a result, not a failure."""
    import pickle
    from types import SimpleNamespace

    from mmaccel.embedded.parallel import _result_of

    class Pipe:
        def __init__(self):
            self.polls = iter([False, True])  # empty when first polled, the result there after the exits

        def poll(self, timeout=None):
            return next(self.polls)

        def recv_bytes(self):
            return pickle.dumps("rank 0's result")

    procs = [SimpleNamespace(exitcode=0), SimpleNamespace(exitcode=0)]
    assert _result_of(procs, Pipe()) == "rank 0's result"
    with pytest.raises(RuntimeError, match=r"rank\(s\) \[1\] ended without a result"):
        _result_of([SimpleNamespace(exitcode=0), SimpleNamespace(exitcode=3)], Pipe())


def _tensor_result(rank, ranks):
    return {"w": torch.arange(6.0), "rank": rank}


def test_a_rank_result_outlives_the_rank(monkeypatch):
    """Rank 0's result, tensors included, travels by value: the parent may read it after every
    rank has exited (multiprocessing's own pickler would send a tensor's storage as a file
    descriptor, gone with the rank: 'Connection reset by peer' in a loaded full run)."""
    from mmaccel.embedded import parallel

    read = parallel._result_of

    def read_after_the_ranks_exit(procs, recv):
        for p in procs:
            p.join()
        return read(procs, recv)

    monkeypatch.setattr(parallel, "_result_of", read_after_the_ranks_exit)
    out = parallel.fork_ranks(_tensor_result, 1)
    assert torch.equal(out["w"], torch.arange(6.0)) and out["rank"] == 0
