"""Head experiments for the default model's recipe, on cached trunk features (minutes, not hours): which
projection heads, dimensions, learning rates and prompt sets generalise to the corpus's held-out concepts.

    python bench/lit_features.py INIT_DIR feats.pt    # the rows, once
    python bench/lit_heads.py --feats feats.pt [--txt identity --dim 384] [--img mlp] ...
    python bench/lit_pools.py INIT_DIR feats.pt 224 pools.pt   # other poolings of the image tower, once
    python bench/lit_heads.py --feats feats.pt --pools pools.pt --pool avg,s4,s5,s6,s7,hist ...

Trains an image and a text head with the symmetric InfoNCE loss on those rows (batch 1024, a random
caption of each image per step, AdamW, cosine schedule) and prints held-out zero-shot top-1/top-5 for each
prompt set and text -> image R@1/R@10. One seed per call: compare settings with --seed 0 1 2 before trusting a
difference under a point. The default recipe (`--lock-text-head`: text head = identity) is `--txt identity
--dim 384`.
"""

import argparse
import math
import time

import torch
import torch.nn.functional as Fn

ap = argparse.ArgumentParser()
ap.add_argument("--feats", required=True)
ap.add_argument("--steps", type=int, default=1500)
ap.add_argument("--bs", type=int, default=1024)
ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--wd", type=float, default=0.2)
ap.add_argument("--dim", type=int, default=256)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--img", default="linear")
ap.add_argument("--txt", default="linear")
ap.add_argument("--hidden", type=int, default=1024)
ap.add_argument("--tnorm", action="store_true")
ap.add_argument("--istd", action="store_true")
ap.add_argument("--drop", type=float, default=0.0)
ap.add_argument("--templates", default="ensemble")
ap.add_argument("--temp", type=float, default=1 / 0.07)
ap.add_argument("--dedup", action="store_true", help="mask in-batch negatives with the same caption")
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--tlr", type=float, default=0.1)
ap.add_argument("--pools", default="", help="bench/lit_pools.py's file: image rows from other poolings")
ap.add_argument("--pool", default="avg", help="which of its poolings, concatenated (as pool='multiscale')")
a = ap.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(a.seed)
D = torch.load(a.feats, weights_only=True)  # tensors, strings and lists only: nothing in the file runs
irow = {k: i for i, k in enumerate(D["ikeys"])}
trow = {c: i for i, c in enumerate(D["caps"])}
IV, TV = D["iv"].float(), D["tv"].float()
if a.pools:  # raw concatenation, as the tower's multiscale pooling does
    P = torch.load(a.pools, weights_only=True)
    assert P["ikeys"] == D["ikeys"], "the pools file must come from this --feats file"
    IV = torch.cat([P[name].float() for name in a.pool.split(",")], 1)
if a.tnorm:
    TV = Fn.normalize(TV, dim=-1) * math.sqrt(TV.shape[1]) / 4
tr_img = torch.tensor([irow[k] for k, _, _ in D["train"]])
tr_caps = [[trow[c] for c in caps] for _, caps, _ in D["train"]]
mu, sd = IV[tr_img].mean(0), IV[tr_img].std(0) + 1e-3
if a.istd:
    IV = (IV - mu) / sd


def head(kind, din):
    if kind == "linear":
        return torch.nn.Linear(din, a.dim, bias=False)
    if kind == "identity":
        return torch.nn.Identity()
    if kind == "eye":
        lin = torch.nn.Linear(din, a.dim, bias=False)
        torch.nn.init.eye_(lin.weight)
        return lin
    if kind == "mlp":
        return Res(din)


class Res(torch.nn.Module):
    def __init__(s, din):
        super().__init__()
        s.lin = torch.nn.Linear(din, a.dim, bias=False)
        s.mlp = torch.nn.Sequential(
            torch.nn.Linear(din, a.hidden),
            torch.nn.GELU(),
            torch.nn.Dropout(a.drop),
            torch.nn.Linear(a.hidden, a.dim),
        )

    def forward(s, x):
        return s.lin(x) + s.mlp(x)


hi, ht = head(a.img, IV.shape[1]), head(a.txt, TV.shape[1])
scale = torch.nn.Parameter(torch.tensor(math.log(a.temp)))
params = list(hi.parameters()) + list(ht.parameters())
if a.txt == "eye":
    params = list(hi.parameters())
    tparams = list(ht.parameters())
else:
    tparams = []
groups = [{"params": params, "weight_decay": a.wd}, {"params": [scale], "weight_decay": 0}]
if tparams:
    groups.append({"params": tparams, "weight_decay": 0.0, "lr_scale": a.tlr})
opt = torch.optim.AdamW(groups, lr=a.lr)
warm = 100
g = torch.Generator().manual_seed(a.seed)
n = len(tr_img)
t0 = time.time()
for step in range(a.steps):
    lr = a.lr * min(1, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / a.steps))
    for pg in opt.param_groups:
        pg["lr"] = lr * pg.get("lr_scale", 1.0)
    idx = torch.randperm(n, generator=g)[: a.bs]
    ci = torch.tensor(
        [tr_caps[i][torch.randint(len(tr_caps[i]), (1,), generator=g).item()] for i in idx.tolist()]
    )
    x = Fn.normalize(hi(IV[tr_img[idx]]), dim=-1)
    y = Fn.normalize(ht(TV[ci]), dim=-1)
    logits = scale.exp().clamp(max=100) * x @ y.T
    if a.dedup:
        same = (ci[:, None] == ci[None, :]) & ~torch.eye(len(ci), dtype=torch.bool)
        logits = logits.masked_fill(same, -1e4)
    lab = torch.arange(len(idx))
    loss = (Fn.cross_entropy(logits, lab) + Fn.cross_entropy(logits.T, lab)) / 2
    opt.zero_grad()
    loss.backward()
    opt.step()
hi.eval()
ht.eval()
with torch.no_grad():
    enc_i = lambda keys: Fn.normalize(hi(IV[torch.tensor([irow[k] for k in keys])]), dim=-1)
    enc_t = lambda caps: Fn.normalize(ht(TV[torch.tensor([trow[c] for c in caps])]), dim=-1)
    labels = D["labels"]
    zi = enc_i([k for k, _ in D["zs"]])
    y = torch.tensor([labels.index(lab) for _, lab in D["zs"]])
    zsr = {}
    for name, tmpl in D["sets"].items():
        W = torch.stack([Fn.normalize(enc_t([t.format(lab) for t in tmpl]).mean(0), dim=0) for lab in labels])
        top = (zi @ W.T).topk(5, dim=1).indices
        zsr[name] = ((top[:, 0] == y).float().mean().item(), (top == y[:, None]).any(1).float().mean().item())
    t1, t5 = zsr[a.templates]
    rk = [k for k, _ in D["ret"]]
    ri = enc_i(rk)
    caps = [c for _, cs in D["ret"] for c in cs]
    owner = torch.tensor([i for i, (_, cs) in enumerate(D["ret"]) for _ in cs])
    s = enc_t(caps) @ ri.T
    rank = (s > s[torch.arange(len(caps)), owner][:, None]).sum(1)
    r1 = (rank < 1).float().mean().item()
    r10 = (rank < 10).float().mean().item()
print(" ".join(f"{k}:{v[0]:.3f}/{v[1]:.3f}" for k, v in zsr.items()))
print(
    f"{vars(a)} | zs top1 {t1:.3f} top5 {t5:.3f} | t2i R@1 {r1:.3f} R@10 {r10:.3f} | scale {scale.exp().item():.1f} | {time.time() - t0:.0f}s",
    flush=True,
)
