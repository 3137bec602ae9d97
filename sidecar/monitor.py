"""Watching one region: active probes, passive signals from the app's traffic, and stall detection.

The classification and the fall/rise arithmetic are pure (`sidecar.core.health`); this is the I/O around it:
- read probes: a signed, consistent GetItem of the region's own canary item every `health.interval`;
- write probes: a PutItem of that item every `health.write_every` probes, so a region that reads but cannot
  write is seen (reads and writes keep separate failure runs: successful reads must not hide failing writes);
- fast probes (HAProxy's `fastinter`): while a region is suspect (its last observation was an outage) or a
  probe is overdue, probes go out every `fast_interval`, overlapping, so `fall` failures take ~2 fast
  intervals instead of `fall` intervals; `probe_now()` sends one at once (the controller asks for it before
  a move, to see that the target answers *now*);
- passive signals: the listener reports upstream failures, 5xx and slow answers of real requests (and every
  answer while the region is suspect), slow judged per latency class (`core.latency`: a Scan against
  Scans); `sweep()` watches requests that wait with no answer from the region: past a quarter of
  `health.timeout` it probes now, and the silence becomes an outage only with evidence
  (`core.health.judge_silence`: a probe sent during it unanswered, or single-item requests waiting 10x
  their p99), so a blackhole under traffic is seen before the next probe times out while slow Scans at a
  healthy region are not.
Recovery (`rise`) is seen by probes and traffic alike; nothing here decides about traffic.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any

import orjson

from sidecar.config import Config
from sidecar.core.health import (
    Cause,
    HealthState,
    ProbeOutcome,
    Silence,
    classify_failure,
    classify_response,
    combine,
    error_code,
    judge_silence,
    observe,
)
from sidecar.core.latency import CLASSES, LatencyClass, p99, slow_after
from sidecar.proxy.region import RegionRuntime
from sidecar.proxy.upstream import UpstreamError, UpstreamPool, UpstreamResponse

logger = logging.getLogger(__name__)

# What DynamoDB answers a probe when the health table is missing or has another key than `pk` (S).
HEALTH_TABLE_ERRORS = frozenset({"ResourceNotFoundException", "ValidationException"})

READ_TARGET = "DynamoDB_20120810.GetItem"
WRITE_TARGET = "DynamoDB_20120810.PutItem"
MAX_OUTSTANDING = 4  # overlapping probes per region at most
THRESHOLDS_EVERY = 1.0  # seconds between recomputations of the per-class latency thresholds
PROBE_HISTORY = 64  # probe answer latencies remembered for the probe p99


def canary_key(region: str) -> dict[str, Any]:
    """Each region probes its own item, so replicated probe writes never conflict."""
    return {"pk": {"S": f"canary#{region}"}}


def fast_interval(interval: float) -> float:
    return min(interval, max(0.05, interval / 5))


class RegionMonitor:
    """The health of one region, from its probes and its traffic. `on_change` is called (synchronously)
    whenever the region's state, cause or suspicion changes."""

    def __init__(
        self,
        runtime: RegionRuntime,
        pool: UpstreamPool,
        config: Callable[[], Config],
        on_change: Callable[[RegionMonitor, HealthState], None],
        on_quiet: Callable[[RegionMonitor], None] | None = None,
    ) -> None:
        self.name = runtime.name
        self.runtime = runtime
        self.pool = pool
        self._config = config
        self._on_change = on_change
        self.health_table_problem: str | None = None  # the probes' last word on the health table itself
        self._on_quiet = on_quiet
        self.answer_rate = 0.0  # answers per second from app traffic, a ~1 s moving average
        self._answers_seen = 0
        self._answers_at = 0.0
        self.reads = HealthState()
        self.writes = HealthState()
        self.state = HealthState()
        self.outcomes: defaultdict[tuple[str, str], int] = defaultdict(int)  # (source, cause) -> count
        self.probe_latency: float | None = None
        self._probe_latencies: deque[float] = deque(maxlen=PROBE_HISTORY)
        self._outstanding: dict[int, float] = {}  # probe id -> loop.time() start
        # Probes as the silence rule sees them (time.monotonic(), the listener's clock): the latest sent,
        # the latest answered, and the start of the latest that ended without an answer.
        self._probe_sent_at: dict[int, float] = {}
        self._last_probe_sent = 0.0
        self._last_probe_answered = 0.0
        self._probe_failed_sent = 0.0
        self._looked_at = 0.0  # when the silence rule last asked for a probe (one may not have gone out)
        self._fast_p99: float | None = None
        self._thresholds_at = 0.0
        self._ids = 0
        self._wake = asyncio.Event()
        self._count = 0
        self._stall_reported_at = 0.0
        self._last_failure_at = 0.0  # wall time of the latest outage observation
        runtime.watch = self.traffic
        self.refresh_thresholds()

    # -- observations
    def observe(self, outcome: ProbeOutcome, source: str, *, write: bool = False) -> None:
        cfg = self._config().health
        now = time.time()
        self.outcomes[(source, outcome.cause.value)] += 1
        if outcome.is_outage:
            self._last_failure_at = now
        if write and not cfg.write_every:
            write = False  # no write probes to clear a write failure run: one run for everything
        if write:
            self.writes = observe(self.writes, outcome, fall=cfg.fall, rise=cfg.rise, now=now, source=source)
        else:
            self.reads = observe(self.reads, outcome, fall=cfg.fall, rise=cfg.rise, now=now, source=source)
        before = self.state
        self.state = combine(self.reads, self.writes)
        health = self.runtime.health
        health.state = self.state.state
        health.cause = self.state.cause
        health.checked_at = now
        self.runtime.suspect = self.state.failures > 0 or self.reads.failures > 0 or self.writes.failures > 0
        if self.state.suspect and not before.suspect:
            self._wake.set()  # go fast now
        changed = (before.state, before.cause, before.suspect) != (
            self.state.state,
            self.state.cause,
            self.state.suspect,
        )
        # Probes always report (a fresh good answer can be what a waiting move needs); traffic only on change.
        if changed or source != "traffic":
            self._on_change(self, before)

    def traffic(self, status: int | None, body: bytes | None, latency: float, error: UpstreamError | None,
                write: bool, cls: LatencyClass = LatencyClass.POINT) -> None:  # fmt: skip
        """A real request's outcome (called by the listener only when it may matter: failures, 5xx, answers
        slow for their latency class, and any answer while the region is suspect)."""
        try:
            if error is not None:
                outcome = classify_failure(error.kind, f"app request: {error.detail}")
            else:
                assert status is not None and body is not None
                code = error_code(status, body) if status >= 500 else None
                outcome = classify_response(
                    status, code, latency, self.runtime.slow_after[cls], what=f"{cls.name.lower()} request"
                )
            if not outcome.is_outage and time.time() - latency < self._last_failure_at:
                # Sent before the latest failure was seen: a late answer to an old request says nothing
                # about the region now (requests already at the region when a fault began still answer).
                return
            self.observe(outcome, "traffic", write=write)
        except Exception:  # the data path must never fail because of health bookkeeping
            logger.exception("region %s: recording a traffic outcome failed", self.name)

    def refresh_thresholds(self, now: float | None = None) -> None:
        """Recompute the per-class slow thresholds and the fast requests' p99 from recent answers (only the
        classes with new answers, when called from the sweep at `now`; all of them otherwise)."""
        rt = self.runtime
        base = self._config().health.slow
        changed = rt.latencies.changed() if now is not None else list(CLASSES)
        for cls in changed:
            rt.slow_after[cls] = slow_after(cls, rt.latencies.p99(cls), rt.latencies.count(cls), base)
        if LatencyClass.POINT in changed:
            self._fast_p99 = rt.latencies.p99(LatencyClass.POINT)
        if now is not None:
            self._thresholds_at = now

    def silence(self, now: float) -> Silence | None:
        """The region's silence as `core.health.judge_silence` reads it; None while nothing waits."""
        rt = self.runtime
        waiting = rt.stats.in_flight
        if waiting <= 0:
            return None
        cfg = self._config().health
        quiet_since = max(rt.last_answer, rt.busy_since)
        quiet = now - quiet_since
        fast_quiet = now - max(rt.fast_last_answer, rt.fast_busy_since) if rt.fast_in_flight > 0 else 0.0
        answered = self._last_probe_answered
        pending = [t for t in self._probe_sent_at.values() if t >= quiet_since and t > answered]
        failed = self._probe_failed_sent
        asked = max(self._last_probe_sent, self._looked_at)
        return Silence(
            quiet=quiet,
            waiting=waiting,
            expected=self.answer_rate * quiet,
            timeout=cfg.timeout,
            fast_quiet=fast_quiet,
            fast_waiting=max(rt.fast_in_flight, 0),
            fast_p99=self._fast_p99,
            probe_sent_ago=now - asked if asked >= quiet_since else None,
            probe_pending_for=now - min(pending) if pending else None,
            probe_failed=failed >= quiet_since and failed > answered,
            probe_p99=p99(self._probe_latencies),
        )

    def sweep(self, now: float) -> None:
        """Requests waiting with no answer from the region: look closer, and call it a stall on evidence.

        The verdict is `core.health.judge_silence`; this only measures and acts. A look probes this region
        now and the others too (`on_quiet`), so the move, if it comes, waits for nothing. A stall counts as
        one timeout per waiting request (at most `fall`), once per silence.
        """
        rt = self.runtime
        dt = now - self._answers_at
        if rt.answers != self._answers_seen or rt.stats.in_flight <= 0:
            # The rate moves with answers, and decays while the app is idle; it holds still only while
            # requests wait unanswered (that silence is what it is there to judge).
            if self._answers_at and dt > 0:
                rate = (rt.answers - self._answers_seen) / dt
                self.answer_rate += (rate - self.answer_rate) * min(1.0, dt)  # ~1 s moving average
            self._answers_seen, self._answers_at = rt.answers, now
        if now - self._thresholds_at >= THRESHOLDS_EVERY:
            self.refresh_thresholds(now)
        silence = self.silence(now)
        if silence is None:
            return
        verdict = judge_silence(silence)
        if verdict.look:
            self._looked_at = now
            self._probe_immediately()
            if self._on_quiet is not None:
                self._on_quiet(self)
        quiet_since = now - silence.quiet
        if not verdict.stalled or self._stall_reported_at >= quiet_since:
            return
        self._stall_reported_at = now
        detail = (
            f"{silence.waiting} app request(s) waiting, no answer from {self.name} for "
            f"{silence.quiet * 1000:.0f} ms; {verdict.evidence}"
        )
        for _ in range(min(silence.waiting, self._config().health.fall)):
            self.observe(ProbeOutcome(Cause.TIMEOUT, detail), "traffic")

    # -- probes
    def probe_now(self) -> None:
        self._wake.set()

    def _hurry(self, now: float, fast: float) -> bool:
        """Probe at the fast pace: the region is suspect, or a probe has gone unanswered for a while."""
        return self.state.suspect or any(now - started > fast for started in self._outstanding.values())

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            cfg = self._config().health
            fast = fast_interval(cfg.interval)
            now = loop.time()
            if self._wake.is_set() or now >= next_at:
                self._wake.clear()
                if len(self._outstanding) < MAX_OUTSTANDING:
                    self._launch(loop)
                next_at = now + (fast if self._hurry(now, fast) else cfg.interval)
            wake_at = next_at
            if self._outstanding and not self._hurry(now, fast):
                # the moment the oldest probe becomes overdue, switch to the fast pace
                wake_at = min(wake_at, min(self._outstanding.values()) + fast + 0.001)
            try:
                await asyncio.wait_for(self._wake.wait(), max(wake_at - loop.time(), 0.001))
            except TimeoutError:
                now = loop.time()
                if self._hurry(now, fast):
                    next_at = min(next_at, now)

    def _probe_immediately(self) -> None:
        """Send a probe now (the silence rule needs one sent during the silence, not at the next tick)."""
        if len(self._outstanding) < MAX_OUTSTANDING:
            self._launch(asyncio.get_running_loop())

    def _launch(self, loop: asyncio.AbstractEventLoop) -> None:
        self._count += 1
        cfg = self._config()
        every = cfg.health.write_every
        write = bool(every) and (self.writes.suspect or (self._count % every == 0 and not self.reads.suspect))
        key = canary_key(self.name)
        if write:
            item = {**key, "at": {"N": repr(time.time())}}
            body = orjson.dumps({"TableName": cfg.health.table, "Item": item})
            target = WRITE_TARGET
        else:
            body = orjson.dumps({"TableName": cfg.health.table, "Key": key, "ConsistentRead": True})
            target = READ_TARGET
        self._ids += 1
        probe_id = self._ids
        started = loop.time()
        source = "write probe" if write else "probe"
        try:
            head = self.runtime.signer.request_head(self.runtime.credentials(), target, body, time.time())
        except Exception as exc:  # credentials unusable: not the region's fault
            self.observe(ProbeOutcome(Cause.AUTH, f"cannot sign the probe: {type(exc).__name__}"), source)
            return
        self._outstanding[probe_id] = started
        sent = self._last_probe_sent = self._probe_sent_at[probe_id] = time.monotonic()

        def reply(response: UpstreamResponse | None, error: UpstreamError | None) -> None:
            self._outstanding.pop(probe_id, None)
            self._probe_sent_at.pop(probe_id, None)
            latency = loop.time() - started
            if error is not None:
                self._probe_failed_sent = max(self._probe_failed_sent, sent)
                outcome = classify_failure(error.kind, error.detail)
            else:
                assert response is not None
                self._last_probe_answered = time.monotonic()
                self._probe_latencies.append(latency)
                self.probe_latency = latency
                code = error_code(response.status, response.body)
                outcome = classify_response(response.status, code, latency, self._config().health.slow)
                # The health table itself missing or keyed wrong: the region answers, so it stays up, but
                # the probes see neither write failures nor lag: say so (the daemon alerts).
                if code in HEALTH_TABLE_ERRORS:
                    self.health_table_problem = f"HTTP {response.status} {code}"
                elif response.status < 400:
                    self.health_table_problem = None
            self.observe(outcome, source, write=write)

        self.pool.send(head + body, reply, idempotent=not write)
