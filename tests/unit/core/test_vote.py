"""The fleet vote: a region is down for the fleet only when most members see it down."""

from __future__ import annotations

from sidecar.core.controller import RegionView
from sidecar.core.health import Cause
from sidecar.core.vote import MemberView, fingerprint, isolated, mismatch, serves, vote

REGIONS = ("us-east-1", "eu-west-1")
SERVES = serves(REGIONS, ["orders"], "ddb-sidecar-health")
T = 1_000_000.0


def up(name: str, ok: float = T) -> RegionView:
    return RegionView(name, "up", None, Cause.OK, None, None, ok)


def down(name: str, since: float = T, ok: float = T - 5) -> RegionView:
    return RegionView(name, "down", "3 consecutive timeout", Cause.TIMEOUT, None, since, ok)


def member(host: str, *views: RegionView, served: dict[str, str] = SERVES) -> MemberView:
    return MemberView(host, served, {v.name: v for v in views})


def test_a_fleet_of_one_votes_exactly_as_its_member_sees() -> None:
    view = down("us-east-1", since=T + 1)
    result = vote(REGIONS, [member("web-1", view, up("eu-west-1"))], SERVES)
    assert result.views[0] == view and result.views[1] == up("eu-west-1")
    assert result.voters == ("web-1",)


def test_one_host_cut_off_alone_moves_nothing() -> None:
    members = [
        member("web-1", down("us-east-1"), up("eu-west-1")),
        member("web-2", up("us-east-1"), up("eu-west-1")),
        member("web-3", up("us-east-1"), up("eu-west-1")),
    ]
    result = vote(REGIONS, members, SERVES)
    us = result.views[0]
    assert us.health == "up" and "1 of 3 members see it down" in (us.cause or "")
    assert result.tallies["us-east-1"].down == 1 and result.tallies["us-east-1"].up == 2
    assert isolated(down("us-east-1"), us)


def test_the_region_down_for_most_is_down_for_the_fleet_with_the_majority_times() -> None:
    members = [
        member("web-1", down("us-east-1", since=T + 1), up("eu-west-1", ok=T + 3)),
        member("web-2", down("us-east-1", since=T + 2), up("eu-west-1", ok=T + 4)),
        member("web-3", up("us-east-1"), up("eu-west-1", ok=T + 5)),
    ]
    result = vote(REGIONS, members, SERVES)
    us, eu = result.views
    assert us.health == "down" and us.outage and us.kind is Cause.TIMEOUT
    assert us.failing_since == T + 2  # by then a majority (2 of 3) saw it failing
    assert "2 of 3 members see it down" in (us.cause or "")
    assert eu.health == "up" and eu.last_ok_at == T + 4  # a majority had answered by then
    assert eu.answered_since(us.failing_since)
    assert not isolated(down("us-east-1"), us)


def test_no_majority_either_way_is_unknown() -> None:
    members = [
        member("web-1", down("us-east-1"), up("eu-west-1")),
        member("web-2", up("us-east-1"), up("eu-west-1")),
        member("web-3", RegionView("us-east-1"), up("eu-west-1")),
        member("web-4", down("us-east-1"), up("eu-west-1")),
    ]
    us = vote(REGIONS, members, SERVES).views[0]
    assert us.health == "unknown" and "no majority" in (us.cause or "")


def test_a_member_serving_something_else_is_refused_with_the_keys_that_differ() -> None:
    other = serves(("us-east-1", "eu-west-1", "ap-south-1"), ["orders"], "ddb-sidecar-health")
    members = [
        member("web-1", down("us-east-1"), up("eu-west-1")),
        member("web-2", down("us-east-1"), up("eu-west-1"), served=other),
        member("web-3", up("us-east-1"), up("eu-west-1")),
    ]
    result = vote(REGIONS, members, SERVES)
    assert result.voters == ("web-1", "web-3")
    assert result.refused == (("web-2", mismatch(SERVES, other)),)
    assert "regions" in result.refused[0][1] and "tables" not in result.refused[0][1]
    assert result.views[0].health == "unknown"  # 1 of 2 voters: no majority
    assert mismatch(SERVES, dict(SERVES)) is None
    assert fingerprint(SERVES) == fingerprint(dict(SERVES)) != fingerprint(other)


def test_a_member_that_has_not_seen_a_region_counts_as_unknown() -> None:
    members = [member("web-1", up("eu-west-1")), member("web-2", up("eu-west-1")), member("web-3")]
    result = vote(REGIONS, members, SERVES)
    assert result.views[0].health == "unknown" and result.views[1].health == "up"
    assert vote(REGIONS, [], SERVES).views[0].health == "unknown"
