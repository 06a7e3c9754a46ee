"""What aim's in-LLM cut costs on the shipped model, by the importance that ranks the tokens.

On the embedded 4-layer language model the official schedule is one cut: after layer 2, half of
the visual tokens (ranked by layer 2's attention) leave, and layer 3 runs on the rest. This
probe keeps aim's merge (``pass_fraction=0.25``) and swaps only the ranking of that cut:

- ``pagerank``: aim as shipped: PageRank over the question's text-to-text attention (tau 0.1,
  5 iterations), pushed through text-to-visual attention, RMS over heads;
- ``pagerank_all``: the official code's PageRank over every query row (visual and text), the
  distribution starting uniform over all tokens;
- ``mean_text``: the text queries' attention averaged over rows and heads (no PageRank);
- ``last``: the last token's attention averaged over heads (FastV's ranking);
- ``no_cut``: the merge alone (``prune=False``), for the ceiling.

Usage: python results/fidelity/aim_importance.py [--n 900] [--retention 0.25] [--out DIR]
(forty-third session; the sweep's table and plot go to DIR, default
``results/fidelity/n2700_run56/aim_importance``)."""
import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

import mmaccel.runtime as runtime
from mmaccel.bench.fidelity import sweep, write_sweep
from mmaccel.embedded import load_default_model
from mmaccel.methods import AIM, REGISTRY, InLLMPruner
from mmaccel.world import generate_samples
from mmaccel.world.spec import MODEL_FAMILIES


@dataclass
class AIMMeanText(AIM):
    """aim whose cut ranks by the text queries' mean attention instead of PageRank."""
    name = "aim_mean_text"

    def importance(self, probs, rows, row_valid, text_keys):
        return InLLMPruner.importance(self, probs, rows, row_valid, text_keys)


@dataclass
class AIMLast(AIMMeanText):
    """aim whose cut ranks by the last token's attention (one query row)."""
    name = "aim_last"
    query = "last"


@dataclass
class AIMPageRankAll(AIM):
    """aim whose PageRank runs over every query row, as the official code's N x N does."""
    name = "aim_pagerank_all"


def all_query_rows(valid, visual):
    """Every position of every row as a query (the official all-token PageRank)."""
    rows = torch.arange(valid.shape[1], device=valid.device).expand(valid.shape[0], -1).contiguous()
    return rows, valid.clone()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=900)
    ap.add_argument("--retention", type=float, default=0.25)
    ap.add_argument("--out", default="results/fidelity/n2700_run56/aim_importance")
    args = ap.parse_args()
    torch.set_num_threads(2)
    for cls in (AIMMeanText, AIMLast, AIMPageRankAll):
        REGISTRY[cls.name] = cls
    text_rows = runtime.text_query_rows
    # the runtime asks text_query_rows for the rows of every "text" pruner: answer with every row
    # for the all-token variant only (the probe runs one method at a time)
    runtime.text_query_rows = lambda valid, visual: (
        all_query_rows(valid, visual) if current[0] == "aim_pagerank_all" else text_rows(valid, visual))
    current = [""]
    model, processor = load_default_model()
    samples = generate_samples(args.n, seed=0, split="test", families=list(MODEL_FAMILIES))
    methods = ["aim:pass_fraction=0.25", "aim_pagerank_all:pass_fraction=0.25", "aim_mean_text:pass_fraction=0.25",
               "aim_last:pass_fraction=0.25", "aim:pass_fraction=0.25:prune=false"]
    result = None
    for spec in methods:
        current[0] = spec.split(":")[0]
        part = sweep(model, processor, samples, [spec], [args.retention])
        result = part if result is None else {**result, "points": result["points"] + part["points"]}
    for path in write_sweep(result, Path(args.out)).values():
        print("wrote", path)


if __name__ == "__main__":
    main()
