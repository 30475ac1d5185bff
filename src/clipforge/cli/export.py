"""`clipforge export onnx`: write a model's towers as ONNX graphs that `clipforge.load(DIR)` runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from clipforge.cli.common import add_json_flag, emit


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a model for other runtimes (ONNX)")
    fmt = p.add_subparsers(dest="export_format", metavar="FORMAT")
    o = fmt.add_parser(
        "onnx", help="image and text towers as ONNX graphs with dynamic batch, for onnxruntime"
    )
    o.add_argument("--model", "-m", default="default", help="checkpoint path or 'default'")
    o.add_argument("--vocab", default=None, help="vocabulary for a checkpoint that carries none")
    o.add_argument("--out", required=True, help="output directory")
    add_json_flag(o)
    o.set_defaults(run=lambda a: export_onnx_command(a.model, a.vocab, Path(a.out), a.json))


def export_onnx_command(model: str, vocab: str | None, out: Path, as_json: bool) -> int:
    from clipforge.checkpoint import load
    from clipforge.onnx_export import export_onnx

    m, _, tokenizer = load(model, vocab=vocab)
    export_onnx(m, out, tokenizer)
    emit(
        {"model": model, "out": str(out), "files": sorted(p.name for p in out.iterdir())},
        as_json,
        f"wrote {out} (image.onnx, text.onnx); load it with clipforge.load({str(out)!r})",
    )
    return 0
