"""Request counters and latency histograms in the Prometheus text format (version 0.0.4), written by hand:
a dozen lines do not justify a dependency, and each worker process keeps its own numbers, as Prometheus
expects of a multi-process server scraped per process."""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from collections.abc import Callable

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # seconds


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count: dict[tuple[str, str, int], int] = defaultdict(int)  # (method, route, status)
        self._hist: dict[str, list[int]] = {}  # route -> per-bucket counts (+Inf last)
        self._sum: dict[str, float] = defaultdict(float)
        self.batch_sizes: dict[str, list[int]] = defaultdict(list)  # encoder micro-batch sizes, for tests

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self._count[(method, route, status)] += 1
            counts = self._hist.setdefault(route, [0] * (len(BUCKETS) + 1))
            counts[bisect.bisect_left(BUCKETS, seconds)] += 1
            self._sum[route] += seconds

    def render(self, gauges: dict[str, tuple[str, float]], batch_counts: Callable[[], dict[str, int]]) -> str:
        """The exposition text. `gauges`: name -> (help, value); `batch_counts`: encoder -> batches run."""
        out = [
            "# HELP clipforge_http_requests_total HTTP requests by method, route and status.",
            "# TYPE clipforge_http_requests_total counter",
        ]
        with self._lock:
            for (method, route, status), n in sorted(self._count.items()):
                out.append(
                    f'clipforge_http_requests_total{{method="{method}",route="{_label(route)}",'
                    f'status="{status}"}} {n}'
                )
            out += [
                "# HELP clipforge_http_request_duration_seconds Request latency by route.",
                "# TYPE clipforge_http_request_duration_seconds histogram",
            ]
            for route, counts in sorted(self._hist.items()):
                r = _label(route)
                cumulative = 0
                for bound, c in zip([*BUCKETS, float("inf")], counts):
                    cumulative += c
                    le = "+Inf" if bound == float("inf") else repr(bound)
                    out.append(
                        f'clipforge_http_request_duration_seconds_bucket{{route="{r}",le="{le}"}} {cumulative}'
                    )
                out.append(
                    f'clipforge_http_request_duration_seconds_sum{{route="{r}"}} {self._sum[route]:.6f}'
                )
                out.append(f'clipforge_http_request_duration_seconds_count{{route="{r}"}} {cumulative}')
        out += [
            "# HELP clipforge_encoder_batches_total Encoder calls made by the micro-batcher.",
            "# TYPE clipforge_encoder_batches_total counter",
        ]
        for kind, n in sorted(batch_counts().items()):
            out.append(f'clipforge_encoder_batches_total{{kind="{kind}"}} {n}')
        for name, (help_text, value) in sorted(gauges.items()):
            out += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value:g}"]
        return "\n".join(out) + "\n"
