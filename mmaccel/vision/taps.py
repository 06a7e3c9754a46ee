"""Vision-stage score taps: attention scores of chosen ViT layers, taken from the tower's own
attention calls (SDPA stays SDPA), as the CLS row or, for encoders without a CLS token, the
mean attention each patch receives. Used by HiRED, VisionZip, MustDrop and friends."""
from __future__ import annotations

from ..scoring import TapRequest, register_wrapper


class VisionTap:
    """Collect ViT attention scores while installed; ``remove()`` restores the tower exactly.

    mode: ``"cls"`` (CLS -> patch row, needs a CLS token), ``"mean_received"``, or ``"auto"``
    (CLS when the tower has one). After a forward, ``scores[layer]`` is a list with one entry
    per attention call: (B, H, 1, N) for ``cls``, (B, H, N) for ``mean_received`` (Qwen2-VL
    attends per image chunk, so it gives one (1, H, n_i) entry per chunk).
    """

    def __init__(self, adapter, layers: list[int], mode: str = "auto"):
        n = len(adapter.vision_layers)
        layers = [l + n if l < 0 else l for l in layers]
        if any(not 0 <= l < n for l in layers):
            raise ValueError(f"vision tap layers must be in [-{n}, {n - 1}], got {layers}")
        if mode == "auto":
            mode = "cls" if adapter.vision_has_cls else "mean_received"
        if mode not in ("cls", "mean_received"):
            raise ValueError(f"vision tap mode must be 'cls', 'mean_received' or 'auto', got {mode!r}")
        if mode == "cls" and not adapter.vision_has_cls:
            raise ValueError("this vision tower has no CLS token; use mode='mean_received'")
        self.adapter, self.layers, self.mode = adapter, layers, mode
        self._modules, self._saved = {}, None

    def install(self) -> "VisionTap":
        for layer in self.layers:
            attn = self.adapter.attention_of(self.adapter.vision_layers[layer])
            attn._mmaccel_tap = TapRequest(mode=self.mode)
            self._modules[layer] = attn
        cfg = next(iter(self._modules.values())).config
        self._cfg, self._saved = cfg, cfg._attn_implementation_internal
        cfg._attn_implementation_internal = register_wrapper(cfg._attn_implementation or "sdpa")
        return self

    def remove(self) -> None:
        for attn in self._modules.values():
            del attn._mmaccel_tap
        if self._saved is not None or self._modules:
            self._cfg._attn_implementation_internal = self._saved
        self._modules = {}

    def clear(self) -> None:
        for attn in self._modules.values():
            attn._mmaccel_tap.collected = []

    @property
    def scores(self) -> dict[int, list]:
        return {layer: attn._mmaccel_tap.collected for layer, attn in self._modules.items()}

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.remove()
        return False
