"""A latency histogram with fixed buckets, free of I/O and of any metrics
library: the daemon's status map carries it, Prometheus and ``lazystore
status`` read it."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

# Seconds; a bucket holds the values up to its bound (Prometheus's "le").
BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
          120.0, 300.0)


@dataclass
class Timings:
    bounds: tuple[float, ...] = BOUNDS
    counts: list[int] = field(default_factory=lambda: [0] * (len(BOUNDS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def to_dict(self) -> dict[str, Any]:
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.total,
                "count": self.count}


def quantile(timings: dict[str, Any], q: float) -> float | None:
    """The bound of the bucket holding quantile *q* of a :meth:`Timings.to_dict`
    map (inf when it is past the last bound; None without observations)."""
    total = sum(timings["counts"])
    if total == 0:
        return None
    rank, seen = q * total, 0
    for bound, n in zip([*timings["bounds"], float("inf")], timings["counts"], strict=True):
        seen += n
        if seen >= rank and n:
            return float(bound)
    return float("inf")
