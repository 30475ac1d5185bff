"""Evaluation at epoch ends: zero-shot accuracy and retrieval recall on a held-out manifest (clipforge.eval)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clipforge.encoder import Encoder


def evaluate(encoder: Encoder, manifest: str | Path) -> dict[str, Any]:
    """{"retrieval": {...R@k...}, "zeroshot": {"top1", "top5", ...}} for the model behind `encoder`. A manifest
    without class labels has no zero-shot task; its entry then says why it was skipped. Where the open corpus's
    task-specific splits sit beside it (heldout.jsonl -> heldout_zeroshot.jsonl, heldout_retrieval.jsonl), each
    task reads its own."""
    from clipforge.eval.retrieval import retrieval_eval
    from clipforge.eval.zeroshot import zeroshot_eval

    out: dict[str, Any] = {"retrieval": retrieval_eval(encoder, _task_file(manifest, "retrieval"))}
    try:
        # One template: a monitor of progress, 62 times cheaper than the ensemble (44,000 prompts for the
        # corpus's 708 classes, minutes on a CPU at every epoch end). `clipforge eval zeroshot` reports the
        # ensemble; on the corpus the two differ by about a tenth of a point (BENCHMARKS.md).
        out["zeroshot"] = zeroshot_eval(encoder, _task_file(manifest, "zeroshot"), templates="simple")
    except ValueError as e:
        out["zeroshot"] = {"skipped": str(e)}
    return out


def _task_file(manifest: str | Path, task: str) -> Path:
    p = Path(manifest)
    specific = p.with_name(f"{p.stem}_{task}{p.suffix}")
    return specific if specific.is_file() else p
