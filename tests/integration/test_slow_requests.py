"""Slow but healthy requests never move traffic: a region is down when it stops answering, not when a Scan
is slow.

Real HAProxy, the sidecar and two moto regions, each behind the fault proxy, with the project's default
health settings (interval 1 s, timeout 800 ms, fall 3, slow 2 s), as a new user gets them. The fault proxy
holds every `Scan` for 1.2 s or 2.5 s before forwarding it (a 1 MB page, or a big request across the
Atlantic); everything else, the sidecar's probes included, passes at once. Rounds of concurrent Scans, with
the app otherwise idle and then beside a light writer: no move, no region down, every Scan answered.

Before the fix, four concurrent 1.2 s Scans moved traffic: 800 ms of silence with requests waiting was
called a blackhole, and answers over `health.slow` counted as outages whatever the operation.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.faultproxy import FaultProxy
from tests.support.moto_region import MotoRegion
from tests.support.stack import HEALTH_TABLE, SidecarStack, new_app_table
from tests.support.traffic import Traffic
from tests.support.wait import wait_until

HOME, OTHER = "us-east-1", "eu-west-1"
CONCURRENT_SCANS = 4
ITEMS = 30


@pytest.fixture(scope="module")
def table(moto_regions: dict[str, MotoRegion]) -> str:
    name = new_app_table(moto_regions.values(), "slowscans")
    for region in moto_regions.values():
        client = region.client()
        for i in range(ITEMS):
            client.put_item(TableName=name, Item={"pk": {"S": f"seed-{i}"}, "v": {"S": "x" * 100}})
    return name


@pytest.fixture
def stack(
    moto_regions: dict[str, MotoRegion], table: str, proxies: dict[str, FaultProxy], tmp_path: Path
) -> Iterator[SidecarStack]:
    for proxy in proxies.values():
        proxy.set_mode("pass")
        proxy.reset_counts()
    stack = SidecarStack(
        [moto_regions[HOME], moto_regions[OTHER]],
        [table],
        tmp_path,
        endpoints={name: p.url for name, p in proxies.items()},
        extra={"health": {"table": HEALTH_TABLE}},  # every other health setting at its default
    )
    stack.start()
    try:
        stack.wait_regions_up()
        yield stack
    finally:
        for proxy in proxies.values():
            proxy.set_mode("pass")
        stack.stop()


def scan_round(stack: SidecarStack, table: str, n: int) -> list[Any]:
    """`n` concurrent full Scans through the stable address; each result is the item count or the error."""
    results: list[Any] = [None] * n

    def scan(i: int) -> None:
        client = stack.client(connect_timeout=5, read_timeout=15, retries={"total_max_attempts": 1})
        try:
            results[i] = len(client.scan(TableName=table)["Items"])
        except Exception as exc:  # every failure is reported by the assertion below
            results[i] = repr(exc)

    threads = [threading.Thread(target=scan, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


@pytest.mark.parametrize("hold", [1.2, 2.5], ids=["1.2s", "2.5s"])
@pytest.mark.parametrize("load", ["idle", "writer"])
def test_concurrent_slow_scans_never_move_traffic(
    stack: SidecarStack, proxies: dict[str, FaultProxy], table: str, hold: float, load: str
) -> None:
    rounds = 6  # 24 Scans: past the history a latency class needs before its own p99 judges it
    proxies[HOME].set_mode("hold", seconds=hold, operation="Scan")
    writer = Traffic(stack, table, rate=10.0) if load == "writer" else None
    with writer or contextlib.nullcontext():
        for r in range(rounds):
            started = time.monotonic()
            results = scan_round(stack, table, CONCURRENT_SCANS)
            took = time.monotonic() - started
            assert all(isinstance(n, int) and n >= ITEMS for n in results), (
                f"round {r}: every Scan answered with the whole table, got {results}"
            )
            assert took >= hold, f"round {r} took {took:.2f} s: the Scans were not held"
            status = stack.status()
            assert status["active_region"] == HOME, f"round {r}: moved: {status['events'][-3:]}"
    assert proxies[HOME].requests("hold", "Scan") == rounds * CONCURRENT_SCANS
    assert proxies[HOME].requests("pass", "Scan") == 0
    status = stack.status()
    kinds = [e["kind"] for e in status["events"]]
    assert "failover" not in kinds and "region-down" not in kinds, status["events"]
    home = next(r for r in status["regions"] if r["name"] == HOME)
    assert home["state"] == "up" and home["weight"] == 100
    if writer is not None:
        assert len(writer.acked) >= 10 and not writer.failed, writer.failed[:5]


def test_a_blackhole_under_scans_only_is_still_left(
    stack: SidecarStack, proxies: dict[str, FaultProxy], table: str
) -> None:
    """The other side of the rule: an app that only Scans, and its region goes dark. The probes sent during
    the silence go unanswered, so the region is down and traffic moves."""
    proxies[HOME].set_mode("hold", seconds=1.2, operation="Scan")
    scan_round(stack, table, CONCURRENT_SCANS)  # some Scan history first
    proxies[HOME].set_mode("blackhole")
    cut = time.monotonic()
    done = threading.Event()
    threading.Thread(
        target=lambda: (scan_round(stack, table, CONCURRENT_SCANS), done.set()), daemon=True
    ).start()
    wait_until(
        lambda: stack.status()["active_region"] == OTHER, 8.0, interval=0.02, message="moved to eu-west-1"
    )
    print(f"\nblackhole under Scans only: moved in {time.monotonic() - cut:.2f} s")
    reason = next(e for e in stack.status()["events"] if e["kind"] == "failover")["reason"]
    assert "us-east-1 down" in reason
    assert done.wait(20), "the Scans stuck in the dark region were answered (with an error) at the move"
