"""The fidelity benchmark on a freshly built (untrained) world model: the plumbing, not accuracy."""
import json

import pytest
import torch
from typer.testing import CliRunner

from mmaccel.bench.fidelity import RunResult, compare, markdown_table
from mmaccel.cli import app


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
    run = RunResult(gold[:3] + ["wrong"], list(q), visual_tokens_in=40, visual_tokens_per_layer=[40, 20],
                    prefill_flops=1.0, prefill_flops_full=3.0, seconds=0.5)
    res = compare(samples, base, run)
    expected_kl = float(torch.sum(p[1].exp() * (p[1] - q[1]))) / 4
    assert res["agreement"] == 0.75 and res["aggregates"]["all"] == 0.75
    assert res["first_token_kl"] == pytest.approx(expected_kl)
    assert res["visual_tokens_per_layer_per_sample"] == [10, 5] and res["flop_ratio"] == 3.0


def test_cli_sweep_writes_table_plot_and_json(world_model_dir, tmp_path):
    out = tmp_path / "sweep"
    res = CliRunner().invoke(app, ["bench", "fidelity", "--model", str(world_model_dir), "--n", "8", "--sweep",
                                   "--methods", "pool,fastv", "--retentions", "1.0,0.25", "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "fidelity.json").read_text())
    points = {(p["method"], p["retention"]): p for p in data["points"]}
    assert set(points) == {("pool", 1.0), ("pool", 0.25), ("fastv", 1.0), ("fastv", 0.25)}
    for method in ("pool", "fastv"):  # full retention is exact: same answers, zero KL
        assert points[(method, 1.0)]["agreement"] == 1.0 and points[(method, 1.0)]["first_token_kl"] < 1e-9
        assert points[(method, 0.25)]["flop_ratio"] > 1.2
        full, quarter = (points[(method, r)]["visual_tokens_per_layer_per_sample"][-1] for r in (1.0, 0.25))
        assert quarter < 0.4 * full
    assert (out / "fidelity.png").read_bytes()[:4] == b"\x89PNG"
    assert "| pool | 0.25 |" in (out / "fidelity.md").read_text()
    assert data["environment"]["torch"] == torch.__version__


def test_cli_single_point_json(world_model_dir, tmp_path):
    path = tmp_path / "one.json"
    res = CliRunner().invoke(app, ["bench", "fidelity", "--model", str(world_model_dir), "--n", "4",
                                   "--method", "random", "--retention", "0.5", "--json", str(path)])
    assert res.exit_code == 0, res.output
    assert json.loads(path.read_text())["points"][0]["method"] == "random"


def test_cli_bad_method_fails_fast(world_model_dir):
    res = CliRunner().invoke(app, ["bench", "fidelity", "--method", "nope", "--model", str(world_model_dir)])
    assert res.exit_code == 1 and "unknown method 'nope'" in res.output
