"""``accelerate_vlm``: patch one model instance, reversibly."""
from __future__ import annotations

from pathlib import Path

from .config import AccelConfig
from .models import get_adapter
from .runtime import Runtime
from .stats import Stats


class AccelHandle:
    """Returned by :func:`accelerate_vlm`. ``stats``, ``kept_visual_positions()`` and
    ``provenance()`` describe the calling thread's last forward/generate call;
    ``restore()`` (or leaving the ``with`` block) removes every hook and patch."""

    def __init__(self, model, config: AccelConfig, runtime: Runtime):
        self.model, self.config, self._runtime = model, config, runtime

    @property
    def stats(self) -> Stats:
        return self._runtime.last_call()[0]

    def kept_visual_positions(self):
        """Per sample of the last call: sorted original sequence positions of the visual tokens
        that reached the last decoder layer (LongTensor each)."""
        from .runtime import kept_visual_positions

        return kept_visual_positions(self._runtime.last_call()[1])

    def provenance(self):
        """Per sample of the last call: {kept visual position: original positions it stands for}."""
        from .runtime import provenance

        return provenance(self._runtime.last_call()[1])

    @property
    def method(self):
        return self._runtime.method

    @property
    def active(self) -> bool:
        return getattr(self.model, "_mmaccel_handle", None) is self

    def restore(self):
        """Give back the untouched model (bit-identical outputs)."""
        if self.active:
            self._runtime.remove()
            del self.model._mmaccel_handle
        return self.model

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()
        return False

    def __repr__(self):
        state = "active" if self.active else "restored"
        return f"AccelHandle({self.config.method}, retention={self.config.retention}, {state})"


def accelerate_vlm(model, method: str | None = None, retention: float | None = None,
                   config: AccelConfig | dict | str | Path | None = None,
                   position_policy: str | None = None, **params) -> AccelHandle:
    """Accelerate ``model`` (a transformers VLM instance) in place; its own ``generate`` keeps working.

    Parameters
    ----------
    model: LlavaForConditionalGeneration, LlavaNextForConditionalGeneration,
        LlavaOnevisionForConditionalGeneration, Qwen2VLForConditionalGeneration or
        Qwen2_5_VLForConditionalGeneration.
    method: a name from :func:`mmaccel.list_methods` (default ``"none"``).
    retention: fraction of each sample's visual tokens kept, in (0, 1]; None = official default.
    config: an ``AccelConfig``, a dict, a YAML path or a preset name; explicit arguments win.
    position_policy: ``"preserve"`` (kept tokens keep their positions, default) or ``"compact"``.
    params: the method's native knobs (e.g. ``k=2, ratio=0.5`` for FastV).
    """
    cfg = AccelConfig.load(config, method=method, retention=retention, position_policy=position_policy)
    if params:
        cfg = AccelConfig.load(cfg, params={**cfg.params, **params})
    if getattr(model, "_mmaccel_handle", None) is not None:
        raise ValueError("this model is already accelerated; call restore() on the previous handle first")
    adapter = get_adapter(model)
    runtime = Runtime(adapter, cfg.build_method(), cfg.position_policy).install()
    handle = AccelHandle(model, cfg, runtime)
    model._mmaccel_handle = handle
    return handle
