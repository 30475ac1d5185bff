"""Timing helpers the benchmarks share: interleaved A/B rounds, medians, per-round ratios, machine load and the
measured fp32 matmul peak. Timings on shared cores drift by up to 5x between runs, so every comparison runs
its sides alternately (A B C A B C ...) and reports medians and the median of per-round ratios."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def set_threads(n: int) -> None:
    torch.set_num_threads(n)


def load_average() -> str:
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} cores"


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def time_once(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, measured in alternating order over `rounds` rounds."""
    with torch.no_grad():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(rounds):
            for k, fn in fns.items():
                times[k].append(time_once(fn))
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def ratio(baseline: list[float], other: list[float]) -> float:
    """Median over rounds of baseline_time / other_time: > 1 means `other` is faster."""
    return statistics.median(b / o for b, o in zip(baseline, other))


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """Measured fp32 GFLOP/s of a large square torch.mm (median of `reps`) at the current thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    ts = [time_once(lambda: torch.mm(a, b)) for _ in range(reps)]
    return 2 * n**3 / statistics.median(ts) / 1e9


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs of one call (matmuls, convolutions, attention) as torch's flop counter sees them."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
