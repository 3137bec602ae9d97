"""Faults of the home region, injected by a fault proxy between the sidecar and moto's us-east-1.

One sidecar for the module; its us-east-1 endpoint is the fault proxy (tests/support/faultproxy.py) in
front of the session's moto us-east-1, and `proxy.request_timeout` is 1 s so that timeouts are quick.
Automatic failover is off (these tests are about one region's faults, not moves: tests/integration/
test_failover.py has those), so HAProxy routes every request to the us-east-1 listener until that
listener's health check says the region is down; after that HAProxy answers 503 itself. A request sent
right after a mode change reaches the listener: the probe needs `fall` (2) failures 250 ms apart and
HAProxy two more checks before it stops routing there.

Each test starts and ends with the proxy in pass mode, no upstream connection kept alive, the region up,
and a good request through the stable address (the `serving` fixture).

moto answers `Connection: close` every time, and the proxy in pass mode keeps that, so the sidecar never
reuses a connection to moto. A reused connection is made with the proxy's keep-alive canned answers
(throttle mode) instead.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.test_data_path import error_of
from tests.support.faultproxy import FaultProxy
from tests.support.moto_region import MotoRegion
from tests.support.stack import DEFAULT_TEST_HEALTH, SidecarStack, new_app_table
from tests.support.wait import wait_until

HOME = "us-east-1"
REQUEST_TIMEOUT = 1.0
MAY_HAVE_BEEN_APPLIED = "may or may not have been applied"


@pytest.fixture(scope="module")
def table(moto_regions: dict[str, MotoRegion]) -> str:
    return new_app_table(moto_regions.values(), "faults")


@pytest.fixture(scope="module")
def proxy(
    moto_regions: dict[str, MotoRegion], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FaultProxy]:
    with FaultProxy(moto_regions[HOME].port, tmp_path_factory.mktemp("faultproxy")) as fault_proxy:
        yield fault_proxy


@pytest.fixture(scope="module")
def stack(
    moto_regions: dict[str, MotoRegion],
    table: str,
    proxy: FaultProxy,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[SidecarStack]:
    regions = [moto_regions["us-east-1"], moto_regions["eu-west-1"]]
    with SidecarStack(
        regions,
        [table],
        tmp_path_factory.mktemp("faults"),
        endpoints={HOME: proxy.url},
        # Automatic failover off: these tests are about what one region's faults do to its requests.
        extra={
            "proxy": {"request_timeout": f"{REQUEST_TIMEOUT:g}s"},
            "failover": {"automatic": False},
            # read probes only, and no heartbeats (PutItems on the probe pool, one a second): the tests
            # count the PutItems that reach the region, and a heartbeat in that window made one count 2
            "health": {**DEFAULT_TEST_HEALTH, "write_every": 0},
            "replication": {"mode": "none"},
        },
    ) as s:
        s.wait_regions_up()
        yield s


@pytest.fixture(scope="module")
def app(stack: SidecarStack) -> Any:
    """The application's boto3 client on the stable address (one attempt, no SDK retries)."""
    return stack.client()


@pytest.fixture(autouse=True)
def serving(stack: SidecarStack, proxy: FaultProxy, app: Any, table: str) -> Iterator[None]:
    restore(stack, proxy, app, table)
    yield
    restore(stack, proxy, app, table)


# -- helpers ----------------------------------------------------------------------------------------------


def key(pk: str) -> dict[str, Any]:
    return {"pk": {"S": pk}}


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def home_status(stack: SidecarStack) -> dict[str, Any]:
    region: dict[str, Any] = next(r for r in stack.status()["regions"] if r["name"] == HOME)
    return region


def wait_home(
    stack: SidecarStack, state: str, cause: str | None = None, *, clean: bool = False, timeout: float = 10.0
) -> dict[str, Any]:
    """Poll status until the home region is in `state` with `cause` in its cause (`clean`: no cause at
    all, i.e. the last probe was fine); return its status entry."""

    def reached() -> dict[str, Any] | None:
        region = home_status(stack)
        ok = region["state"] == state and (cause is None or cause in (region["cause"] or ""))
        return region if ok and not (clean and region["cause"]) else None

    return wait_until(
        reached,
        timeout,
        interval=0.05,
        message=lambda: f"{HOME} {state} (cause containing {cause!r}); now {home_status(stack)}",
    )


def metric(stack: SidecarStack, name: str, **labels: str) -> float:
    """One sample of the sidecar's /metrics (0 if absent), e.g. metric(s, "x_bucket", le="0.25")."""
    for family in text_string_to_metric_families(stack.metrics()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def idle_upstream(stack: SidecarStack) -> float:
    return metric(stack, "ddb_sidecar_upstream_connections", region=HOME, state="idle")


def moto_item(moto_regions: dict[str, MotoRegion], table: str, pk: str) -> dict[str, Any] | None:
    """The item as stored in moto's us-east-1 (read around the proxy)."""
    item: dict[str, Any] | None = (
        moto_regions[HOME].client().get_item(TableName=table, Key=key(pk), ConsistentRead=True).get("Item")
    )
    return item


def failing(call: Any, **kwargs: Any) -> tuple[tuple[int, str, str], ClientError, float]:
    """Run a boto3 call that must fail: ((status, code, message), the error, seconds it took)."""
    started = time.monotonic()
    with pytest.raises(ClientError) as err:
        call(**kwargs)
    return error_of(err.value), err.value, time.monotonic() - started


def restore(stack: SidecarStack, proxy: FaultProxy, app: Any, table: str) -> None:
    """Pass mode, no kept-alive upstream connection, home region up, and a good write and read through
    the stable address (the daemon still serves); then zero the proxy's counters."""
    proxy.set_mode("pass")
    proxy.drop_connections()
    wait_until(lambda: idle_upstream(stack) == 0, 5, message="no idle upstream connection to us-east-1")
    wait_home(stack, "up", clean=True)
    # HAProxy's own check (inter 250 ms, rise 1) may still call the listener down for a moment.
    wait_until(
        lambda: app.get_item(TableName=table, Key=key("probe")) is not None,
        5,
        interval=0.05,
        message="a GetItem through the stable address",
        ignore=(ClientError,),
    )
    pk = unique("alive")
    app.put_item(TableName=table, Item={**key(pk), "v": {"S": "ok"}})
    assert app.get_item(TableName=table, Key=key(pk), ConsistentRead=True)["Item"]["v"] == {"S": "ok"}
    proxy.reset_counts()


# -- tests ------------------------------------------------------------------------------------------------


def test_pass_forwards_and_keeps_connection_close(
    stack: SidecarStack, proxy: FaultProxy, app: Any, table: str, moto_regions: dict[str, MotoRegion]
) -> None:
    connects = metric(stack, "ddb_sidecar_upstream_connects_total", region=HOME)
    pk = unique("pass")
    app.put_item(TableName=table, Item={**key(pk), "n": {"N": "1"}})
    assert app.get_item(TableName=table, Key=key(pk), ConsistentRead=True)["Item"]["n"] == {"N": "1"}
    app.update_item(
        TableName=table,
        Key=key(pk),
        UpdateExpression="SET n = :two",
        ExpressionAttributeValues={":two": {"N": "2"}},
    )
    assert moto_item(moto_regions, table, pk) == {**key(pk), "n": {"N": "2"}}
    assert proxy.requests("pass", "PutItem") == 1
    assert proxy.requests("pass", "UpdateItem") == 1
    # moto closes every connection and the proxy passes that on: one new upstream connection per request,
    # none kept idle. (So a reused connection can only be made with the proxy's keep-alive canned answers.)
    assert metric(stack, "ddb_sidecar_upstream_connects_total", region=HOME) - connects == 3
    assert idle_upstream(stack) == 0


def test_refused_connect_is_503_not_sent_and_region_goes_down(
    stack: SidecarStack, proxy: FaultProxy, app: Any, table: str
) -> None:
    proxy.set_mode("refuse")
    (status, code, message), _, _ = failing(app.get_item, TableName=table, Key=key("x"))
    assert (status, code) == (503, "ServiceUnavailableException")
    assert "NOT sent" in message and "safe to retry" in message and "refused" in message

    region = wait_home(stack, "down", "refused")
    assert region["cause"].startswith("2 consecutive refused")
    # Now HAProxy stops routing to the listener and answers 503 itself (still DynamoDB-shaped).
    wait_until(
        lambda: "no healthy DynamoDB region" in failing(app.get_item, TableName=table, Key=key("x"))[0][2],
        5,
        message="HAProxy answering 503 itself",
    )
    assert proxy.connections("refuse") == 0  # nothing was listening

    proxy.set_mode("pass")
    wait_home(stack, "up")
    wait_until(
        lambda: app.get_item(TableName=table, Key=key("x")) is not None,
        5,
        message="GetItem succeeding again",
        ignore=(ClientError,),
    )


def test_blackhole_write_times_out_as_maybe_applied(
    stack: SidecarStack, proxy: FaultProxy, app: Any, table: str, moto_regions: dict[str, MotoRegion]
) -> None:
    proxy.set_mode("blackhole", match=table)  # only the app's table: the probes' PutItems pass
    pk = unique("black")
    (status, code, message), _, took = failing(app.put_item, TableName=table, Item=key(pk))
    assert (status, code) == (500, "InternalServerError")
    assert MAY_HAVE_BEEN_APPLIED in message and f"within {REQUEST_TIMEOUT:g} s" in message
    assert REQUEST_TIMEOUT * 0.9 <= took < REQUEST_TIMEOUT + 2.0
    assert proxy.requests("blackhole", "PutItem") == 1
    assert moto_item(moto_regions, table, pk) is None  # the blackhole swallowed it
    proxy.set_mode("blackhole")  # now everything, the probes too
    region = wait_home(stack, "down", "timeout")
    assert "consecutive timeout" in region["cause"]


def test_reset_after_request_write_is_reported_not_resent(
    stack: SidecarStack, proxy: FaultProxy, app: Any, table: str, moto_regions: dict[str, MotoRegion]
) -> None:
    # `match`: only the app's table is faulted, the health probes pass and the region stays up.
    proxy.set_mode("reset_after_request", match=table)
    pk = unique("reset-write")
    (status, code, message), _, _ = failing(app.put_item, TableName=table, Item=key(pk))
    assert (status, code) == (500, "InternalServerError")
    assert MAY_HAVE_BEEN_APPLIED in message and "lost after the request was sent" in message
    assert proxy.requests(op="PutItem") == 1  # sent once, in any mode: never resent
    assert proxy.requests("reset_after_request", "PutItem") == 1
    assert moto_item(moto_regions, table, pk) == key(pk)  # it was in fact applied, once
    assert home_status(stack)["state"] == "up"


def test_reset_after_request_read_on_fresh_connection_is_reported(
    stack: SidecarStack, proxy: FaultProxy, app: Any, table: str
) -> None:
    pk = unique("reset-read")
    app.put_item(TableName=table, Item=key(pk))
    proxy.set_mode("reset_after_request", match=table)
    (status, code, message), _, _ = failing(app.get_item, TableName=table, Key=key(pk))
    # A connection opened for this request: nothing says it was the server's stale keep-alive close, so
    # the read is not retried either, and the client gets the same "may have been applied" 500.
    assert (status, code) == (500, "InternalServerError")
    assert MAY_HAVE_BEEN_APPLIED in message
    assert proxy.requests("reset_after_request", "GetItem") == 1


def prime_kept_alive_connection(stack: SidecarStack, proxy: FaultProxy, app: Any, table: str) -> None:
    """Leave one idle kept-alive upstream connection in the us-east-1 pool (moto would close it)."""
    proxy.set_mode("throttle", match=table, times=1)
    (status, _, _), _, _ = failing(app.get_item, TableName=table, Key=key("prime"))
    assert status == 400
    wait_until(lambda: idle_upstream(stack) == 1, 5, message="one idle upstream connection")


def test_reset_after_request_read_on_reused_connection_is_retried(
    stack: SidecarStack, proxy: FaultProxy, app: Any, table: str
) -> None:
    pk = unique("reuse-read")
    app.put_item(TableName=table, Item={**key(pk), "v": {"S": "read"}})
    prime_kept_alive_connection(stack, proxy, app, table)
    proxy.set_mode("reset_after_request", match=table, times=1)
    connects = metric(stack, "ddb_sidecar_upstream_connects_total", region=HOME)
    # The kept-alive connection dies before any response byte: a read is sent once more, on a new
    # connection (which the proxy, its one reset spent, passes to moto).
    got = app.get_item(TableName=table, Key=key(pk), ConsistentRead=True)
    assert got["Item"]["v"] == {"S": "read"}
    assert proxy.requests("reset_after_request", "GetItem") == 1
    assert metric(stack, "ddb_sidecar_upstream_connects_total", region=HOME) - connects == 1


def test_reset_after_request_write_on_reused_connection_is_not_retried(
    stack: SidecarStack, proxy: FaultProxy, app: Any, table: str, moto_regions: dict[str, MotoRegion]
) -> None:
    prime_kept_alive_connection(stack, proxy, app, table)
    proxy.set_mode("reset_after_request", match=table, times=1)
    connects = metric(stack, "ddb_sidecar_upstream_connects_total", region=HOME)
    pk = unique("reuse-write")
    (status, code, message), _, _ = failing(app.put_item, TableName=table, Item=key(pk))
    assert (status, code) == (500, "InternalServerError")
    assert MAY_HAVE_BEEN_APPLIED in message
    # A resend would have reached moto through the proxy, back in pass mode: none did.
    assert proxy.requests("reset_after_request", "PutItem") == 1
    assert proxy.requests(op="PutItem") == 1
    assert metric(stack, "ddb_sidecar_upstream_connects_total", region=HOME) == connects
    assert moto_item(moto_regions, table, pk) == key(pk)


def test_reset_at_accept_is_reported_and_region_goes_down(
    stack: SidecarStack, proxy: FaultProxy, app: Any, table: str
) -> None:
    proxy.set_mode("reset")
    (status, code, message), _, _ = failing(app.get_item, TableName=table, Key=key("x"))
    # Which one depends on when the reset arrives: during the connect (nothing was written: safe to
    # retry) or after the request was written (the sidecar cannot know it was not read).
    if status == 503:
        assert code == "ServiceUnavailableException" and "NOT sent" in message, message
    else:
        assert (status, code) == (500, "InternalServerError")
        assert MAY_HAVE_BEEN_APPLIED in message
    assert proxy.connections("reset") >= 1
    wait_home(stack, "down", "connection")


@pytest.mark.parametrize(
    ("status", "code"), [(500, "InternalServerError"), (503, "ServiceUnavailableException")]
)
def test_region_5xx_is_relayed_unchanged_and_marks_region_down(
    stack: SidecarStack, proxy: FaultProxy, app: Any, table: str, status: int, code: str
) -> None:
    proxy.set_mode("http_error", status=status, code=code, message="injected")
    (got_status, got_code, message), err, _ = failing(app.get_item, TableName=table, Key=key("x"))
    assert (got_status, got_code, message) == (status, code, "injected")
    # The region's own answer, not one the sidecar or HAProxy made up.
    assert err.response["ResponseMetadata"]["RequestId"].startswith("faultproxy-")
    assert proxy.requests("http_error", "GetItem") >= 1
    region = wait_home(stack, "down", "5xx")
    assert f"HTTP {status}" in region["cause"]
    assert stack.status()["regions"]  # the daemon answers; `serving` checks requests after pass


@pytest.mark.parametrize("code", ["ProvisionedThroughputExceededException", "ThrottlingException"])
def test_throttle_is_relayed_and_is_not_an_outage(
    stack: SidecarStack, proxy: FaultProxy, app: Any, table: str, code: str
) -> None:
    proxy.set_mode("throttle", code=code, message="slow down")
    (status, got_code, message), err, _ = failing(app.get_item, TableName=table, Key=key("x"))
    assert (status, got_code, message) == (400, code, "slow down")
    assert err.response["ResponseMetadata"]["RequestId"].startswith("faultproxy-")
    wait_home(stack, "up", f"throttled: HTTP 400 {code}")
    # Six more probe intervals: throttled probes never count as failures.
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        region = home_status(stack)
        assert region["state"] == "up", region
        time.sleep(0.1)
    assert proxy.requests("throttle", "GetItem") >= 5  # the probes were throttled too
    # HAProxy still routes to the region: the answer is still the region's throttle, not a 503.
    (status, got_code, _), _, _ = failing(app.get_item, TableName=table, Key=key("x"))
    assert (status, got_code) == (400, code)


def test_delay_shows_in_upstream_latency(
    stack: SidecarStack, proxy: FaultProxy, app: Any, table: str, moto_regions: dict[str, MotoRegion]
) -> None:
    def slow_observations() -> float:
        """Upstream latencies above 0.5 s observed so far for us-east-1."""
        total = metric(stack, "ddb_sidecar_upstream_latency_seconds_count", region=HOME)
        return total - metric(stack, "ddb_sidecar_upstream_latency_seconds_bucket", region=HOME, le="0.5")

    before = slow_observations()
    # 300 ms each way for the app's requests; the probes (another table) are not delayed.
    proxy.set_mode("delay", seconds=0.3, match=table)
    pk = unique("delay")
    started = time.monotonic()
    app.put_item(TableName=table, Item=key(pk))
    assert app.get_item(TableName=table, Key=key(pk), ConsistentRead=True)["Item"] == key(pk)
    took = time.monotonic() - started
    assert took >= 4 * 0.3
    assert slow_observations() - before == 2
    assert metric(stack, "ddb_sidecar_upstream_latency_seconds_bucket", region=HOME, le="0.25") < metric(
        stack, "ddb_sidecar_upstream_latency_seconds_count", region=HOME
    )
    assert proxy.requests("delay") == 2
    assert home_status(stack)["state"] == "up"
    assert moto_item(moto_regions, table, pk) == key(pk)


def test_a_missing_health_table_is_an_alert_that_says_how_to_fix_it(
    moto_regions: dict[str, MotoRegion], tmp_path: Path
) -> None:
    """The probes answer 4xx when the health table is missing: the region stays up (it answers), but the
    sidecar would be blind to write failures and lag there; it says so, with the command that fixes it."""
    app = new_app_table(moto_regions.values(), "hts")
    health = f"hts-health-{uuid.uuid4().hex[:8]}"
    moto_regions["us-east-1"].create_table(health)  # eu-west-1 lacks it
    stack = SidecarStack(
        [moto_regions["us-east-1"], moto_regions["eu-west-1"]],
        [app],
        tmp_path,
        extra={"health": {**DEFAULT_TEST_HEALTH, "table": health}, "replication": {"mode": "none"}},
    )
    with stack:

        def alerted() -> dict[str, Any] | None:
            events = stack.status()["events"]
            return next((e for e in events if e.get("alert") == "health-table"), None)

        alert = wait_until(alerted, 15, message="a health-table alert")
        assert (
            "eu-west-1" in alert["reason"]
            and "aws dynamodb create-table --region eu-west-1" in alert["reason"]
        )
        region = next(r for r in stack.status()["regions"] if r["name"] == "eu-west-1")
        assert "ResourceNotFoundException" in (region["health_table_problem"] or "")
        assert 'ddb_sidecar_alerts_total{kind="health-table"} 1.0' in stack.metrics()
        moto_regions["eu-west-1"].create_table(health)
        wait_until(
            lambda: any(e["kind"] == "health-table-ok" for e in stack.status()["events"]), 15, message="fixed"
        )
