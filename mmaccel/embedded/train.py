"""Train the embedded VLM from scratch on freshly generated world samples.

``python -m mmaccel.embedded.train --out DIR --minutes M --seed S``

Every step draws a new batch of one *group* (normal images, high-res images, image
pairs, or videos of 8/12/16 frames) so that all rows share one visual token count.
With ``--followups K`` each sample also carries up to K more questions about the same
media as further chat turns (one vision pass, several supervised answers; see
:mod:`mmaccel.world.followups`). The loss is the mean, over every answered turn, of
the turn's mean cross-entropy on its answer tokens (answer + eos), or with
``--loss-mean tokens`` the mean over all answer tokens (a caption of ~12 tokens then
weighs as much as six one-word answers instead of one). AdamW, linear warm-up, flat,
then cosine decay.

Stage 1 (``vision_steps``, see :mod:`.pretrain`) first trains the vision tower and
projector on dense patch labels; stage 2 trains everything on the questions.
The cosine runs over ``--steps`` when given (fully reproducible; ``--minutes`` is then
only a hard cap), else over the wall time left in ``--minutes`` (the CPU is shared, so
speed varies; data stream and init still follow the seed, and the log records the
steps done).
"""
from __future__ import annotations

import os

# On a shared CPU, spinning OpenMP workers stall badly when another process holds a
# core; passive waiting keeps 2 threads close to full speed (must precede torch import).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json
import math
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ..machine import BF16_FLAGS, cpu_flags, machine_line
from ..world.samples import SPLIT_KEY, make_sample, shuffled_turns
from .build import CONTENT_ORDERS, build_model, build_processor, build_tokenizer
from .data import assistant_id, encode_for_training
from .dropout import (CONTENT_FROM, check_content_from, check_dropout, drop_visual, forward_with_background_dropout,
                      plan_background_dropout, plan_content_dropout, plan_stop_rows)
from .parallel import agreed_schedule, all_reduce_gradients, global_totals, pool_log_window
from .place_gate import check_place_open, parse_place_open, place_gate
from .pretrain import pretrain_vision, rescale_projector

# group name -> (probability, batch size multiplier, make_sample keywords, {family: weight})
CORE_MIX = {"color": 1.0, "count": 1.2, "exists": 1.2, "where": 1.0, "caption": 1.5}
HIRES_MIX = {"color": 1.0, "count": 1.0, "exists": 1.0, "where": 1.0, "caption": 1.5}
VIDEO_MIX = {"motion": 1.2, "flash": 1.2, "appear": 1.0}
STOP_ROWS_MEDIA = ("all", "image")
GROUPS = {
    "image": (0.52, 1.0, {"hires": False}, CORE_MIX),
    "hires": (0.10, 0.5, {"hires": True}, HIRES_MIX),
    "multi": (0.07, 1.0, {}, {"multi": 1.0}),
    "video8": (0.19, 1.0, {"num_frames": 8}, VIDEO_MIX),
    "video12": (0.07, 0.75, {"num_frames": 12}, VIDEO_MIX),
    "video16": (0.05, 0.5, {"num_frames": 16}, VIDEO_MIX),
}


@dataclass(frozen=True)
class Phase:
    """A stretch of stage 2: until schedule progress ``end`` (0..1), draw from ``groups``."""

    end: float
    groups: dict


# From few objects to the full world: with 1-2 objects the model first learns to find
# *an* object and read its color / shape / position; binding a color to a shape among
# distractors, counting, and the videos come after (short runs showed the crowded world
# alone sits on a chance plateau for 1,000+ steps).
CURRICULUM = (
    Phase(0.15, {"image": (1.0, 1.0, {"hires": False, "max_objects": 2}, CORE_MIX)}),
    Phase(0.35, {"image": (0.6, 1.0, {"hires": False, "max_objects": 4}, CORE_MIX),
                 "multi": (0.1, 1.0, {}, {"multi": 1.0}),
                 "video8": (0.3, 1.0, {"num_frames": 8}, VIDEO_MIX)}),
    Phase(1.0, GROUPS),
)


def curriculum(groups: dict | None = None) -> tuple[Phase, ...]:
    """The default stage-2 curriculum, or one phase of ``groups`` when given."""
    return (Phase(1.0, groups),) if groups else CURRICULUM


def reweighted(phases: tuple[Phase, ...], weights: dict[str, float]) -> tuple[Phase, ...]:
    """``phases`` with each named family's weight replaced in every group that has it."""
    def group(g):
        prob, mult, kw, mix = g
        return prob, mult, kw, {f: weights.get(f, w) for f, w in mix.items()}

    return tuple(Phase(ph.end, {n: group(g) for n, g in ph.groups.items()}) for ph in phases)


def parse_weights(text: str) -> dict[str, float]:
    """'flash=2.4,caption=3' -> {'flash': 2.4, 'caption': 3.0} (known families only)."""
    from ..world.spec import MODEL_FAMILIES

    out = {}
    for item in filter(None, text.split(",")):
        name, sep, value = item.partition("=")
        if not sep or name not in MODEL_FAMILIES or float(value) < 0:
            raise ValueError(f"bad family weight {item!r}: use family=weight with a family of {MODEL_FAMILIES}")
        out[name] = float(value)
    return out


def with_stretch(phases: tuple[Phase, ...], start: float, end: float, name: str,
                 group: tuple) -> tuple[Phase, ...]:
    """``phases`` with ``group`` (under ``name``) drawn for its probability ``group[0]`` (the
    share) of the batches between schedule progress ``start`` and ``end``; the other groups
    keep their relative odds there.

    The phases are split at ``start`` and ``end`` so that nothing outside changes.
    """
    share = group[0]
    check_stretch(start, end, share)
    ends = sorted({p.end for p in phases} | {start, end} - {0.0})
    out = []
    for e in ends:
        groups = phase_groups(phases, e - 1e-9)
        if start < e <= end:
            total = sum(g[0] for g in groups.values())
            groups = {n: (g[0] / total * (1.0 - share), *g[1:]) for n, g in groups.items()}
            groups = {**groups, name: group}
        out.append(Phase(e, groups))
    return tuple(out)


def check_stretch(start: float, end: float, share: float) -> None:
    """``ValueError`` unless 0 <= start < end <= 1 and 0 < share <= 1."""
    if not (0.0 <= start < end <= 1.0 and 0.0 < share <= 1.0):
        raise ValueError(f"stretch needs 0 <= start < end <= 1 and 0 < share <= 1, got {start}, {end}, {share}")


# kind -> (group name, make_sample keywords, family mix) of a stretch's group. Caption rows
# carry no follow-ups: in 10-minute probes from run 13 (summary_tower/README.md), captions
# alone took the caption set to 0.807, while a 0.8 share with follow-ups on every row ran 40%
# fewer steps, diluted the caption's gradient, and reached 0.718 after the same recovery.
STRETCH_GROUPS = {  # in the order stretches are inserted (a later one scales an earlier one)
    "motion": ("motion8", {"num_frames": 8}, {"motion": 1.0}),
    "flash": ("flash8", {"num_frames": 8}, {"flash": 1.0}),
    "caption": ("caption144", {"hires": False, "followups": 0}, {"caption": 1.0}),
}


STRETCH_HELP = {  # kind -> what its batches are, for --KIND-stretch
    "motion": "8-frame motion videos alone, like --flash-stretch (run 35: 0.15:0.30:0.25 did not make "
              "motion's transition come)",
    "flash": "8-frame flash videos alone (of at most MAX_OBJECTS objects), e.g. 0.35:0.55:0.5:1",
    "caption": "144 px still scenes with captions alone, without follow-ups, e.g. 0.68:0.86:1 (the "
               "caption skill needs many caption steps)",
}


def stretch_group(kind: str, spec: tuple) -> tuple[float, float, str, tuple]:
    """(start, end, name, group) of a stretch ``spec`` (start, end, share[, objects]) of ``kind``
    (``STRETCH_GROUPS``): a group of probability ``share`` drawing that kind's samples alone, with
    at most ``objects`` objects (default: the world's)."""
    start, end, share, rest = stretch_bounds(spec)
    name, kw, mix = STRETCH_GROUPS[kind]
    kw = {**kw, **({"max_objects": int(rest[0])} if rest else {})}
    return start, end, name, (share, 1.0, kw, mix)


def stretch_bounds(spec: tuple) -> tuple[float, float, float, list]:
    """(start, end, share, [max_objects] or []) of a stretch spec of any kind; ``ValueError`` on
    a bad length, range or share."""
    if len(spec) not in (3, 4):
        raise ValueError(f"bad stretch {spec!r}: use (start, end, share[, max_objects])")
    start, end, share, *rest = spec
    check_stretch(float(start), float(end), float(share))
    return float(start), float(end), float(share), rest


def parse_stretch(text: str) -> tuple:
    """'0.35:0.55:0.5[:1]' -> (0.35, 0.55, 0.5[, 1]); '' -> ()."""
    if not text:
        return ()
    parts = text.split(":")
    out = tuple(float(x) for x in parts[:3]) + tuple(int(x) for x in parts[3:])
    stretch_bounds(out)  # raises on a bad length, range or share
    return out


def training_phases(cfg: "TrainConfig", groups: dict | None = None) -> tuple[Phase, ...]:
    """The stage-2 phases of ``cfg``: the curriculum (or ``groups``), reweighted by
    ``cfg.family_weights``, with ``cfg.motion_stretch``, ``cfg.flash_stretch`` then
    ``cfg.caption_stretch`` inserted when set (a later stretch overlapping an earlier one scales
    its share too)."""
    phases = reweighted(curriculum(groups), cfg.family_weights)
    for kind, spec in cfg.stretches():
        start, end, name, group = stretch_group(kind, spec)
        phases = with_stretch(phases, start, end, name, group)
    return phases


def phase_groups(phases: tuple[Phase, ...], progress: float) -> dict:
    """The groups of the first phase whose ``end`` lies beyond ``progress``."""
    for ph in phases:
        if progress < ph.end:
            return ph.groups
    return phases[-1].groups


@dataclass
class TrainConfig:
    """Hyper-parameters (all recorded in ``train_config.json`` next to the weights)."""

    seed: int = 0
    minutes: float = 50.0
    steps: int | None = None
    batch_size: int = 16
    lr: float = 3e-4
    lr_late: float | None = None
    lr_late_from: float = 0.35
    warmup: int = 200
    decay_from: float = 0.6
    min_lr_frac: float = 0.05
    weight_decay: float = 0.01
    clip: float = 1.0
    vision_lr_mult: float = 1.0
    vision_steps: int = 800
    vision_lr: float = 2e-3
    vision_dense: bool = False
    vision_ordinal: bool = False
    vision_ordinal_channels: int = 0
    vision_where: bool = False
    vision_facts_from: int = 0
    vision_fact_weight: float = 1.0
    place_open: tuple = ()
    stage1_workers: int = 0
    freeze_tower: bool = False
    summary: str = ""
    summary_weight: float = 1.0
    summary_channels: int = 0
    summary_order: bool = False
    visual_norm: float = 1.0
    threads: int = 2
    followups: int = 0
    extra_followups: tuple = ()
    loss_mean: str = "turns"
    family_weights: dict = field(default_factory=dict)
    visual_dropout: float = 0.0
    background_dropout: float = 0.0
    content_from: str = "features"
    stop_rows: float = 0.0
    stop_rows_from: float = 0.0
    stop_rows_media: str = "all"
    content_dropout: float = 0.0
    content_dropout_share: float = 0.5
    content_dropout_from: float = 0.0
    shuffle_turns: bool = False
    early_steps: tuple = ()
    motion_stretch: tuple = ()
    flash_stretch: tuple = ()
    caption_stretch: tuple = ()
    bf16: bool = False
    compile: bool = False
    order: str = "image-first"
    device: str = "cpu"
    workers: int = 0
    data_parallel: int = 1
    log_every: int = 25
    eval_n: int = 100
    text: dict = field(default_factory=dict)
    vision: dict = field(default_factory=dict)

    def __post_init__(self):
        # fail at start-up, not at the first stage-2 step after minutes of stage 1
        from ..world.followups import check_extra_kinds

        check_extra_kinds(self.extra_followups)
        check_dropout(self.visual_dropout)
        check_dropout(self.background_dropout)
        check_content_from(self.content_from)
        if not 0.0 <= self.stop_rows <= 1.0 or (self.stop_rows and not self.background_dropout):
            raise ValueError(f"stop_rows must be in [0, 1] and needs background dropout, got {self.stop_rows}")
        if not 0.0 <= self.stop_rows_from < 1.0:
            raise ValueError(f"stop_rows_from is a schedule position in [0, 1), got {self.stop_rows_from}")
        if self.stop_rows_media not in STOP_ROWS_MEDIA:
            raise ValueError(f"stop_rows_media must be one of {STOP_ROWS_MEDIA}, got {self.stop_rows_media!r}")
        self._check_content_dropout()
        objective_kind(self.loss_mean)
        check_early_steps(self.early_steps)
        if self.early_steps and self.steps:
            raise ValueError("early_steps floors a wall-clock (--minutes) schedule; a --steps schedule is in steps already")
        for kind, spec in self.stretches():
            stretch_group(kind, spec)
        self._check_data_parallel()
        if self.summary_order and not self.summary:
            raise ValueError("summary_order (--summary-order) is read from the scene summary's channels: "
                             "it needs --summary mean or token")
        self._check_fact_heads()

    def _check_fact_heads(self) -> None:
        """The options of stage 1's place and where heads, each refused without the head it acts on."""
        heads = self.vision_ordinal or self.vision_where
        if self.vision_ordinal_channels and not self.vision_ordinal or self.vision_ordinal_channels < 0:
            raise ValueError(f"vision_ordinal_channels ({self.vision_ordinal_channels}) is a channel count >= 0 "
                             "for the place head, which --vision-ordinal makes")
        if self.vision_facts_from and not heads or self.vision_facts_from < 0:
            raise ValueError(f"vision_facts_from ({self.vision_facts_from}) is a channel index >= 0 for the place "
                             "and where heads, which --vision-ordinal and --vision-where make")
        if self.vision_fact_weight != 1.0 and not heads or self.vision_fact_weight <= 0:
            raise ValueError(f"vision_fact_weight ({self.vision_fact_weight}) is a weight > 0 on the place and "
                             "where heads' terms, which --vision-ordinal and --vision-where make")
        check_place_open(self.place_open)
        if self.place_open and not (self.vision_ordinal and self.vision_ordinal_channels):
            raise ValueError("place_open (--place-open) gates the place head's channels: it needs --vision-ordinal "
                             "with --vision-ordinal-channels N > 0")

    def _check_data_parallel(self) -> None:
        if self.data_parallel < 1:
            raise ValueError(f"data_parallel is a process count >= 1, got {self.data_parallel}")
        if self.data_parallel == 1:
            return
        if not self.device.startswith("cpu") or self.workers or self.stage1_workers:
            raise ValueError("data_parallel runs both stages in forked CPU processes: it needs device 'cpu' and "
                             "no --workers or --stage1-workers (each rank builds its own share of a step's samples)")
        if self.batch_size < 2 * self.data_parallel:
            raise ValueError(f"data_parallel {self.data_parallel} needs a batch of at least 2 rows per rank, "
                             f"got batch_size {self.batch_size}")

    def _check_content_dropout(self) -> None:
        check_dropout(self.content_dropout)
        if self.content_dropout and not self.background_dropout:
            raise ValueError("content_dropout needs background dropout (its content detector plans the batch)")
        if not 0.0 <= self.content_dropout_share <= 1.0:
            raise ValueError(f"content_dropout_share is a share of rows in [0, 1], got {self.content_dropout_share}")
        if not 0.0 <= self.content_dropout_from < 1.0:
            raise ValueError(f"content_dropout_from is a schedule position in [0, 1), got {self.content_dropout_from}")

    def stretches(self) -> tuple[tuple[str, tuple], ...]:
        """(kind, spec) of each stretch set, motion, flash, caption (a later stretch scales an earlier one)."""
        specs = ((kind, getattr(self, f"{kind}_stretch")) for kind in STRETCH_GROUPS)
        return tuple((kind, spec) for kind, spec in specs if spec)


def lr_at(step: int, progress: float, cfg: TrainConfig) -> float:
    """Linear warm-up (steps) to ``cfg.lr``, flat until progress ``decay_from``, then cosine
    to ``min_lr_frac`` at progress 1 (a long flat stretch gets past the loss plateau sooner).
    With ``lr_late``, the peak drops from ``cfg.lr`` to ``lr_late`` at progress ``lr_late_from``
    (a high rate for the early, small-scene phases only)."""
    peak = cfg.lr if cfg.lr_late is None or progress < cfg.lr_late_from else cfg.lr_late
    if step < cfg.warmup:
        return peak * (step + 1) / cfg.warmup
    frac = min(1.0, max(0.0, (progress - cfg.decay_from) / (1.0 - cfg.decay_from)))
    lo = peak * cfg.min_lr_frac
    return lo + (peak - lo) * 0.5 * (1.0 + math.cos(math.pi * frac))


def step_rng(seed: int, step: int) -> np.random.Generator:
    """Random stream of training step ``step`` (train seed space only)."""
    return np.random.default_rng(np.random.SeedSequence([SPLIT_KEY["train"], seed, step, 1]))


def draw_batch(rng: np.random.Generator, batch_size: int, groups=None, followups: int = 0,
               extra_followups: tuple = ()):
    """Pick a group, then ``batch_size * mult`` samples with families by weight, each with
    up to ``followups`` extra questions about its media (``extra_followups``: opt-in kinds;
    a group's own ``followups`` keyword overrides the count)."""
    groups = groups or GROUPS
    names = list(groups)
    probs = np.array([groups[n][0] for n in names], float)
    name = names[int(rng.choice(len(names), p=probs / probs.sum()))]
    _, mult, kw, mix = groups[name]
    kw = {"followups": followups, **kw}
    fams, w = list(mix), np.array(list(mix.values()), float)
    picks = rng.choice(len(fams), size=max(1, int(round(batch_size * mult))), p=w / w.sum())
    return name, [make_sample(fams[int(i)], rng, extra_followups=tuple(extra_followups), **kw) for i in picks]


def per_turn_loss(logits, labels, turn_of, with_counts: bool = False):
    """Mean answer-token cross-entropy per assistant turn.

    logits (B, L, V); labels (B, L) with -100 outside answers; turn_of (B, L) the
    1-based index of the assistant turn each token belongs to. Returns (losses (B, T),
    present (B, T) bool), T the most turns of any row; turn 1 is the main question.
    ``with_counts`` also returns the answer tokens per turn (B, T) float.
    """
    import torch
    import torch.nn.functional as F

    lg, lb, turn = logits[:, :-1].float(), labels[:, 1:], turn_of[:, 1:]
    ce = F.cross_entropy(lg.transpose(1, 2), lb, ignore_index=-100, reduction="none")
    mask = (lb != -100).float()
    n_turns = int(turn.max())
    idx = (turn - 1).clamp(min=0)
    total = torch.zeros(ce.shape[0], n_turns, device=ce.device).scatter_add_(1, idx, ce * mask)
    count = torch.zeros_like(total).scatter_add_(1, idx, mask)
    losses = total / count.clamp(min=1.0)
    return (losses, count > 0, count) if with_counts else (losses, count > 0)


def turn_index(input_ids, marker_id: int):
    """(B, L) number of assistant markers at or before each position."""
    return (input_ids == marker_id).long().cumsum(dim=1)


def train_step(model, opt, batch, marker_id: int, lr: float, clip: float, loss_mean: str = "turns",
               bf16: bool = False, ranks: int = 1):
    """One optimiser step on the mean over all answered turns (``loss_mean="turns"``) or
    all answer tokens (``"tokens"``) of an encoded ``batch`` (see
    :func:`encode_for_training`); returns the main question's loss per sample (B,) and
    the follow-ups' mean loss (nan if none). ``bf16``: the forward pass under bfloat16
    autocast (weights, gradients and the loss stay float32). ``ranks`` > 1: one rank of a data-
    parallel group (:mod:`.parallel`): the objective's denominators and the gradients are summed
    over the ranks before the clip and the step, so every rank takes the same step."""
    import torch

    labels = batch.pop("labels")
    turns = turn_index(batch["input_ids"], marker_id).to(model.device)
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
        if "drop_fraction" in batch:  # planned by --background-dropout
            out = forward_with_background_dropout(model, batch)
        else:
            out = model(**batch.to(model.device), use_cache=False)
    losses, present, count = per_turn_loss(out.logits, labels.to(model.device), turns, with_counts=True)
    totals = global_totals(present, count) if ranks > 1 else None
    objective(losses, present, count, loss_mean, totals).backward()
    if ranks > 1:
        all_reduce_gradients(model.parameters())
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    losses = losses.detach()
    extra = losses[:, 1:][present[:, 1:]]
    follow = float(extra.mean()) if extra.numel() else float("nan")
    return losses[:, 0].cpu().numpy(), follow


LOSS_MEANS = ("turns", "tokens")


def objective_kind(loss_mean: str) -> str:
    """``loss_mean`` itself when it is one of :data:`LOSS_MEANS`, else ``ValueError``."""
    if loss_mean not in LOSS_MEANS:
        raise ValueError(f"unknown loss_mean {loss_mean!r}; choose from {LOSS_MEANS}")
    return loss_mean


def objective(losses, present, count, loss_mean: str, totals=None):
    """The scalar to minimise from per-turn mean losses (B, T), see :func:`train_step`.
    ``totals``: (answered turns, answer tokens) over every rank's rows (data parallelism), so
    that the ranks' objectives sum to the objective of all their rows in one batch."""
    if objective_kind(loss_mean) == "turns":
        return losses[present].sum() / (totals[0] if totals is not None else present.sum())
    return (losses * count).sum() / (totals[1] if totals is not None else count.sum())


def make_optimizer(model, cfg: TrainConfig):
    """AdamW in four groups: (vision tower + projector | rest) x (decay | no decay).

    The vision groups' lr is ``vision_lr_mult`` times the base lr (see ``train_step``).
    """
    import torch

    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        vis = "vision_tower" in name or "multi_modal_projector" in name
        key = (vis, p.ndim >= 2)
        groups.setdefault(key, []).append(p)
    return torch.optim.AdamW([
        {"params": ps, "weight_decay": cfg.weight_decay if dec else 0.0,
         "lr_mult": cfg.vision_lr_mult if vis else 1.0} for (vis, dec), ps in sorted(groups.items())
    ], lr=cfg.lr, betas=(0.9, 0.98))


class Logger:
    """Prints to stdout and appends to ``path`` (if given)."""

    def __init__(self, path=None):
        self.f = open(path, "a") if path else None

    def __call__(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        if self.f:
            self.f.write(line + "\n")
            self.f.flush()


class FamilyLoss:
    """Running mean of per-sample loss per family between log lines."""

    def __init__(self):
        self.sum, self.n = defaultdict(float), defaultdict(int)

    def add(self, families: list[str], losses) -> None:
        for f, v in zip(families, losses):
            self.sum[f] += float(v)
            self.n[f] += 1

    def flush(self) -> str:
        txt = " ".join(f"{f}={self.sum[f] / self.n[f]:.3f}" for f in sorted(self.n))
        self.sum.clear()
        self.n.clear()
        return txt


def train(cfg: TrainConfig, out_dir=None, log=None, groups=None):
    """Train a fresh model; returns (model, processor, history list of dicts)."""
    import torch

    log = log or Logger()
    log(f"machine {machine_line()}")
    cfg = resolved_precision(cfg, log)
    torch.set_num_threads(cfg.threads)
    tokenizer = build_tokenizer(cfg.order, cfg.extra_followups)
    processor = build_processor(tokenizer, cfg.order)
    model = build_model(tokenizer, seed=cfg.seed, text=cfg.text, vision=cfg.vision).to(cfg.device)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"params {n_params / 1e6:.2f}M config {json.dumps(asdict(cfg))}")
    t0 = time.time()
    if cfg.vision_steps:
        acc = pretrain_vision(model, processor, cfg.seed, cfg.vision_steps, lr=cfg.vision_lr, log=log,
                              summary=cfg.summary, summary_weight=cfg.summary_weight,
                              summary_channels=cfg.summary_channels,
                              dense=cfg.vision_dense, workers=cfg.stage1_workers, ranks=cfg.data_parallel,
                              ordinal=cfg.vision_ordinal, ordinal_channels=cfg.vision_ordinal_channels,
                              where=cfg.vision_where, facts_from=cfg.vision_facts_from,
                              summary_order=cfg.summary_order, fact_weight=cfg.vision_fact_weight)
        log(f"stage 1 done: cell accuracy {acc:.3f} in {time.time() - t0:.0f}s")
        if cfg.visual_norm:
            factor = rescale_projector(model, processor, cfg.seed, cfg.visual_norm)
            log(f"projector output scaled by {factor:.4f} to mean token norm {cfg.visual_norm}")
    if cfg.freeze_tower:  # stage 2 eroded the tower's shape features (RECIPE.md): keep stage 1's
        model.model.vision_tower.requires_grad_(False)
    budget = cfg.minutes * 60.0 - (time.time() - t0) if cfg.minutes else None
    if cfg.data_parallel > 1:
        from .parallel import run_stage2

        history = run_stage2(model, processor, cfg, log, groups, budget)
    else:
        opt = make_optimizer(model, cfg)
        with compiled_language_model(model, cfg.compile):
            history = run_loop(model, opt, processor, cfg, log, groups, budget)
    model.eval()
    if out_dir:
        save(model, processor, cfg, out_dir, history)
    return model, processor, history


def native_bf16(device: str) -> bool:
    """Whether bfloat16 autocast pays off on ``device``: a CUDA device, or a CPU with AVX512-BF16
    or AMX. Elsewhere the CPU converts in software: on an AVX-512 Xeon without either, a stage-2
    step took 2.4x as long as in float32 (``results/recipe-cpu/step_speed_no_bf16.md``)."""
    return not device.startswith("cpu") or bool(set(BF16_FLAGS) & cpu_flags())


def resolved_precision(cfg: TrainConfig, log) -> TrainConfig:
    """``cfg`` with ``bf16`` off (and said in the log) where the device has no native bfloat16,
    so the shipped command trains as fast as the machine allows; the saved config records it."""
    if cfg.bf16 and not native_bf16(cfg.device):
        log("--bf16 asked, but this CPU has neither AVX512-BF16 nor AMX (bfloat16 would run 2-3x "
            "slower than float32 here): stage 2 runs in float32")
        return replace(cfg, bf16=False)
    return cfg


@contextmanager
def compiled_language_model(model, enabled: bool = True, backend: str = "inductor"):
    """Within the block, ``model``'s language model runs through ``torch.compile``
    (dynamic shapes: batches differ in length and rows); the eager module is always put
    back, so saving and generation see the plain model. Why: inductor fuses the norms,
    rotary and activations, the bulk of a step after the matmuls: 1.14x alone, 1.46x with
    ``bf16``, against eager float32 on this CPU (``results/recipe-cpu/step_speed.md``)."""
    import torch

    if not enabled:
        yield model
        return
    inner = model.model
    eager = inner.language_model
    inner.language_model = torch.compile(eager, dynamic=True, backend=backend)
    try:
        yield model
    finally:
        inner.language_model = eager


def progress_of(step: int, cfg: TrainConfig) -> float:
    """Schedule position in [0, 1] of a ``cfg.steps`` schedule (a ``--minutes`` one follows
    :class:`WallClock`)."""
    return (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)


class WallClock:
    """Schedule progress of a ``--minutes`` run: the share of the stage-2 ``budget`` (seconds)
    spent, with an optional step floor for the schedule's start, ``early_steps`` = (S, P):
    progress P is not reached before step S, and the rest of the schedule (P -> 1) then runs from
    that moment to the end of the budget. A machine that makes S steps within P of the budget
    follows plain wall time; a slower one gives the early curriculum the steps it needs
    (runs 34-35: 790 steps of the first phase instead of 1,300, and `where` never trained).
    The budget stays a hard limit: progress is 1 when it is spent."""

    def __init__(self, budget: float, early_steps: tuple = (), on_early_end=None):
        self.budget, self.early_steps, self.on_early_end = budget, tuple(early_steps), on_early_end
        self.early_end: float | None = None  # elapsed seconds when progress P was reached

    def __call__(self, step: int, elapsed: float) -> float:
        wall = elapsed / self.budget
        if wall >= 1.0 or not self.early_steps:
            return min(wall, 1.0)
        steps, p = self.early_steps
        if self.early_end is None:
            early = min(wall, p * step / steps)
            if early < p:
                return early
            self.early_end = elapsed
            if self.on_early_end:
                self.on_early_end(step, elapsed)
        return p + (1.0 - p) * (elapsed - self.early_end) / (self.budget - self.early_end)


def parse_early_steps(text: str) -> tuple:
    """'2600:0.3' -> (2600, 0.3); '' -> ()."""
    if not text:
        return ()
    steps, sep, prog = text.partition(":")
    if not sep:
        raise ValueError(f"early_steps needs STEPS:PROGRESS, got {text!r}")
    out = (int(steps), float(prog))
    check_early_steps(out)
    return out


def check_early_steps(spec: tuple) -> None:
    """``ValueError`` unless ``spec`` is () or (S, P) with S >= 1 and 0 < P < 1."""
    if spec and not (len(spec) == 2 and int(spec[0]) >= 1 and 0.0 < float(spec[1]) < 1.0):
        raise ValueError(f"early_steps needs STEPS:PROGRESS with STEPS >= 1 and 0 < PROGRESS < 1, got {spec!r}")


def step_batch(processor, cfg: TrainConfig, step: int, groups: dict, prog: float = 0.0, part: tuple = (0, 1)):
    """Families and encoded batch of training step ``step`` at schedule position ``prog``
    (a pure function of its inputs). ``part`` = (rank, ranks): only rows rank, rank + ranks, ...
    of the step's drawn samples (data parallelism: the ranks together see the samples of a
    one-process step; their dropout plans draw from streams of their own)."""
    _, samples = draw_batch(step_rng(cfg.seed, step), cfg.batch_size, groups, cfg.followups,
                            cfg.extra_followups)
    rank, ranks = part
    samples = samples[rank::ranks]
    if not samples:
        raise ValueError(f"step {step} drew too few samples for {ranks} ranks")

    def plan_rng(stream: int):  # a one-process run's streams unchanged; a rank's its own
        salt = [] if ranks == 1 else [ranks, rank]
        return np.random.default_rng(np.random.SeedSequence([cfg.seed, step, stream, *salt]))

    if cfg.shuffle_turns:  # its own stream, so the samples are those of a run without it
        rng = plan_rng(4)
        samples = [shuffled_turns(s, rng) for s in samples]
    batch = encode_for_training(processor, samples)
    if cfg.visual_dropout:
        # from the tokenizer, not dropout.media_token_ids(model): batch workers hold no model
        media_ids = [processor.tokenizer.convert_tokens_to_ids(t) for t in ("<image>", "<video>")]
        rng = plan_rng(2)
        batch["attention_mask"] = drop_visual(batch["input_ids"], batch["attention_mask"], media_ids,
                                              cfg.visual_dropout, rng)
    if cfg.background_dropout:
        rng = plan_rng(3)
        plan_background_dropout(processor, samples, batch, cfg.background_dropout, rng,
                                content_from=cfg.content_from)
    if cfg.content_dropout and prog >= cfg.content_dropout_from:
        rng = plan_rng(6)
        plan_content_dropout(batch, cfg.content_dropout, cfg.content_dropout_share, rng)
    if stop_rows_apply(cfg, batch, prog):
        rng = plan_rng(5)
        plan_stop_rows(batch, processor.tokenizer.eos_token_id, cfg.stop_rows, rng)
    return [s.family for s in samples], batch


def stop_rows_apply(cfg: TrainConfig, batch: dict, prog: float) -> bool:
    """Whether this step's batch gets stop rows: from schedule position ``stop_rows_from``, and
    with ``stop_rows_media="image"`` only on batches of still images (one media kind per batch),
    so video rows keep every answer (runs 18, 20, 21: with stop rows on every batch from the
    first step, motion never left its loss plateau)."""
    if not cfg.stop_rows or prog < cfg.stop_rows_from:
        return False
    return cfg.stop_rows_media == "all" or "pixel_values_videos" not in batch


_WORKER = {}


def _worker_batch(args):
    cfg, step, groups, prog = args
    import torch

    torch.set_num_threads(1)
    if "processor" not in _WORKER:
        _WORKER["processor"] = build_processor(build_tokenizer(cfg.order, cfg.extra_followups), cfg.order)
    return step_batch(_WORKER["processor"], cfg, step, groups, prog)


def prefetched(cfg: TrainConfig, phases, ahead: int = 4):
    """Batches of steps 0..cfg.steps-1 built by ``cfg.workers`` processes, at most
    ``ahead`` per worker in flight (step schedules only: the curriculum phase of a step
    must not depend on wall time)."""
    import multiprocessing as mp
    from collections import deque

    def job(i):
        prog = progress_of(i, cfg)
        return cfg, i, phase_groups(phases, prog), prog

    with mp.get_context("fork").Pool(cfg.workers) as pool:
        pending, nxt = deque(), 0
        for step in range(cfg.steps):
            while nxt < cfg.steps and len(pending) < ahead * cfg.workers:
                pending.append(pool.apply_async(_worker_batch, (job(nxt),)))
                nxt += 1
            yield pending.popleft().get()


def run_loop(model, opt, processor, cfg: TrainConfig, log, groups=None, budget=None, rank: int = 0) -> list[dict]:
    """Stage 2 loop; stops after ``cfg.steps`` or when ``budget`` seconds are spent. With
    ``cfg.data_parallel`` ranks (:mod:`.parallel`), this is rank ``rank``'s loop: it trains on its
    share of each step's samples and follows rank 0's schedule position and stop."""
    ranks = cfg.data_parallel
    t0, step, history = time.time(), 0, []
    fam_loss, window, follow = FamilyLoss(), [], []
    phases = training_phases(cfg, groups)
    source = prefetched(cfg, phases) if cfg.workers and cfg.steps else None
    marker = assistant_id(processor)
    clock = None if cfg.steps else WallClock(budget, cfg.early_steps, lambda s, t: log(
        f"schedule progress {cfg.early_steps[1]} reached at step {s} ({t:.0f}s); the rest of the schedule "
        f"runs over the remaining {budget - t:.0f}s"))
    gate = place_gate(model, cfg)
    try:
        while True:
            elapsed = time.time() - t0
            prog = progress_of(step, cfg) if cfg.steps else clock(step, elapsed)
            stop = stop_message(step, elapsed, prog, cfg, budget)
            if ranks > 1:
                prog, stopping = agreed_schedule(prog, stop is not None)
                stop = (stop or f"stage 2 stopped by rank 0 at step {step}") if stopping else None
            if stop:
                if window:  # the steps since the last log line, so the history ends at the last step
                    history.append(log_step(log, step, window, follow, lr, elapsed, fam_loss, ranks))
                log(stop)
                break
            fams, batch = next(source) if source else step_batch(processor, cfg, step, phase_groups(phases, prog), prog,
                                                                 (rank, ranks))
            lr = lr_at(step, prog, cfg)
            if gate is not None and gate.set(prog):
                log(f"place channels open from step {step} (progress {prog:.3f})")
            losses, follow_loss = train_step(model, opt, batch, marker, lr, cfg.clip, cfg.loss_mean, cfg.bf16, ranks)
            fam_loss.add(fams, losses)
            window.append(float(losses.mean()))
            follow.append(follow_loss)
            step += 1
            if step % cfg.log_every == 0:
                history.append(log_step(log, step, window, follow, lr, time.time() - t0, fam_loss, ranks))
                window, follow = [], []
    finally:
        if gate is not None:
            gate.remove()
    return history


def stop_message(step: int, elapsed: float, prog: float, cfg: TrainConfig, budget) -> str | None:
    """Why stage 2 ends before step ``step``, or None to go on."""
    if (cfg.steps and step >= cfg.steps) or (not cfg.steps and prog >= 1.0):
        return f"stage 2 done at step {step} ({elapsed:.0f}s)"
    if cfg.steps and budget is not None and elapsed >= budget:
        return f"stage 2 stopped by the --minutes cap at step {step} of {cfg.steps} ({elapsed:.0f}s)"
    return None


def log_step(log, step: int, window, follow, lr: float, seconds: float, fam_loss: FamilyLoss,
             ranks: int = 1) -> dict:
    """Log one line (main-question loss, follow-up loss, per-family losses); return its record.
    With data-parallel ``ranks`` every rank calls it, and the figures are pooled over their rows."""
    if ranks > 1:
        pool_log_window(fam_loss, window, follow)
    follow = [f for f in follow if not math.isnan(f)]
    rec = {"step": step, "loss": float(np.mean(window)), "followups": float(np.mean(follow)) if follow else None,
           "lr": lr, "seconds": seconds}
    extra = f" follow-ups {rec['followups']:.4f}" if follow else ""
    log(f"step {step} loss {rec['loss']:.4f}{extra} lr {lr:.2e} t {seconds:.0f}s | {fam_loss.flush()}")
    return rec


def save(model, processor, cfg: TrainConfig, out_dir, history) -> None:
    """save_pretrained (safetensors) for model and processor, plus the recipe."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.tokenizer.padding_side = "left"  # ready for batched generation
    processor.save_pretrained(out)
    steps = history[-1]["step"] if history else 0
    (out / "train_config.json").write_text(json.dumps({**asdict(cfg), "steps_done": steps}, indent=2))


def parse_args(argv=None) -> tuple[TrainConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(description="Train the embedded VLM on the synthetic world.")
    p.add_argument("--out", required=True)
    p.add_argument("--minutes", type=float, default=50.0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--lr-late", type=float, default=None, help="peak lr from --lr-late-from on")
    p.add_argument("--lr-late-from", type=float, default=TrainConfig.lr_late_from)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--vision-lr-mult", type=float, default=TrainConfig.vision_lr_mult)
    p.add_argument("--warmup", type=int, default=TrainConfig.warmup)
    p.add_argument("--decay-from", type=float, default=TrainConfig.decay_from,
                   help="schedule progress (0..1) where the cosine decay starts")
    p.add_argument("--vision-steps", type=int, default=TrainConfig.vision_steps)
    p.add_argument("--vision-dense", action="store_true",
                   help="stage 1 also labels every object cell with its object's shape and color")
    p.add_argument("--vision-ordinal", action="store_true",
                   help="stage 1 also asks every object cell for its object's place from the left "
                        "(the order a caption lists the objects in)")
    p.add_argument("--vision-ordinal-channels", type=int, default=TrainConfig.vision_ordinal_channels,
                   help="the place head reads only the first N channels of the projected tokens (0: all)")
    p.add_argument("--vision-where", action="store_true",
                   help="stage 1 also asks every object cell which side of the tile its object lies on "
                        "(left/right/top/bottom by the dominant axis: the where question's answer)")
    p.add_argument("--vision-facts-from", type=int, default=TrainConfig.vision_facts_from,
                   help="the place and where heads read channels from this one on (e.g. 64: past the "
                        "--summary-channels 64 group, so that per-object facts and the scene summary "
                        "do not share channels)")
    p.add_argument("--vision-fact-weight", type=float, default=TrainConfig.vision_fact_weight,
                   help="scales the place and where heads' stage-1 terms (e.g. 0.3: a weaker place fact)")
    p.add_argument("--place-open", default="",
                   help="START:END: the place head's channels reach the language model only from stage-2 "
                        "progress START, ramped to full by END (1:1: never; their projector rows stay zero)")
    p.add_argument("--stage1-workers", type=int, default=TrainConfig.stage1_workers,
                   help="processes rendering stage-1 batches (same batches for any number)")
    p.add_argument("--freeze-tower", action="store_true",
                   help="stage 2 keeps the vision tower of stage 1 (the projector and LM train)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--followups", type=int, default=TrainConfig.followups,
                   help="extra questions about each sample's media, as further chat turns")
    p.add_argument("--extra-followups", default="",
                   help="opt-in follow-up kinds, comma list of: flash (other objects' flash "
                        "counts, 0), caption (a caption turn on every still scene of <= 4 objects), "
                        "order (the same scenes' object count and the object at one random position "
                        "from the left)")
    p.add_argument("--family-weights", default="",
                   help="override sampling weights of question families, e.g. flash=2.4,caption=3")
    p.add_argument("--visual-dropout", type=float, default=0.0,
                   help="half the rows hide a random fraction in [0, this) of their visual tokens")
    p.add_argument("--loss-mean", choices=LOSS_MEANS, default=TrainConfig.loss_mean,
                   help="average the loss over answered turns or over answer tokens")
    p.add_argument("--background-dropout", type=float, default=0.0,
                   help="half the rows hide a random share in [0, P) of their empty-canvas visual tokens")
    p.add_argument("--content-from", choices=CONTENT_FROM, default=TrainConfig.content_from,
                   help="background dropout's empty-token test: features (distance to a blank canvas's "
                        "projected token) or pixels (the token's patches show only the background colour)")
    p.add_argument("--shuffle-turns", action="store_true",
                   help="put each sample's main question and follow-ups in a random order (no turn "
                        "position gives an answer away)")
    p.add_argument("--early-steps", default="",
                   help="STEPS:PROGRESS: schedule progress PROGRESS is not reached before stage-2 step STEPS "
                        "(a slower machine gives the early curriculum the steps it needs; the rest of the "
                        "schedule then runs over the remaining time), e.g. 2600:0.3")
    for kind in STRETCH_GROUPS:
        p.add_argument(f"--{kind}-stretch", default="",
                       help=f"START:END:SHARE[:MAX_OBJECTS]: between schedule progress START and END, SHARE of "
                            f"the batches are {STRETCH_HELP[kind]}")
    p.add_argument("--bf16", action="store_true",
                   help="stage-2 forward under bfloat16 autocast (float32 weights) where the device runs it natively "
                        "(CUDA, or a CPU with AVX512-BF16/AMX); elsewhere float32, said in the log")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the language model for stage 2 (about 80 s of compiling first)")
    p.add_argument("--device", default="cpu", help="torch device (the shipped recipe runs on cpu)")
    p.add_argument("--summary", choices=["", "mean", "token"], default=TrainConfig.summary,
                   help="stage 1 also learns scene-summary targets (kinds present, shape counts), "
                        "from the tokens' mean or from every token")
    p.add_argument("--summary-weight", type=float, default=TrainConfig.summary_weight,
                   help="weight of the stage-1 scene-summary loss")
    p.add_argument("--stop-rows", type=float, default=TrainConfig.stop_rows,
                   help="share of rows that hide most visual tokens (background first) and learn only their eos "
                        "(needs --background-dropout)")
    p.add_argument("--stop-rows-from", type=float, default=TrainConfig.stop_rows_from,
                   help="schedule position in [0, 1) from which --stop-rows applies (0: from the first step)")
    p.add_argument("--stop-rows-media", choices=STOP_ROWS_MEDIA, default=TrainConfig.stop_rows_media,
                   help="which batches get --stop-rows: all, or still images only (video rows keep their answers)")
    p.add_argument("--content-dropout", type=float, default=TrainConfig.content_dropout,
                   help="rows hide a random share in [0, P) of their object tokens and keep their answers "
                        "(needs --background-dropout)")
    p.add_argument("--content-dropout-share", type=float, default=TrainConfig.content_dropout_share,
                   help="share of rows that get --content-dropout")
    p.add_argument("--content-dropout-from", type=float, default=TrainConfig.content_dropout_from,
                   help="schedule position in [0, 1) from which --content-dropout applies")
    p.add_argument("--summary-channels", type=int, default=TrainConfig.summary_channels,
                   help="the summary head reads only the first N channels of the projected tokens (0: all)")
    p.add_argument("--summary-order", action="store_true",
                   help="stage 1's summary channels also tell the scene's kinds left to right (a caption's "
                        "order, alike in every token; needs --summary)")
    p.add_argument("--families", default=None,
                   help="probe runs: train only these still-image families (comma list), no curriculum")
    p.add_argument("--max-objects", type=int, default=None, help="with --families: objects per scene cap")
    p.add_argument("--text-layers", type=int, default=None, help="language-model layers (default: build's)")
    p.add_argument("--order", choices=sorted(CONTENT_ORDERS), default=TrainConfig.order,
                   help="where the question goes relative to the media in the chat template")
    p.add_argument("--init-std", type=float, default=None,
                   help="language-model init std (transformers' default 0.02)")
    p.add_argument("--workers", type=int, default=0, help="batch-building processes (with --steps only)")
    p.add_argument("--data-parallel", type=int, default=1,
                   help="both stages in N forked 1-thread CPU processes, each on its share of a step's rows, "
                        "gradients summed (2 on a 2-core CPU: stage 2 1.2-1.4x the steps, "
                        "results/recipe-cpu/step_breakdown.md; stage 1 1.29x, results/recipe-cpu/stage1_data_parallel.md)")
    p.add_argument("--eval-n", type=int, default=TrainConfig.eval_n)
    p.add_argument("--log", default=None, help="also append log lines to this file")
    a = p.parse_args(argv)
    cfg = TrainConfig(seed=a.seed, minutes=a.minutes, steps=a.steps, lr=a.lr,
                      batch_size=a.batch_size, threads=a.threads, eval_n=a.eval_n,
                      vision_lr_mult=a.vision_lr_mult, warmup=a.warmup, decay_from=a.decay_from,
                      vision_steps=a.vision_steps, vision_dense=a.vision_dense, vision_ordinal=a.vision_ordinal, vision_ordinal_channels=a.vision_ordinal_channels,
                      vision_where=a.vision_where, vision_facts_from=a.vision_facts_from,
                      vision_fact_weight=a.vision_fact_weight, place_open=parse_place_open(a.place_open),
                      freeze_tower=a.freeze_tower,
                      stage1_workers=a.stage1_workers,
                      followups=a.followups, device=a.device, loss_mean=a.loss_mean,
                      bf16=a.bf16, compile=a.compile,
                      family_weights=parse_weights(a.family_weights), visual_dropout=a.visual_dropout,
                      background_dropout=a.background_dropout, content_from=a.content_from,
                      stop_rows=a.stop_rows,
                      stop_rows_from=a.stop_rows_from, stop_rows_media=a.stop_rows_media,
                      content_dropout=a.content_dropout, content_dropout_share=a.content_dropout_share,
                      content_dropout_from=a.content_dropout_from, shuffle_turns=a.shuffle_turns,
                      early_steps=parse_early_steps(a.early_steps),
                      **{f"{k}_stretch": parse_stretch(getattr(a, f"{k}_stretch")) for k in STRETCH_GROUPS},
                      extra_followups=tuple(k for k in a.extra_followups.split(",") if k),
                      workers=a.workers, data_parallel=a.data_parallel, summary=a.summary, summary_weight=a.summary_weight,
                      summary_channels=a.summary_channels, summary_order=a.summary_order, lr_late=a.lr_late, lr_late_from=a.lr_late_from,
                      order=a.order, text=text_overrides(a.text_layers, a.init_std))
    return cfg, a


def text_overrides(layers: int | None, init_std: float | None) -> dict:
    """Language-model config keys changed from the build defaults."""
    out = {"num_hidden_layers": layers} if layers else {}
    return {**out, "initializer_range": init_std} if init_std else out


def probe_groups(families: str | None, max_objects: int | None) -> dict | None:
    """One group of 144 px images of ``families`` (comma list), or None for the curriculum."""
    if not families:
        return None
    kw = {"hires": False, **({"max_objects": max_objects} if max_objects else {})}
    return {"image": (1.0, 1.0, kw, {f: 1.0 for f in families.split(",")})}


def main(argv=None):
    from ..world.samples import generate_samples
    from ..world.spec import MODEL_FAMILIES
    from .evaluate import evaluate_samples, format_table

    cfg, args = parse_args(argv)
    log = Logger(args.log)
    model, processor, _ = train(cfg, args.out, log, probe_groups(args.families, args.max_objects))
    if cfg.eval_n:
        held_out = generate_samples(cfg.eval_n, seed=cfg.seed, split="test", families=MODEL_FAMILIES)
        res = evaluate_samples(model, processor, held_out)
        log("held-out quick eval:\n" + format_table(res))
        (Path(args.out) / "quick_eval.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
