"""Many hosts, one decision: three sidecars (each with its own HAProxy and its own fault proxy per region)
agree on the active region through a real three-member etcd cluster on loopback.

Each "host" is a `ddb-sidecar run` process with its own ports, state_dir and fault proxies, so one host can
be cut off from a region alone. The regions are the session's two moto servers. Health settings are the
quick test ones (interval 250 ms, timeout 400 ms, fall 2); lease_ttl is 3 s.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from sidecar.fleet.localetcd import LocalEtcdCluster
from tests.support.fleet import HOSTS, Fleet
from tests.support.moto_region import MotoRegion
from tests.support.stack import new_app_table
from tests.support.wait import wait_until

HOME, OTHER = "us-east-1", "eu-west-1"
LEASE_TTL = 3.0


@pytest.fixture(scope="module")
def table(moto_regions: dict[str, MotoRegion]) -> str:
    return new_app_table(moto_regions.values(), "fleet")


@pytest.fixture
def fleet(
    moto_regions: dict[str, MotoRegion], table: str, etcd: LocalEtcdCluster, tmp_path: Path
) -> Iterator[Fleet]:
    f = Fleet(moto_regions, table, etcd.endpoints, tmp_path, lease_ttl=LEASE_TTL)
    try:
        yield f.start()
    finally:
        f.stop()


def alerts(doc: dict[str, Any]) -> list[str]:
    return [e.get("alert", "") for e in doc["events"] if e["kind"] == "alert"]


def test_one_host_cut_off_alone_moves_nothing(fleet: Fleet) -> None:
    fleet.proxies["web-1"][HOME].set_mode("refuse")
    wait_until(
        lambda: fleet.status("web-1")["coordination"]["isolated"], 10, message="web-1 sees itself cut off"
    )
    assert "host-isolated" in alerts(fleet.status("web-1"))
    assert fleet.active() == dict.fromkeys(HOSTS, HOME)
    wait_until(  # every member's view of it, once web-1's record has gone through etcd
        lambda: all(
            fleet.status(h)["coordination"]["regions"][HOME] == {"up": 2, "down": 1, "voters": 3}
            for h in HOSTS
        ),
        10,
        message="the fleet counts web-1 alone seeing us-east-1 down",
    )
    # the others are unaffected; web-1's requests fail fast ("not sent, safe to retry")
    assert fleet.lands_in("web-2") == {HOME} and fleet.lands_in("web-3") == {HOME}
    with pytest.raises(ClientError) as err:
        fleet.lands_in("web-1")
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert fleet.active() == dict.fromkeys(HOSTS, HOME)
    assert not [e for e in fleet.status("web-2")["events"] if e["kind"] == "failover"]
    fleet.proxies["web-1"][HOME].set_mode("pass")
    wait_until(lambda: not fleet.status("web-1")["coordination"]["isolated"], 10, message="web-1 rejoins")


def test_the_region_cut_for_all_moves_every_host(fleet: Fleet) -> None:
    for host in HOSTS:
        fleet.proxies[host][HOME].set_mode("refuse")
    wait_until(lambda: fleet.active() == dict.fromkeys(HOSTS, OTHER), 15, message="every host moved")
    for host in HOSTS:
        assert fleet.lands_in(host) == {OTHER}
    leader = fleet.leader()
    moves = [e for e in fleet.status(leader)["events"] if e["kind"] == "failover"]
    assert len(moves) == 1 and "members see it down" in moves[0]["reason"]
    epochs = {fleet.status(h)["coordination"]["applied_epoch"] for h in HOSTS}
    assert len(epochs) == 1


def test_killing_the_leader_elects_another_and_moves_nothing(fleet: Fleet) -> None:
    leader = fleet.leader()
    others = [h for h in HOSTS if h != leader]
    epoch = fleet.status(others[0])["coordination"]["epoch"]
    stack = fleet.stacks[leader]
    stack.signal(signal.SIGKILL)
    assert stack.wait_exit(5) == -signal.SIGKILL
    wait_until(
        lambda: all(fleet.status(h)["coordination"]["leader"] in others for h in others),
        LEASE_TTL + 2 + 3,  # the bound, plus slack for a loaded machine
        interval=0.05,
        message="a new leader among the others",
    )
    assert {fleet.status(h)["active_region"] for h in others} == {HOME}
    assert fleet.status(others[0])["coordination"]["epoch"] == epoch  # nothing decided anew
    stack.start()  # the killed host comes back (adopting its HAProxy), and follows the fleet's decision
    wait_until(fleet.settled, 20, message="the restarted member rejoined")
    assert fleet.active() == dict.fromkeys(HOSTS, HOME)


def test_operator_commands_from_a_non_leader_act_on_the_whole_fleet(fleet: Fleet) -> None:
    leader = fleet.leader()
    host = next(h for h in HOSTS if h != leader)
    done = fleet.cli(host, "failover", "--to", OTHER)
    assert done.returncode == 0, done.stderr
    assert f"active region: {OTHER}" in done.stdout
    # the command returned once every live member applied it
    assert fleet.active() == dict.fromkeys(HOSTS, OTHER)
    paused = fleet.cli(host, "pause")
    assert paused.returncode == 0, paused.stderr
    assert {fleet.status(h)["mode"] for h in HOSTS} == {"paused"}
    resumed = fleet.cli(host, "resume")
    assert resumed.returncode == 0, resumed.stderr
    refused = fleet.cli(host, "failover", "--to", "ap-south-1")
    assert refused.returncode == 1 and "refused" in refused.stderr


def test_losing_etcd_keeps_serving_and_converges_without_a_flip(fleet: Fleet, etcd: LocalEtcdCluster) -> None:
    for i in range(3):
        etcd.kill(i)
    try:
        wait_until(
            lambda: all(fleet.status(h)["coordination"]["state"] == "lost" for h in HOSTS),
            15,
            message="every member says coordination lost",
        )
        assert all("coordination-lost" in alerts(fleet.status(h)) for h in HOSTS)
        for host in HOSTS:
            assert fleet.lands_in(host) == {HOME}  # serving goes on with the current weights
        refused = fleet.cli("web-2", "failover", "--to", OTHER)
        assert refused.returncode != 0 and "--local" in refused.stderr
    finally:
        etcd.restart_all()
    wait_until(
        lambda: all(fleet.status(h)["coordination"]["state"] == "connected" for h in HOSTS),
        30,
        message="every member reconnected",
    )
    wait_until(fleet.settled, 20, message="one leader again")
    assert fleet.active() == dict.fromkeys(HOSTS, HOME)
    for host in HOSTS:
        assert not [e for e in fleet.status(host)["events"] if e["kind"] in ("failover", "fleet-decision")]


def test_losing_one_etcd_member_changes_nothing(fleet: Fleet, etcd: LocalEtcdCluster) -> None:
    etcd.kill(0)
    try:
        done = fleet.cli("web-3", "pause")
        assert done.returncode == 0, done.stderr
        assert {fleet.status(h)["coordination"]["state"] for h in HOSTS} == {"connected"}
        assert {fleet.status(h)["mode"] for h in HOSTS} == {"paused"}
    finally:
        etcd.restart(0)


def test_a_member_serving_other_tables_is_refused_as_a_voter(
    fleet: Fleet, moto_regions: dict[str, MotoRegion]
) -> None:
    other_table = new_app_table(moto_regions.values(), "fleetother")
    stranger = fleet.add("web-4", tables=[other_table])
    stranger.wait_regions_up()
    wait_until(
        lambda: any(r["host"] == "web-4" for r in fleet.status("web-1")["coordination"]["refused_members"]),
        15,
        message="web-4 refused as a voter",
    )
    doc = fleet.status("web-1")
    refused = next(r for r in doc["coordination"]["refused_members"] if r["host"] == "web-4")
    assert "tables" in refused["differs"] and "regions" not in refused["differs"]
    assert "web-4" not in doc["coordination"]["voters"]
    assert "member-mismatch" in alerts(doc)
