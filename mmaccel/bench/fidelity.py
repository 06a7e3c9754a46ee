"""The fidelity benchmark: what an acceleration costs in answers, on the embedded world.

For a method and retention it reports accuracy per question family, answer agreement with
the unaccelerated model, the mean KL(p_base || p_accel) of the first answer token, visual
tokens per LLM layer (mean per sample), the analytic prefill FLOP ratio, and wall time.
A sweep over methods x retentions writes a Markdown table, a PNG plot and one JSON file.
"""
from __future__ import annotations

import json
import platform
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..config import parse_method_spec
from ..machine import machine_line


@dataclass
class RunResult:
    """Answers, first-token log-probabilities and cost of one evaluation pass."""

    answers: list[str]
    first_logprobs: list  # per sample: (V,) float32 tensor
    visual_tokens_in: int = 0
    visual_tokens_per_layer: list[int] = field(default_factory=list)
    prefill_flops: float = 0.0
    prefill_flops_full: float = 0.0
    seconds: float = 0.0


def run_samples(model, processor, samples, batch_size: int = 16, max_new_tokens: int = 32, handle=None) -> RunResult:
    """Greedy answers of ``samples``, batched like the model's evaluation (same media shape per batch)."""
    from ..embedded.evaluate import group_key

    groups = defaultdict(list)
    for i, s in enumerate(samples):
        groups[group_key(s)].append(i)
    res = RunResult([""] * len(samples), [None] * len(samples))
    start = time.perf_counter()
    for idx in groups.values():
        for k in range(0, len(idx), batch_size):
            chunk = idx[k:k + batch_size]
            _run_batch(model, processor, [samples[i] for i in chunk], chunk, res, max_new_tokens, handle)
    res.seconds = time.perf_counter() - start
    return res


def _run_batch(model, processor, batch, chunk, res: RunResult, max_new_tokens, handle) -> None:
    import torch

    from ..embedded.data import encode_prompts

    inputs = encode_prompts(processor, batch).to(model.device)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    texts = processor.batch_decode(out.sequences[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    first = torch.log_softmax(out.logits[0].float(), dim=-1)
    for j, i in enumerate(chunk):
        res.answers[i] = texts[j].strip()
        res.first_logprobs[i] = first[j]
    if handle is not None:
        _add_stats(res, handle.stats)


def _add_stats(res: RunResult, stats) -> None:
    res.visual_tokens_in += stats.visual_tokens_in
    layers = stats.visual_tokens_per_layer
    res.visual_tokens_per_layer = [a + b for a, b in zip(res.visual_tokens_per_layer, layers)] or list(layers)
    res.prefill_flops += stats.prefill_flops
    res.prefill_flops_full += stats.prefill_flops_full


def first_word_accuracy(samples, answers: list[str]) -> float:
    """Share of answers whose first word is the gold answer's first word: it separates a wrong
    answer from a right one the model failed to end (a run-on 'red red red')."""
    first = lambda text: (text.split() or [""])[0]  # noqa: E731
    return sum(first(a) == first(s.answer) for s, a in zip(samples, answers)) / max(1, len(samples))


def correctness(samples, answers: list[str]) -> list[int]:
    """Per sample, 1 where the answer is exactly the gold answer (the accuracy's own test)."""
    return [int(a == s.answer) for s, a in zip(samples, answers)]


CAPTION_ERRORS = ("fewer objects", "more objects", "same count, wrong")


def objects_listed(caption: str) -> int:
    """Objects a caption lists: "a red circle, a blue square and a yellow triangle" -> 3."""
    return caption.count(",") + caption.count(" and ") + 1


def caption_errors(samples, answers: list[str]) -> dict:
    """The caption samples' wrong answers by kind: fewer or more objects listed than the gold
    caption, or as many with a wrong colour, shape or order. A reduction that drops an object's
    tokens shows as fewer; one that makes the model see an object twice, as more.
    Returns {"n": captions, "right": ..., kind: count for each of CAPTION_ERRORS}."""
    out = {"n": 0, "right": 0, **dict.fromkeys(CAPTION_ERRORS, 0)}
    for sample, answer in zip(samples, answers):
        if sample.family != "caption":
            continue
        out["n"] += 1
        gold, said = objects_listed(sample.answer), objects_listed(answer)
        kind = ("right" if answer == sample.answer else CAPTION_ERRORS[0] if said < gold
                else CAPTION_ERRORS[1] if said > gold else CAPTION_ERRORS[2])
        out[kind] += 1
    return out


def compare(samples, base: RunResult, run: RunResult) -> dict:
    """Accuracy per family, agreement with the baseline and mean first-token KL."""
    import torch

    from ..embedded.evaluate import summarize

    summary = summarize(samples, run.answers)
    agree = sum(a == b for a, b in zip(base.answers, run.answers)) / len(samples)
    kls = [torch.sum(p.exp() * (p - q)).item() for p, q in zip(base.first_logprobs, run.first_logprobs)]
    n = len(samples)
    return {
        "families": {f: r["accuracy"] for f, r in summary["families"].items()},
        "aggregates": {k: r["accuracy"] for k, r in summary["aggregates"].items()},
        "subsets": {k: r["accuracy"] for k, r in summary["subsets"].items()},
        "first_word": first_word_accuracy(samples, run.answers),
        "correct": correctness(samples, run.answers),
        "caption_errors": caption_errors(samples, run.answers),
        "agreement": agree,
        "first_token_kl": sum(kls) / n,
        "visual_tokens_in_per_sample": run.visual_tokens_in / n,
        "visual_tokens_per_layer_per_sample": [v / n for v in run.visual_tokens_per_layer],
        "flop_ratio": run.prefill_flops_full / run.prefill_flops if run.prefill_flops else 1.0,
        "seconds": run.seconds,
        "baseline_seconds": base.seconds,
    }


def evaluate(model, processor, samples, method: str, retention: float | None, base: RunResult,
             batch_size: int = 16) -> dict:
    """One (method, retention) point against a precomputed baseline; ``method`` is a
    :func:`parse_method_spec` spec."""
    from ..api import accelerate_vlm

    name, params = parse_method_spec(method)
    with accelerate_vlm(model, method=name, retention=retention, **params) as handle:
        run = run_samples(model, processor, samples, batch_size, handle=handle)
    return {"method": method, "retention": retention, **compare(samples, base, run)}


def environment() -> dict:
    import torch
    import transformers

    return {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cpu": machine_line(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": torch.get_num_threads(),
            "device": "cpu", "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def sweep(model, processor, samples, methods: list[str], retentions: list[float], batch_size: int = 16,
          progress=None) -> dict:
    """All (method, retention) points plus the baseline's own accuracy."""
    from ..embedded.evaluate import summarize

    run_samples(model, processor, samples[: min(len(samples), 4)], batch_size)  # warm-up, not timed
    base = run_samples(model, processor, samples, batch_size)
    summary = summarize(samples, base.answers)
    out = {"environment": environment(), "n": len(samples), "points": [],
           "baseline": {"families": {f: r["accuracy"] for f, r in summary["families"].items()},
                        "aggregates": {k: r["accuracy"] for k, r in summary["aggregates"].items()},
                        "subsets": {k: r["accuracy"] for k, r in summary["subsets"].items()},
                        "subset_n": {k: r["n"] for k, r in summary["subsets"].items()},
                        "first_word": first_word_accuracy(samples, base.answers),
                        "correct": correctness(samples, base.answers),
                        "caption_errors": caption_errors(samples, base.answers),
                        "seconds": base.seconds}}
    for method in methods:
        for retention in retentions:
            point = evaluate(model, processor, samples, method, retention, base, batch_size)
            out["points"].append(point)
            if progress:
                progress(point)
    return out


def markdown_table(result: dict) -> str:
    """One row per (method, retention): accuracy (and its share of the baseline's), the
    small-object and counting subsets, agreement, KL, tokens, FLOP ratio, time."""
    fams = list(result["baseline"]["families"])
    subs = list(result["baseline"].get("subsets", {}))
    head = ["method", "retention", "all", "kept", "kept 95% CI", "1st word", *fams, *subs, "agree", "KL",
            "vis tok/sample (last layer)", "FLOP x", "s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = result["baseline"]
    lines.append("| " + " | ".join(["baseline", "1.0", f"{base['aggregates']['all']:.3f}", "1.000", "",
                                     f"{base.get('first_word', float('nan')):.3f}",
                                     *[f"{base['families'][f]:.3f}" for f in fams],
                                     *[f"{base['subsets'][k]:.3f}" for k in subs], "1.000", "0", "", "1.00",
                                     f"{base['seconds']:.1f}"]) + " |")
    for p in result["points"]:
        vis = p["visual_tokens_per_layer_per_sample"]
        row = [p["method"], str(p["retention"]), f"{p['aggregates']['all']:.3f}", f"{kept_share(result, p):.3f}",
               _interval_text(kept_interval(result, p)),
               f"{p.get('first_word', float('nan')):.3f}",
               *[f"{p['families'].get(f, float('nan')):.3f}" for f in fams],
               *[f"{p.get('subsets', {}).get(k, float('nan')):.3f}" for k in subs], f"{p['agreement']:.3f}",
               f"{p['first_token_kl']:.4f}", f"{vis[-1]:.1f}" if vis else "", f"{p['flop_ratio']:.2f}",
               f"{p['seconds']:.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def kept_share(result: dict, point: dict) -> float:
    """The point's overall accuracy as a share of the unaccelerated model's."""
    base = result["baseline"]["aggregates"]["all"]
    return point["aggregates"]["all"] / base if base else float("nan")


def kept_interval(result: dict, point: dict, draws: int = 2000, seed: int = 0) -> tuple[float, float] | None:
    """95% paired bootstrap interval of the kept share: the same resampled questions for the
    point and the baseline, ``draws`` times (seeded). None for a sweep saved without per-sample
    results."""
    import torch

    if "correct" not in point or "correct" not in result["baseline"]:
        return None
    ours = torch.tensor(point["correct"], dtype=torch.float64)
    base = torch.tensor(result["baseline"]["correct"], dtype=torch.float64)
    picks = torch.randint(0, ours.numel(), (draws, ours.numel()), generator=torch.Generator().manual_seed(seed))
    shares = ours[picks].sum(1) / base[picks].sum(1).clamp(min=1)
    low, high = torch.quantile(shares, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return low, high


def _interval_text(interval) -> str:
    return "" if interval is None else f"{interval[0]:.3f}-{interval[1]:.3f}"


def versus_random(result: dict, retention: float) -> list[str]:
    """Lines saying, per method at ``retention``, its kept share and whether it beats
    ``random`` on each subset (small objects, counting)."""
    pts = {p["method"]: p for p in result["points"] if p["retention"] == retention}
    rnd = pts.get("random")
    lines = []
    for name, p in pts.items():
        interval = kept_interval(result, p)
        txt = f"- `{name}` at {retention}: keeps {kept_share(result, p):.1%} of full accuracy"
        if interval is not None:
            txt += f" (95% CI {interval[0]:.1%}-{interval[1]:.1%})"
        if rnd is not None and name != "random":
            for k, acc in p.get("subsets", {}).items():
                r = rnd["subsets"].get(k, float("nan"))
                txt += f"; {k} {acc:.3f} vs random {r:.3f} ({'beats' if acc > r else 'does not beat'})"
        lines.append(txt)
    return lines


def caption_error_lines(result: dict) -> list[str]:
    """A Markdown table of the wrong captions by kind, per point (the baseline first); empty for
    a sweep saved before the kinds were recorded or without caption samples."""
    rows = [("baseline", 1.0, result["baseline"])] + [(p["method"], p["retention"], p) for p in result["points"]]
    rows = [(m, r, p["caption_errors"]) for m, r, p in rows if p.get("caption_errors", {}).get("n")]
    if not rows:
        return []
    lines = ["", f"## Wrong captions by kind (of {rows[0][2]['n']} captions)", "",
             "| method | retention | right | " + " | ".join(CAPTION_ERRORS) + " |", "|---" * (3 + len(CAPTION_ERRORS)) + "|"]
    lines += [f"| {m} | {r} | {e['right']} | " + " | ".join(str(e[k]) for k in CAPTION_ERRORS) + " |" for m, r, e in rows]
    return lines


def cost_curve(result: dict, method: str) -> list[tuple[float, float]]:
    """[(prefill FLOP share of the full model, accuracy)] of ``method``'s points, cheapest first,
    with the unreduced model at share 1.0."""
    pts = {1.0: result["baseline"]["aggregates"]["all"]}
    for p in result["points"]:
        if p["method"] == method and p["flop_ratio"] > 1.0:
            pts[1.0 / p["flop_ratio"]] = p["aggregates"]["all"]
    return sorted(pts.items())


def accuracy_at_cost(curve: list[tuple[float, float]], share: float) -> float | None:
    """Accuracy at prefill FLOP share ``share``, linear between the two measured points around
    it; None when the method's cheapest point costs more (never extrapolated)."""
    for (s0, a0), (s1, a1) in zip(curve, curve[1:]):
        if s0 <= share <= s1:
            return a0 if s1 == s0 else a0 + (a1 - a0) * (share - s0) / (s1 - s0)
    return curve[0][1] if curve and abs(curve[0][0] - share) < 1e-12 else None


def equal_cost(result: dict, reference: str = "random") -> list[str]:
    """Markdown lines comparing every method at the prefill cost ``reference`` pays at each of
    its retentions (a one-step pre-LLM method: the cost the retention buys), since methods
    that prune inside the LLM or also merge pay more or less than that at the same retention."""
    targets = sorted((1.0 / p["flop_ratio"], p["retention"]) for p in result["points"]
                     if p["method"] == reference and p["flop_ratio"] > 1.0)
    base = result["baseline"]["aggregates"]["all"]
    curves = {m: cost_curve(result, m) for m in sorted({p["method"] for p in result["points"]})}
    lines = []
    for share, retention in targets:
        lines += ["", f"## At equal cost: {share:.1%} of the full prefill FLOPs (`{reference}`'s cost at "
                      f"retention {retention})"]
        for method, curve in curves.items():
            acc = accuracy_at_cost(curve, share)
            kept = f"{acc / base:.1%}" if acc is not None and base else "n/a"
            lines.append(f"- `{method}`: not measured this cheap (its cheapest point costs {curve[0][0]:.1%})"
                         if acc is None else f"- `{method}`: {acc:.3f}, keeps {kept} of full accuracy")
    return lines


def line_styles(methods: list[str]) -> dict[str, dict]:
    """Matplotlib styles per method spec: one colour per method, its knob variants
    (``aim:pass_fraction=0.25``) in that colour, dashed, with square markers, so a sweep of more
    specs than the palette has colours never gives two methods one colour."""
    from matplotlib import colormaps

    bases = sorted({m.split(":")[0] for m in methods})
    palette = colormaps["tab10" if len(bases) <= 10 else "tab20"]
    colour = {b: palette(i % palette.N) for i, b in enumerate(bases)}
    return {m: {"color": colour[m.split(":")[0]], "linestyle": "--" if ":" in m else "-",
                "marker": "s" if ":" in m else "o"} for m in methods}


def plot(result: dict, path: Path) -> None:
    """Accuracy (all families) vs retention and vs prefill FLOP share, one line per method,
    the unreduced model dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_retention, by_cost) = plt.subplots(1, 2, figsize=(11, 4), dpi=120, sharey=True)
    by_method = defaultdict(list)
    for p in result["points"]:
        by_method[p["method"]].append((p["retention"], p["aggregates"]["all"]))
    styles = line_styles(list(by_method))
    for method, pts in sorted(by_method.items()):
        pts.sort()
        by_retention.plot([r for r, _ in pts], [a for _, a in pts], label=method, **styles[method])
        curve = cost_curve(result, method)
        by_cost.plot([s for s, _ in curve], [a for _, a in curve], **styles[method])
    for ax in (by_retention, by_cost):
        ax.axhline(result["baseline"]["aggregates"]["all"], color="gray", linestyle="--",
                   label="no reduction" if ax is by_retention else None)
        ax.grid(alpha=0.3)
    by_retention.set_xlabel("retention (fraction of visual tokens kept)")
    by_cost.set_xlabel("prefill FLOPs (share of the unreduced model)")
    by_retention.set_ylabel("exact-match accuracy (all families)")
    fig.suptitle(f"Fidelity on the embedded world (n={result['n']})")
    by_retention.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_sweep(result: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "fidelity.json", "md": out_dir / "fidelity.md", "png": out_dir / "fidelity.png"}
    paths["json"].write_text(json.dumps(result, indent=2))
    env = result["environment"]
    note = (f"Machine: {env.get('cpu', env['processor'])}, {env['threads']} threads, torch {env['torch']}, "
            f"transformers {env['transformers']}, {env['date']}. n={result['n']} held-out samples.\n\n")
    summary = [line for r in sorted({p["retention"] for p in result["points"]}) if r < 1.0
               for line in ["", f"## Retention {r}", *versus_random(result, r)]]
    summary += caption_error_lines(result) + equal_cost(result)
    paths["md"].write_text("# Fidelity sweep\n\n" + note + markdown_table(result) + "\n" + "\n".join(summary) + "\n")
    plot(result, paths["png"])
    return paths
