"""Health probes, classified: what a probe's outcome says about a region, and fall/rise hysteresis.

Pure: the shell measures (status, error code, exception, latency) and hands them here. A throttle or an
auth failure is not a regional outage: the region answered, moving would not help.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

import orjson


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


def classify_response(status: int, error_code: str | None, latency: float, slow_after: float) -> ProbeOutcome:
    """A probe that got an HTTP answer: what does it say about the region?"""
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
            f"answered in {latency * 1000:.0f} ms (slow above {slow_after * 1000:.0f} ms)",
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
    """Is a region that has answered nothing for `quiet` seconds, while `waiting` requests wait and its
    recent rate promised `expected` answers in that time, stalled (a blackhole)?

    After `timeout` of silence, yes. Sooner (from 3/4 of it) only on strong evidence: at least 10 requests
    waiting and 50 answers due (200 requests a second, 600 ms of total silence). A hiccup of a loaded
    server (430 ms seen here, 4 requests waiting) moved traffic for nothing when half the timeout and fewer
    waiting sufficed.
    """
    if quiet > timeout:
        return True
    return quiet > timeout * FAST_STALL and expected >= FAST_STALL_EXPECTED and waiting >= FAST_STALL_WAITING
