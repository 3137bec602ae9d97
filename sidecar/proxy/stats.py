"""Per-region request counters and latency histograms, cheap enough for the hot path.

prometheus_client's labelled metrics take a lock and a label lookup per call (a few µs each); the data path
instead bumps plain dict entries and bucket lists, and `sidecar.metrics` turns them into Prometheus
families only when /metrics is scraped.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from dataclasses import dataclass, field

# Upstream latency buckets in seconds: loopback test regions answer in ~1 ms, AWS across the Atlantic in
# ~80-150 ms, and anything past the 10 s request timeout is an outage.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


@dataclass(slots=True)
class Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        running = 0
        for bound, n in zip(self.buckets, self.counts, strict=False):
            running += n
            out.append((repr(bound), running))
        out.append(("+Inf", running + self.counts[-1]))
        return out


@dataclass(slots=True)
class RegionStats:
    """What one region listener saw. `requests[(operation, status)]` counts client requests by outcome."""

    requests: defaultdict[tuple[str, int], int] = field(default_factory=lambda: defaultdict(int))
    upstream_latency: Histogram = field(default_factory=Histogram)
    refused: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    upstream_errors: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    in_flight: int = 0

    def total(self) -> int:
        return sum(self.requests.values())

    def errors(self) -> int:
        return sum(n for (_, status), n in self.requests.items() if status >= 400)
