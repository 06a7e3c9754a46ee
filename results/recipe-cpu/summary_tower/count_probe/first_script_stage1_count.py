"""Stage 1 alone, with the shipped run's flags, then the count probe of count_probe.py on the
fresh tower: can the tower carry per-shape counts better with a heavier summary loss?
usage: python stage1_count.py WEIGHT STEPS"""
import sys, time, numpy as np, torch
from mmaccel.embedded.train import parse_args, build_tokenizer, build_processor, build_model, resolved_precision, Logger
from mmaccel.embedded.pretrain import pretrain_vision, projected_tokens, summary_targets
from mmaccel.world.samples import SPLIT_KEY, make_sample
from mmaccel.world.spec import SHAPES
w, steps = float(sys.argv[1]), int(sys.argv[2])
cfg, _ = parse_args(["--out", "/tmp/x", "--seed", "2", "--init-std", "0.06", "--order", "question-both", "--vision-steps", str(steps),
                     "--vision-dense", "--summary", "token", "--summary-channels", "64", "--summary-weight", str(w),
                     "--extra-followups", "flash,caption"])
torch.set_num_threads(2)
tok = build_tokenizer(cfg.order, cfg.extra_followups); proc = build_processor(tok, cfg.order)
model = build_model(tok, seed=cfg.seed, text=cfg.text, vision=cfg.vision)
model.train()
t0 = time.time()
acc = pretrain_vision(model, proc, cfg.seed, steps, lr=cfg.vision_lr, log=print, summary="token", summary_weight=w,
                      summary_channels=64, dense=True)
print(f"stage 1 w={w} steps={steps}: cell acc {acc:.3f} in {time.time()-t0:.0f}s", flush=True)
model.eval()
torch.manual_seed(0)
def data(n, seed):
    rng = np.random.default_rng(np.random.SeedSequence([SPLIT_KEY["train"], seed, 11]))
    S = [make_sample("count", rng, hires=False) for _ in range(n)]
    pix = proc.image_processor([s.image for s in S], return_tensors="pt")["pixel_values"][:, 0]
    with torch.no_grad():
        f = torch.cat([projected_tokens(model, pix[i:i+64]) for i in range(0, n, 64)]).float()
    return f, torch.from_numpy(np.stack([summary_targets(s.meta)[1] for s in S]))
def fit(x, y, xt, yt, steps=1500):
    mu, sd = x.mean(0), x.std(0) + 1e-5
    x, xt = (x - mu) / sd, (xt - mu) / sd
    W = torch.nn.Linear(x.shape[1], len(SHAPES) * 7)
    opt = torch.optim.Adam(W.parameters(), 1e-2, weight_decay=1e-4)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(W(x).view(-1, 7), y.flatten())
        opt.zero_grad(); loss.backward(); opt.step()
    acc = (W(xt).view(-1, len(SHAPES), 7).argmax(-1) == yt).float()
    return round(acc.mean().item(), 3), {k: round(acc[yt == k].mean().item(), 3) for k in range(6) if (yt == k).any()}
f, c = data(4000, 1); ft, ct = data(1000, 2)
print("summary channels tile mean:", fit(f[..., :64].mean(1), c, ft[..., :64].mean(1), ct))
print("summary channels token 14:", fit(f[:, 14, :64], c, ft[:, 14, :64], ct), flush=True)
