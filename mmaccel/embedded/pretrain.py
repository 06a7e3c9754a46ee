"""Stage 1: dense patch pre-training of the vision tower and projector.

Before the VLM is trained end to end, the SigLIP tower and the projector learn to
describe each patch of a tile, from labels computed from the scene metadata:

- ``cls`` (G*G,): 0 = empty, 1 + shape * 4 + color for the object whose centre lies in
  the cell, 13 = part of an object whose centre is elsewhere, 14 = part of a digit
  string, 15 + d for the cell holding the centre of digit ``d``;
- ``pos`` (G*G, 2): where the cell's content is, as (x, y) / side in [0, 1]: the object
  centre for object-centre cells, else the cell centre (so tokens carry 2-D position).

- ``obj`` (G*G, 4): the (shape, color) of the object covering the cell (the nearest centre
  when several do; -1 off objects), so that every token on an object, not only the centre
  one, learns to say what it is part of (``dense``; the centre class alone left shape
  poorly decodable: see RECIPE.md); and two facts about that object, each asked of every
  token on it by its own head when enabled: its place from the left among the tile's
  objects (``ordinal``, the order a caption lists them in) and the side of the tile its centre
  lies on by the dominant axis (``where``, the answer to a where question);

- scene summary (``summary`` mode "mean" or "token"): which of the 12 (shape, color)
  kinds are present and how many objects of each shape (0-6), read by a second head
  from the mean of the tile's tokens ("mean") or from every token alone ("token"). This
  puts the aggregate facts that existence and counting questions need into the tokens
  themselves, where the language model can read them with any attention pattern (the
  LM alone learns neither aggregate in a 60-minute budget; see RECIPE.md). With
  ``summary_order``, a further head asks the same channels, the same way, for the scene's
  kinds in the caption's order (:func:`order_targets`): a scene-level fact, alike in every
  token, unlike the per-object place from the left, which sets an object's tokens apart.

A temporary linear head reads the projected features (the tokens the language model
will see); it is discarded afterwards, so the saved model stays a stock checkpoint.
An alignment term also scores each object-centre (digit-centre) token against the
language model's own word embeddings of its color and shape (digit), so that visual
tokens start out close to the words that name them (a dense form of LLaVA's
alignment stage). This shortens the "ignore the image" plateau of training from scratch.
"""
from __future__ import annotations

import time

import numpy as np

from ..world.images import COLOR_NAMES, WHERE_NAMES, where_of
from ..world.samples import SPLIT_KEY, draw_image_sample
from ..world.scene import render
from ..world.spec import MAX_OBJECTS, SHAPES

N_CLASSES = 25
N_KINDS = len(SHAPES) * len(COLOR_NAMES)
MAX_SHAPE_COUNT = 6
SUMMARY_OUT = N_KINDS + len(SHAPES) * (MAX_SHAPE_COUNT + 1)
NO_KIND = N_KINDS  # the order slot past a scene's last object
ORDER_OUT = MAX_OBJECTS * (N_KINDS + 1)  # per place from the left: one of the kinds, or none
HEAD_OUT = N_CLASSES + 2 + len(SHAPES) + len(COLOR_NAMES)  # classes, (x, y), shape, color
DENSE_KINDS = ("shape", "color", "ordinal", "where")  # the columns of :func:`cell_objects`
OBJECT_FACTS = {"ordinal": MAX_OBJECTS, "where": len(WHERE_NAMES)}  # fact -> classes, heads made in this order
FACT_WORDS = {"ordinal": "place", "where": "where"}  # as the stage-1 log names them


def digit_centres(meta: dict) -> list[tuple[str, float, float]]:
    """(digit, x, y) pixel centres of each character of the scene's digit string."""
    from ..world.scene import font

    if not meta.get("text"):
        return []
    fnt, text = font(meta["text_px"]), meta["text"]
    x0, y0, x1, y1 = meta["text_box"]
    bx0 = fnt.getbbox(text)[0]
    out = []
    for i, ch in enumerate(text):
        left = x0 - bx0 + fnt.getlength(text[:i])
        out.append((ch, left + fnt.getlength(ch) / 2, (y0 + y1) / 2))
    return out


def cell_of(x: float, y: float, side: int, grid: int) -> int:
    """Row-major index of the grid cell that holds pixel (x, y)."""
    cx, cy = min(int(x * grid / side), grid - 1), min(int(y * grid / side), grid - 1)
    return cy * grid + cx


def cell_centres(side: float, grid: int) -> np.ndarray:
    """(G*G, 2) pixel (x, y) centres of the grid cells, row-major."""
    cell = side / grid
    return np.stack(np.meshgrid(np.arange(grid), np.arange(grid)), -1).reshape(-1, 2) * cell + cell / 2


def covered_cells(centers: np.ndarray, obj: dict, cell: float) -> tuple[np.ndarray, np.ndarray]:
    """(covered (G*G,) bool, |centre gap| (G*G, 2)): a cell is covered when it overlaps the
    object's box by more than 2 px."""
    gap = np.abs(centers - [obj["cx"], obj["cy"]])
    return gap.max(1) < obj["size"] / 2 + cell / 2 - 2, gap


def _kind(obj: dict) -> list[int]:
    return [SHAPES.index(obj["shape"]), COLOR_NAMES.index(obj["color"])]


def kind_index(obj: dict) -> int:
    """The object's (shape, color) kind as one index, shape * 4 + color (0 .. N_KINDS - 1): the
    summary's presence bits, the order slots, and one less than its centre cell's class."""
    shape, color = _kind(obj)
    return shape * len(COLOR_NAMES) + color


def patch_targets(meta: dict, grid: int):
    """(cls (G*G,) int64, pos (G*G, 2) float32) for one still scene."""
    side, cell = meta["side"], meta["side"] / grid
    cls = np.zeros(grid * grid, np.int64)
    centers = cell_centres(side, grid)
    pos = (centers / side).astype(np.float32)
    if meta.get("text_box"):
        x0, y0, x1, y1 = meta["text_box"]
        inside = (centers[:, 0] >= x0 - cell / 2) & (centers[:, 0] <= x1 + cell / 2) & \
                 (centers[:, 1] >= y0 - cell / 3) & (centers[:, 1] <= y1 + cell / 3)
        cls[inside] = 14
    for o in meta["objects"]:
        cls[covered_cells(centers, o, cell)[0] & (cls == 0)] = 13
    for o in meta["objects"]:
        i = cell_of(o["cx"], o["cy"], side, grid)
        cls[i] = 1 + kind_index(o)
        pos[i] = [o["cx"] / side, o["cy"] / side]
    for ch, x, y in digit_centres(meta):
        i = cell_of(x, y, side, grid)
        cls[i], pos[i] = 15 + int(ch), [x / side, y / side]
    return cls, pos


def covering_objects(meta: dict, grid: int) -> np.ndarray:
    """(G*G,) int64: index into ``meta["objects"]`` of the object covering each cell, -1 where
    none. A cell is covered when it overlaps the object's box by more than 2 px (as for class
    13); of several, the object whose centre is nearest the cell centre wins, and the centre
    cell always names its own object."""
    side, cell = meta["side"], meta["side"] / grid
    centers = cell_centres(side, grid)
    out = np.full(grid * grid, -1, np.int64)
    best = np.full(grid * grid, np.inf)
    for k, o in enumerate(meta["objects"]):
        near, gap = covered_cells(centers, o, cell)
        dist = np.hypot(*gap.T)
        win = near & (dist < best)
        out[win], best[win] = k, dist[win]
    for k, o in enumerate(meta["objects"]):
        out[cell_of(o["cx"], o["cy"], side, grid)] = k
    return out


def object_rows(meta: dict) -> np.ndarray:
    """(K + 1, 4) int64: each object's (shape, color, place from the left, where), then a row
    of -1s, so that indexing with :func:`covering_objects` (-1 where none) gives per-cell targets."""
    side = meta["side"]
    rows = [_kind(o) + [int(k), WHERE_NAMES.index(where_of(o["cx"], o["cy"], side))]
            for o, k in zip(meta["objects"], places_from_left(meta["objects"]))]
    return np.array(rows + [[-1] * len(DENSE_KINDS)], np.int64).reshape(-1, len(DENSE_KINDS))


def places_from_left(objects: list[dict]) -> np.ndarray:
    """(K,) int64: each object's place from the left by centre x (0 = leftmost, ties in list
    order), the order a caption lists them in."""
    return np.argsort(np.argsort([o["cx"] for o in objects], kind="stable"), kind="stable")


def object_targets(meta: dict, grid: int):
    """(G*G, 2) int64: (shape, color) index of the object covering each cell (see
    :func:`covering_objects`), -1 where none."""
    return cell_objects(meta, grid)[:, :2]


def ordinal_targets(meta: dict, grid: int):
    """(G*G,) int64: the covering object's place from the left among the scene's objects (0 =
    leftmost, by centre x, the order a caption lists them in), -1 where no object covers the
    cell. Asked of every object token (``ordinal``), it puts the caption's order in the tokens
    themselves instead of leaving the language model to compare positions while it writes."""
    return cell_objects(meta, grid)[:, 2]


def where_targets(meta: dict, grid: int):
    """(G*G,) int64: the side of the tile (index into ``WHERE_NAMES``) the covering object's
    centre lies on, by the dominant axis (the where question's own rule), -1 where no object
    covers the cell. Asked of every object token (``where``), it turns the where answer into a
    lookup, as colour is, instead of a comparison of coordinates the language model must learn."""
    return cell_objects(meta, grid)[:, 3]


def summary_targets(meta: dict):
    """(present (N_KINDS,) float32 0/1, shape counts (len(SHAPES),) int64) of a still scene."""
    present = np.zeros(N_KINDS, np.float32)
    counts = np.zeros(len(SHAPES), np.int64)
    for o in meta["objects"]:
        present[kind_index(o)] = 1.0
        counts[SHAPES.index(o["shape"])] += 1
    return present, counts


def order_targets(meta: dict) -> np.ndarray:
    """(MAX_OBJECTS,) int64: the (shape, color) kind (shape * 4 + color) of the object at each
    place from the left (:func:`places_from_left`, the caption's order), ``NO_KIND`` past the
    scene's last object: what the caption says, in the form of a scene summary."""
    out = np.full(MAX_OBJECTS, NO_KIND, np.int64)
    for o, k in zip(meta["objects"], places_from_left(meta["objects"])):
        out[k] = kind_index(o)
    return out


def vision_batch(processor, rng: np.random.Generator, n: int, grid: int, crowded: bool = False,
                 part: tuple[int, int] = (0, 1)):
    """Pixel tiles (m, 3, S, S) with stacked patch targets (cls, pos, obj) from random normal-size
    scenes; with ``crowded``, every other scene holds up to 6 objects (a count scene) and the
    summary targets (present, counts, order) follow. ``part`` = (rank, ranks): all ``n`` scenes are
    drawn from ``rng`` (a cheap share of the work) and only the rank's contiguous block of them
    is rendered and labelled (m scenes), so the ranks' parts in order are the one-process batch.
    Blocks, not every ranks-th scene: scenes alternate between a caption and a crowded count
    scene, and a stride of 2 would give one rank all the slow ones to wait for."""
    import torch

    fams = ["caption", "count"] if crowded else ["caption"]
    drawn = [draw_image_sample(fams[i % len(fams)], rng, hires=False) for i in range(n)]
    mine = drawn[share(n, *part)]
    pix = processor.image_processor([render(scene) for scene, _ in mine], return_tensors="pt")["pixel_values"][:, 0]
    tg = [patch_targets(s.meta, grid) + (cell_objects(s.meta, grid),)
          + (summary_targets(s.meta) + (order_targets(s.meta),) if crowded else ()) for _, s in mine]
    return pix, *(torch.from_numpy(np.stack(t)) for t in zip(*tg))


def cell_objects(meta: dict, grid: int) -> np.ndarray:
    """(G*G, 4) int64 per cell: the covering object's (shape, color, place from the left, where),
    -1s where none (the covering rule runs once for all of them)."""
    return object_rows(meta)[covering_objects(meta, grid)]  # index -1 picks the "none" row


def share(n: int, rank: int, ranks: int) -> slice:
    """Rank ``rank``'s contiguous block of ``n`` items split as evenly as they go over ``ranks``."""
    return slice(rank * n // ranks, (rank + 1) * n // ranks)


def word_ids(tokenizer) -> dict[str, list[int]]:
    """Token ids of the color, shape and digit words, in class order."""
    ids = lambda words: tokenizer.convert_tokens_to_ids(list(words))  # noqa: E731
    return {"color": ids("\u2581" + c for c in COLOR_NAMES), "shape": ids("\u2581" + s for s in SHAPES),
            "digit": ids(str(d) for d in range(10))}


def word_targets(cls):
    """Per-cell color / shape / digit class (-1 where none) from the cell classes (n, G*G)."""
    import torch

    obj = (cls >= 1) & (cls <= 12)
    none = torch.full_like(cls, -1)
    color = torch.where(obj, (cls - 1) % len(COLOR_NAMES), none)
    shape = torch.where(obj, (cls - 1) // len(COLOR_NAMES), none)
    digit = torch.where(cls >= 15, cls - 15, none)
    return {"color": color, "shape": shape, "digit": digit}


def alignment_loss(model, feats, cls, words: dict, totals: dict | None = None) -> "torch.Tensor":
    """CE of token features against the word embeddings naming their content, a mean over the
    labelled cells of each kind (``totals``: their counts over every rank; default this batch's)."""
    import torch.nn.functional as F

    emb = model.get_input_embeddings().weight
    totals = at_least_one(totals or denominators(cls))
    loss = 0.0
    for kind, target in word_targets(cls).items():
        if (target >= 0).any():
            logits = feats @ emb[words[kind]].T  # (n, G*G, n_words)
            ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-1, reduction="sum")
            loss = loss + ce / totals[f"word_{kind}"]
    return loss


def denominators(cls, obj=None) -> dict:
    """The stage-1 objective's denominators for a batch of cell classes (n, G*G) and object
    targets (n, G*G, 4): tiles, and the labelled cells of the dense and word terms. A
    data-parallel step sums them over the ranks (:func:`global_denominators`) so that the ranks'
    objectives add up to the one-process objective of the whole batch."""
    import torch

    counts = {"tiles": torch.tensor(float(cls.shape[0]))}
    counts.update({f"word_{k}": (t >= 0).sum().float() for k, t in word_targets(cls).items()})
    if obj is not None:
        counts.update({f"dense_{k}": (obj[..., i] >= 0).sum().float() for i, k in enumerate(DENSE_KINDS)})
    return counts


def at_least_one(totals: dict) -> dict:
    """Denominators clamped to 1 (a kind no cell is labelled with adds a loss of 0, not 0/0);
    applied after summing over ranks, so a rank without a kind does not count one."""
    return {k: v.clamp(min=1.0) for k, v in totals.items()}


def global_denominators(local: dict) -> dict:
    """:func:`denominators` summed over the data-parallel group."""
    import torch
    import torch.distributed as dist

    flat = torch.stack(list(local.values()))
    dist.all_reduce(flat)
    return dict(zip(local, flat))


def projected_tokens(model, pix):
    """(n, 3, S, S) tiles -> (n, G*G, D) projected tokens: what the LLM will read (LLaVA-OV's
    feature layer -1 is the last hidden state before SigLIP's post-layernorm)."""
    hidden = model.model.vision_tower(pix, output_hidden_states=True).hidden_states[-1]
    return model.model.multi_modal_projector(hidden)


def patch_loss(model, head, pix, cls, pos, obj, present=None, counts=None, order=None, words=None, summary=None,
               dense: bool = False, totals: dict | None = None, facts: dict | None = None, order_head=None,
               fact_weight: float = 1.0):
    """Cross-entropy on cell classes, 4 x L1 on content positions, word alignment, with
    ``dense`` the (shape, color) of every object cell, with ``facts`` = {fact: (head, channels)}
    (facts of ``OBJECT_FACTS``) every object cell's place from the left and / or where (obj
    (n, G*G, 4), :func:`cell_objects`; read from the channels of the slice ``channels``; their
    terms scaled by ``fact_weight``), with
    ``summary`` = (mode, head, weight, channels) the scene-summary loss, and with ``order_head``
    too the scene's kinds in order (``order`` (n, MAX_OBJECTS), :func:`order_targets`), read as
    the summary is and weighted alike. Every term is a sum over this batch divided by
    ``totals`` (:func:`denominators`; default this batch's own, i.e. plain means). Returns
    (loss, cell accuracy, position error, summary accuracy or nan, order accuracy or nan, then
    each of ``OBJECT_FACTS``' accuracy or nan), the figures this batch's."""
    import torch.nn.functional as F

    totals = at_least_one(totals or denominators(cls, obj))
    cells = totals["tiles"] * cls.shape[1]
    feats = projected_tokens(model, pix)
    out = head(feats)  # (n, G*G, HEAD_OUT)
    ce = F.cross_entropy(out[..., :N_CLASSES].flatten(0, 1), cls.flatten(), reduction="sum") / cells
    l1_sum = (out[..., N_CLASSES:N_CLASSES + 2].sigmoid() - pos).abs().sum()
    if dense:
        shape_logits, color_logits = out[..., N_CLASSES + 2:].split([len(SHAPES), len(COLOR_NAMES)], -1)
        for logits, target, kind in ((shape_logits, obj[..., 0], "dense_shape"), (color_logits, obj[..., 1], "dense_color")):
            ce = ce + F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-1,
                                      reduction="sum") / totals[kind]
    fact_loss, fact_accs = object_fact_losses(facts or {}, feats, obj, totals)
    align = alignment_loss(model, feats, cls, words, totals) if words else 0.0
    acc = (out[..., :N_CLASSES].argmax(-1) == cls).float().mean()
    extra, s_acc = (summary_loss(feats, present, counts, *summary, tiles=totals["tiles"]) if summary
                    else (0.0, float("nan")))
    in_order, o_acc = 0.0, float("nan")
    if order_head is not None:  # read as the summary is: its mode, weight and channels
        mode, _, weight, channels = summary
        in_order, o_acc = scene_order_loss(feats, order, order_head, mode, weight, channels, totals["tiles"])
    pos_err = l1_sum.item() / cls.numel()
    return (ce + 4.0 * l1_sum / cells + align + extra + in_order + fact_weight * fact_loss, acc.item(), pos_err,
            s_acc, o_acc, *fact_accs)


def object_fact_losses(facts: dict, feats, obj, totals: dict):
    """(summed loss, [accuracy or nan for each of ``OBJECT_FACTS``]) of the facts asked
    (``facts`` = {fact: (head, channel slice)}) of the object tokens in feats (n, G*G, D)."""
    loss, accs = 0.0, []
    for name in OBJECT_FACTS:
        if name not in facts:
            accs.append(float("nan"))
            continue
        head, channels = facts[name]
        part, acc = object_fact_loss(head, feats[..., channels], obj[..., DENSE_KINDS.index(name)],
                                     totals[f"dense_{name}"])
        loss, accs = loss + part, accs + [acc]
    return loss, accs


def object_fact_loss(head, feats, target, total):
    """CE of every object token's fact (target (n, G*G), -1 off objects), a sum over this batch
    divided by ``total``, the labelled cells of the whole step. Returns (loss, the share of this
    batch's labelled cells read right, nan if none)."""
    import torch.nn.functional as F

    logits = head(feats)  # (n, G*G, classes)
    loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-1, reduction="sum")
    on = target >= 0
    acc = (logits.argmax(-1) == target)[on].float().mean().item() if on.any() else float("nan")
    return loss / total, acc


def summary_loss(feats, present, counts, mode: str, head, weight: float = 1.0, channels: int = 0, tiles=None):
    """BCE on kind presence + CE on per-shape counts, from the tokens' mean ("mean") or
    from each token ("token"). feats (n, T, D); present (n, N_KINDS); counts (n, S).
    ``channels`` > 0: the head reads only the first ``channels`` of the D channels, so the
    summary is asked of a channel group and the other channels keep only the per-cell targets.
    ``tiles``: the tile count the means divide by (default n; a data-parallel step's whole
    batch). Returns (loss, share of scenes whose presence bits and counts are all right)."""
    import torch.nn.functional as F

    x, rows = summary_rows(feats, mode, channels, tiles)
    out = head(x)  # (n, T or 1, SUMMARY_OUT)
    pres_logit = out[..., :N_KINDS]
    cnt_logit = out[..., N_KINDS:].unflatten(-1, (len(SHAPES), MAX_SHAPE_COUNT + 1))
    tgt_p = present[:, None].expand_as(pres_logit)
    tgt_c = counts[:, None].expand(cnt_logit.shape[:-1])
    loss = (F.binary_cross_entropy_with_logits(pres_logit, tgt_p, reduction="sum") / N_KINDS
            + F.cross_entropy(cnt_logit.flatten(0, -2), tgt_c.flatten(), reduction="sum") / len(SHAPES)) / rows
    right = ((pres_logit > 0) == (tgt_p > 0.5)).all(-1) & (cnt_logit.argmax(-1) == tgt_c).all(-1)
    return weight * loss, right.float().mean().item()


def summary_rows(feats, mode: str, channels: int = 0, tiles=None):
    """(what a summary head reads: (n, T, D') every token's first ``channels`` channels (0: all),
    or (n, 1, D') their mean with mode "mean"; the count of such rows over ``tiles`` tiles
    (default n), which the summary terms' means divide by)."""
    feats = feats[..., :channels] if channels else feats
    x = feats.mean(1, keepdim=True) if mode == "mean" else feats
    return x, x.shape[1] * (feats.shape[0] if tiles is None else tiles)


def scene_order_loss(feats, order, head, mode: str, weight: float = 1.0, channels: int = 0, tiles=None):
    """CE of the kind at each place from the left (order (n, MAX_OBJECTS), :func:`order_targets`),
    read by ``head`` as the summary is read: from the tokens' mean ("mean") or every token
    ("token"), of the first ``channels`` channels (0: all).
    A mean over tiles x (T or 1) x places. Returns (weight x loss, share of the read rows with
    every place right)."""
    import torch.nn.functional as F

    x, rows = summary_rows(feats, mode, channels, tiles)
    logits = head(x).unflatten(-1, (MAX_OBJECTS, N_KINDS + 1))  # (n, T or 1, places, kinds + none)
    target = order[:, None].expand(logits.shape[:-1])
    loss = F.cross_entropy(logits.flatten(0, -2), target.flatten(), reduction="sum") / MAX_OBJECTS / rows
    right = (logits.argmax(-1) == target).all(-1)
    return weight * loss, right.float().mean().item()


def pretrain_vision(model, processor, seed: int, steps: int, batch_size: int = 48, lr: float = 2e-3,
                    log=print, summary: str = "", dense: bool = False, workers: int = 0,
                    summary_weight: float = 1.0, summary_channels: int = 0, ranks: int = 1,
                    ordinal: bool = False, ordinal_channels: int = 0, where: bool = False,
                    facts_from: int = 0, summary_order: bool = False, fact_weight: float = 1.0) -> float:
    """Train tower + projector for ``steps`` on patch targets (with ``dense``, the object of
    every covered cell too; plus the scene summary when ``summary`` is "mean" or "token");
    returns the final cell accuracy. ``ordinal``: every object token also learns its object's
    place from the left (:func:`ordinal_targets`), read from ``ordinal_channels`` channels (0:
    all); ``where``: and the side of the tile it lies on (:func:`where_targets`, from all
    channels); both heads read from channel ``facts_from`` on, their terms scaled by
    ``fact_weight``. ``summary_weight`` scales the
    summary loss, which reads the first ``summary_channels`` channels (0: all);
    ``summary_order``: those channels also tell the scene's kinds in the caption's order
    (:func:`scene_order_loss`, same weight). ``workers`` processes render the batches; or
    ``ranks`` > 1 forked 1-thread data-parallel ranks each render and train on a share of every
    step's scenes (rendering is a third of a step and single-threaded, so two 1-thread ranks beat
    one 2-thread process: ``results/recipe-cpu/stage1_data_parallel.md``). Either way the
    batches, and so the steps, stay the one-process ones."""
    import torch

    if ranks > 1 and workers:
        raise ValueError("stage 1 takes rendering workers or data-parallel ranks, not both")
    hidden = model.config.text_config.hidden_size
    heads = {"patch": torch.nn.Linear(hidden, HEAD_OUT).to(model.device)}
    if summary:
        heads["summary"] = torch.nn.Linear(summary_channels or hidden, SUMMARY_OUT).to(model.device)
    channels = {"ordinal": fact_channels(facts_from, ordinal_channels), "where": fact_channels(facts_from, 0)}
    asked = {"ordinal": ordinal, "where": where}
    for name in OBJECT_FACTS:  # made after the others, in OBJECT_FACTS' order, so that their
        if asked[name]:  # initial weights stay those of a run without a later one
            width = len(range(hidden)[channels[name]])
            heads[name] = torch.nn.Linear(width, OBJECT_FACTS[name]).to(model.device)
    if summary_order:  # made last, for the same reason
        if not summary:
            raise ValueError("summary_order is read from the summary's channels: it needs a summary mode")
        heads["order"] = torch.nn.Linear(summary_channels or hidden, ORDER_OUT).to(model.device)
    job = dict(seed=seed, steps=steps, batch_size=batch_size, lr=lr, summary=summary, dense=dense,
               workers=workers, summary_weight=summary_weight, summary_channels=summary_channels,
               facts={name: channels[name] for name in OBJECT_FACTS if name in heads}, fact_weight=fact_weight)
    if ranks == 1:
        return stage1_loop(model, processor, heads, job, log)
    from .parallel import fork_ranks, load_state_bytes

    log(f"stage 1 on {ranks} data-parallel ranks of 1 thread, {batch_size} scenes a step split between them")
    state, acc = fork_ranks(_stage1_rank, ranks, model, processor, heads, job, log)
    load_state_bytes(model, state)
    return acc


def fact_channels(start: int, count: int) -> slice:
    """The channels a fact head reads: ``count`` of them from ``start`` (0: all from ``start``)."""
    return slice(start, start + count if count else None)


def stage1_params(model) -> list:
    """What stage 1 trains besides its heads: the tower, the projector, the word embeddings."""
    return (list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())
            + [model.get_input_embeddings().weight])


def stage1_loop(model, processor, heads: dict, job: dict, log, rank: int = 0, ranks: int = 1) -> float:
    """Stage 1's steps on this rank's share of each step's scenes (all of them with one rank)."""
    import torch

    from .parallel import all_reduce_gradients

    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    params, words = stage1_params(model), word_ids(processor.tokenizer)
    trained = params + [p for h in heads.values() for p in h.parameters()]
    opt = torch.optim.AdamW(trained, lr=job["lr"], weight_decay=0.01)
    summary = (job["summary"], heads["summary"], job["summary_weight"], job["summary_channels"]) if job["summary"] else None
    t0, stats, steps = time.time(), [], job["steps"]
    batches = stage1_batches(processor, job["seed"], steps, job["batch_size"], grid, bool(summary),
                             job["workers"], (rank, ranks))
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = job["lr"] * min(1.0, (step + 1) / 50) * 0.5 * (1 + np.cos(np.pi * step / steps))
        batch = [t.to(model.device) for t in next(batches)] + ([] if summary else [None, None, None])
        totals = denominators(batch[1], batch[3])
        totals = global_denominators(totals) if ranks > 1 else totals
        loss, *st = patch_loss(model, heads["patch"], *batch, words=words, dense=job["dense"], summary=summary,
                               totals=totals, facts={n: (heads[n], c) for n, c in job["facts"].items()},
                               order_head=heads.get("order"), fact_weight=job["fact_weight"])
        loss.backward()
        if ranks > 1:
            all_reduce_gradients(trained)
            st = pooled_stats(st, batch[1].shape[0], totals["tiles"])
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        stats.append(st)
        if (step + 1) % 50 == 0:
            acc, err, s_acc, o_acc, *fact_accs = np.mean(stats[-50:], axis=0)
            facts = "".join(f" {FACT_WORDS[n]} acc {a:.3f}" for n, a in zip(OBJECT_FACTS, fact_accs) if n in heads)
            facts = (f" order acc {o_acc:.3f}" if "order" in heads else "") + facts
            log(f"vision pretrain step {step + 1}/{steps} loss {loss.item():.4f} cell acc {acc:.3f} "
                f"pos err {err:.4f} summary acc {s_acc:.3f}{facts} t {time.time() - t0:.0f}s")
    return float(np.mean([st[0] for st in stats[-50:]])) if stats else 0.0


def pooled_stats(stats: list[float], tiles: int, all_tiles) -> list[float]:
    """This rank's (cell accuracy, position error, summary accuracy, order accuracy, fact accuracies), means over its ``tiles``,
    made the whole step's: weighted by tiles and summed over the ranks (nan stays nan)."""
    import torch
    import torch.distributed as dist

    flat = torch.tensor(stats, dtype=torch.float64) * tiles
    dist.all_reduce(flat)
    return (flat / float(all_tiles)).tolist()


def _stage1_rank(rank: int, ranks: int, model, processor, heads, job, log):
    """One data-parallel rank of stage 1; rank 0 returns (state bytes, final cell accuracy)."""
    from .parallel import quiet_log, state_bytes

    acc = stage1_loop(model, processor, heads, job, log if rank == 0 else quiet_log, rank, ranks)
    return None if rank else (state_bytes(model), acc)


_STAGE1: dict = {}


def _one_thread():
    import torch

    torch.set_num_threads(1)  # a forked worker must not use the parent's OpenMP pool


def _stage1_batch(step: int):
    processor, seed, batch_size, grid, crowded, part = _STAGE1["args"]
    rng = np.random.default_rng(np.random.SeedSequence([SPLIT_KEY["train"], seed, step, 2]))
    return vision_batch(processor, rng, batch_size, grid, crowded, part)


def stage1_batches(processor, seed: int, steps: int, batch_size: int, grid: int, crowded: bool, workers: int = 0,
                   part: tuple[int, int] = (0, 1)):
    """The batches of stage-1 steps 0..steps-1 (each a pure function of seed and step; with
    ``part`` = (rank, ranks), that rank's share of each, see :func:`vision_batch`), built in
    this process or by ``workers`` forked processes, in order."""
    import multiprocessing as mp

    _STAGE1["args"] = (processor, seed, batch_size, grid, crowded, part)
    if not workers:
        yield from map(_stage1_batch, range(steps))
        return
    with mp.get_context("fork").Pool(workers, initializer=_one_thread) as pool:
        yield from pool.imap(_stage1_batch, range(steps), chunksize=4)


def rescale_projector(model, processor, seed: int, target_norm: float = 1.0, n: int = 32) -> float:
    """Scale the projector's output layer so visual tokens have mean L2 norm ``target_norm``.

    The alignment term grows the projected features to norms of 20-40, against about
    0.3 for the word embeddings. Tokens that large are nearly frozen in the language
    model's residual stream (each layer adds an O(1) update), so the LM could not
    write question information into them. One linear rescale keeps every direction.
    Returns the factor applied.
    """
    import torch

    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    rng = np.random.default_rng(np.random.SeedSequence([SPLIT_KEY["train"], seed, 3]))
    pix = vision_batch(processor, rng, n, grid)[0].to(model.device)
    proj = model.model.multi_modal_projector
    with torch.no_grad():
        factor = target_norm / projected_tokens(model, pix).norm(dim=-1).mean().item()
        proj.linear_2.weight.mul_(factor)
        if proj.linear_2.bias is not None:
            proj.linear_2.bias.mul_(factor)
    return factor
