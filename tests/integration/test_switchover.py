"""Switchover with a write fence, and replication lag from heartbeats: real sidecar and HAProxy, real moto
regions, one-way replication us-east-1 -> eu-west-1 with a chosen delay (tests/support/globaltables.py,
standing in for Global Tables, which moto lacks).

The promise under test: every write acknowledged through the stable address during a switchover is in the
new region afterwards, and no write was acknowledged by the old region after the switch.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.globaltables import GlobalTables
from tests.support.moto_region import MotoRegion
from tests.support.stack import SIDECAR, SidecarStack
from tests.support.traffic import Writers
from tests.support.wait import wait_until

HOME, OTHER = "us-east-1", "eu-west-1"
DELAY = 0.3


@pytest.fixture
def tables(moto_regions: dict[str, MotoRegion]) -> tuple[str, str]:
    suffix = uuid.uuid4().hex[:8]
    app, health = f"so-app-{suffix}", f"so-health-{suffix}"
    for region in moto_regions.values():
        region.create_table(app, stream=True)
        region.create_table(health, stream=True)
    return app, health


@pytest.fixture
def replicated(
    moto_regions: dict[str, MotoRegion], tables: tuple[str, str], tmp_path: Path
) -> Iterator[GlobalTables]:
    src, dst = moto_regions[HOME], moto_regions[OTHER]
    with GlobalTables(src, dst, list(tables), tmp_path, {**src.env()}, delay=DELAY) as gt:
        yield gt


def make_stack(
    moto_regions: dict[str, MotoRegion], tables: tuple[str, str], tmp_path: Path, **failover: Any
) -> SidecarStack:
    app, health = tables
    stack = SidecarStack(
        [moto_regions[HOME], moto_regions[OTHER]],
        [app],
        tmp_path,
        extra={
            "health": {"table": health, "interval": "1s", "timeout": "800ms"},
            "failover": {"switchover_timeout": "3s", **failover},
        },
    )
    stack.start()
    stack.wait_regions_up()
    return stack


def cli(stack: SidecarStack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SIDECAR), *args, "-c", str(stack.config_path)],
        capture_output=True, text=True, timeout=60, env=stack.env, check=False,
    )  # fmt: skip


def test_lag_is_measured_from_heartbeats(
    moto_regions: dict[str, MotoRegion], tables: tuple[str, str], replicated: GlobalTables, tmp_path: Path
) -> None:
    stack = make_stack(moto_regions, tables, tmp_path)
    try:

        def lag() -> float | None:
            value = stack.status()["replication"]["lag_ms"]
            return float(value) if value is not None else None

        measured = wait_until(lag, 20, message="replication lag measured")
        assert DELAY * 1000 * 0.8 <= measured <= DELAY * 1000 + 1500, measured
        other = next(r for r in stack.status()["regions"] if r["name"] == OTHER)
        assert other["lag_ms"] is not None
        assert "ddb_sidecar_replication_lag_seconds" in stack.metrics()
    finally:
        stack.stop()


def test_switchover_loses_no_write_and_the_old_region_takes_none_after(
    moto_regions: dict[str, MotoRegion], tables: tuple[str, str], replicated: GlobalTables, tmp_path: Path
) -> None:
    app, _ = tables
    stack = make_stack(moto_regions, tables, tmp_path)
    try:
        wait_until(lambda: stack.status()["replication"]["lag_ms"] is not None, 20, message="lag measured")
        with Writers(stack, app) as writers:
            wait_until(lambda: len(writers.acked) >= 50, 20, message="writes flowing")
            started = time.monotonic()
            done = cli(stack, "switchover", "--to", OTHER)
            switched = time.monotonic()
            assert done.returncode == 0, done.stdout + done.stderr
            wait_until(
                lambda: len([a for a in writers.acked if a[0] > switched]) >= 50, 20, message="writes after"
            )
        print(f"\nswitchover: {done.stdout.strip()!r} (CLI took {switched - started:.2f} s)")
        assert "writes held" in done.stdout
        assert stack.status()["active_region"] == OTHER
        assert not writers.failed, writers.failed[:5]
        keys = [k for _, _, k in writers.acked]
        time.sleep(DELAY + 1.0)  # replication of the last writes before the switch (the emulator's delay)
        in_new = moto_regions[OTHER].present(app, keys)
        missing = [k for k in keys if k not in in_new]
        assert not missing, f"{len(missing)} acknowledged writes not in {OTHER}: {missing[:5]}"
        # Nothing replicates eu-west-1 -> us-east-1 here: a key in us-east-1 was written there. None of the
        # writes sent after the switch completed may be there.
        after = [k for sent, _, k in writers.acked if sent > switched]
        assert after and not moto_regions[HOME].present(app, after)
        events = [e["kind"] for e in stack.status()["events"]]
        assert "switchover" in events and "fence-released" in events
    finally:
        stack.stop()


def test_switchover_refused_when_replication_does_not_catch_up(
    moto_regions: dict[str, MotoRegion], tables: tuple[str, str], tmp_path: Path
) -> None:
    """No replication at all (the emulator is not running): the fence heartbeat never reaches eu-west-1, so
    the held writes go to us-east-1 after switchover_timeout and nothing moves."""
    app, _ = tables
    stack = make_stack(moto_regions, tables, tmp_path, switchover_timeout="1s")
    try:
        with Writers(stack, app, threads=2) as writers:
            wait_until(lambda: len(writers.acked) >= 20, 20, message="writes flowing")
            done = cli(stack, "switchover", "--to", OTHER)
        assert done.returncode == 1
        assert "did not reach eu-west-1" in done.stderr and "nothing moved" in done.stderr
        assert stack.status()["active_region"] == HOME
        assert not writers.failed, writers.failed[:5]
        keys = [k for _, _, k in writers.acked]
        assert moto_regions[HOME].present(app, keys) == set(keys)  # held writes went to the old region
    finally:
        stack.stop()


def test_failover_reports_the_lag_at_the_move(
    moto_regions: dict[str, MotoRegion], tables: tuple[str, str], replicated: GlobalTables, tmp_path: Path
) -> None:
    stack = make_stack(moto_regions, tables, tmp_path)
    try:
        wait_until(lambda: stack.status()["replication"]["lag_ms"] is not None, 20, message="lag measured")
        done = cli(stack, "failover", "--to", OTHER)
        assert done.returncode == 0, done.stderr
        assert "replication lag into eu-west-1 was" in done.stdout and " ms at the move" in done.stdout
        move = next(e for e in stack.status()["events"] if e["kind"] == "operator-failover")
        assert "replication lag to eu-west-1" in move["reason"] and "unmeasured" not in move["reason"]
    finally:
        stack.stop()


def test_automatic_failback_goes_home_through_a_switchover(
    moto_regions: dict[str, MotoRegion], tables: tuple[str, str], tmp_path: Path
) -> None:
    """failback: automatic. After an operator failover to eu-west-1 (replication now eu-west-1 ->
    us-east-1), once the hold-down is over and the lag into home is measured below max_lag, the sidecar
    goes home by itself, with writes held until replication has caught up."""
    app, _ = tables
    src, dst = moto_regions[OTHER], moto_regions[HOME]
    with GlobalTables(src, dst, list(tables), tmp_path, {**src.env()}, delay=DELAY):
        stack = make_stack(moto_regions, tables, tmp_path, failback="automatic", hold_down="3s", max_lag="2s")
        try:
            assert cli(stack, "failover", "--to", OTHER).returncode == 0
            with Writers(stack, app, threads=2) as writers:
                wait_until(lambda: stack.status()["active_region"] == HOME, 30, message="failed back home")
                back = time.monotonic()
                wait_until(lambda: len([a for a in writers.acked if a[0] > back]) >= 20, 20, message="writes")
            events = stack.status()["events"]
            failback = next(e for e in events if e["kind"] == "failback")
            assert "switched over with writes held" in failback["reason"]
            assert "replication lag to us-east-1" in failback["reason"]
            assert [e for e in events if e["kind"] == "fence-released"]
            assert not writers.failed, writers.failed[:5]
        finally:
            stack.stop()


def test_streams_mode_replicates_through_the_sidecar_and_switches_over_without_loss(
    moto_regions: dict[str, MotoRegion], tables: tuple[str, str], tmp_path: Path
) -> None:
    """replication.mode: streams: the sidecar's own replicator copies us-east-1's stream into eu-west-1;
    a switchover waits until it has applied everything written before the fence, then replication runs
    from eu-west-1."""
    app, health = tables
    stack = SidecarStack(
        [moto_regions[HOME], moto_regions[OTHER]],
        [app],
        tmp_path,
        extra={
            "health": {"table": health},
            "failover": {"switchover_timeout": "5s"},
            "replication": {"mode": "streams"},
        },
    )
    stack.start()
    try:
        stack.wait_regions_up()
        with Writers(stack, app, threads=2) as writers:
            wait_until(
                lambda: stack.status()["replication"]["lag_ms"] is not None, 30, message="replicator lag"
            )
            wait_until(lambda: len(writers.acked) >= 30, 20, message="writes flowing")
            done = cli(stack, "switchover", "--to", OTHER)
            switched = time.monotonic()
            assert done.returncode == 0, done.stdout + done.stderr
            wait_until(
                lambda: len([a for a in writers.acked if a[0] > switched]) >= 20, 20, message="writes after"
            )
        assert not writers.failed, writers.failed[:5]
        status = stack.status()
        assert status["active_region"] == OTHER
        assert status["replication"]["replicator"]["source"] == OTHER
        metrics = stack.metrics()
        assert "ddb_sidecar_replication_records_total" in metrics
        assert "ddb_sidecar_replication_iterator_age_seconds" in metrics
        before = [k for sent, _, k in writers.acked if sent < switched]
        assert moto_regions[OTHER].present(app, before) == set(before)  # nothing lost in the move
        # from eu-west-1 now: what was written after the switch reaches us-east-1 through the replicator
        after = [k for sent, _, k in writers.acked if sent > switched]
        wait_until(
            lambda: moto_regions[HOME].present(app, after) == set(after), 20, message="replicated back"
        )
    finally:
        stack.stop()
