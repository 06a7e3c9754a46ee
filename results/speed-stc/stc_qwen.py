"""STC-Cacher on a Qwen2-VL tower: ViT time on a mostly static video, beside the analytic FLOP cut.

A Qwen2-VL-shaped tower (`build_qwen2_vl_tower_model`: 8 blocks x 384, MLP 4x, patch 14,
temporal patch 2) encodes `mostly_static_video` (16 frames of 392 px: 784 patches a slice of 2
frames) one slice at a time, as a Qwen `StreamSession` does: plain, and under `QwenSTCCacher`
with the settings of `results/speed-stc/speed.md`'s SigLIP table. Median of 3 after a warm-up,
2 threads. The analytic FLOP cut is `stc_flop_cut` with the slice's patches; its patch-embedding
term counts 3 x 20^2 inputs a patch (Qwen's 2 x 14^2 x 3 = 1176, close enough for a term of
under 1%). The relative error is the worst slice's merger output against the plain encoding.
Run: python results/speed-stc/stc_qwen.py"""
import json
import math
import platform
import statistics
import time

import numpy as np
import torch
import transformers

from mmaccel.bench.speed import STC_SETTINGS, build_qwen2_vl_tower_model, mostly_static_video, stc_flop_cut
from mmaccel.vision.stc_cacher import CacherState
from mmaccel.vision.stc_cacher_qwen import QwenSTCCacher

SIDE, FRAMES, DEPTH, DIM = 392, 16, 8, 384


def slices(clip: np.ndarray):
    """Each pair of frames through Qwen2-VL's own video processor (no resize, mean/std 0.5):
    ((784, 1176) flattened patches per slice, grid (1, 28, 28))."""
    from transformers import Qwen2VLVideoProcessor

    proc = Qwen2VLVideoProcessor(patch_size=14, merge_size=2, temporal_patch_size=2, do_resize=False,
                                 image_mean=[0.5] * 3, image_std=[0.5] * 3)
    out = [proc(videos=[clip[t:t + 2]], return_tensors="pt") for t in range(0, len(clip), 2)]
    return [o["pixel_values_videos"] for o in out], out[0]["video_grid_thw"]


def encode(model, pieces, grid, setting):
    state = CacherState(*setting) if setting else None
    outputs, start = [], time.perf_counter()
    with torch.inference_mode():
        for pixels in pieces:
            if state is None:
                outputs.append(model.model.get_video_features(pixels, grid).pooler_output[0])
            else:
                with QwenSTCCacher(model.model.visual.blocks, state):
                    outputs.append(model.model.get_video_features(pixels, grid).pooler_output[0])
    return time.perf_counter() - start, state, outputs


def main(threads: int = 2, repeats: int = 3) -> None:
    torch.set_num_threads(threads)
    model = build_qwen2_vl_tower_model(DEPTH, DIM)
    pieces, grid = slices(mostly_static_video(FRAMES, SIDE))
    tokens, units = pieces[0].shape[0], len(pieces)
    encode(model, pieces, grid, None)  # warm-up
    runs = [encode(model, pieces, grid, None) for _ in range(repeats)]
    full, reference = statistics.median(r[0] for r in runs), runs[-1][2]
    rows = []
    for interval, ratio, threshold in STC_SETTINGS:
        runs = [encode(model, pieces, grid, (interval, ratio, threshold)) for _ in range(repeats)]
        t, state, outputs = statistics.median(r[0] for r in runs), runs[-1][1], runs[-1][2]
        refs = math.ceil(units / interval)
        share = (state.recomputed - refs * DEPTH * tokens) / max(1, (units - refs) * DEPTH * tokens)
        rows.append({"cache_interval": interval, "update_ratio": ratio, "similarity_threshold": threshold,
                     "seconds": t, "vit_time_cut": 1 - t / full,
                     "vit_flop_cut": stc_flop_cut(tokens, DIM, 4 * DIM, DEPTH, 20, units, interval, share),
                     "rows_recomputed": state.recomputed / state.total, "dynamic_share": share,
                     "max_relative_error": max(float((o - r).norm() / r.norm()) for o, r in zip(outputs, reference))})
        print(json.dumps(rows[-1]), flush=True)
    env = dict(machine=platform.machine(), threads=threads, torch=torch.__version__,
               transformers=transformers.__version__, date=time.strftime("%Y-%m-%d %H:%M"))
    result = {"env": env, "tokens_per_slice": tokens, "slices": units, "full_s": full, "cached": rows}
    json.dump(result, open("results/speed-stc/stc_qwen.json", "w"), indent=1)


if __name__ == "__main__":
    main()
