"""A switchover in a fleet: every member's write fence closes before the flip and opens after it.

Three sidecars (each with its own HAProxy and fault proxies), a three-member etcd, the session's two moto
regions with one-way replication us-east-1 -> eu-west-1 delayed by DELAY (tests/support/globaltables.py,
standing in for Global Tables), and writers on every host. The promise: every write acknowledged through
any host is in the new region afterwards, and none was acknowledged by the old region after the new one
took its first direct write (no moment with writes in both regions).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.fleet.localetcd import LocalEtcdCluster
from tests.support.fleet import HOSTS, Fleet
from tests.support.globaltables import GlobalTables
from tests.support.moto_region import MotoRegion
from tests.support.stack import DEFAULT_TEST_HEALTH, stream_tables
from tests.support.traffic import Writers
from tests.support.wait import wait_until

HOME, OTHER = "us-east-1", "eu-west-1"
DELAY = 0.3
SWITCHOVER_TIMEOUT = 3.0


@contextlib.contextmanager
def replicated_fleet(
    moto_regions: dict[str, MotoRegion],
    etcd: LocalEtcdCluster,
    tmp_path: Path,
    source: str = HOME,
    **failover: str,
) -> Iterator[Fleet]:
    """A fleet whose app and health tables replicate one way, from `source` to the other region."""
    app, health = stream_tables(moto_regions.values(), "fso")
    src, dst = moto_regions[source], next(r for n, r in moto_regions.items() if n != source)
    with GlobalTables(src, dst, [app, health], tmp_path, {**src.env()}, delay=DELAY):
        f = Fleet(
            moto_regions,
            app,
            etcd.endpoints,
            tmp_path,
            health={**DEFAULT_TEST_HEALTH, "table": health},
            extra={"failover": {"switchover_timeout": f"{SWITCHOVER_TIMEOUT:g}s", **failover}},
        )
        try:
            yield f.start()
        finally:
            f.stop()


@pytest.fixture
def fleet(moto_regions: dict[str, MotoRegion], etcd: LocalEtcdCluster, tmp_path: Path) -> Iterator[Fleet]:
    with replicated_fleet(moto_regions, etcd, tmp_path) as f:
        wait_until(
            lambda: all(f.status(h)["replication"]["lag_ms"] is not None for h in HOSTS),
            20,
            message="every member measures the lag into eu-west-1",
        )
        yield f


def test_switchover_from_a_non_leader_fences_every_member_and_loses_nothing(
    fleet: Fleet, moto_regions: dict[str, MotoRegion]
) -> None:
    host = next(h for h in HOSTS if h != fleet.leader())
    writers = {h: Writers(fleet.stacks[h], fleet.table, threads=2) for h in HOSTS}
    with contextlib.ExitStack() as running:
        for w in writers.values():
            running.enter_context(w)
        wait_until(
            lambda: all(len(w.acked) >= 20 for w in writers.values()), 20, message="writes on every host"
        )
        done = fleet.cli(host, "switchover", "--to", OTHER)
        switched = time.monotonic()
        assert done.returncode == 0, done.stdout + done.stderr
        wait_until(
            lambda: all(len([a for a in w.acked if a[0] > switched]) >= 20 for w in writers.values()),
            20,
            message="writes after the switchover on every host",
        )
    print(f"\nfleet switchover from {host}:\n{done.stdout}")
    assert fleet.active() == dict.fromkeys(HOSTS, OTHER)
    for h in HOSTS:  # every member held its writes, and said how long
        assert f"{h}: writes held" in done.stdout
        assert not writers[h].failed, (h, writers[h].failed[:5])
    acked = [a for w in writers.values() for a in w.acked]
    keys = [k for _, _, k in acked]

    def missing() -> list[str]:
        present = moto_regions[OTHER].present(fleet.table, keys)
        return [k for k in keys if k not in present]

    wait_until(
        lambda: not missing(),
        10 + DELAY,
        message=lambda: f"{len(missing())} acknowledged writes in eu-west-1",
    )
    # Nothing replicates eu-west-1 -> us-east-1 here: a key in us-east-1 was written there directly.
    in_old = moto_regions[HOME].present(fleet.table, keys)
    new_only = [(sent, at, k) for sent, at, k in acked if k not in in_old]
    old = [(sent, at, k) for sent, at, k in acked if k in in_old]
    assert new_only and old
    first_new = min(at for _, at, _ in new_only)  # the new region had taken a write by then
    late = [k for sent, _, k in old if sent > first_new]
    assert not late, f"{len(late)} writes sent after the new region took one landed in the old: {late[:5]}"
    assert not [k for sent, _, k in acked if sent > switched and k in in_old]
    for h in HOSTS:
        kinds = [e["kind"] for e in fleet.status(h)["events"]]
        assert "fence-released" in kinds, (h, kinds)


def test_a_member_that_does_not_acknowledge_aborts_the_switchover_with_nothing_moved(fleet: Fleet) -> None:
    leader = fleet.leader()
    host, frozen = [h for h in HOSTS if h != leader][:2]
    pid = fleet.stacks[frozen].pid
    assert pid is not None
    writers = {h: Writers(fleet.stacks[h], fleet.table, threads=2) for h in HOSTS if h != frozen}
    with contextlib.ExitStack() as running:
        for w in writers.values():
            running.enter_context(w)
        wait_until(lambda: all(len(w.acked) >= 10 for w in writers.values()), 20, message="writes flowing")
        os.kill(pid, signal.SIGSTOP)
        try:
            done = fleet.cli(host, "switchover", "--to", OTHER)
        finally:
            os.kill(pid, signal.SIGCONT)
        print(f"\nswitchover with {frozen} frozen: {done.stderr.strip()}")
        assert done.returncode == 1, done.stdout + done.stderr
        assert f"{frozen} did not acknowledge" in done.stderr and "nothing moved" in done.stderr
        wait_until(fleet.settled, 30, message="the frozen member is back in the fleet")
        t = time.monotonic()
        wait_until(
            lambda: all(len([a for a in w.acked if a[0] > t]) >= 10 for w in writers.values()),
            20,
            message="writes go on",
        )
    assert fleet.active() == dict.fromkeys(HOSTS, HOME)
    for h, w in writers.items():
        assert not w.failed, (h, w.failed[:5])
        assert fleet.status(h)["fence"]["closed"] is False


def test_automatic_failback_in_a_fleet_goes_home_through_a_fleet_switchover(
    moto_regions: dict[str, MotoRegion], etcd: LocalEtcdCluster, tmp_path: Path
) -> None:
    """failback: automatic. After an operator failover to eu-west-1 (replication now eu-west-1 ->
    us-east-1), the leader takes the whole fleet home once the hold-down is over and the lag into home is
    below max_lag, with every member's writes held until replication has caught up."""
    with replicated_fleet(
        moto_regions, etcd, tmp_path, source=OTHER, failback="automatic", hold_down="3s", max_lag="2s"
    ) as fleet:
        moved = fleet.cli(HOSTS[1], "failover", "--to", OTHER)
        assert moved.returncode == 0, moved.stderr
        assert fleet.active() == dict.fromkeys(HOSTS, OTHER)
        writers = {h: Writers(fleet.stacks[h], fleet.table, threads=1) for h in HOSTS}
        with contextlib.ExitStack() as running:
            for w in writers.values():
                running.enter_context(w)
            wait_until(
                lambda: set(fleet.active().values()) == {HOME}, 30, message="the fleet failed back home"
            )
            back = time.monotonic()
            wait_until(
                lambda: all(len([a for a in w.acked if a[0] > back]) >= 10 for w in writers.values()),
                20,
                message="writes after the failback",
            )
        leader = fleet.leader()
        failback = next(e for e in fleet.status(leader)["events"] if e["kind"] == "failback")
        assert "switched over with writes held" in failback["reason"]
        for h in HOSTS:
            assert not writers[h].failed, (h, writers[h].failed[:5])
            assert "fence-released" in [e["kind"] for e in fleet.status(h)["events"]]
