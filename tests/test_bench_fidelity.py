"""The fidelity benchmark on a freshly built (untrained) world model: the plumbing, not accuracy."""
import json

import pytest
import torch
from typer.testing import CliRunner

from mmaccel.bench.fidelity import (CAPTION_ERRORS, RunResult, accuracy_at_cost, compare, cost_curve, equal_cost, kept_interval,
                                    kept_share, markdown_table)
from mmaccel.cli import app
from mmaccel.machine import machine_line


@pytest.fixture(scope="module")
def world_model_dir(tmp_path_factory):
    from mmaccel.embedded.build import build_model, build_processor, build_tokenizer

    path = tmp_path_factory.mktemp("world_model")
    tok = build_tokenizer()
    build_model(tok, seed=0).save_pretrained(path)
    build_processor(tok).save_pretrained(path)
    return path


def test_compare_metrics_by_hand():
    from mmaccel.world.samples import generate_samples

    samples = generate_samples(4, seed=0, split="test")
    p = torch.log_softmax(torch.tensor([[2.0, 0.0], [0.0, 0.0], [1.0, 1.0], [0.0, 3.0]]), -1)
    q = torch.log_softmax(torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 3.0]]), -1)
    gold = [s.answer for s in samples]
    base = RunResult(gold, list(p), seconds=1.0)
    run_on = gold[0] + " " + gold[0] + " " + gold[0]  # right first word, never ended
    run = RunResult([run_on] + gold[1:3] + ["wrong"], list(q), visual_tokens_in=40,
                    visual_tokens_per_layer=[40, 20], prefill_flops=1.0, prefill_flops_full=3.0, seconds=0.5)
    res = compare(samples, base, run)
    assert res["first_word"] == 0.75 and res["aggregates"]["all"] == 0.5 and res["agreement"] == 0.5
    assert res["correct"] == [0, 1, 1, 0]  # the run-on answer is wrong, as in the accuracy
    run = RunResult(gold[:3] + ["wrong"], list(q), visual_tokens_in=40, visual_tokens_per_layer=[40, 20],
                    prefill_flops=1.0, prefill_flops_full=3.0, seconds=0.5)
    res = compare(samples, base, run)
    expected_kl = float(torch.sum(p[1].exp() * (p[1] - q[1]))) / 4
    assert res["agreement"] == 0.75 and res["aggregates"]["all"] == 0.75
    assert res["first_token_kl"] == pytest.approx(expected_kl)
    assert res["visual_tokens_per_layer_per_sample"] == [10, 5] and res["flop_ratio"] == 3.0


def test_caption_errors_by_kind_by_hand():
    from dataclasses import replace

    from mmaccel.bench.fidelity import caption_errors, caption_error_lines, objects_listed
    from mmaccel.world.samples import generate_samples

    cap = generate_samples(1, seed=0, split="test", families=["caption"])[0]
    gold = "a red circle, a blue square and a yellow triangle"
    caps = [replace(cap, answer=gold)] * 4
    other = generate_samples(1, seed=0, split="test", families=["color"])[0]
    answers = [gold, "a red circle and a blue square",  # right; one object lost
               "a red circle, a blue square, a blue square and a yellow triangle",  # one seen twice
               "a red circle, a green square and a yellow triangle", "no"]  # a wrong colour; not a caption
    assert objects_listed(gold) == 3 and objects_listed("a red circle") == 1
    errors = caption_errors(caps + [other], answers)
    assert errors == {"n": 4, "right": 1, "fewer objects": 1, "more objects": 1, "same count, wrong": 1}
    table = caption_error_lines({"baseline": {"caption_errors": errors}, "points": [{"method": "aim", "retention": 0.25}]})
    assert table[1] == "## Wrong captions by kind (of 4 captions)" and table[-1] == "| baseline | 1.0 | 1 | 1 | 1 | 1 |"


def test_kept_interval_is_a_paired_bootstrap_of_the_kept_share():
    base = [1] * 80 + [0] * 20
    result = {"baseline": {"aggregates": {"all": 0.8}, "correct": base}, "points": []}
    same = {"aggregates": {"all": 0.8}, "correct": list(base)}
    assert kept_interval(result, same) == (1.0, 1.0)  # the same questions right: no doubt at all
    assert kept_interval(result, {"aggregates": {"all": 0.0}, "correct": [0] * 100}) == (0.0, 0.0)
    half = {"aggregates": {"all": 0.4}, "correct": [1, 0] * 40 + [0] * 20}  # half of the baseline's hits
    low, high = kept_interval(result, half)
    assert low < kept_share(result, half) == 0.5 < high and high - low < 0.4
    assert kept_interval(result, half) == (low, high)  # seeded
    assert kept_interval(result, {"aggregates": {"all": 0.4}}) is None  # a sweep saved before per-sample results


def _point(method, retention, acc, flop_ratio):
    return {"method": method, "retention": retention, "aggregates": {"all": acc}, "flop_ratio": flop_ratio}


def test_equal_cost_interpolates_between_measured_points_and_never_extrapolates():
    result = {"baseline": {"aggregates": {"all": 0.8}},
              "points": [_point("random", 1.0, 0.8, 1.0), _point("random", 0.25, 0.4, 4.0),
                         _point("deep", 0.25, 0.7, 2.0), _point("deep", 0.11, 0.6, 2.5),
                         _point("cheap", 0.5, 0.6, 2.0), _point("cheap", 0.25, 0.5, 5.0)]}
    assert cost_curve(result, "deep") == [(0.4, 0.6), (0.5, 0.7), (1.0, 0.8)]
    assert accuracy_at_cost(cost_curve(result, "cheap"), 0.25) == pytest.approx(0.5 + 0.1 * 0.05 / 0.3)
    assert accuracy_at_cost(cost_curve(result, "deep"), 0.25) is None  # cheapest point costs 40%
    assert accuracy_at_cost(cost_curve(result, "random"), 0.25) == pytest.approx(0.4)
    lines = equal_cost(result)
    assert lines[1].startswith("## At equal cost: 25.0% of the full prefill FLOPs") and "retention 0.25" in lines[1]
    assert "- `deep`: not measured this cheap (its cheapest point costs 40.0%)" in lines
    assert "- `random`: 0.400, keeps 50.0% of full accuracy" in lines


def test_cli_sweep_writes_table_plot_and_json(world_model_dir, tmp_path):
    out = tmp_path / "sweep"
    res = CliRunner().invoke(app, ["bench", "fidelity", "--model", str(world_model_dir), "--n", "8", "--sweep",
                                   "--methods", "pool,fastv,random", "--retentions", "1.0,0.25", "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "fidelity.json").read_text())
    points = {(p["method"], p["retention"]): p for p in data["points"]}
    assert set(points) == {(m, r) for m in ("pool", "fastv", "random") for r in (1.0, 0.25)}
    for method in ("pool", "fastv"):  # full retention is exact: same answers, zero KL
        assert points[(method, 1.0)]["agreement"] == 1.0 and points[(method, 1.0)]["first_token_kl"] < 1e-9
        assert points[(method, 0.25)]["flop_ratio"] > 1.2
        full, quarter = (points[(method, r)]["visual_tokens_per_layer_per_sample"][-1] for r in (1.0, 0.25))
        assert quarter < 0.4 * full
    assert (out / "fidelity.png").read_bytes()[:4] == b"\x89PNG"
    assert all(len(p["correct"]) == 8 for p in data["points"]) and len(data["baseline"]["correct"]) == 8
    table = (out / "fidelity.md").read_text()
    assert "kept 95% CI" in table.splitlines()[4]
    cost = 1.0 / points[("random", 0.25)]["flop_ratio"]
    assert "| pool | 0.25 |" in table and f"## At equal cost: {cost:.1%} of the full prefill FLOPs" in table
    errors = points[("pool", 0.25)]["caption_errors"]
    assert errors["n"] >= 1 and sum(errors[k] for k in ("right", *CAPTION_ERRORS)) == errors["n"]
    assert "## Wrong captions by kind" in table and data["baseline"]["caption_errors"]["n"] == errors["n"]
    assert data["environment"]["torch"] == torch.__version__
    assert data["environment"]["cpu"] == machine_line() and table.count(f"Machine: {machine_line()}, ") == 1
    again = tmp_path / "again"  # a saved sweep re-renders without running the model
    res = CliRunner().invoke(app, ["bench", "fidelity", "--from-json", str(out / "fidelity.json"), "--out", str(again)])
    assert res.exit_code == 0, res.output
    assert (again / "fidelity.md").read_text() == table and (again / "fidelity.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_from_json_refuses_what_is_not_a_sweep(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"points": []}))
    res = CliRunner().invoke(app, ["bench", "fidelity", "--from-json", str(bad), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "is not a sweep JSON" in res.output and not (tmp_path / "o").exists()


def test_cli_single_point_json(world_model_dir, tmp_path):
    path = tmp_path / "one.json"
    res = CliRunner().invoke(app, ["bench", "fidelity", "--model", str(world_model_dir), "--n", "4",
                                   "--method", "random", "--retention", "0.5", "--json", str(path)])
    assert res.exit_code == 0, res.output
    assert json.loads(path.read_text())["points"][0]["method"] == "random"


def test_cli_bad_method_fails_fast(world_model_dir):
    res = CliRunner().invoke(app, ["bench", "fidelity", "--method", "nope", "--model", str(world_model_dir)])
    assert res.exit_code == 1 and "unknown method 'nope'" in res.output


def test_method_spec_carries_native_knobs():
    from mmaccel.bench.fidelity import parse_method_spec

    assert parse_method_spec("aim") == ("aim", {})
    assert parse_method_spec(" aim:pass_fraction=0.25:prune=false ") == ("aim", {"pass_fraction": 0.25, "prune": False})
    assert parse_method_spec("fastv:k=2") == ("fastv", {"k": 2})
    for bad in ("aim:pass_fraction", "aim:=0.25", "aim:pass_fraction=[0.25"):
        with pytest.raises(ValueError, match="method spec"):
            parse_method_spec(bad)


def test_cli_sweep_sets_method_variants_side_by_side(world_model_dir, tmp_path):
    """One sweep with aim at its official merge passes and at passes of a quarter: two labelled
    points, the knob really reaching the method (a cheaper-merge variant keeps the same budget)."""
    out = tmp_path / "variants"
    res = CliRunner().invoke(app, ["bench", "fidelity", "--model", str(world_model_dir), "--n", "6", "--sweep",
                                   "--methods", "aim,aim:pass_fraction=0.25:prune=false", "--retentions", "0.25",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    points = {p["method"]: p for p in json.loads((out / "fidelity.json").read_text())["points"]}
    assert set(points) == {"aim", "aim:pass_fraction=0.25:prune=false"}
    pruned, merged = points["aim"], points["aim:pass_fraction=0.25:prune=false"]
    per_layer = pruned["visual_tokens_per_layer_per_sample"]  # 4 layers: the official cut halves layer 3
    assert per_layer[0] == per_layer[2] > 0 and abs(per_layer[3] - per_layer[0] / 2) <= 0.5
    assert merged["visual_tokens_per_layer_per_sample"][-1] == merged["visual_tokens_per_layer_per_sample"][0] > 0
    assert "| aim:pass_fraction=0.25:prune=false | 0.25 |" in (out / "fidelity.md").read_text()


def test_cli_unknown_knob_fails_fast(world_model_dir):
    res = CliRunner().invoke(app, ["bench", "fidelity", "--method", "aim:pass_fracton=0.25",
                                   "--model", str(world_model_dir)])
    assert res.exit_code == 1 and "pass_fracton" in res.output


def test_knob_variants_share_their_method_colour_and_no_two_methods_share_one():
    from mmaccel.bench.fidelity import line_styles

    specs = ["random", "pool", "pool:proportional_attention=true", "fastv", "aim", "aim:proportional_attention=false",
             "hired", "visionzip", "visionzip:proportional_attention=true", "stc", "mustdrop", "tome"]
    styles = line_styles(specs)
    assert styles["aim:proportional_attention=false"]["color"] == styles["aim"]["color"]
    assert styles["aim:proportional_attention=false"]["linestyle"] == "--" and styles["aim"]["linestyle"] == "-"
    bases = [s for s in specs if ":" not in s]
    assert len({styles[b]["color"] for b in bases}) == len(bases)
    many = [f"m{i}" for i in range(14)]
    assert len({line_styles(many)[m]["color"] for m in many}) == 14
