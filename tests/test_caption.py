"""The caption job: real files on disk, failures recorded, kill -9 and resume without loss or duplicates."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mmaccel.caption import completed_ids, load_caption_config, resolve_inputs
from mmaccel.cli import app
from mmaccel.testing.tiny import save_tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny("llava_onevision", tmp_path_factory.mktemp("tiny_caption_model"), seed=2)


def make_folder(root, n=5):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40 + i, 60, 3), dtype=np.uint8)).save(root / f"img_{i:03d}.png")
    (root / "notes.txt").write_text("not an image")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 5)
    return root


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_caption_folder_records_failures_and_skips_non_images(model_dir, tmp_path):
    folder = make_folder(tmp_path / "imgs")
    out = tmp_path / "out" / "caps.jsonl"
    res = CliRunner().invoke(app, ["caption", "--config", str(write_config(tmp_path, folder, out, model_dir)),
                                   "--quiet", "--set", "batch_size=2"])
    assert res.exit_code == 0, res.output
    rows = read_rows(out)
    assert sorted(r["id"] for r in rows) == ["broken.png"] + [f"img_{i:03d}.png" for i in range(5)]
    broken = next(r for r in rows if r["id"] == "broken.png")
    assert "error" in broken and "caption" not in broken
    good = [r for r in rows if "caption" in r]
    assert all(isinstance(r["caption"], str) and r["stats"]["visual_tokens_kept"] < r["stats"]["visual_tokens_in"]
               for r in good)
    assert "5 captioned, 1 failed" in res.stdout and "1 non-image files skipped" in res.stdout
    again = CliRunner().invoke(app, ["caption", "--config", str(tmp_path / "job.yaml"), "--quiet"])
    assert again.exit_code == 0, again.output
    assert "0 captioned, 1 failed, 5 already done, 1 earlier failures retried" in again.stdout
    assert len(read_rows(out)) == 6  # the broken image's error line was replaced, not repeated
    shutil.copy(folder / "img_000.png", folder / "broken.png")  # the file is whole now
    third = CliRunner().invoke(app, ["caption", "--config", str(tmp_path / "job.yaml"), "--quiet"])
    assert third.exit_code == 0 and "1 captioned, 0 failed, 5 already done" in third.stdout
    rows = read_rows(out)
    assert len(rows) == 6 and all("caption" in r for r in rows)


def write_config(tmp_path, inputs, out, model_dir, **extra):
    lines = [f"inputs: {inputs}", f"output: {out}", f"model: {model_dir}", "method: pool", "retention: 0.25",
             "batch_size: 1", "max_new_tokens: 3"] + [f"{k}: {v}" for k, v in extra.items()]
    path = tmp_path / "job.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_kill_9_then_resume_loses_nothing_and_duplicates_nothing(model_dir, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(24):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(folder / f"f_{i:02d}.png")
    out = tmp_path / "caps.jsonl"
    cfg = write_config(tmp_path, folder, out, model_dir, max_new_tokens=12)
    cmd = [sys.executable, "-m", "mmaccel.cli", "caption", "--config", str(cfg), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 3):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = out.read_text().splitlines()
    assert 3 <= len(before) < 24, "the job must be killed mid-run"
    with open(out, "a") as f:
        f.write('{"id": "f_99.png", "capt')  # a line cut short by the crash
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    after = out.read_text().splitlines()
    ids = [json.loads(line)["id"] for line in after]
    assert sorted(ids) == [f"f_{i:02d}.png" for i in range(24)]  # all once, none twice
    assert after[: len(before)] == before  # finished lines untouched


def test_config_errors_and_overrides(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("inputs: x\nbatch_sise: 4\n")
    with pytest.raises(ValueError, match="unknown config key 'batch_sise'"):
        load_caption_config(cfg)
    cfg.write_text("inputs: x\nbatch_size: 4\nretention: 0.5\n")
    loaded = load_caption_config(cfg, ["batch_size=2", "method=fastv"])
    assert loaded.batch_size == 2 and loaded.method == "fastv" and loaded.retention == 0.5
    with pytest.raises(ValueError, match="batch_size"):
        load_caption_config(cfg, ["batch_size=0"])
    res = CliRunner().invoke(app, ["caption", "--config", str(cfg), "--set", "method=nope"])
    assert res.exit_code == 1 and "unknown method 'nope'" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("typo, said", [("retention: true", "retention: Input should be a valid number, got True"),
                                         ("retention: '0.5'", "retention: Input should be a valid number, got '0.5'"),
                                         ("batch_size: 2.5", "batch_size: Input should be a valid integer, got 2.5"),
                                         ("do_sample: 'off'", "do_sample: Input should be a valid boolean, got 'off'")])
def test_a_config_value_of_the_wrong_type_is_refused_not_coerced(tmp_path, typo, said):
    """pydantic's lax mode read ``retention: true`` as 1.0 (a job that reduces nothing) and the
    string 'off' as False; the job's config is held to the type of each key."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"inputs: x\n{typo}\n")
    with pytest.raises(ValueError, match=re.escape(said)):
        load_caption_config(cfg)
    cfg.write_text("inputs: x\nretention: 0.25\ntemperature: 1\ndo_sample: false\n")  # an int for a float is fine
    assert load_caption_config(cfg).temperature == 1.0


def test_manifest_and_glob_inputs(tmp_path):
    folder = make_folder(tmp_path / "m", n=2)
    manifest = tmp_path / "list.jsonl"
    manifest.write_text(json.dumps({"path": "m/img_000.png", "id": "a", "prompt": "what ?"}) + "\n"
                        + json.dumps({"path": "m/img_001.png"}) + "\n")
    items, skipped = resolve_inputs(str(manifest))
    assert [(i.id, i.prompt) for i in items] == [("a", "what ?"), ("m/img_001.png", None)] and skipped == []
    items, skipped = resolve_inputs(str(folder / "img_*.png"))
    assert [i.id for i in items] == ["img_000.png", "img_001.png"]
    with pytest.raises(ValueError, match="no input files"):
        resolve_inputs(str(tmp_path / "nothing_here"))


def test_completed_ids_drops_a_partial_last_line(tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "cap')
    assert completed_ids(out) == {"a", "b"}
    assert out.read_text() == '{"id": "a"}\n{"id": "b"}\n'
