"""What a region listener shares with the rest of the daemon: the region's runtime (signer, pool, health,
counters, passive-signal hooks) and the data-path policy. A leaf module: the listener, the fence, the
monitor and the daemon all name these types, and none of them needs the others to do so."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sidecar.core.gate import GatePolicy
from sidecar.core.latency import CLASSES, LatencyClass, RecentLatencies
from sidecar.proxy.sigv4 import ClientVerifier, Credentials, DynamoDBRequestSigner
from sidecar.proxy.stats import RegionStats
from sidecar.proxy.upstream import UpstreamError, UpstreamPool

if TYPE_CHECKING:
    from sidecar.proxy.budget import ByteBudget
    from sidecar.proxy.fence import WriteFence
    from sidecar.proxy.offload import GateOffload


@dataclass(slots=True)
class DataPathPolicy:
    """What the listeners enforce; replaced as a whole on SIGHUP."""

    gate: GatePolicy
    verifier: ClientVerifier | None = None


class RegionHealth:
    """The region's usability as the health check reports it; written by the region's monitor."""

    __slots__ = ("cause", "checked_at", "state")

    def __init__(self) -> None:
        self.state = "unknown"
        self.cause: str | None = None
        self.checked_at: float | None = None

    @property
    def healthy(self) -> bool:
        return self.state == "up"


# (status, body, latency, error, is_write, latency class): a request's outcome for the region's health monitor.
TrafficWatch = Callable[[int | None, bytes | None, float, UpstreamError | None, bool, LatencyClass], None]


class RegionRuntime:
    """Everything a listener needs for its region; shared with the health monitor and the admin API.

    Passive health signals: the listener reports to `watch` only what may matter (upstream failures, 5xx,
    answers slower than their class's `slow_after`, and every answer while `suspect`), so a healthy region
    costs a comparison per request. Every answer's latency goes into `latencies` (per class: a Scan is
    judged against Scans). `last_answer` and `busy_since` (monotonic) let the monitor see a blackhole:
    requests waiting and no answer for a while; `fast_*` the same for the requests that should be fast.
    """

    def __init__(
        self,
        name: str,
        signer: DynamoDBRequestSigner,
        pool: UpstreamPool,
        credentials: Callable[[], Credentials],
        policy: Callable[[], DataPathPolicy],
    ) -> None:
        self.name = name
        self.signer = signer
        self.pool = pool
        self.credentials = credentials
        self.policy = policy
        self.health = RegionHealth()
        self.stats = RegionStats()
        self.watch: TrafficWatch | None = None
        self.suspect = False
        # per LatencyClass; set by the monitor from `latencies` (expected-long classes: inf until known)
        self.slow_after = [2.0 if cls is LatencyClass.POINT else float("inf") for cls in CLASSES]
        self.latencies = RecentLatencies()
        self.last_answer = 0.0
        self.busy_since = 0.0
        self.answers = 0
        self.fast_in_flight = 0
        self.fast_busy_since = 0.0
        self.fast_last_answer = 0.0
        self.writes_in_flight = 0
        # Switchover: the fence shared by every listener, and (after one) the active region this listener's
        # stray writes go to, so that no write lands in the old region once the new one took over.
        self.fence: WriteFence[RegionRuntime] | None = None
        # The request bytes every listener may hold at once (shared; None: unbounded, in unit tests).
        self.budget: ByteBudget | None = None
        # Where large bodies are judged (a worker process; None: inline, in unit tests).
        self.offload: GateOffload | None = None
        self.forward_to: RegionRuntime | None = None
