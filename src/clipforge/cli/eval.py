"""`clipforge eval zeroshot | retrieval | linear-probe`: metrics JSON, and with --out a Markdown report and
PNG pictures beside it."""

from __future__ import annotations

import argparse

from clipforge.cli.common import add_json_flag, add_model_flags, emit


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="evaluate a model on a labelled manifest (zeroshot, retrieval, linear-probe)"
    )
    kinds = p.add_subparsers(dest="eval_kind", metavar="KIND", required=True)

    q = kinds.add_parser(
        "zeroshot", help="top-1, top-5 and mean per-class recall of zero-shot classification"
    )
    q.add_argument("--manifest", required=True, help='JSON lines {"image": path, "label": class}')
    q.add_argument("--templates", default="ensemble", help="simple | ensemble | a template file")
    q.add_argument(
        "--classes", default=None, help="file with one class a line (default: the manifest's labels)"
    )
    _common(q)
    q.set_defaults(
        run=lambda a: run_eval(
            "zeroshot",
            a.model,
            a.vocab,
            a.device,
            a.out,
            a.json,
            manifest=a.manifest,
            templates=a.templates,
            classes=a.classes,
        )
    )

    q = kinds.add_parser("retrieval", help="image-to-text and text-to-image recall@1/5/10")
    q.add_argument("--manifest", required=True, help='JSON lines {"image": path, "caption": text or [texts]}')
    _common(q)
    q.set_defaults(
        run=lambda a: run_eval("retrieval", a.model, a.vocab, a.device, a.out, a.json, manifest=a.manifest)
    )

    q = kinds.add_parser("linear-probe", help="logistic regression on frozen image features")
    q.add_argument("--train", required=True, help="training manifest (image, label)")
    q.add_argument("--test", required=True, help="test manifest (image, label)")
    q.add_argument("--C", type=float, default=None, help="inverse regularisation (default: cross-validated)")
    _common(q)
    q.set_defaults(
        run=lambda a: run_eval(
            "linear-probe", a.model, a.vocab, a.device, a.out, a.json, train=a.train, test=a.test, C=a.C
        )
    )


def _common(q: argparse.ArgumentParser) -> None:
    add_model_flags(q)
    q.add_argument("--out", default=None, help="folder for the JSON, the Markdown report and the pictures")
    add_json_flag(q)


def run_eval(
    kind: str, model: str, vocab: str | None, device: str, out: str | None, as_json: bool, **kw
) -> int:
    from clipforge.encoder import Encoder
    from clipforge.eval import linear_probe_eval, retrieval_eval, zeroshot_eval

    enc = Encoder.load(model, vocab=vocab, device=device)
    if kind == "zeroshot":
        metrics = zeroshot_eval(
            enc, kw["manifest"], templates=kw["templates"], classes=kw["classes"], out_dir=out
        )
    elif kind == "retrieval":
        metrics = retrieval_eval(enc, kw["manifest"], out_dir=out)
    else:
        metrics = linear_probe_eval(enc, kw["train"], kw["test"], C=kw["C"], out_dir=out)
    text = "\n".join(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}" for k, v in metrics.items())
    emit(metrics, as_json, text + (f"\nreport in {out}" if out else ""))
    return 0
