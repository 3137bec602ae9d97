"""Automatic failover with the default health settings: real HAProxy, real moto regions, a fault proxy in
front of each region, boto3 as the application.

Each test gets its own sidecar (the controller's state and hold-down are per test) in front of the session's
moto regions, through two fault proxies. "Moved" means: the sidecar says eu-west-1 is active, and a write
through the stable address is acknowledged and is in eu-west-1's data, not us-east-1's.

The time from the fault to the move is printed (`-s`) and bounded generously here: the figures that count
come from `make bench-failover`, not from timed tests on a shared machine.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.support.faultproxy import FaultProxy
from tests.support.moto_region import MotoRegion
from tests.support.stack import HEALTH_TABLE, SidecarStack, new_app_table
from tests.support.traffic import Traffic, put
from tests.support.wait import wait_until

HOME, OTHER = "us-east-1", "eu-west-1"
# Default health settings (interval 1 s, timeout 800 ms, fall 3, rise 3), as an operator gets them.
DEFAULT_HEALTH = {"table": HEALTH_TABLE}
# Generous bounds for a shared 2-core machine; the 1 s / 3 s are measured by the benchmark.
IDLE_BOUND = 8.0
TRAFFIC_BOUND = 8.0


@pytest.fixture(scope="module")
def table(moto_regions: dict[str, MotoRegion]) -> str:
    return new_app_table(moto_regions.values(), "failover")


@pytest.fixture
def stack_factory(
    moto_regions: dict[str, MotoRegion],
    table: str,
    proxies: dict[str, FaultProxy],
    tmp_path: Path,
) -> Iterator[Any]:
    stacks: list[SidecarStack] = []
    for proxy in proxies.values():
        proxy.set_mode("pass")

    def make(failover: dict[str, Any] | None = None, **extra: Any) -> SidecarStack:
        stack = SidecarStack(
            [moto_regions[HOME], moto_regions[OTHER]],
            [table],
            tmp_path,
            endpoints={name: p.url for name, p in proxies.items()},
            extra={"health": DEFAULT_HEALTH, "failover": failover or {}, **extra},
        )
        stacks.append(stack)
        stack.start()
        stack.wait_regions_up()
        return stack

    yield make
    for proxy in proxies.values():
        proxy.set_mode("pass")
    for stack in stacks:
        stack.stop()


def app_client(stack: SidecarStack, timeout: float = 2.0) -> Any:
    return stack.client(connect_timeout=timeout, read_timeout=timeout)


def where(moto_regions: dict[str, MotoRegion], table: str, key: str) -> set[str]:
    """The regions whose own data holds `key` (read from moto directly, not through the sidecar)."""
    found = set()
    for name, region in moto_regions.items():
        if "Item" in region.client().get_item(TableName=table, Key={"pk": {"S": key}}):
            found.add(name)
    return found


def a_write_lands_in(stack: SidecarStack, moto_regions: dict[str, MotoRegion], table: str) -> set[str]:
    """Write a new item through the stable address; the regions whose own data then holds it."""
    key = f"after-{uuid.uuid4().hex[:8]}"
    put(app_client(stack), table, key)
    return where(moto_regions, table, key)


def active(stack: SidecarStack) -> str:
    return str(stack.status()["active_region"])


def wait_moved(stack: SidecarStack, to: str, bound: float) -> float:
    started = time.monotonic()
    wait_until(lambda: active(stack) == to, bound, interval=0.02, message=f"traffic moved to {to}")
    return time.monotonic() - started


FAULTS = [
    pytest.param("blackhole", {}, id="blackhole"),
    pytest.param("refuse", {}, id="refused"),
    pytest.param("reset", {}, id="reset"),
    pytest.param("http_error", {"status": 500}, id="5xx"),
]


@pytest.mark.parametrize(("mode", "params"), FAULTS)
def test_an_outage_of_the_idle_home_region_moves_traffic(
    stack_factory: Any,
    proxies: dict[str, FaultProxy],
    moto_regions: dict[str, MotoRegion],
    table: str,
    mode: str,
    params: dict[str, Any],
) -> None:
    stack = stack_factory()
    assert active(stack) == HOME
    proxies[HOME].set_mode(mode, **params)
    took = wait_moved(stack, OTHER, IDLE_BOUND)
    print(f"\nidle, {mode}: moved in {took:.2f} s")
    assert a_write_lands_in(stack, moto_regions, table) == {OTHER}
    status = stack.status()
    moves = [e for e in status["events"] if e["kind"] == "failover"]
    assert len(moves) == 1 and moves[0]["from"] == HOME and moves[0]["to"] == OTHER
    assert "us-east-1 down" in moves[0]["reason"]
    assert {r["name"]: r["weight"] for r in status["regions"]} == {HOME: 0, OTHER: 100}


@pytest.mark.parametrize(("mode", "params"), FAULTS)
def test_an_outage_under_traffic_moves_it_quickly(
    stack_factory: Any,
    proxies: dict[str, FaultProxy],
    moto_regions: dict[str, MotoRegion],
    table: str,
    mode: str,
    params: dict[str, Any],
) -> None:
    stack = stack_factory()
    with Traffic(stack, table) as traffic:
        wait_until(lambda: len(traffic.acked) >= 20, 15, message="traffic flowing")
        cut = time.monotonic()
        proxies[HOME].set_mode(mode, **params)
        took = wait_moved(stack, OTHER, TRAFFIC_BOUND)
        wait_until(lambda: len(traffic.acked_after(cut + took)) >= 10, 15, message="traffic in eu-west-1")
    first = min(at for at, _, _ in traffic.acked if at > cut + took) - cut
    lost = [f for f in traffic.failed if f[0] > cut]
    print(f"\nunder traffic, {mode}: moved in {took:.2f} s, first write acked after {first:.2f} s, "
          f"{len(lost)} failed requests")  # fmt: skip
    for key in traffic.acked_after(cut + took + 0.5)[:5]:
        assert where(moto_regions, table, key) == {OTHER}


@pytest.mark.parametrize("load", ["idle", "traffic"])
def test_a_slow_region_beyond_the_threshold_moves_traffic(
    stack_factory: Any,
    proxies: dict[str, FaultProxy],
    moto_regions: dict[str, MotoRegion],
    table: str,
    load: str,
) -> None:
    # slow at 300 ms; the fault adds 250 ms each way: answers in ~0.5 s, slow but within the 800 ms timeout
    stack = stack_factory(health={**DEFAULT_HEALTH, "slow": "300ms"})
    with Traffic(stack, table, rate=20 if load == "traffic" else 0.001):
        proxies[HOME].set_mode("delay", seconds=0.25)
        took = wait_moved(stack, OTHER, IDLE_BOUND)
    print(f"\n{load}, slow: moved in {took:.2f} s")
    reason = next(e for e in stack.status()["events"] if e["kind"] == "failover")["reason"]
    assert "slow" in reason
    assert a_write_lands_in(stack, moto_regions, table) == {OTHER}


def test_throttling_and_auth_failures_for_a_minute_never_move(
    moto_regions: dict[str, MotoRegion], table: str, tmp_path: Path
) -> None:
    """Two sidecars side by side for 60 s: one whose home region throttles everything, one whose home region
    rejects the sidecar's credentials. Neither moves; the second alerts (moving would not help)."""
    regions = [moto_regions[HOME], moto_regions[OTHER]]
    with (
        FaultProxy(moto_regions[HOME].port, tmp_path) as throttled,
        FaultProxy(moto_regions[HOME].port, tmp_path) as rejecting,
    ):
        stacks = {}
        try:
            for name, proxy in (("throttle", throttled), ("auth", rejecting)):
                stacks[name] = SidecarStack(
                    regions, [table], tmp_path, endpoints={HOME: proxy.url}, extra={"health": DEFAULT_HEALTH}
                ).start()
                stacks[name].wait_regions_up()
            throttled.set_mode("throttle", code="ThrottlingException")
            rejecting.set_mode("http_error", status=400, code="UnrecognizedClientException",
                               message="The security token included in the request is invalid.")  # fmt: skip
            with (
                Traffic(stacks["throttle"], table, rate=20) as t1,
                Traffic(stacks["auth"], table, rate=20) as t2,
            ):
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    for stack in stacks.values():
                        assert active(stack) == HOME
                    time.sleep(1.0)  # sampling the state once a second for a minute is the test
            assert len(t1.failed) > 100 and len(t2.failed) > 100  # the faults really reached the app
            for name, stack in stacks.items():
                status = stack.status()
                assert not [e for e in status["events"] if e["kind"] in ("failover", "failback")], name
                home = next(r for r in status["regions"] if r["name"] == HOME)
                assert home["state"] == "up", (name, home)
                assert home["weight"] == 100
            home = next(r for r in stacks["throttle"].status()["regions"] if r["name"] == HOME)
            assert "throttled" in (home["cause"] or "")
            auth_status = stacks["auth"].status()
            alerts = [e for e in auth_status["events"] if e["kind"] == "alert"]
            assert alerts and "credentials rejected" in alerts[0]["reason"]
            assert "moving would not help" in auth_status["failover"]["reason"]
        finally:
            for stack in stacks.values():
                stack.stop()


def test_a_region_flapping_every_second_moves_at_most_once_per_hold_down(
    stack_factory: Any, proxies: dict[str, FaultProxy]
) -> None:
    """Both regions flap in anti-phase (one refuses while the other serves, swapping every second) for
    30 s, with hold_down 10 s: automatic moves are at least a (growing) hold-down apart."""
    hold_down = 10.0
    stack = stack_factory(failover={"hold_down": f"{hold_down:g}s"})
    end = time.monotonic() + 30
    phase = 0
    while time.monotonic() < end:
        proxies[HOME].set_mode("refuse" if phase == 0 else "pass")
        proxies[OTHER].set_mode("pass" if phase == 0 else "refuse")
        phase ^= 1
        time.sleep(1.0)  # the flapping period is the fault being injected
    moves = [e for e in stack.status()["events"] if e["kind"] in ("failover", "failback")]
    assert moves, "a region that fails for a whole second under default settings is seen down"
    times = sorted(_epoch(e["at"]) for e in moves)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    print(f"\nflapping: {len(moves)} moves, gaps {gaps}")
    assert len(moves) <= 1 + 30 / hold_down
    # events carry whole seconds: allow one second of rounding
    assert all(gap >= hold_down - 1 for gap in gaps), gaps


def _epoch(iso: str) -> float:
    return time.mktime(time.strptime(iso, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone


@pytest.mark.parametrize("mode", ["refuse", "blackhole"])
def test_both_regions_down_no_move_503s_then_recovery(
    stack_factory: Any,
    proxies: dict[str, FaultProxy],
    moto_regions: dict[str, MotoRegion],
    table: str,
    mode: str,
) -> None:
    """Every region failing at once looks like this host's network: nothing moves, the app gets
    DynamoDB-shaped 503s (retryable by every SDK); when one region comes back, traffic goes there."""
    stack = stack_factory()
    proxies[HOME].set_mode(mode)
    proxies[OTHER].set_mode(mode)
    wait_until(
        lambda: all(r["state"] == "down" for r in stack.status()["regions"]), 15, message="both regions down"
    )
    client = app_client(stack, timeout=5.0)

    def a_503() -> bool:
        try:
            put(client, table, "during")
        except ClientError as exc:
            return exc.response["ResponseMetadata"]["HTTPStatusCode"] == 503 and exc.response["Error"][
                "Code"
            ] in ("ServiceUnavailableException", "ServiceUnavailable")
        return False

    wait_until(a_503, 15, message="a DynamoDB-shaped 503 while every region is down")
    status = stack.status()
    assert status["active_region"] == HOME
    assert not [e for e in status["events"] if e["kind"] == "failover"]
    assert "own network" in status["failover"]["reason"]
    assert [e for e in status["events"] if e["kind"] == "alert" and e.get("alert") == "all-down"]
    proxies[OTHER].set_mode("pass")
    took = wait_moved(stack, OTHER, 15)
    print(f"\nboth down ({mode}), then eu-west-1 back: moved {took:.2f} s after it returned")
    assert a_write_lands_in(stack, moto_regions, table) == {OTHER}
