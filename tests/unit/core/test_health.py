"""Probe outcomes classified: what counts as an outage, and fall/rise hysteresis."""

from __future__ import annotations

import pytest

from sidecar.core.health import Cause, HealthState, classify_failure, classify_response, error_code, observe


@pytest.mark.parametrize(
    ("status", "body", "code"),
    [
        (200, b'{"Item":{}}', None),
        (
            400,
            b'{"__type":"com.amazonaws.dynamodb.v20120810#ThrottlingException","message":"x"}',
            "ThrottlingException",
        ),
        (
            403,
            b"<ErrorResponse><Error><Code>SignatureDoesNotMatch</Code></Error></ErrorResponse>",
            "SignatureDoesNotMatch",
        ),
        (500, b"not json, not xml", None),
        (400, b"[1]", None),
    ],
)
def test_error_code_from_json_or_xml(status: int, body: bytes, code: str | None) -> None:
    assert error_code(status, body) == code


@pytest.mark.parametrize(
    ("status", "code", "latency", "cause"),
    [
        (200, None, 0.01, Cause.OK),
        (200, None, 3.0, Cause.SLOW),
        (500, "InternalServerError", 0.01, Cause.SERVER_ERROR),
        (400, "ProvisionedThroughputExceededException", 0.01, Cause.THROTTLED),
        (400, "UnrecognizedClientException", 0.01, Cause.AUTH),
        (403, None, 0.01, Cause.AUTH),
        (400, "ResourceNotFoundException", 0.01, Cause.CLIENT_ERROR),
    ],
)
def test_classify_response(status: int, code: str | None, latency: float, cause: Cause) -> None:
    outcome = classify_response(status, code, latency, slow_after=2.0)
    assert outcome.cause is cause
    assert outcome.is_outage == (cause in {Cause.SLOW, Cause.SERVER_ERROR})


def test_fall_and_rise() -> None:
    state = HealthState()
    ok = classify_response(200, None, 0.01, 2.0)
    bad = classify_failure("timeout", "no response")
    assert observe(state, ok, fall=3, rise=2).state == "up"
    state = observe(state, ok, fall=3, rise=2)
    for expected in ("up", "up", "down"):
        state = observe(state, bad, fall=3, rise=2)
        assert state.state == expected
    assert state.cause is not None and "3 consecutive timeout" in state.cause
    state = observe(state, ok, fall=3, rise=2)
    assert state.state == "down"  # one good probe is not enough
    state = observe(state, ok, fall=3, rise=2)
    assert state.state == "up" and state.cause is None
    # A throttle while up is not an outage, and says so.
    state = observe(state, classify_response(400, "ThrottlingException", 0.01, 2.0), fall=3, rise=2)
    assert state.state == "up" and state.cause is not None and state.cause.startswith("throttled")


def test_observe_tracks_when_failing_began_and_the_last_good_answer() -> None:
    ok = classify_response(200, None, 0.01, 2.0)
    bad = classify_failure("timeout", "no answer within 0.8 s")
    s = observe(HealthState(), ok, fall=3, rise=2, now=10.0)
    assert (s.state, s.last_ok_at, s.failing_since, s.kind) == ("up", 10.0, None, Cause.OK)
    s = observe(s, bad, fall=3, rise=2, now=11.0, source="traffic")
    assert s.suspect and s.failing_since == 11.0 and s.kind is Cause.TIMEOUT
    assert s.cause is not None and s.cause.endswith("(seen by traffic)")
    s = observe(s, bad, fall=3, rise=2, now=12.0)
    s = observe(s, bad, fall=3, rise=2, now=13.0)
    assert s.state == "down" and not s.suspect and s.failing_since == 11.0 and s.last_ok_at == 10.0
    s = observe(s, ok, fall=3, rise=2, now=14.0)
    assert s.state == "down" and s.failing_since is None and s.last_ok_at == 14.0
    assert (
        s.cause is not None and s.cause.startswith("3 consecutive timeout") and "recovering: 1/2" in s.cause
    )
    s = observe(s, ok, fall=3, rise=2, now=15.0)
    assert s.state == "up" and s.cause is None


def test_a_throttle_is_a_good_answer_for_the_failure_run() -> None:
    bad = classify_failure("refused", "connection refused")
    s = observe(HealthState(state="up"), bad, fall=3, rise=2, now=1.0)
    s = observe(s, classify_response(400, "ThrottlingException", 0.01, 2.0), fall=3, rise=2, now=2.0)
    assert (s.state, s.failures, s.failing_since, s.kind) == ("up", 0, None, Cause.THROTTLED)
    assert s.last_ok_at == 2.0


def test_a_recovering_region_stays_down_for_the_reason_it_went_down() -> None:
    """A late good answer (a request that reached the region before the fault) must not turn an outage into
    'not an outage': the controller would then refuse to move."""
    bad = classify_response(500, "InternalServerError", 0.01, 2.0)
    s = HealthState(state="up")
    for t in (1.0, 2.0, 3.0):
        s = observe(s, bad, fall=3, rise=3, now=t)
    s = observe(s, classify_response(200, None, 0.01, 2.0), fall=3, rise=3, now=4.0)
    assert s.state == "down" and s.kind is Cause.SERVER_ERROR
    from sidecar.core.controller import RegionView

    assert RegionView.from_health("us-east-1", s).outage


def test_a_stall_needs_the_timeout_or_strong_evidence() -> None:
    from sidecar.core.health import stalled

    assert stalled(0.81, 0.8, expected=0, waiting=1)  # a full timeout of silence
    assert not stalled(0.5, 0.8, expected=1000, waiting=100)  # under 3/4 of it: never
    assert stalled(0.61, 0.8, expected=120, waiting=120)  # busy region: 600 ms of silence, dozens waiting
    # the CI false move: a loaded server's 434 ms hiccup, 4 requests waiting, 17 answers due
    assert not stalled(0.434, 0.8, expected=17, waiting=4)
    assert not stalled(0.7, 0.8, expected=49, waiting=50)
    assert not stalled(0.7, 0.8, expected=200, waiting=9)
