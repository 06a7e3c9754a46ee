"""Apply the ship rules of this folder's README to a candidate run (twelfth session).

Usage: python results/recipe-cpu/summary_tower/gates.py CANDIDATE_EVAL_JSON CANDIDATE_FIDELITY_JSON [CANDIDATE_CAPTIONS_JSON [CANDIDATE_BLANK_JSON]]
Compares against run 13: its seed-15 n=1800 evaluation in this folder and its n=900 sweep in
results/fidelity/run13_fidelity.json. Prints each gate's figures and verdict. From run 32 on
(twentieth session), with run 31 shipped, a candidate must also be nearer issue 3's bars than
run 31 (summed shortfall) and keep its seed-method mean within 2 points of run 31's.
From run 26 on (seventeenth session) captions are judged on the caption set, 600 caption-only
samples of seed 15 (`N=600 OUT=... caption_failures.py`), against run 13's captions600_run13.json;
the eval's 200 captions are printed but no longer gated (their standard error is about 0.035).
From run 34 on (twenty-first session) the comparison with run 31 is the summed distance D to
issue 3's and issue 4's bars (`distance`), with a 5-point floor per seed method at 0.25 and
issue 3's blank bar (seed 0's 450 blanked, the fourth argument).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from mmaccel.bench.fidelity import kept_share

HERE = Path(__file__).parent
SEED_METHODS = ("aim", "hired", "stc", "mustdrop")
BARS = {"image_questions": 0.95, "video": 0.90, "caption": 0.80}


def full_token(path: str) -> dict:
    return {k: v["accuracy"] for k, v in json.loads(Path(path).read_text())["aggregates"].items()}


def kept(path: str) -> dict:
    """(method, retention) -> share of full accuracy kept ('all' aggregate)."""
    d = json.loads(Path(path).read_text())
    return {(p["method"], p["retention"]): kept_share(d, p) for p in d["points"]}


def gate1(cand: dict, ref: dict) -> bool:
    ok = cand["all"] >= ref["all"] - 0.01 and all(cand[k] >= ref[k] - 0.03 for k in BARS)
    print("gate 1:", {k: (round(ref[k], 3), round(cand[k], 3)) for k in ("all", *BARS)}, "->", ok)
    return ok


def seed_mean(k: dict) -> float:
    return sum(k[(m, r)] for m in SEED_METHODS for r in (0.25, 0.11)) / (2 * len(SEED_METHODS))


def caption_set(path: str) -> float:
    return json.loads(Path(path).read_text())["accuracy"]


def with_caption_set(acc: dict, path) -> dict:
    """``acc`` with its caption score replaced by the caption set's (600 captions, run 26 on)."""
    return {**acc, "caption": caption_set(path)}


def main(cand_eval: str, cand_fid: str, cand_captions: str | None = None,
         cand_blank: str | None = None) -> None:
    ref, cand = full_token(HERE / "eval_seed15_n1800_run13.json"), full_token(cand_eval)
    if cand_captions:
        print("captions of the eval (not gated):", round(ref["caption"], 3), round(cand["caption"], 3))
        ref, cand = with_caption_set(ref, HERE / "captions600_run13.json"), with_caption_set(cand, cand_captions)
    g1 = gate1(cand, ref)
    kr, kc = kept("results/fidelity/run13_fidelity.json"), kept(cand_fid)
    drop = {m: round(kc[(m, 0.25)] - kr[(m, 0.25)], 3) for m in SEED_METHODS}
    mr, mc = seed_mean(kr), seed_mean(kc)
    print(f"seed-method mean kept: run 13 {mr:.3f}, candidate {mc:.3f}; change at 0.25: {drop}")
    gate_a = mc >= mr + 0.02 and min(drop.values()) >= -0.05
    bars = lambda a: sum(a[k] >= v for k, v in BARS.items())  # noqa: E731
    gate_b = (bars(cand) > bars(ref) and cand["all"] >= ref["all"] + 0.02 and mc >= mr - 0.03
              and min(drop.values()) >= -0.10)
    print(f"issue-3 bars met: run 13 {bars(ref)}, candidate {bars(cand)}")
    print(f"A: {gate_a}  B: {gate_b}  -> passes the run-13 gates: {g1 and (gate_a or gate_b)}")
    if cand_captions:
        nearer = beats_shipped(cand, mc)
        print(f"-> ships by the rule of runs 32-33: {g1 and (gate_a or gate_b) and nearer}")
    if cand_blank:
        rule34 = run34_rule(cand, kc, cand_blank)  # printed whatever the run-13 gates say
        print(f"-> ships by the rule of run 34: {g1 and (gate_a or gate_b) and rule34}")


def shortfall(acc: dict) -> float:
    """Summed distance below issue 3's bars (0 when all are met)."""
    return sum(max(0.0, bar - acc[k]) for k, bar in BARS.items())


def shipped() -> tuple[dict, dict]:
    """Run 31's (shipped) full-token scores, caption set substituted, and its sweep's kept shares:
    the sweep made with aim's and mustdrop's official cut layers (twenty-third session), which is
    how every candidate from then on is swept; `fidelity_run31/` is the sweep before that fix,
    the reference of runs 34-37 (`RUN31_SWEEP=fidelity_run31` reproduces their gates). From the
    thirty-first session mustdrop's tower weighs merged windows by size (proportional attention),
    so the reference is run 31's sweep with that code, `fidelity_run31_proportional/`;
    `RUN31_SWEEP=fidelity_run31_official_layers` reproduces the gates printed before it (runs to 41).
    From the thirty-second session aim's merged tokens weigh log(size) in the LLM (its
    proportional attention), so the reference is `fidelity_run31_llm_proportional/`, and
    `RUN31_SWEEP=fidelity_run31_proportional` reproduces the thirty-first session's."""
    ship = with_caption_set(full_token(HERE / "eval_seed15_n1800_run31.json"), HERE / "captions600_run31.json")
    return ship, kept(HERE / os.environ.get("RUN31_SWEEP", "fidelity_run31_llm_proportional") / "fidelity.json")


def beats_shipped(cand: dict, cand_mean: float) -> bool:
    """Run 32's rule: nearer the bars than run 31 (shipped), mean kept at most 2 points under."""
    ship, ship_kept = shipped()
    ship_mean = seed_mean(ship_kept)
    ok = shortfall(cand) < shortfall(ship) and cand_mean >= ship_mean - 0.02
    print(f"vs run 31: shortfall {shortfall(ship):.3f} -> {shortfall(cand):.3f}; "
          f"mean kept {ship_mean:.3f} -> {cand_mean:.3f} -> {ok}")
    return ok


def fidelity_shortfall(k: dict) -> float:
    """Issue 4's distance: the seed methods' mean shortfall below 97% kept at 0.25, plus the best
    method's shortfall below 95% kept at 0.11 (``random`` is not a method here)."""
    at25 = sum(max(0.0, 0.97 - k[(m, 0.25)]) for m in SEED_METHODS) / len(SEED_METHODS)
    best11 = max(v for (m, r), v in k.items() if r == 0.11 and m != "random")
    return at25 + max(0.0, 0.95 - best11)


def distance(acc: dict, k: dict) -> float:
    """D of run 34's rule: summed distance to issue 3's and issue 4's bars."""
    return shortfall(acc) + fidelity_shortfall(k)


def blank_ok(path: str) -> bool:
    """Issue 3's blank bar: accuracy with the media blanked at most chance + 10 points."""
    agg = json.loads(Path(path).read_text())["aggregates"]["all"]
    ok = agg["accuracy"] <= agg["chance"] + 0.10
    print(f"blanked: {agg['accuracy']:.3f} (chance {agg['chance']:.3f}) -> {ok}")
    return ok


def run34_rule(cand: dict, cand_kept: dict, cand_blank: str) -> bool:
    """Run 34's rule: D under run 31's, no seed method 5+ points under run 31's kept at 0.25, blank bar."""
    ship, ship_kept = shipped()
    d_ship, d_cand = distance(ship, ship_kept), distance(cand, cand_kept)
    drops = {m: round(cand_kept[(m, 0.25)] - ship_kept[(m, 0.25)], 3) for m in SEED_METHODS}
    floor = min(drops.values()) > -0.05
    print(f"vs run 31: D {d_ship:.3f} (issue 3 {shortfall(ship):.3f} + issue 4 {fidelity_shortfall(ship_kept):.3f})"
          f" -> {d_cand:.3f} (issue 3 {shortfall(cand):.3f} + issue 4 {fidelity_shortfall(cand_kept):.3f});"
          f" change at 0.25: {drops} -> D {d_cand < d_ship}, floor {floor}")
    return d_cand < d_ship and floor and blank_ok(cand_blank)


if __name__ == "__main__":
    main(*sys.argv[1:5])
