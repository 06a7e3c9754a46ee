"""Apply the ship rules of this folder's README to a candidate run (twelfth session).

Usage: python results/recipe-cpu/summary_tower/gates.py CANDIDATE_EVAL_JSON CANDIDATE_FIDELITY_JSON [CANDIDATE_CAPTIONS_JSON]
Compares against run 13: its seed-15 n=1800 evaluation in this folder and its n=900 sweep in
results/fidelity/run13_fidelity.json. Prints each gate's figures and verdict. From run 32 on
(twentieth session), with run 31 shipped, a candidate must also be nearer issue 3's bars than
run 31 (summed shortfall) and keep its seed-method mean within 2 points of run 31's.
From run 26 on (seventeenth session) captions are judged on the caption set, 600 caption-only
samples of seed 15 (`N=600 OUT=... caption_failures.py`), against run 13's captions600_run13.json;
the eval's 200 captions are printed but no longer gated (their standard error is about 0.035).
"""
from __future__ import annotations

import json
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


def main(cand_eval: str, cand_fid: str, cand_captions: str | None = None) -> None:
    ref, cand = full_token(HERE / "eval_seed15_n1800_run13.json"), full_token(cand_eval)
    if cand_captions:
        print("captions of the eval (not gated):", round(ref["caption"], 3), round(cand["caption"], 3))
        ref["caption"], cand["caption"] = caption_set(HERE / "captions600_run13.json"), caption_set(cand_captions)
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
        print(f"-> ships: {g1 and (gate_a or gate_b) and nearer}")


def shortfall(acc: dict) -> float:
    """Summed distance below issue 3's bars (0 when all are met)."""
    return sum(max(0.0, bar - acc[k]) for k, bar in BARS.items())


def beats_shipped(cand: dict, cand_mean: float) -> bool:
    """Run 32's rule: nearer the bars than run 31 (shipped), mean kept at most 2 points under."""
    ship = full_token(HERE / "eval_seed15_n1800_run31.json")
    ship["caption"] = caption_set(HERE / "captions600_run31.json")
    ship_mean = seed_mean(kept(HERE / "fidelity_run31" / "fidelity.json"))
    ok = shortfall(cand) < shortfall(ship) and cand_mean >= ship_mean - 0.02
    print(f"vs run 31: shortfall {shortfall(ship):.3f} -> {shortfall(cand):.3f}; "
          f"mean kept {ship_mean:.3f} -> {cand_mean:.3f} -> {ok}")
    return ok


if __name__ == "__main__":
    main(*sys.argv[1:4])
