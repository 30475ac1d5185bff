"""Memory of a model loaded with one tower against both: `clipforge.load(path, towers=...)` for ViT-B-32 and
ViT-L-14 with random weights saved to a temporary clipforge directory (safetensors, Hugging Face names).

Each load runs in a fresh process, so resident memory (VmRSS after the load, minus VmRSS after `import
clipforge`) and peak RSS (VmHWM, not ru_maxrss, which a child inherits from its parent at exec) are the load's alone; tensor bytes are the model's parameters and buffers.
The towers are measured in alternating order over `--rounds` rounds; the tables give medians.

    PYTHONPATH=src python bench/one_tower.py [--models ViT-B-32,ViT-L-14] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, machine, table  # noqa: E402

TOWERS = ("both", "text", "image")

# Run in a child process: prints {"rss": bytes added by the load, "peak": peak RSS, "tensors": bytes}.
CHILD = """
import json, sys, warnings
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
import clipforge
base = status("VmRSS")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the random model carries no vocabulary
    model, _, _ = clipforge.load(sys.argv[1], towers=sys.argv[2])
tensors = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({"rss": status("VmRSS") - base, "peak": status("VmHWM") - base, "tensors": tensors}))
"""


def measure(path: Path, towers: str) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), towers], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def save_random(preset: str, directory: Path) -> Path:
    import clipforge

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = clipforge.create_model(preset, seed=0)
    return clipforge.save_model(model, directory / preset)


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="ViT-B-32,ViT-L-14")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(f"machine: {machine()}; load average {load_average()}")
    rows = []
    for preset in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            path = save_random(preset, Path(tmp))
            runs: dict[str, list[dict[str, int]]] = {t: [] for t in TOWERS}
            for _ in range(args.rounds):
                for towers in TOWERS:
                    runs[towers].append(measure(path, towers))
        med = {t: {k: statistics.median(r[k] for r in runs[t]) for k in runs[t][0]} for t in TOWERS}
        for towers in TOWERS:
            m = med[towers]
            saved = 1 - m["rss"] / med["both"]["rss"]
            rows.append([preset, towers, mib(m["tensors"]), mib(m["rss"]), mib(m["peak"]), f"{saved:.0%}"])
    print(f"{args.rounds} rounds, medians")
    print(table(["model", "towers", "tensors MiB", "RSS added MiB", "peak RSS added MiB", "RSS saved"], rows))


if __name__ == "__main__":
    main()
