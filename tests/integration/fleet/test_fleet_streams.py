"""Streams mode in a fleet: exactly one replicator runs (the leader's), its checkpoints in etcd, so that a new
leader resumes where the old one stopped; the replication lag is one figure for the whole fleet.

Three sidecars with `replication.mode: streams`, a three-member etcd, the session's two moto regions (streams
on the app and health tables), writers on every host.
"""

from __future__ import annotations

import base64
import contextlib
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from sidecar.fleet.localetcd import LocalEtcdCluster
from tests.support.fleet import HOSTS, Fleet
from tests.support.moto_region import MotoRegion
from tests.support.stack import DEFAULT_TEST_HEALTH, stream_tables
from tests.support.traffic import Writers
from tests.support.wait import wait_until

HOME, OTHER = "us-east-1", "eu-west-1"


@pytest.fixture
def fleet(moto_regions: dict[str, MotoRegion], etcd: LocalEtcdCluster, tmp_path: Path) -> Iterator[Fleet]:
    app, health = stream_tables(moto_regions.values(), "fst")
    f = Fleet(
        moto_regions,
        app,
        etcd.endpoints,
        tmp_path,
        health={**DEFAULT_TEST_HEALTH, "table": health},
        extra={"replication": {"mode": "streams", "poll_interval": "100ms"}},
    )
    try:
        yield f.start()
    finally:
        f.stop()


def replicators(fleet: Fleet, hosts: tuple[str, ...] | list[str] = HOSTS) -> dict[str, dict | None]:
    return {h: fleet.status(h)["replication"]["replicator"] for h in hosts}


def write_and_replicate(fleet: Fleet, moto: dict[str, MotoRegion], hosts: list[str]) -> list[str]:
    writers = {h: Writers(fleet.stacks[h], fleet.table, threads=1) for h in hosts}
    with contextlib.ExitStack() as running:
        for w in writers.values():
            running.enter_context(w)
        wait_until(lambda: all(len(w.acked) >= 20 for w in writers.values()), 20, message="writes")
    for h, w in writers.items():
        assert not w.failed, (h, w.failed[:5])
    keys = [k for w in writers.values() for _, _, k in w.acked]
    wait_until(
        lambda: len(moto[OTHER].present(fleet.table, keys)) == len(keys),
        20,
        message=lambda: f"{len(keys) - len(moto[OTHER].present(fleet.table, keys))} writes not in eu-west-1",
    )
    return keys


def test_only_the_leader_replicates_and_a_new_leader_resumes_from_the_shared_checkpoints(
    fleet: Fleet, moto_regions: dict[str, MotoRegion], etcd: LocalEtcdCluster
) -> None:
    leader = fleet.leader()
    wait_until(lambda: (replicators(fleet)[leader] or {}).get("running"), 20, message="the leader replicates")
    running = {h: r is not None and r["running"] for h, r in replicators(fleet).items()}
    assert running == {h: h == leader for h in HOSTS}, running

    before = write_and_replicate(fleet, moto_regions, list(HOSTS))
    # the fleet's one figure: every member reports the leader's lag
    wait_until(
        lambda: all(fleet.status(h)["replication"]["lag_ms"] is not None for h in HOSTS),
        10,
        message="every member shows the replication lag",
    )
    stored = etcd_get(etcd, f"{fleet.prefix}/checkpoints/{HOME}--{OTHER}--{fleet.table}")
    assert stored is not None and stored["shards"], stored
    assert any(cp["sequence"] for cp in stored["shards"].values())

    fleet.stacks[leader].signal(signal.SIGKILL)
    others = [h for h in HOSTS if h != leader]
    wait_until(
        lambda: (
            len({fleet.status(h)["coordination"]["leader"] for h in others} - {leader}) == 1
            and fleet.status(others[0])["coordination"]["leader"] in others
        ),
        15,
        message="a new leader",
    )
    new = str(fleet.status(others[0])["coordination"]["leader"])
    wait_until(
        lambda: (replicators(fleet, others)[new] or {}).get("running"),
        20,
        message="the new leader replicates",
    )
    t = time.monotonic()
    after = write_and_replicate(fleet, moto_regions, others)
    applied = replicators(fleet, others)[new]
    assert applied is not None
    # It resumed at the old leader's checkpoints: it applied what was written since (and the heartbeats),
    # not the whole stream again (which would be every write before and after, and every heartbeat).
    print(
        f"\nnew leader {new} applied {applied['records_applied']} records "
        f"({len(after)} app writes after the kill, {len(before)} before) in {time.monotonic() - t:.1f} s"
    )
    assert applied["records_applied"] < len(before) + len(after), applied
    assert not [h for h in others if h != new and replicators(fleet, others)[h]]
    fleet.stacks[leader].wait_exit(5)
    fleet.stacks[leader].start()  # adopts its HAProxy; rejoins as a follower, without a replicator
    wait_until(fleet.settled, 30, message="the killed member rejoined")
    assert replicators(fleet)[leader] is None


def etcd_get(etcd: LocalEtcdCluster, key: str) -> dict | None:
    body = orjson.dumps({"key": base64.b64encode(key.encode()).decode()})
    request = urllib.request.Request(
        f"{etcd.endpoints[0]}/v3/kv/range", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=5) as resp:
        kvs = orjson.loads(resp.read()).get("kvs") or []
    return orjson.loads(base64.b64decode(kvs[0]["value"])) if kvs else None
