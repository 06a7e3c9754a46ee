"""The speed benchmark's plumbing on a tiny decoder (numbers from it mean nothing)."""
import json

import pytest
from typer.testing import CliRunner

from mmaccel.bench.speed import mostly_static_video, stc_flop_cut
from mmaccel.cli import app
from mmaccel.machine import machine_line


def test_speed_bench_small_writes_results(tmp_path):
    res = CliRunner().invoke(app, ["bench", "speed", "--small", "--methods", "fastv,pool", "--retentions", "0.25",
                                   "--repeats", "1", "--warmup", "0", "--stc", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "speed.json").read_text())
    points = {p["method"]: p for p in data["points"]}
    assert set(points) == {"fastv", "pool"}
    for p in points.values():
        assert p["flop_ratio"] > 1.0 and p["visual_tokens_last_layer"] < p["visual_tokens_in"]
        assert p["base_ms"] > 0 and p["accel_ms"] > 0
    assert points["fastv"]["scoring_share"] > 0 and points["pool"]["scoring_share"] == 0
    assert data["environment"]["threads"] == 2 and "| fastv | 0.25 |" in (tmp_path / "speed.md").read_text()
    stc = data["stc_cacher"]["cached"]
    assert [(c["cache_interval"], c["similarity_threshold"]) for c in stc] == [(2, None), (4, None), (2, 0.85)]
    assert stc[1]["rows_recomputed"] < stc[0]["rows_recomputed"] < 1.0
    assert 0 < stc[0]["vit_flop_cut"] < stc[1]["vit_flop_cut"] < 1.0
    assert abs(stc[0]["dynamic_share"] - 0.25) < 0.01  # the fixed rule updates its share
    # on a mostly static clip the README rule updates fewer tokens than the fixed quarter
    assert stc[2]["dynamic_share"] < 0.25 and stc[2]["vit_flop_cut"] > stc[0]["vit_flop_cut"]
    assert all(0 <= c["max_relative_error"] < 1 for c in stc)
    assert "similarity < 0.85 (README rule" in (tmp_path / "speed.md").read_text()


def test_stc_flop_cut_by_hand():
    # N=4 tokens, D=2, I=4, one layer, patch 1: full token 4*4 + 2*2*4 + 2*4*2 = 48, embed 3*1*2 = 6;
    # a cached token: K 4 + (1/4) * (48 - 4) = 15. Two frames, interval 2: 1 - (54 + 21) / 108.
    assert abs(stc_flop_cut(4, 2, 4, 1, 1, 2, 2, 0.25) - (1 - 75 / 108)) < 1e-12
    assert stc_flop_cut(729, 384, 1536, 6, 14, 16, 1, 0.25) == 0.0  # every frame a reference
    assert abs(stc_flop_cut(729, 384, 1536, 6, 14, 16, 2, 1.0)) < 1e-12  # recompute everything


def test_mostly_static_video_is_mostly_static():
    clip = mostly_static_video(frames=6, size=96)
    changed = (clip[1:] != clip[:-1]).any(-1).mean()
    assert clip.shape == (6, 96, 96, 3) and 0 < changed < 0.2


def test_speed_bench_times_the_tower_and_tome_shrinks_a_deeper_one(tmp_path):
    res = CliRunner().invoke(app, ["bench", "speed", "--small", "--methods", "tome", "--retentions", "0.25",
                                   "--repeats", "1", "--warmup", "0", "--vision-layers", "4", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "speed.json").read_text())
    (p,) = data["points"]
    assert data["vision_layers"] == 4 and p["base_vit_ms"] > 0 and p["accel_vit_ms"] > 0
    assert p["visual_tokens_last_layer"] < p["visual_tokens_in"] and p["flop_ratio"] > 1.0


def test_speed_bench_asks_for_a_deeper_tower_for_tome(tmp_path):
    res = CliRunner().invoke(app, ["bench", "speed", "--small", "--methods", "tome", "--retentions", "0.25",
                                   "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)])
    assert res.exit_code != 0 and "add --vision-layers" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "speed.json").exists()


def test_speed_bench_times_tome_inside_a_qwen2_vl_tower(tmp_path):
    res = CliRunner().invoke(app, ["bench", "speed", "--small", "--methods", "random", "--retentions", "0.25",
                                   "--repeats", "1", "--warmup", "0", "--qwen-tome", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    q = json.loads((tmp_path / "speed.json").read_text())["qwen_tome"]
    (p,) = q["points"]
    assert p["patches_per_block"][0] == q["patches"] > p["patches_per_block"][-1]
    assert p["patches_per_mlp"][0] < p["patches_per_block"][0]  # ToMe merges between attention and MLP
    assert p["flop_ratio"] > 1.0 and p["seconds"] > 0
    assert "tome inside a Qwen2-VL tower" in (tmp_path / "speed.md").read_text()


def test_speed_bench_batch_and_dtype_on_cpu(tmp_path):
    res = CliRunner().invoke(app, ["bench", "speed", "--small", "--methods", "fastv", "--retentions", "0.25",
                                   "--repeats", "1", "--warmup", "0", "--batch", "2", "--dtype", "bfloat16",
                                   "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "speed.json").read_text())
    env, (p,) = data["environment"], data["points"]
    assert (env["device"], env["dtype"], env["batch"]) == ("cpu", "bfloat16", 2)
    # two samples of 64 visual tokens each ((112 px / 14)^2), a quarter of each kept
    assert p["visual_tokens_in"] == 2 * 64 and p["visual_tokens_last_layer"] == 2 * 16
    assert env["cpu"] == machine_line()  # which CPU: the same command's speed varies by CPU type
    assert f"CPU ({machine_line()}), 2 threads, bfloat16, batch 2" in (tmp_path / "speed.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--dtype", "float8"], "--dtype 'float8'"),
    (["--llm", "70b"], "--llm '70b'"),
    (["--batch", "0"], "--batch must be at least 1"),
    (["--device", "tpu"], "--device 'tpu'"),
])
def test_speed_bench_rejects_a_bad_target(tmp_path, args, message):
    res = CliRunner().invoke(app, ["bench", "speed", "--small", "--out", str(tmp_path), *args])
    assert res.exit_code != 0 and message in res.output
    assert not (tmp_path / "speed.json").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-CUDA message")
def test_speed_bench_says_when_cuda_is_missing(tmp_path):
    res = CliRunner().invoke(app, ["bench", "speed", "--small", "--device", "cuda", "--out", str(tmp_path)])
    assert res.exit_code != 0 and "no CUDA device is available here" in res.output


def test_synced_clock_is_scoped():
    from mmaccel import stats

    assert stats._SYNC_CUDA is False
    with pytest.raises(RuntimeError):
        with stats.synced_clock():
            assert stats._SYNC_CUDA is True
            raise RuntimeError("boom")
    assert stats._SYNC_CUDA is False
