"""``AccelConfig``: one validated schema for the Python API, YAML presets and the CLI."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PRESET_DIR = Path(__file__).parent / "configs"


class AccelConfig(BaseModel):
    """What to run: a method, its budget and native knobs, and the position policy.

    ``retention`` is the fraction of each sample's visual tokens kept by the method's final
    reduction step, in (0, 1]; ``None`` keeps the method's official default budget.
    """

    model_config = ConfigDict(extra="forbid")

    method: str = "none"
    retention: float | None = Field(default=None)
    position_policy: Literal["preserve", "compact"] = "preserve"
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("retention", mode="before")
    @classmethod
    def _check_retention(cls, v):
        # before pydantic's coercion, as a method knob is checked: "0.5" or true in a YAML file is
        # a typo to report, not 0.5 or 1.0 (no reduction at all) to run
        from .methods.base import _is_instance  # the knob check's own rule for a number

        if v is not None and not _is_instance(v, float):
            raise ValueError(f"retention must be a number or null, got {v!r} ({type(v).__name__})")
        if v is not None and not (0.0 < v <= 1.0):
            raise ValueError(f"retention must be in (0, 1], got {v}")
        return v

    @model_validator(mode="after")
    def _check_method(self):
        self.build_method()  # unknown method or parameter -> ValueError with the valid choices
        return self

    def build_method(self):
        from .methods import make_method

        params = dict(self.params)
        if self.retention is not None:
            params["retention"] = self.retention
        return make_method(self.method, **params)

    @classmethod
    def load(cls, source: "AccelConfig | dict | str | Path | None" = None, **overrides) -> "AccelConfig":
        """From a config object, a dict, a YAML file path or a preset name; ``overrides`` win."""
        data = _as_dict(source)
        data.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**data)
        except ValidationError as err:
            raise ValueError(_one_line(err)) from None


def _as_dict(source) -> dict:
    if source is None:
        return {}
    if isinstance(source, AccelConfig):
        return source.model_dump()
    if isinstance(source, dict):
        return dict(source)
    return read_yaml(resolve_preset(source))


def resolve_preset(name: str | Path) -> Path:
    """A YAML path, or the name of a bundled preset (``fastv-50`` -> configs/fastv-50.yaml)."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    bundled = PRESET_DIR / f"{path.stem}.yaml"
    if bundled.exists():
        return bundled
    raise ValueError(f"no config file or preset named {str(name)!r}; presets: {', '.join(list_presets())}")


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def parse_method_spec(spec: str) -> tuple[str, dict]:
    """``"aim"`` -> ("aim", {}); ``"aim:pass_fraction=0.25:prune=false"`` -> ("aim",
    {"pass_fraction": 0.25, "prune": False}): a method and native knobs, as the command line takes
    them (``video-qa --method``, bench sweeps, where the spec is the point's label). Values are YAML
    scalars; the method checks their names and types."""
    import yaml

    name, *knobs = spec.strip().split(":")
    params = {}
    for knob in knobs:
        key, sep, value = knob.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"method spec {spec!r}: expected name:knob=value[:knob=value], got {knob!r}")
        try:
            params[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ValueError(f"method spec {spec!r}: cannot read the value of {key.strip()!r}: {value!r}") from None
    return name.strip(), params


def read_yaml(path: Path) -> dict:
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def _one_line(err: ValidationError) -> str:
    msgs = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "config"
        text = e["msg"].removeprefix("Value error, ")
        if e["type"].endswith("_type"):  # a strict type error: say what was given
            text += f", got {e['input']!r} ({type(e['input']).__name__})"
        msgs.append(f"unknown config key {loc!r}" if e["type"] == "extra_forbidden" else f"{loc}: {text}")
    return "; ".join(msgs)
