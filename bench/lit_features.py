"""The rows bench/lit_heads.py trains on: the locked towers' cached trunk outputs for the corpus's training
images and captions, its held-out images, their captions and every prompt set's prompts, in one file.

    python bench/lit_features.py INIT_DIR feats.pt

INIT_DIR: a clipforge directory whose towers are the pretrained ones (e.g. any `--towers auto` run's final/).
Reads the feature cache `clipforge train --feature-cache auto` fills (the namespace of a run that locks both
towers and trains their projections) and computes what it lacks.
"""

import json
import random
import sys
from pathlib import Path

import torch

import clipforge
from clipforge import paths
from clipforge.checkpoint import build_model, read_checkpoint, resolve
from clipforge.data.manifest import read_manifest
from clipforge.train import features as F

torch.set_num_threads(2)
init, out = sys.argv[1], sys.argv[2]
C = Path.home() / ".cache/clipforge/corpus"
ROOT = str(paths.features_dir())
loaded = read_checkpoint(resolve(init))
model = build_model(loaded).eval()
tok = loaded.tokenizer
for n, p in model.named_parameters():  # as a locked run: only the heads train (the cache namespace says so)
    p.requires_grad_(n in ("visual.proj", "text.text_projection", "logit_scale"))
ist = F.image_store(ROOT, model.visual, model.config, 0)
tst = F.text_store(ROOT, model.text, model.config, tok, 0)
train = read_manifest(C / "train.jsonl")
held = read_manifest(C / "heldout.jsonl")
zs = [json.loads(lab) for lab in open(C / "heldout_zeroshot.jsonl")]
ret = [json.loads(lab) for lab in open(C / "heldout_retrieval.jsonl")]


def img(samples):
    keys, st = F.build_image_features(
        ist, model.visual, 0, samples, model.config.preprocess, workers=2, progress=True
    )
    return keys


tk = img(train)
hk = img(held)
hmap = {s.image: k for s, k in zip(held, hk)}
zs_keys = [hmap[str((C / r["image"]).absolute())] for r in zs]
ret_keys = [hmap[str((C / r["image"]).absolute())] for r in ret]
templates = [
    lab.strip() for lab in open(Path(clipforge.__file__).parent / "templates/ensemble.txt") if lab.strip()
]
labels = sorted({r["label"] for r in zs})

vocab = [w.strip() for w in open(Path.home() / ".cache/clipforge/towers/minilm-l6-v2/vocab.txt")]
words = [w for w in vocab if w.isalpha() and w.isascii() and len(w) >= 3]
rng = random.Random(0)
waffle_t = [f"a photo of a {{}}, which has {rng.choice(words)} {rng.choice(words)}." for _ in range(16)]
domain = [
    "a clip art drawing of a {}.",
    "an emoji of a {}.",
    "a black silhouette icon of a {}.",
    "{} icon",
    "{} emoji",
    "{}, clip art",
    "{}",
]
sets = {
    "ensemble": templates,
    "simple": ["a photo of a {}."],
    "domain": domain,
    "label": ["{}"],
    "waffle": waffle_t,
    "domain+waffle": [t.replace("a photo of a {}", d.rstrip(".")) for d in domain[:3] for t in waffle_t[:5]],
}
prompts = sorted({t.format(lab) for ts in sets.values() for t in ts for lab in labels})
train_caps = sorted({c for s in train for c in s.captions})
ret_caps = [c for r in ret for c in r["caption"]]
allcaps = sorted(set(train_caps) | set(prompts) | set(ret_caps))
F.build_text_features(tst, model.text, 0, allcaps, tok, progress=True)
ikeys = sorted({k for k in tk + hk if k})
iv = ist.read(ikeys)[0]
tv = tst.read([F.text_key(c) for c in allcaps])[0]
torch.save(
    dict(
        ikeys=ikeys,
        iv=iv,
        caps=allcaps,
        tv=tv,
        train=[(k, list(s.captions), s.image) for s, k in zip(train, tk) if k],
        zs=[(k, r["label"]) for k, r in zip(zs_keys, zs)],
        ret=[(k, r["caption"]) for k, r in zip(ret_keys, ret)],
        labels=labels,
        templates=templates,
        sets=sets,
    ),
    out,
)
print("saved", iv.shape, tv.shape)
