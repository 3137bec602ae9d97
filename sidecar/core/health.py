"""Health probes, classified: what a probe's outcome says about a region, and fall/rise hysteresis.

Pure: the shell measures (status, error code, exception, latency) and hands them here. A throttle or an
auth failure is not a regional outage: the region answered, moving would not help.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

import orjson

from sidecar.core.latency import SLOW_FACTOR


class Cause(enum.StrEnum):
    OK = "ok"
    TIMEOUT = "timeout"
    REFUSED = "refused"
    CONNECTION = "connection"
    SERVER_ERROR = "5xx"
    SLOW = "slow"
    THROTTLED = "throttled"
    AUTH = "auth"
    CLIENT_ERROR = "4xx"


# Causes that mean the region itself is failing; the others mean it answered.
OUTAGE_CAUSES = frozenset({Cause.TIMEOUT, Cause.REFUSED, Cause.CONNECTION, Cause.SERVER_ERROR, Cause.SLOW})

_THROTTLING = frozenset(
    {
        "ThrottlingException",
        "ProvisionedThroughputExceededException",
        "RequestLimitExceeded",
        "LimitExceededException",
    }
)
_AUTH = frozenset(
    {
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "MissingAuthenticationTokenException",
        "AccessDeniedException",
        "ExpiredTokenException",
        "IncompleteSignatureException",
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
    }
)


@dataclass(frozen=True, slots=True)
class ProbeOutcome:
    cause: Cause
    detail: str
    latency: float | None = None

    @property
    def is_outage(self) -> bool:
        return self.cause in OUTAGE_CAUSES


def error_code(status: int, body: bytes) -> str | None:
    """The error code of a DynamoDB answer: `__type`'s name from JSON (AWS), or `<Code>` from XML (moto
    answers bad signatures with XML)."""
    if status < 400:
        return None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body[:2000].decode("utf-8", "replace")
        start = text.find("<Code>")
        if start >= 0:
            end = text.find("</Code>", start)
            return text[start + 6 : end] if end > 0 else None
        return None
    if isinstance(data, dict):
        kind = data.get("__type") or data.get("code") or ""
        return str(kind).rsplit("#", 1)[-1] or None
    return None


def classify_response(
    status: int, error_code: str | None, latency: float, slow_after: float, what: str = ""
) -> ProbeOutcome:
    """A probe (or app request: `what` names it) that got an HTTP answer: what does it say about the region?
    `slow_after` may be infinite (an expected-long request with no history to judge it by)."""
    if status >= 500:
        if error_code in _THROTTLING:
            return ProbeOutcome(Cause.THROTTLED, f"HTTP {status} {error_code}", latency)
        return ProbeOutcome(Cause.SERVER_ERROR, f"HTTP {status} {error_code or ''}".strip(), latency)
    if status >= 400:
        if error_code in _THROTTLING:
            return ProbeOutcome(Cause.THROTTLED, f"HTTP {status} {error_code}", latency)
        if error_code in _AUTH or status == 403:
            return ProbeOutcome(Cause.AUTH, f"HTTP {status} {error_code or ''}".strip(), latency)
        return ProbeOutcome(Cause.CLIENT_ERROR, f"HTTP {status} {error_code or ''}".strip(), latency)
    if latency > slow_after:
        return ProbeOutcome(
            Cause.SLOW,
            f"{what + ' ' if what else ''}answered in {latency * 1000:.0f} ms (slow above {slow_after * 1000:.0f} ms)",
            latency,
        )
    return ProbeOutcome(Cause.OK, f"HTTP {status}", latency)


def classify_failure(kind: str, detail: str) -> ProbeOutcome:
    """A probe that got no HTTP answer; `kind` is timeout, refused or connection."""
    cause = {"timeout": Cause.TIMEOUT, "refused": Cause.REFUSED}.get(kind, Cause.CONNECTION)
    return ProbeOutcome(cause, detail)


@dataclass(frozen=True, slots=True)
class HealthState:
    """One region's health after a sequence of observations (active probes and passive signals).

    `kind`: the classification of the last observation. `failing_since`: when the current run of outage
    observations began (None while the last one was not an outage). `last_ok_at`: when the region last
    answered in a way that is not an outage. Times are whatever clock the caller passes (the daemon: wall).
    """

    state: str = "unknown"  # up | down | unknown
    cause: str | None = None
    failures: int = 0
    successes: int = 0
    latency: float | None = None
    kind: Cause | None = None
    failing_since: float | None = None
    last_ok_at: float | None = None

    @property
    def suspect(self) -> bool:
        """Not (yet) down, but the last observation was an outage: time to look closer."""
        return self.failures > 0 and self.state != "down"


def observe(
    prev: HealthState,
    outcome: ProbeOutcome,
    *,
    fall: int,
    rise: int,
    now: float | None = None,
    source: str = "",
) -> HealthState:
    """Fold one observation into the region's state with fall/rise hysteresis.

    `source` names where it came from ("probe", "traffic"), for the cause an operator reads.
    """
    where = f" (seen by {source})" if source else ""
    if outcome.is_outage:
        failures = prev.failures + 1
        state = "down" if failures >= fall else prev.state
        return replace(
            prev,
            state=state,
            cause=f"{failures} consecutive {outcome.cause.value}: {outcome.detail}{where}",
            failures=failures,
            successes=0,
            latency=outcome.latency,
            kind=outcome.cause,
            failing_since=prev.failing_since if prev.failures and prev.failing_since is not None else now,
        )
    successes = prev.successes + 1
    if prev.state == "down":
        state = "up" if successes >= rise else "down"
    else:
        state = "up"  # unknown becomes up at the first good answer: at start-up nothing is known to be wrong
    cause = None if outcome.cause is Cause.OK else f"{outcome.cause.value}: {outcome.detail}{where}"
    if state == "down":  # recovering: keep saying why it is down, and how far the recovery got
        why = (prev.cause or "down").split("; recovering:", 1)[0]
        cause = f"{why}; recovering: {successes}/{rise} good answers"
    return replace(
        prev,
        state=state,
        cause=cause,
        failures=0,
        successes=successes,
        latency=outcome.latency,
        # recovering: still down for the reason it went down (a good answer does not make it "not an outage")
        kind=prev.kind if state == "down" else outcome.cause,
        failing_since=None,
        last_ok_at=now if now is not None else prev.last_ok_at,
    )


_STATE_ORDER = {"down": 0, "unknown": 1, "up": 2}


def combine(reads: HealthState, writes: HealthState) -> HealthState:
    """One region's health from its read and write runs: the worse one wins; unknown writes (no write probe
    yet) do not hold back a region whose reads are up."""
    worst = min((reads, writes), key=lambda h: _STATE_ORDER.get(h.state, 1))
    if worst.state == "down":
        chosen = worst
    elif reads.state == "up":
        chosen = writes if writes.failures > reads.failures else reads
        chosen = replace(chosen, state="up")
    else:
        chosen = reads
    starts = [h.failing_since for h in (reads, writes) if h.failing_since is not None]
    oks = [h.last_ok_at for h in (reads, writes) if h.last_ok_at is not None]
    return replace(
        chosen,
        failing_since=min(starts) if starts else None,
        last_ok_at=max(oks) if oks else None,
    )


# A busy region's silence counts as a stall from this fraction of health.timeout, given strong evidence.
FAST_STALL = 0.75
FAST_STALL_WAITING = 10
FAST_STALL_EXPECTED = 50


def stalled(quiet: float, timeout: float, expected: float, waiting: int) -> bool:
    """Has a region that answered nothing for `quiet` seconds, while `waiting` requests wait and its recent
    rate promised `expected` answers in that time, been silent long enough to be called stalled?

    After `timeout` of silence, yes. Sooner (from 3/4 of it) only on strong evidence: at least 10 requests
    waiting and 50 answers due (200 requests a second, 600 ms of total silence). A hiccup of a loaded
    server (430 ms seen here, 4 requests waiting) moved traffic for nothing when half the timeout and fewer
    waiting sufficed. Silence alone is not enough: see `judge_silence`.
    """
    if quiet > timeout:
        return True
    return quiet > timeout * FAST_STALL and expected >= FAST_STALL_EXPECTED and waiting >= FAST_STALL_WAITING


# Silence past this fraction of health.timeout is a reason to look closer: probe now (and the others), and
# again each time as long while it lasts. Early, so the probe's verdict is in when the silence is long
# enough to judge (3/4 of the timeout under load).
LOOK_AFTER = 0.25
# A probe started during a silence has failed to answer after this many times the region's recent probe
# p99, at least PROBE_FLOOR, at most health.timeout (when the probe itself times out). Only a silence long
# enough for `stalled` is judged at all, so the margin need not be large: 10x measured 1.2 s on a loaded
# test region (probe p99 ~100 ms behind 200 requests a second), against 0.7 s for the old rule.
PROBE_FACTOR = 3.0
PROBE_FLOOR = 0.1
# A request that should be fast has waited too long after this many times its class's p99, at least this.
FAST_FLOOR = 0.05


@dataclass(frozen=True, slots=True)
class Silence:
    """What the shell sees of a region while app requests wait at it. Durations in seconds.

    `quiet`: no answer to any app request for this long while requests waited. `fast_quiet`: the same for
    the requests that should be fast (point operations with a small body, `core.latency.LatencyClass.POINT`);
    0 when none waits. Probes sent during this silence: `probe_sent_ago`, the latest was sent this long ago
    (None: none yet); `probe_pending_for`, the oldest one still unanswered, with no probe answered since
    it was sent, has waited this long (None: none); `probe_failed`, one ended without an answer and no
    probe has answered since it was sent.
    """

    quiet: float
    waiting: int
    expected: float
    timeout: float
    fast_quiet: float = 0.0
    fast_waiting: int = 0
    fast_p99: float | None = None
    probe_sent_ago: float | None = None
    probe_pending_for: float | None = None
    probe_failed: bool = False
    probe_p99: float | None = None


@dataclass(frozen=True, slots=True)
class SilenceVerdict:
    look: bool = False  # probe this region now (and the others)
    stalled: bool = False  # an outage: the waiting requests will not be answered
    evidence: str = ""  # why, for the cause an operator reads


QUIET = SilenceVerdict()


def probe_overdue(probe_p99: float | None, timeout: float) -> float:
    """How long a probe may go unanswered before that is evidence the region stopped answering."""
    limit = max(PROBE_FACTOR * probe_p99, PROBE_FLOOR) if probe_p99 is not None else PROBE_FLOOR
    return min(limit, timeout)


def fast_limit(fast_p99: float | None) -> float:
    """How long a request that should be fast may wait before that is evidence of a stall."""
    return max(SLOW_FACTOR * fast_p99, FAST_FLOOR) if fast_p99 is not None else FAST_FLOOR


def judge_silence(s: Silence) -> SilenceVerdict:
    """Is a region that leaves app requests waiting stalled (a blackhole), or only slow at what it was asked?

    Silence seen only by traffic is a reason to look closer (probe now), never a verdict on its own: four
    Scans of a healthy region that each take 1.2 s leave it silent for 1.2 s. The silence becomes evidence
    once it is long enough (`stalled`: health.timeout, or 3/4 of it under heavy traffic) AND either
    - a probe started during the silence failed to answer (it ended without an answer, or has gone
      unanswered for `probe_overdue`), or
    - requests that should be fast are among those waiting, and have waited 10x their class's recent p99.
    A probe answered after another was sent cancels that one's evidence (the region was alive since). It
    does not veto the second kind: a region that answers its probes but not the app's GetItems is failing
    the app.
    """
    if s.waiting <= 0 or s.quiet <= s.timeout * LOOK_AFTER:
        return QUIET
    # Look once per LOOK_AFTER of silence, when no probe from this silence is still out.
    look = s.probe_sent_ago is None or (
        s.probe_pending_for is None and s.probe_sent_ago > s.timeout * LOOK_AFTER
    )
    if not stalled(s.quiet, s.timeout, s.expected, s.waiting):
        return SilenceVerdict(look=look)
    reasons = []
    if s.probe_failed:
        reasons.append("a probe sent during the silence failed")
    elif s.probe_pending_for is not None and s.probe_pending_for >= probe_overdue(s.probe_p99, s.timeout):
        reasons.append(f"a probe sent during the silence unanswered for {s.probe_pending_for * 1000:.0f} ms")
    limit = fast_limit(s.fast_p99)
    if s.fast_waiting > 0 and s.fast_quiet >= limit:
        usual = f" (over {limit * 1000:.0f} ms, {SLOW_FACTOR:g}x their recent p99)" if s.fast_p99 else ""
        reasons.append(f"{s.fast_waiting} single-item request(s) waiting {s.fast_quiet * 1000:.0f} ms{usual}")
    if not reasons:
        return SilenceVerdict(look=look)
    return SilenceVerdict(look=look, stalled=True, evidence="; ".join(reasons))
