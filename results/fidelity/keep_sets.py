"""Why do the text-blind pre-LLM methods lose so much on the embedded model? Two probes.

1. Which tokens does each score point at? On the base tile (6 x 6 tokens) of 100 still scenes,
   the share of each score's top 9 tokens (25%) that lie on an object (``object_targets``),
   for the tower's mean-received attention at every layer (what hired / visionzip rank by on
   this CLS-less tower; they use the feature layer, the last one here), STC-Pruner's score
   and a plain feature saliency (distance from the tile's median token). Random: the object
   share of all cells.
2. Does keeping object tokens help the language model? Accuracy on 240 still-image questions
   at one retention for random, stc, hired, visionzip and two keep sets defined here:
   ``salient`` (the top tokens by feature saliency) and ``salient_mix`` (half the budget
   salient, half spread evenly over the rest, so a share of background stays).

Usage: python results/fidelity/keep_sets.py [MODEL_DIR] [RETENTION]
"""
import sys
from dataclasses import dataclass

import numpy as np
import torch

from mmaccel.bench.fidelity import evaluate, run_samples
from mmaccel.embedded import DEFAULT_MODEL_DIR, load_model
from mmaccel.embedded.pretrain import object_targets, projected_tokens
from mmaccel.methods import REGISTRY, PreLLMReducer, Reduction
from mmaccel.methods.stc import stc_scores
from mmaccel.models import get_adapter
from mmaccel.vision.taps import VisionTap
from mmaccel.world.samples import SPLIT_KEY, generate_samples, make_sample


def saliency(features: torch.Tensor) -> torch.Tensor:
    """(n, D) -> (n,) distance of each token from the median token."""
    f = features.float()
    return (f - f.median(0).values).norm(dim=-1)


@dataclass
class Salient(PreLLMReducer):
    name = "salient"
    retention: float | None = 0.25

    def reduce(self, features, segment, budget):
        keep = saliency(features).topk(min(budget, features.shape[0])).indices
        return Reduction(keep.sort().values.to(features.device))


@dataclass
class SalientMix(PreLLMReducer):
    name = "salient_mix"
    retention: float | None = 0.25

    def reduce(self, features, segment, budget):
        n = features.shape[0]
        top = saliency(features).topk(min((budget + 1) // 2, n)).indices
        rest = torch.ones(n, dtype=torch.bool)
        rest[top] = False
        idx, k = rest.nonzero().flatten(), budget - top.numel()
        spread = idx[torch.linspace(0, idx.numel() - 1, k).round().long()] if k > 0 and idx.numel() else idx[:0]
        return Reduction(torch.cat([top, spread]).unique().sort().values.to(features.device))


def precision_at(scores: torch.Tensor, on_object: np.ndarray, k: int = 9) -> float:
    top = scores.topk(k, dim=1).indices.numpy()
    return float(np.take_along_axis(on_object, top, 1).mean())


def probe_scenes(processor) -> tuple[torch.Tensor, np.ndarray]:
    """The 100 held-out still scenes of probe 1: base tiles (100, 3, S, S) and whether each of
    their 6 x 6 cells lies on an object (100, 36)."""
    rng = np.random.default_rng(np.random.SeedSequence([SPLIT_KEY["test"], 3, 7]))
    samples = [make_sample(f, rng, hires=False) for f in ["color", "count", "exists", "where"] * 25]
    pix = processor.image_processor([s.image for s in samples], return_tensors="pt")["pixel_values"][:, 0]
    return pix, np.stack([object_targets(s.meta, 6)[:, 0] >= 0 for s in samples])


def score_probe(model, processor) -> None:
    adapter = get_adapter(model)
    pix, on_object = probe_scenes(processor)
    layers = list(range(len(adapter.vision_layers)))
    with VisionTap(adapter, layers, "mean_received") as tap, torch.no_grad():
        model.model.vision_tower(pix)
        received = {layer: torch.cat([t.float() for t in v]).sum(1) for layer, v in tap.scores.items()}
        feats = projected_tokens(model, pix).float()
    print(f"object share of cells (random): {on_object.mean():.3f}")
    for layer, s in received.items():
        print(f"mean-received attention, tower layer {layer}: precision@9 {precision_at(s, on_object):.3f}")
    stc = torch.stack([-stc_scores(f, [])[0] for f in feats])
    print(f"stc-pruner score: precision@9 {precision_at(stc, on_object):.3f}")
    print(f"feature saliency: precision@9 {precision_at(torch.stack([saliency(f) for f in feats]), on_object):.3f}")


def keep_set_probe(model, processor, retention: float) -> None:
    REGISTRY.update({"salient": Salient, "salient_mix": SalientMix})
    samples = generate_samples(240, seed=0, split="test", families=["color", "count", "exists", "where"])
    base = run_samples(model, processor, samples)
    for method in ["random", "stc", "hired", "visionzip", "salient", "salient_mix"]:
        out = evaluate(model, processor, samples, method, retention, base)
        fams = " ".join(f"{k} {v:.3f}" for k, v in out["families"].items())
        print(f"{method:<12} r={retention}: {fams} | agreement {out['agreement']:.3f}", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(2)
    model, processor = load_model(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_MODEL_DIR)
    score_probe(model, processor)
    keep_set_probe(model, processor, float(sys.argv[2]) if len(sys.argv) > 2 else 0.25)
