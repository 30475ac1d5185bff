"""A quickly trained joint space for benchmarks that need one before the real locked-tower run ends: fits only
the two linear projections of a pretrained-tower model (LiT with both towers locked) by the CLIP loss on the
trunk features already in the feature cache (images and captions of the corpus's train split that have
both), and saves the model. Nothing is embedded here: pairs missing from the cache are left out.

    python bench/quick_projection.py --init INIT_DIR --out DIR [--steps 400] [--batch 1024]

INIT_DIR is a checkpoint of the `effnet-lite0-minilm` preset with its pretrained towers loaded (what
`clipforge train --init` starts from); its trunks must be those whose features the cache holds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import clipforge  # noqa: E402
from clipforge import paths  # noqa: E402
from clipforge.loss import clip_loss  # noqa: E402
from clipforge.train import features as ft  # noqa: E402
from clipforge.train.locked import head_parameters  # noqa: E402
from clipforge.train.optim import lock_tower  # noqa: E402


def cached_pairs(model, tokenizer, corpus: Path, cache: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(image trunk features (N, Ci), text trunk features (N, Ct)): one row per cached (image, caption)."""
    size = model.config.preprocess.image_size
    for tower, example in ((model.visual, torch.zeros(1, 3, size, size)), (model.text, tokenizer([""]))):
        lock_tower(tower, keep=head_parameters(tower, example, 0))  # as training locks it: same namespaces
    images = ft.image_store(cache, model.visual, model.config, 0)
    texts = ft.text_store(cache, model.text, model.config, tokenizer, 0)
    image_index, text_index = images.index(), texts.index()
    keys_i, keys_t = [], []
    for line in open(corpus / "train.jsonl", encoding="utf-8"):
        row = json.loads(line)
        ik = hashlib.sha256((corpus / row["image"]).read_bytes()).hexdigest()
        if ik not in image_index:
            continue
        for c in row["captions"]:
            if ft.text_key(c) in text_index:
                keys_i.append(ik)
                keys_t.append(ft.text_key(c))
    if not keys_i:
        raise SystemExit(f"no (image, caption) pair has cached features in {images.dir} and {texts.dir}")
    return images.read(keys_i)[0], texts.read(keys_t)[0]


def fit(model, img: torch.Tensor, txt: torch.Tensor, steps: int, batch: int, lr: float) -> None:
    params = [model.visual.proj, model.text.text_projection, model.logit_scale]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        idx = torch.randint(0, len(img), (batch,), generator=gen)
        a = F.normalize(model.visual.head(img[idx]), dim=-1)
        b = F.normalize(model.text.head(txt[idx]), dim=-1)
        loss = clip_loss(a, b, model.scale())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--init", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--corpus", default=None)
    ap.add_argument("--cache", default=None, help="feature cache (default: the clipforge cache's)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-3)
    a = ap.parse_args()
    torch.set_num_threads(1)
    corpus = Path(a.corpus) if a.corpus else paths.corpus_dir()
    cache = Path(a.cache) if a.cache else paths.cache_dir() / "features"
    model, _, tokenizer = clipforge.load(a.init)
    t0 = time.perf_counter()
    img, txt = cached_pairs(model, tokenizer, corpus, cache)
    print(f"{len(img)} cached (image, caption) pairs")
    fit(model, img, txt, a.steps, a.batch, a.lr)
    clipforge.save_model(model, a.out, tokenizer=tokenizer)
    print(f"saved {a.out} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
