"""The serving metrics, written in the Prometheus text exposition format (version 0.0.4).

Three families are all a dashboard or an autoscaler needs, so they are written by hand rather than
through a client library: requests by route and status, request latency, and rows per model call. gRPC
calls count under their method's path, with the HTTP status of the same answer (400 for INVALID_ARGUMENT).
Everything is updated from the server's event loop thread, so no locks are needed. Several worker
processes share theirs through a directory (SharedMetrics), so that /metrics counts for the whole server.
"""

from __future__ import annotations

import json
import math
import os
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass
class Histogram:
    bounds: tuple[float, ...]
    counts: list[int] = field(init=False)  # per bucket, not cumulative; the last one is +Inf
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # buckets are "less than or equal"
        self.total += value

    def add(self, other: Histogram) -> None:
        self.counts = [mine + theirs for mine, theirs in zip(self.counts, other.counts, strict=True)]
        self.total += other.total

    def to_json(self) -> dict[str, Any]:
        return {"counts": self.counts, "total": self.total}

    @classmethod
    def from_json(cls, bounds: tuple[float, ...], data: dict[str, Any]) -> Histogram:
        histogram = cls(bounds)
        histogram.counts, histogram.total = list(data["counts"]), data["total"]
        return histogram

    def lines(self, name: str, labels: str = "") -> list[str]:
        separator = "," if labels else ""
        lines, cumulative = [], 0
        for bound, count in zip((*self.bounds, math.inf), self.counts):
            cumulative += count
            le = "+Inf" if bound == math.inf else _number(bound)
            lines.append(f'{name}_bucket{{{labels}{separator}le="{le}"}} {cumulative}')
        braces = f"{{{labels}}}" if labels else ""
        lines.append(f"{name}_sum{braces} {_number(self.total)}")
        lines.append(f"{name}_count{braces} {cumulative}")
        return lines


@dataclass
class ServeMetrics:
    model: str
    batching: bool
    requests: Counter[tuple[str, int]] = field(default_factory=Counter)  # (route, status) -> count
    latency: dict[str, Histogram] = field(default_factory=dict)  # route -> seconds
    batch_rows: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests[route, status] += 1
        self.latency.setdefault(route, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def observe_model_call(self, rows: int) -> None:
        self.batch_rows.observe(rows)

    def add(self, other: ServeMetrics) -> None:
        self.requests.update(other.requests)
        for route, histogram in other.latency.items():
            self.latency.setdefault(route, Histogram(LATENCY_BUCKETS)).add(histogram)
        self.batch_rows.add(other.batch_rows)

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": [[route, status, count] for (route, status), count in self.requests.items()],
            "latency": {route: histogram.to_json() for route, histogram in self.latency.items()},
            "batch_rows": self.batch_rows.to_json(),
        }

    @classmethod
    def from_json(cls, model: str, batching: bool, data: dict[str, Any]) -> ServeMetrics:
        return cls(
            model,
            batching,
            Counter({(route, status): count for route, status, count in data["requests"]}),
            {route: Histogram.from_json(LATENCY_BUCKETS, h) for route, h in data["latency"].items()},
            Histogram.from_json(BATCH_BUCKETS, data["batch_rows"]),
        )

    def render(self) -> str:
        lines = [
            "# HELP nnwheel_requests_total Requests answered, by route (for gRPC, the method's path) and HTTP status code.",
            "# TYPE nnwheel_requests_total counter",
        ]
        for (route, status), count in sorted(self.requests.items()):
            lines.append(f'nnwheel_requests_total{{route="{_escape(route)}",code="{status}"}} {count}')
        lines += [
            "# HELP nnwheel_request_duration_seconds Time from receiving a request to the end of its response.",
            "# TYPE nnwheel_request_duration_seconds histogram",
        ]
        for route, histogram in sorted(self.latency.items()):
            lines += histogram.lines("nnwheel_request_duration_seconds", f'route="{_escape(route)}"')
        lines += [
            "# HELP nnwheel_batch_rows Rows per model call: above 1 when concurrent requests were batched.",
            "# TYPE nnwheel_batch_rows histogram",
            *self.batch_rows.lines("nnwheel_batch_rows"),
            "# HELP nnwheel_batching_enabled 1 when concurrent requests are merged into one model call.",
            "# TYPE nnwheel_batching_enabled gauge",
            f'nnwheel_batching_enabled{{model="{_escape(self.model)}"}} {int(self.batching)}',
        ]
        return "\n".join(lines) + "\n"


class SharedMetrics:
    """The metrics of one worker process among several, shared through files in a directory they all know.

    Each worker writes its counts to a file of its own (publish(): the server does so every second and on
    each /metrics request), and /metrics answers with the sum of every worker's latest file, so that a
    scrape counts for the whole server, whichever worker answers it. The files of workers that have exited
    stay in the sum: counters never go back.
    """

    def __init__(self, metrics: ServeMetrics, directory: Path, worker: str | None = None) -> None:
        self.metrics = metrics
        self.directory = directory
        self._worker = worker or str(os.getpid())

    def publish(self) -> None:
        """Replace this worker's file at once, so that readers see the old counts or the new ones."""
        partial = self.directory / f".{self._worker}.partial"
        partial.write_text(json.dumps(self.metrics.to_json()), encoding="utf-8")
        os.replace(partial, self.directory / f"{self._worker}.json")

    def render(self) -> str:
        self.publish()
        total = ServeMetrics(self.metrics.model, self.metrics.batching)
        for path in sorted(self.directory.glob("*.json")):
            data = json.loads(path.read_text(encoding="utf-8"))
            total.add(ServeMetrics.from_json(self.metrics.model, self.metrics.batching, data))
        return total.render()


def _number(value: float) -> str:
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
