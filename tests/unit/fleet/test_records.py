"""What fleet members write to etcd and read back: region views and commands survive the round trip, and a
record written by another version (or garbage) never breaks a reader."""

from __future__ import annotations

import pytest

from sidecar.core.controller import FailoverIntent, Pause, RegionView, Resume, Switchover
from sidecar.core.health import Cause
from sidecar.fleet.records import intent_from_json, intent_to_json, view_from_json, view_to_json


def test_a_region_view_round_trips() -> None:
    view = RegionView("us-east-1", "down", "3 consecutive timeout", Cause.TIMEOUT, None, 1000.5, 990.25)
    assert view_from_json("us-east-1", view_to_json(view)) == view
    up = RegionView("eu-west-1", "up", None, Cause.OK, None, None, 1001.0)
    assert view_from_json("eu-west-1", view_to_json(up)) == up


@pytest.mark.parametrize(
    "data",
    [{}, {"health": "sideways"}, {"health": "down", "kind": "meteor", "failing_since": "yesterday"}],
)
def test_a_strange_record_reads_as_unknown_or_unclassified(data: dict[str, object]) -> None:
    view = view_from_json("us-east-1", data)
    assert view.health in ("unknown", "down") and view.kind is None and view.failing_since is None


def test_fleet_commands_round_trip_and_others_are_refused() -> None:
    for intent in (
        FailoverIntent("eu-west-1"),
        Pause(),
        Resume(),
        Switchover("eu-west-1"),
        Switchover("us-east-1", failback=True),
    ):
        assert intent_from_json(intent_to_json(intent)) == intent
    with pytest.raises(ValueError, match="unknown fleet command"):
        intent_from_json({"kind": "failover"})  # no target
