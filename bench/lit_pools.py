"""The pooled-feature variants behind the default model's `pool="multiscale"` (BENCHMARKS.md, "The default
model"): one pass of the pretrained EfficientNet-Lite0 over the rows of bench/lit_features.py's file, keeping
several poolings side by side, for bench/lit_heads.py to train heads on.

    python bench/lit_pools.py INIT_DIR feats.pt 224 pools224.pt
    python bench/lit_heads.py --feats feats.pt --txt identity --dim 384 --pools pools224.pt --pool avg,s4,s5,s6,s7,hist

INIT_DIR: any clipforge directory with the pretrained image tower (e.g. a `--towers auto` run's final/). Keeps,
per image: `avg` (the head convolution's global average, the reference's 1,280), `max` (its global maximum),
`s4`..`s7` (global averages of stages 4-7: 80, 112, 192, 320 channels) and `hist` (a 4x4x4 colour histogram of
the pixels), computed by the tower's own code at SIZE px.
"""

import dataclasses
import hashlib
import sys
import time
from pathlib import Path

import torch

from clipforge.checkpoint import build_model, read_checkpoint, resolve
from clipforge.data.manifest import read_manifest
from clipforge.model.efficientnet import colour_histogram
from clipforge.transforms import Preprocess

torch.set_num_threads(2)
init, feats, size, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
C = Path.home() / ".cache/clipforge/corpus"
loaded = read_checkpoint(resolve(init))
vis = build_model(loaded).eval().visual
pcfg = dataclasses.replace(loaded.config.preprocess, image_size=size)
pre = Preprocess(pcfg)
keys = torch.load(feats, weights_only=True)["ikeys"]  # the rows' image keys: each file's sha256
want, paths = set(keys), {}
for s in [*read_manifest(C / "train.jsonl"), *read_manifest(C / "heldout.jsonl")]:
    h = hashlib.sha256(Path(s.image).read_bytes()).hexdigest()
    if h in want:
        paths.setdefault(h, s.image)


class Images(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return len(keys)

    def __getitem__(self, i: int) -> torch.Tensor:
        return pre(paths[keys[i]])


mean = torch.tensor(pcfg.mean).view(1, 3, 1, 1)
std = torch.tensor(pcfg.std).view(1, 3, 1, 1)
stage_of = {end: f"s{n}" for n, end in zip(range(4, 8), vis.stage_ends[3:])}
rows: dict[str, list[torch.Tensor]] = {k: [] for k in ["avg", "max", "s4", "s5", "s6", "s7", "hist"]}
t0 = time.time()
with torch.inference_mode():
    for x in torch.utils.data.DataLoader(Images(), batch_size=64, num_workers=1):
        rows["hist"].append(colour_histogram(x * std + mean))
        h = vis.stem(x)
        for i, block in enumerate(vis.blocks):
            h = block(h)
            if i in stage_of:
                rows[stage_of[i]].append(h.mean((2, 3)))
        h = vis.top(h)
        rows["avg"].append(h.mean((2, 3)))
        rows["max"].append(h.amax((2, 3)))
torch.save({k: torch.cat(v).half() for k, v in rows.items()} | {"ikeys": keys}, out)
print(f"{len(keys)} images in {time.time() - t0:.0f} s")
