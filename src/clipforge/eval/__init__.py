"""Evaluation harness: zero-shot classification, retrieval and linear probes on a user's labelled manifest,
each with a JSON of metrics and, on request, a Markdown report with pictures (report.py)."""

from clipforge.eval.probe import linear_probe_eval
from clipforge.eval.retrieval import retrieval_eval
from clipforge.eval.zeroshot import zeroshot_eval

__all__ = ["linear_probe_eval", "retrieval_eval", "zeroshot_eval"]
