"""Share of each method's kept visual tokens that hold object pixels: 96 still-image questions
(count, caption, color, where) of the test split, retention 0.25, one sample per call. See
content_oracle.md. Usage: python results/fidelity/kept_content.py"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from content_oracle import DEFAULT_MODEL_DIR, accelerate_vlm, content_map, generate_samples, load_model  # noqa: E402
from mmaccel.bench.fidelity import parse_method_spec  # noqa: E402
from mmaccel.embedded.data import encode_prompts  # noqa: E402

torch.set_num_threads(2)
model, processor = load_model(DEFAULT_MODEL_DIR)
samples = generate_samples(96, seed=0, split="test", families=["count", "caption", "color", "where"])
for name in ("random", "hired", "visionzip", "stc", "mustdrop", "aim:prune=false", "fastv"):
    mname, params = parse_method_spec(name)  # aim:prune=false: its merge only
    on = tot = allc = allv = 0
    with accelerate_vlm(model, method=mname, retention=0.25, **params) as h:
        for s in samples:
            inputs = encode_prompts(processor, [s])
            with torch.inference_mode():
                model.generate(**inputs, max_new_tokens=1)
            flags = content_map(h._runtime, model)[0]
            kept = h.kept_visual_positions()[0]
            on, tot = on + int(flags[kept].sum()), tot + kept.numel()
            vis = inputs["input_ids"][0] == model.config.image_token_id
            allc, allv = allc + int(flags[vis].sum()), allv + int(vis.sum())
    print(f"{name:16s} kept {tot/len(samples):.1f}/sample, content share of kept {on/tot:.3f} (of all tokens {allc/allv:.3f})", flush=True)
