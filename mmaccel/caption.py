"""Config-driven batch image captioning that survives interruptions.

One JSON line per image (``id``, ``path``, ``caption`` and ``stats``, or ``error``) is appended
and flushed to disk batch by batch. A rerun resumes: captions already written are never redone
or duplicated, and a line cut short by a crash (even ``kill -9``) is dropped before appending. An
image that cannot be read is recorded with its error and the job goes on; a rerun tries it
again (the file may have been half-copied), replacing its error line, so the output keeps one
line per image.
"""
from __future__ import annotations

import glob as globlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class CaptionConfig(BaseModel):
    """The caption job. ``inputs`` is a folder, a glob pattern or a ``.jsonl`` manifest whose
    lines hold ``path`` (and optionally ``id`` and ``prompt``)."""

    # strict: a YAML typo must not pass as something else (``retention: "0.5"``, ``retention: true``
    # -> 1.0, no reduction; ``do_sample: "no"`` -> False), as method knobs are held (``methods.base``)
    model_config = ConfigDict(extra="forbid", strict=True)

    inputs: str
    output: str = "captions.jsonl"
    model: str | None = None  # a model directory; None = the embedded model
    method: str | None = None
    retention: float | None = None
    preset: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    batch_size: int = Field(default=8, ge=1, le=256)
    prompt: str = "Describe the image."
    max_new_tokens: int = Field(default=32, ge=1, le=2048)
    do_sample: bool = False
    temperature: float = Field(default=1.0, gt=0)
    recursive: bool = True

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, v):
        if not v.strip():
            raise ValueError("prompt must not be empty")
        return v

    def accel_config(self):
        from .config import AccelConfig

        return AccelConfig.load(self.preset, method=self.method, retention=self.retention,
                                params=self.params or None)


def load_caption_config(path: str | Path | None, overrides: list[str] = ()) -> CaptionConfig:
    """File values, then ``key=value`` overrides (YAML-typed); unknown keys name themselves."""
    import yaml

    from .config import _one_line

    data = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ValueError(f"config file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of config keys")
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        data[key.strip()] = yaml.safe_load(value)
    try:
        return CaptionConfig(**data)
    except ValidationError as err:
        raise ValueError(_one_line(err)) from None


@dataclass
class Item:
    id: str
    path: str
    prompt: str | None = None


def resolve_inputs(spec: str, recursive: bool = True) -> tuple[list[Item], list[str]]:
    """Items to caption and the files skipped because they are not images."""
    path = Path(spec)
    if path.suffix == ".jsonl" and path.is_file():
        return _manifest(path), []
    if path.is_dir():
        files = sorted(p for p in (path.rglob("*") if recursive else path.iterdir()) if p.is_file())
        root = path
    else:
        files = sorted(Path(p) for p in globlib.glob(spec, recursive=recursive) if Path(p).is_file())
        root = Path(os.path.commonpath([str(p.parent) for p in files])) if files else Path(".")
    if not files:
        raise ValueError(f"no input files found for {spec!r} (a folder, a glob pattern or a .jsonl manifest)")
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    skipped = [str(p) for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    return [Item(str(p.relative_to(root)), str(p)) for p in images], skipped


def _manifest(path: Path) -> list[Item]:
    items, seen = [], set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            item = Item(str(row.get("id", row["path"])), str(path.parent / row["path"]), row.get("prompt"))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}:{n}: each manifest line must be a JSON object with a 'path'") from None
        if item.id in seen:
            raise ValueError(f"{path}:{n}: duplicate id {item.id!r}")
        seen.add(item.id)
        items.append(item)
    return items


def completed_ids(output: Path) -> set[str]:
    """Ids already captioned; a trailing partial line (a crash mid-write) is cut off the file."""
    return _captioned(_written_rows(output))


def _captioned(rows: list[dict]) -> set[str]:
    return {row["id"] for row in rows if "error" not in row}


def _written_rows(output: Path) -> list[dict]:
    """The output's complete JSON lines (a partial last line is cut off the file first)."""
    if not output.exists():
        return []
    data = output.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(output, "r+b") as f:
            f.truncate(end)
    rows = []
    for line in data[:end].splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in rows if isinstance(r, dict) and "id" in r]


def drop_error_lines(output: Path, rows: list[dict]) -> int:
    """Remove the error lines from ``output``, whose complete lines are ``rows`` (atomically: a
    new file replaces it), so their images can be tried again without a second line. Returns
    how many were removed."""
    kept = [r for r in rows if "error" not in r]
    if len(kept) == len(rows):
        return 0
    tmp = output.with_name(output.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in kept))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, output)
    return len(rows) - len(kept)


@dataclass
class Summary:
    total: int = 0
    resumed: int = 0
    retried: int = 0  # failed before, tried again
    captioned: int = 0
    failed: int = 0
    skipped_files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    visual_tokens_in: int = 0
    visual_tokens_kept: int = 0

    def line(self) -> str:
        rate = self.captioned / self.seconds if self.seconds else 0.0
        return (f"{self.captioned} captioned, {self.failed} failed, {self.resumed} already done, "
                f"{self.retried} earlier failures retried, "
                f"{len(self.skipped_files)} non-image files skipped, {self.seconds:.1f} s ({rate:.2f} img/s), "
                f"visual tokens {self.visual_tokens_in} -> {self.visual_tokens_kept}")


def run_caption(cfg: CaptionConfig, pipeline=None, progress: bool = True) -> Summary:
    """Caption every pending input, appending to ``cfg.output``."""
    items, skipped = resolve_inputs(cfg.inputs, cfg.recursive)
    output = Path(cfg.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    rows = _written_rows(output)
    done = _captioned(rows)
    retried = drop_error_lines(output, rows)
    pending = [it for it in items if it.id not in done]
    summary = Summary(total=len(items), resumed=len(items) - len(pending), retried=retried, skipped_files=skipped)
    if pending:
        pipe = pipeline or _pipeline(cfg)
        _caption_all(cfg, pipe, pending, output, summary, progress)
    return summary


def _pipeline(cfg: CaptionConfig):
    from .pipeline import Pipeline

    return Pipeline(cfg.model, config=cfg.accel_config())


def _caption_all(cfg, pipe, pending, output, summary: Summary, progress: bool) -> None:
    from tqdm import tqdm

    start = time.perf_counter()
    with open(output, "a", encoding="utf-8") as out, tqdm(total=len(pending), disable=not progress or None,
                                                          unit="img", desc="caption") as bar:
        for i in range(0, len(pending), cfg.batch_size):
            rows = _caption_batch(cfg, pipe, pending[i:i + cfg.batch_size], summary)
            out.write("".join(json.dumps(r) + "\n" for r in rows))
            out.flush()
            os.fsync(out.fileno())
            bar.update(len(rows))
    summary.seconds = time.perf_counter() - start


def _caption_batch(cfg, pipe, batch: list[Item], summary: Summary) -> list[dict]:
    from .vision.io import load_image

    rows, loaded = [], []
    for item in batch:
        try:
            loaded.append((item, load_image(item.path)))
        except ValueError as err:
            rows.append({"id": item.id, "path": item.path, "error": str(err)})
            summary.failed += 1
    if loaded:
        rows += _generate(cfg, pipe, loaded, summary)
    return rows


def _generate(cfg, pipe, loaded, summary: Summary) -> list[dict]:
    pairs = [(image, item.prompt or cfg.prompt) for item, image in loaded]
    kwargs = {"do_sample": cfg.do_sample, **({"temperature": cfg.temperature} if cfg.do_sample else {})}
    answers = pipe.ask_batch(pairs, max_new_tokens=cfg.max_new_tokens, **kwargs)
    stats = answers[0].stats.to_dict() if answers else {}
    summary.captioned += len(answers)
    summary.visual_tokens_in += stats.get("visual_tokens_in", 0)
    summary.visual_tokens_kept += stats.get("visual_tokens_kept", 0)
    batch_stats = {k: stats[k] for k in ("method", "batch_size", "visual_tokens_in", "visual_tokens_kept",
                                         "prefill_flops", "flop_ratio", "timings") if k in stats}
    return [{"id": item.id, "path": item.path, "caption": ans.text, "stats": batch_stats}
            for (item, _), ans in zip(loaded, answers)]
