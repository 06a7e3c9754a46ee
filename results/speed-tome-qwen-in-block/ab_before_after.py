"""tome in a Qwen2-VL tower (8 blocks x 384, one 448 px image: 1,024 patches), retention 0.25:
the plain tower, the merge before each block (the old schedule, ``in_block=False``) and the
merge inside each block (``in_block=True``, the default since the twenty-sixth session),
interleaved in one process, 3 rounds, median of the rounds' medians (ms).
Run: python results/speed-tome-qwen-in-block/ab_before_after.py"""
import torch, time, statistics
from mmaccel.bench.speed import build_qwen2_vl_tower_model, _median_time
from mmaccel.api import accelerate_vlm
import mmaccel.methods.tome_qwen as tq
torch.set_num_threads(1)
model = build_qwen2_vl_tower_model(8, 384)
grid = 32
pixels = torch.randn(grid * grid, 3 * 2 * 14 * 14); thw = torch.tensor([[1, grid, grid]])
orig = tq.QwenWindowMerger.__init__
def run(in_block):
    def init(self, *a, **k):
        k["in_block"] = in_block if "in_block" in k else k.get("in_block", False)
        orig(self, *a, **k)
    tq.QwenWindowMerger.__init__ = init
    try:
        with torch.inference_mode(), accelerate_vlm(model, method="tome", retention=0.25):
            return _median_time(lambda: model.model.get_image_features(pixels, thw), 3)
    finally:
        tq.QwenWindowMerger.__init__ = orig
def full():
    with torch.inference_mode():
        return _median_time(lambda: model.model.get_image_features(pixels, thw), 3)
res = {"full": [], "old": [], "new": []}
for _ in range(3):
    res["full"].append(full()); res["old"].append(run(False)); res["new"].append(run(True))
print({k: round(statistics.median(v) * 1e3, 1) for k, v in res.items()})
