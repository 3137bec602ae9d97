"""The failover shell's pure-ish parts: combining read and write health, and the persisted state file."""

from __future__ import annotations

import json
from pathlib import Path

from sidecar.config import config_from_data
from sidecar.core.controller import Move, State
from sidecar.core.health import Cause, HealthState, combine
from sidecar.engine import active_weights
from sidecar.failover import STATE_FILE, load_state, save_state
from sidecar.monitor import fast_interval


def test_combine_the_worse_of_reads_and_writes_wins() -> None:
    up = HealthState(state="up", kind=Cause.OK, last_ok_at=10.0)
    writes_down = HealthState(state="down", cause="3 consecutive 5xx", failures=3, kind=Cause.SERVER_ERROR,
                              failing_since=8.0, last_ok_at=7.0)  # fmt: skip
    both = combine(up, writes_down)
    assert (both.state, both.cause, both.failing_since, both.last_ok_at) == (
        "down",
        "3 consecutive 5xx",
        8.0,
        10.0,
    )
    # writes not probed yet: reads decide
    assert combine(up, HealthState()).state == "up"
    # a write failure run makes the region suspect while it is still up
    one = HealthState(
        state="unknown", cause="1 consecutive timeout", failures=1, kind=Cause.TIMEOUT, failing_since=9.0
    )
    suspect = combine(up, one)
    assert suspect.state == "up" and suspect.suspect and suspect.failing_since == 9.0
    assert combine(HealthState(), HealthState()).state == "unknown"


def test_fast_interval_is_a_fifth_within_bounds() -> None:
    assert fast_interval(1.0) == 0.2
    assert fast_interval(0.1) == 0.05
    assert fast_interval(0.01) == 0.01


def test_state_round_trips_atomically(tmp_path: Path) -> None:
    path = tmp_path / "run" / STATE_FILE
    state = State(active="eu-west-1", mode="paused", moves=(Move(1.0, "us-east-1", "eu-west-1", True, "r"),),
                  hold_until=61.0, level=1, level_from=61.0)  # fmt: skip
    save_state(path, state)
    loaded, problem = load_state(path)
    assert problem is None and loaded is not None
    assert (loaded.active, loaded.mode, loaded.moves, loaded.hold_until) == (
        "eu-west-1",
        "paused",
        state.moves,
        61.0,
    )
    assert [p.name for p in path.parent.iterdir()] == [STATE_FILE]  # no temporary file left behind


def test_an_unreadable_state_file_is_moved_aside_not_trusted(tmp_path: Path) -> None:
    path = tmp_path / STATE_FILE
    path.write_text('{"version": 1, "active": 42}')
    state, problem = load_state(path, move_aside=False)
    assert state is None and problem is not None and "active" in problem and path.exists()
    state, problem = load_state(path)
    assert state is None and problem is not None and "moved aside" in problem
    assert not path.exists() and len(list(tmp_path.glob(STATE_FILE + ".corrupt-*"))) == 1
    assert load_state(path) == (None, None)  # no file: nothing to say


def test_render_weights_follow_the_persisted_active_region(tmp_path: Path) -> None:
    config = config_from_data(
        {
            "regions": [
                {"name": "us-east-1", "proxy": "127.0.0.1:21101"},
                {"name": "eu-west-1", "proxy": "127.0.0.1:21102"},
            ],
            "tables": ["orders"],
            "state_dir": str(tmp_path),
        },
        base_dir=tmp_path,
    )
    assert active_weights(config) == {"us-east-1": 100, "eu-west-1": 0}
    save_state(tmp_path / STATE_FILE, State(active="eu-west-1"))
    assert active_weights(config) == {"us-east-1": 0, "eu-west-1": 100}
    (tmp_path / STATE_FILE).write_text(json.dumps({"version": 1, "active": "mars-1", "mode": "automatic"}))
    assert active_weights(config) == {"us-east-1": 100, "eu-west-1": 0}  # not configured: home
