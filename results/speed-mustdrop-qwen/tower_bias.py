"""What MustDrop's proportional attention costs a Qwen2-VL tower (thirty-second session).

Since the thirty-first session the Qwen blocks after MustDrop's 3x3 window merge get a
log(size) bias queue (one additive mask per attention call) where they had none. This times
`get_image_features` of the Qwen2-VL-shaped tower of `mmaccel bench speed --qwen-tome` (8 x 384,
one 448 px image: 1,024 patches) plain, under `mustdrop` (proportional attention, the default)
and under `mustdrop:proportional_attention=False`, alternating, median of 7, 2 threads. The
image is flat except 10% of its 2x2 patch groups (random), so the blocks after the merge run on
512 of the 1,024 patches, as on a light background with a few objects. Run from the repository root; writes `tower_bias.json`.
"""
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from mmaccel import accelerate_vlm
from mmaccel.bench.speed import build_qwen2_vl_tower_model, environment

REPEATS, SIDE = 7, 448
VARIANTS = {"plain": None, "mustdrop (proportional)": {}, "mustdrop (official weighting)": {"proportional_attention": False}}


def flat_image_patches(grid: int, busy: float = 0.1, seed: int = 0) -> torch.Tensor:
    """Qwen's flattened patches (grid^2, 3*2*14*14), 2x2 groups in a row each: constant, but a
    ``busy`` share of the groups random."""
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.full((grid * grid, 3 * 2 * 14 * 14), 0.5)
    groups = torch.randperm(grid * grid // 4, generator=gen)[: int(busy * grid * grid / 4)]
    for g in groups.tolist():
        pixels[4 * g: 4 * g + 4] = torch.randn(4, pixels.shape[1], generator=gen)
    return pixels


def time_once(model, pixels, thw, knobs) -> float:
    accelerated = nullcontext() if knobs is None else accelerate_vlm(model, method="mustdrop", **knobs)
    with torch.inference_mode(), accelerated:
        start = time.perf_counter()
        model.model.get_image_features(pixels, thw)
        seconds = time.perf_counter() - start
    return seconds


def main() -> None:
    torch.set_num_threads(2)
    model = build_qwen2_vl_tower_model(8, 384, text_layers=4)
    grid = SIDE // 14
    pixels, thw = flat_image_patches(grid), torch.tensor([[1, grid, grid]])
    times = {name: [] for name in VARIANTS}
    for name, knobs in VARIANTS.items():  # warm-up
        time_once(model, pixels, thw, knobs)
    for _ in range(REPEATS):
        for name, knobs in VARIANTS.items():
            times[name].append(time_once(model, pixels, thw, knobs))
    rows = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    for name, ms in rows.items():
        print(f"{name}: {ms:.1f} ms")
    out = {"environment": environment(2), "patches": grid * grid, "repeats": REPEATS, "median_ms": rows,
           "all_ms": {k: [x * 1e3 for x in v] for k, v in times.items()}}
    Path(__file__).with_name("tower_bias.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
