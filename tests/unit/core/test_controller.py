"""The failover controller: every transition, with time as plain numbers and HAProxy as a dict."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.core.controller import (
    ACTIVE_WEIGHT,
    Alert,
    Decision,
    FailoverIntent,
    Health,
    Intent,
    Move,
    Pause,
    Persist,
    Policy,
    RecordEvent,
    RegionView,
    Resume,
    SetWeights,
    Snapshot,
    State,
    Switchover,
    decide,
    desired_weights,
    effective_mode,
    hold_down_for,
    initial_state,
    next_level,
    state_from_dict,
    state_to_dict,
)
from sidecar.core.health import Cause, HealthState

CommandT = TypeVar("CommandT", SetWeights, Alert, RecordEvent, Persist)

A, B, C = "us-east-1", "eu-west-1", "ap-south-1"
TIMEOUTS = "3 consecutive timeout: no answer within 800 ms"
POLICY = Policy(hold_down=60.0, max_lag=1.0)
AUTO_BACK = Policy(hold_down=60.0, max_lag=1.0, failback="automatic")


def up(
    name: str, lag_ms: float | None = None, cause: str | None = None, kind: Cause | None = None
) -> RegionView:
    return RegionView(name, "up", cause, kind, lag_ms)


def down(name: str, cause: str = TIMEOUTS, kind: Cause | None = Cause.TIMEOUT) -> RegionView:
    return RegionView(name, "down", cause, kind)


def unknown(name: str) -> RegionView:
    return RegionView(name, "unknown")


def throttled(name: str, health: str = "up") -> RegionView:
    return RegionView(
        name, "down" if health == "down" else "up", "throttled: HTTP 400 ThrottlingException", Cause.THROTTLED
    )


def auth(name: str, health: str = "up") -> RegionView:
    return RegionView(
        name, "down" if health == "down" else "up", "auth: HTTP 400 UnrecognizedClientException", Cause.AUTH
    )


def of(decision: Decision, kind: type[CommandT]) -> list[CommandT]:
    return [c for c in decision.commands if isinstance(c, kind)]


def weights_of(decision: Decision) -> dict[str, int] | None:
    sets = of(decision, SetWeights)
    assert len(sets) <= 1
    return dict(sets[0].weights) if sets else None


def events(decision: Decision) -> list[RecordEvent]:
    return of(decision, RecordEvent)


def alerts(decision: Decision) -> list[Alert]:
    return of(decision, Alert)


class Sim:
    """The shell, reduced to a dict of HAProxy weights and a clock that the test moves."""

    def __init__(self, policy: Policy = POLICY, regions: Sequence[str] = (A, B), state: State | None = None):
        self.policy = policy
        self.names = tuple(regions)
        self.state = state or State(active=self.names[0])
        self.haproxy: dict[str, int] | None = desired_weights(self.names, self.state.active)
        self.now = 0.0
        self.decisions: list[Decision] = []

    def step(self, *views: RegionView, at: float | None = None, intent: Intent | None = None) -> Decision:
        if at is not None:
            self.now = at
        snap = Snapshot(self.now, views, self.state, self.haproxy)
        decision = decide(self.policy, snap, intent)
        assert decide(self.policy, snap, intent) == decision  # deterministic
        self._apply(decision)
        if decision.switchover is not None:
            # The shell's switchover: writes held, replication drained (instantly here), then the flip.
            assert not of(decision, SetWeights)
            flip = Snapshot(self.now, views, self.state, self.haproxy)
            decision = decide(self.policy, flip, Switchover(decision.switchover, failback=True))
            self._apply(decision)
        return decision

    def _apply(self, decision: Decision) -> None:
        for command in decision.commands:
            if isinstance(command, SetWeights) and self.haproxy is not None:
                self.haproxy = dict(command.weights)
        self.state = decision.state
        self.decisions.append(decision)

    def moves(self) -> list[RecordEvent]:
        kinds = {"failover", "failback", "operator-failover"}
        return [e for d in self.decisions for e in events(d) if e.kind in kinds]


# -- steady state and automatic failover ---------------------------------------------------------------


def test_steady_state_does_nothing() -> None:
    sim = Sim()
    d = sim.step(up(A), up(B))
    assert d.commands == ()
    assert d.reason == f"{A} up, active"
    assert d.wake_at is None
    assert d.state.active == A and not d.refused
    assert sim.step(up(A), up(B), at=1.0).commands == ()


def test_home_down_moves_to_the_next_region_naming_the_cause() -> None:
    sim = Sim()
    d = sim.step(down(A), up(B, lag_ms=420), at=100.0)
    assert weights_of(d) == {A: 0, B: 100}
    assert d.state.active == B
    assert d.reason.startswith(f"{A} down: {TIMEOUTS}; moved to {B}")
    assert f"replication lag to {B} 420 ms" in d.reason
    assert "hold-down 60 s" in d.reason
    assert "\n" not in d.reason
    [event] = events(d)
    assert (event.kind, event.from_region, event.to_region, event.reason) == ("failover", A, B, d.reason)
    [persist] = of(d, Persist)
    assert persist == Persist(d.state)
    assert d.state.hold_until == 160.0
    assert d.state.moves == (Move(100.0, A, B, True, d.reason),)
    assert isinstance(d.commands[0], SetWeights)  # traffic first, then the bookkeeping
    # the next cycle, with HAProxy showing the new weights, is quiet again
    assert sim.step(down(A), up(B), at=101.0).commands == ()


def test_moves_to_the_first_up_region_in_preference_order() -> None:
    d = Sim(regions=(A, B, C)).step(down(A), up(B), up(C))
    assert d.state.active == B
    d = Sim(regions=(A, B, C)).step(down(A), down(B), up(C))
    assert d.state.active == C


def test_prefers_a_clean_region_over_one_already_failing_probes() -> None:
    d = Sim(regions=(A, B, C)).step(
        down(A), up(B, cause="1 consecutive timeout: x", kind=Cause.TIMEOUT), up(C)
    )
    assert d.state.active == C


def test_a_down_region_without_a_classified_cause_counts_as_an_outage() -> None:
    d = Sim().step(RegionView(A, "down", None, None), up(B))
    assert d.state.active == B
    assert "no cause recorded" in d.reason


def test_every_region_down_is_this_hosts_network_no_move_and_one_alert() -> None:
    sim = Sim()
    d = sim.step(down(A), down(B, cause="3 consecutive refused: connection refused", kind=Cause.REFUSED))
    assert d.state.active == A
    assert weights_of(d) is None
    assert "this host's own network" in d.reason
    assert f"staying on {A}" in d.reason
    [alert] = alerts(d)
    assert alert.kind == "all-down"
    assert alert.message == d.reason
    assert d.state.alerts == {"all-down"}
    assert of(d, Persist) == []  # alerts are not durable
    again = sim.step(down(A), unknown(B), at=1.0)
    assert alerts(again) == [] and again.state.active == A  # down + unknown is still "nothing is up"
    # B comes back while A is still down: the alert clears and traffic moves
    back = sim.step(down(A), up(B), at=2.0)
    assert back.state.active == B
    assert [e.kind for e in events(back)] == ["failover", "alert-cleared"]


def test_nothing_known_at_start_up_is_not_an_alert() -> None:
    d = Sim().step(unknown(A), unknown(B))
    assert d.commands == ()
    assert "no region has answered a probe yet" in d.reason


def test_an_unknown_active_region_is_not_moved_from() -> None:
    d = Sim().step(unknown(A), up(B))
    assert d.commands == ()
    assert "waiting for probes" in d.reason


# -- throttling and auth never move -------------------------------------------------------------------


def test_throttling_never_moves() -> None:
    sim = Sim()
    for t in range(60):
        d = sim.step(throttled(A), up(B), at=float(t))
        assert d.commands == ()
        assert "throttling is not a regional outage" in d.reason
    # even if the shell reported the region down with a throttling cause
    d = sim.step(throttled(A, "down"), up(B), at=61.0)
    assert d.commands == () and d.state.active == A
    assert "not a regional outage; not moving" in d.reason


def test_auth_failures_never_move_and_alert_once() -> None:
    sim = Sim()
    first = sim.step(auth(A), up(B))
    [alert] = alerts(first)
    assert alert.kind == "auth" and A in alert.message and "fix the credentials" in alert.message
    assert first.state.active == A
    for t in range(1, 60):
        d = sim.step(auth(A, "down" if t % 2 else "up"), up(B), at=float(t))
        assert d.state.active == A
        assert alerts(d) == []
    assert "credentials rejected" in sim.decisions[-1].reason
    cleared = sim.step(up(A), up(B), at=60.0)
    assert [e.reason for e in events(cleared)] == [f"auth:{A} cleared"]


def test_never_moves_to_a_region_that_rejects_the_credentials() -> None:
    d = Sim().step(down(A), auth(B))
    assert d.state.active == A
    assert "reject the sidecar's credentials" in d.reason
    assert [a.kind for a in alerts(d)] == ["auth"]


# -- the hold-down -------------------------------------------------------------------------------------


def test_hold_down_blocks_a_second_move_and_wakes_at_its_expiry() -> None:
    sim = Sim()
    sim.step(down(A), up(B), at=0.0)
    held = sim.step(up(A), down(B), at=10.0)
    assert held.state.active == B
    assert weights_of(held) is None
    assert held.wake_at == 60.0
    assert "held down" in held.reason and f"not moving to {A}" in held.reason
    assert [a.kind for a in alerts(held)] == ["held-down"]
    still = sim.step(up(A), down(B), at=30.0)
    assert still.wake_at == 60.0 and alerts(still) == []  # one alert per hold-down
    moved = sim.step(up(A), down(B), at=60.0)
    assert moved.state.active == A
    assert "hold-down 120 s (2x: automatic moves repeating)" in moved.reason
    assert moved.state.hold_until == 180.0
    assert [e.kind for e in events(moved)] == ["failover", "alert-cleared"]


def test_hold_down_growth_and_decay() -> None:
    p = POLICY
    assert [hold_down_for(p, n) for n in range(6)] == [60, 120, 240, 480, 480, 480]
    assert next_level(p, State(A), 0.0) == 0  # the first automatic move
    last = State(A, level=2, level_from=1000.0)  # the last hold-down (240 s) ended at 1000
    assert next_level(p, last, 1000.0) == 3  # right away: doubles
    assert next_level(p, last, 1479.0) == 3  # within one quiet period (480 s)
    assert next_level(p, last, 1480.0) == 1  # one quiet period: halves
    assert next_level(p, last, 1960.0) == 0  # two: back to hold_down
    assert next_level(p, replace(last, level=3), 1000.0) == 3  # capped
    assert next_level(p, replace(last, level=99), 1000.0) == 3  # a silly persisted level is capped too
    assert next_level(Policy(hold_down=0.0), last, 1000.0) == 0


def test_zero_hold_down_never_holds() -> None:
    sim = Sim(Policy(hold_down=0.0))
    assert sim.step(down(A), up(B), at=0.0).state.active == B
    assert sim.step(up(A), down(B), at=0.0).state.active == A


def test_flapping_every_second_for_ten_minutes_moves_at_most_once_per_growing_hold_down() -> None:
    # A flaps up/down every second; failback automatic with lag fine: the worst case for a storm
    sim = Sim(AUTO_BACK)
    for t in range(600):
        a = up(A, lag_ms=10) if t % 2 else down(A)
        sim.step(a, up(B, lag_ms=10), at=float(t))
    moves = sim.moves()
    times = [d.state.moves[-1].at for d in sim.decisions if of(d, SetWeights)]
    # a fixed 60 s hold-down would allow ten moves here; the growing one allows four
    assert len(moves) == len(times) == 4
    assert times == [0.0, 61.0, 182.0, 423.0]
    assert [m.kind for m in moves] == ["failover", "failback", "failover", "failback"]
    holds = [hold_down_for(AUTO_BACK, level) for level in range(4)]
    assert holds == [60.0, 120.0, 240.0, 480.0]
    for start, nxt, hold in zip(times, times[1:], holds, strict=False):
        assert nxt - start >= hold
    assert sim.state.hold_until == 423.0 + 480.0
    # and at most one held-down alert per hold-down
    held = [a for d in sim.decisions for a in alerts(d)]
    assert all(a.kind == "held-down" for a in held) and len(held) <= len(moves)


def test_two_regions_flapping_in_anti_phase_with_manual_failback() -> None:
    sim = Sim(POLICY)
    for t in range(600):
        views = (down(A), up(B)) if t % 2 else (up(A), down(B))
        sim.step(*views, at=float(t))
    auto = [m for m in sim.state.moves if m.automatic]
    # each move comes at the first flap after the previous hold-down (60, 120, 240, 480 s) ends
    assert [m.at for m in auto] == [1.0, 62.0, 183.0, 424.0]
    assert len(sim.moves()) == 4


def test_a_quiet_day_resets_the_hold_down() -> None:
    sim = Sim()
    sim.step(down(A), up(B), at=0.0)
    sim.step(up(A), down(B), at=60.0)  # 120 s hold-down, ends at 180
    d = sim.step(down(A), up(B), at=180.0 + 86400.0)
    assert d.reason.endswith("hold-down 60 s")
    assert d.state.level == 0


def test_a_hold_down_from_a_clock_that_stepped_back_is_clamped() -> None:
    state = State(B, hold_until=1e12, level=1, level_from=1e12)
    sim = Sim(state=state)
    d = sim.step(up(A), down(B), at=1000.0)
    assert d.wake_at == 1000.0 + POLICY.max_hold_down
    [persist] = of(d, Persist)
    assert persist.state.hold_until == 1480.0


# -- failback ------------------------------------------------------------------------------------------


def failed_over(policy: Policy) -> Sim:
    sim = Sim(policy)
    sim.step(down(A), up(B), at=0.0)
    assert sim.state.active == B
    return sim


def test_manual_failback_never_goes_home_automatically() -> None:
    sim = failed_over(POLICY)
    for t in (61.0, 1000.0, 100000.0):
        d = sim.step(up(A, lag_ms=0), up(B), at=t)
        assert d.commands == ()
        assert d.state.active == B
    assert f"home {A} is up again, failback is manual" in d.reason
    assert f"ddb-sidecar failover --to {A}" in d.reason


def test_manual_failback_says_how_home_is() -> None:
    d = failed_over(POLICY).step(down(A), up(B), at=61.0)
    assert d.reason == f"{B} up, active; home {A} down ({TIMEOUTS})"


def test_automatic_failback_waits_for_measured_lag() -> None:
    d = failed_over(AUTO_BACK).step(up(A, lag_ms=None), up(B), at=61.0)
    assert d.state.active == B and d.commands == ()
    assert "replication lag to it is unmeasured" in d.reason
    assert d.wake_at is None


def test_automatic_failback_waits_for_lag_below_max_lag() -> None:
    d = failed_over(AUTO_BACK).step(up(A, lag_ms=1500), up(B), at=61.0)
    assert d.state.active == B and d.commands == ()
    assert "1500 ms is above max_lag 1000 ms" in d.reason


def test_automatic_failback_waits_for_the_hold_down() -> None:
    d = failed_over(AUTO_BACK).step(up(A, lag_ms=10), up(B), at=30.0)
    assert d.state.active == B and d.commands == ()
    assert "failback to us-east-1 waits for the hold-down" in d.reason
    assert d.wake_at == 60.0


def test_automatic_failback_waits_for_a_clean_home() -> None:
    sick = up(A, lag_ms=10, cause="1 consecutive timeout: x", kind=Cause.TIMEOUT)
    d = failed_over(AUTO_BACK).step(sick, up(B), at=61.0)
    assert d.state.active == B and "failback waits for home" in d.reason


def test_automatic_failback_goes_home_when_all_conditions_hold() -> None:
    sim = failed_over(AUTO_BACK)
    d = sim.step(up(A, lag_ms=300), up(B), at=60.0)
    assert weights_of(d) == {A: 100, B: 0}
    assert d.reason.startswith(f"failback to home {A}: switched over with writes held")
    assert "replication lag to us-east-1 300 ms" in d.reason
    [event] = events(d)
    assert (event.kind, event.from_region, event.to_region) == ("failback", B, A)
    assert d.state.level == 1  # an automatic move: it counts toward the hold-down


# -- pause and resume ----------------------------------------------------------------------------------


def test_pause_stops_automatic_moves_and_resume_acts_at_once() -> None:
    sim = Sim()
    paused = sim.step(up(A), up(B), intent=Pause())
    assert paused.state.mode == "paused"
    assert [type(c) for c in paused.commands] == [Persist, RecordEvent]
    assert paused.reason.startswith("paused by the operator")
    again = sim.step(up(A), up(B), intent=Pause())
    assert again.commands == () and again.reason.startswith("already paused")
    d = sim.step(down(A), up(B), at=1.0)
    assert d.state.active == A
    assert d.reason.startswith("paused: no automatic decisions")
    assert [a.kind for a in alerts(d)] == ["paused-down"]
    for t in range(2, 30):  # flapping while paused: no move, no more alerts
        d = sim.step(down(A) if t % 2 else up(A), up(B), at=float(t))
        assert d.state.active == A and alerts(d) == []
    resumed = sim.step(down(A), up(B), at=30.0, intent=Resume())
    assert resumed.state.mode == "automatic"
    assert resumed.state.active == B
    assert resumed.reason.startswith(f"resumed: {A} down")
    assert [e.kind for e in events(resumed)] == ["resume", "failover", "alert-cleared"]


def test_resume_when_running_is_harmless() -> None:
    d = Sim().step(up(A), up(B), intent=Resume())
    assert d.commands == ()
    assert d.reason == f"already running automatically: {A} up, active"


def test_automatic_off_in_the_config_acts_as_paused() -> None:
    policy = Policy(automatic=False)
    d = Sim(policy).step(down(A), up(B))
    assert d.state.active == A
    assert "automatic failover is off in the config" in d.reason
    assert effective_mode(policy, d.state) == "paused"
    assert effective_mode(POLICY, d.state) == "automatic"


# -- operator failover ---------------------------------------------------------------------------------


def test_operator_failover_to_an_up_region() -> None:
    sim = Sim(AUTO_BACK)
    d = sim.step(up(A, lag_ms=5), up(B, lag_ms=250), at=10.0, intent=FailoverIntent(B))
    assert weights_of(d) == {A: 0, B: 100}
    assert not d.refused
    assert d.reason.startswith(f"operator failover from {A} to {B}")
    assert "replication lag to eu-west-1 250 ms" in d.reason
    assert [e.kind for e in events(d)] == ["operator-failover"]
    # it starts a hold-down, but does not grow it
    assert d.state.hold_until == 70.0
    assert (d.state.level, d.state.level_from) == (0, None)
    assert d.state.moves[-1].automatic is False
    # so automation does not undo it at once, even with failback automatic and home perfect
    held = sim.step(up(A, lag_ms=5), up(B), at=20.0)
    assert held.state.active == B and held.wake_at == 70.0
    back = sim.step(up(A, lag_ms=5), up(B), at=70.0)
    assert back.state.active == A
    assert back.reason.endswith("hold-down 60 s")


def test_operator_failover_to_a_down_region_is_refused_with_what_to_do() -> None:
    sim = Sim(regions=(A, B, C))
    d = sim.step(up(A), down(B), up(C), intent=FailoverIntent(B))
    assert d.refused
    assert d.state.active == A and weights_of(d) is None
    assert d.reason == (
        f"refused failover to {B}: it is down ({TIMEOUTS}); "
        f"choose a region that is up (regions up: {C}) or wait until {B} is up again"
    )
    [event] = events(d)
    assert (event.kind, event.from_region, event.to_region) == ("refused", A, B)
    assert of(d, Persist) == []


def test_operator_failover_to_an_unknown_region_moves_with_a_warning() -> None:
    d = Sim().step(up(A), unknown(B), intent=FailoverIntent(B))
    assert not d.refused and d.state.active == B
    assert "warning: eu-west-1's health is unknown" in d.reason
    assert "replication lag to eu-west-1 unmeasured" in d.reason


def test_operator_failover_to_a_region_that_does_not_exist() -> None:
    d = Sim().step(up(A), up(B), intent=FailoverIntent("mars-1"))
    assert d.refused and d.state.active == A
    assert d.reason == f"refused failover to mars-1: no such region (configured: {A}, {B})"


def test_operator_failover_to_the_active_region_is_a_no_op() -> None:
    d = Sim().step(up(A), up(B), intent=FailoverIntent(A))
    assert not d.refused and d.commands == ()
    assert "already active" in d.reason


def test_operator_failover_works_paused_and_during_a_hold_down() -> None:
    sim = Sim()
    sim.step(up(A), up(B), intent=Pause())
    d = sim.step(up(A), up(B), at=1.0, intent=FailoverIntent(B))
    assert d.state.active == B and d.state.mode == "paused"
    sim = Sim()
    sim.step(down(A), up(B), at=0.0)  # automatic, held until 60
    d = sim.step(up(A), up(B), at=5.0, intent=FailoverIntent(A))
    assert d.state.active == A
    assert d.state.hold_until == 65.0
    assert d.state.level_from == 60.0  # the automatic growth still counts from the automatic move
    # a longer automatic hold-down already running is not shortened by an operator's move
    sim = Sim(state=State(A, hold_until=400.0, level=3, level_from=400.0))
    d = sim.step(up(A), up(B), at=10.0, intent=FailoverIntent(B))
    assert d.state.hold_until == 400.0
    assert "automatic moves held down for 390 s" in d.reason


def test_operator_failover_to_an_all_down_world_is_refused_with_no_alternatives() -> None:
    d = Sim().step(down(A), down(B), intent=FailoverIntent(B))
    assert d.refused
    assert "no other region is up" in d.reason


# -- weights as HAProxy has them ------------------------------------------------------------------------


def test_drifted_weights_are_reasserted() -> None:
    sim = Sim()
    sim.haproxy = {A: 0, B: 0}  # e.g. a reload lost the runtime weights of a rendered config
    d = sim.step(up(A), up(B))
    assert weights_of(d) == {A: 100, B: 0}
    assert d.reason == f"{A} up, active; re-asserting weights: HAProxy had {{{A}: 0, {B}: 0}}"
    assert [e.kind for e in events(d)] == ["weights-reasserted"]
    assert of(d, Persist) == []
    assert sim.step(up(A), up(B)).commands == ()


def test_a_server_missing_from_haproxy_is_reported() -> None:
    sim = Sim()
    sim.haproxy = {A: 100}
    d = sim.step(up(A), up(B))
    assert "HAProxy had {us-east-1: 100, eu-west-1: missing}" in d.reason


def test_unreadable_weights_are_not_rewritten_every_cycle() -> None:
    sim = Sim()
    sim.haproxy = None
    assert sim.step(up(A), up(B)).commands == ()
    moved = sim.step(down(A), up(B), at=1.0)
    assert weights_of(moved) == {A: 0, B: 100}  # a move is still commanded


def test_a_removed_active_region_is_replaced_by_a_configured_one() -> None:
    sim = Sim(regions=(A, B))
    sim.state = State("old-region")
    sim.haproxy = None
    d = sim.step(down(A), up(B))
    assert d.state.active == B
    assert weights_of(d) == {A: 0, B: 100}
    assert d.reason.startswith(f"active region old-region is no longer configured: moved to {B}")
    assert [e.kind for e in events(d)] == ["reconfigure"]


# -- start-up ------------------------------------------------------------------------------------------


def test_initial_state_adopts_what_haproxy_does() -> None:
    persisted = State(A, mode="paused", hold_until=50.0)
    s = initial_state([A, B], persisted, {A: 0, B: 100})
    assert s.active == B and s.mode == "paused" and s.hold_until == 50.0
    assert s.reason == f"started: adopted HAProxy's active region {B} (the persisted state said {A})"
    s = initial_state([A, B], None, {A: 0, B: 100, "unconfigured": 100})
    assert s.active == B


def test_initial_state_after_kill_9_does_not_flip() -> None:
    # the daemon had moved to B and died; HAProxy kept routing to B; a restart must keep B
    state = initial_state([A, B], State(B), {A: 0, B: 100})
    d = decide(POLICY, Snapshot(0.0, (up(A), up(B)), state, {A: 0, B: 100}))
    assert d.state.active == B
    assert of(d, SetWeights) == []


@pytest.mark.parametrize(
    ("observed", "seen"),
    [
        (None, "HAProxy's weights unreadable"),
        ({A: 0, B: 0}, "HAProxy weights no region"),
        ({A: 100, B: 100}, f"HAProxy weights 2 regions ({A}, {B})"),
    ],
)
def test_initial_state_falls_back_to_the_persisted_state_then_home(
    observed: dict[str, int] | None, seen: str
) -> None:
    s = initial_state([A, B], State(B, alerts=frozenset({"x"})), observed)
    assert s.active == B and s.alerts == frozenset()
    assert s.reason == f"started: {seen}; restored the persisted active region {B}"
    s = initial_state([A, B], None, observed)
    assert s == State(A, reason=f"started: {seen}, no persisted state; home region {A} active")
    s = initial_state([A, B], State("gone"), observed)
    assert s.active == A and "the persisted active region gone is not configured" in s.reason
    with pytest.raises(ValueError):
        initial_state([], None, observed)


# -- persistence -----------------------------------------------------------------------------------------


def test_state_round_trips_through_json() -> None:
    sim = Sim()
    sim.step(down(A), up(B), at=0.0)
    sim.step(up(A), up(B), at=5.0, intent=Pause())
    state = sim.state
    back = state_from_dict(json.loads(json.dumps(state_to_dict(state))))
    assert back == replace(state, alerts=frozenset(), reason="")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "version"),
        ({"version": 1}, "active"),
        ({"version": 1, "active": A, "mode": "sleepy"}, "mode"),
        ({"version": 1, "active": A, "mode": "paused", "level": -1}, "level"),
        ({"version": 1, "active": A, "mode": "paused", "hold_until": "soon"}, "hold_until"),
        ({"version": 1, "active": A, "mode": "paused", "moves": {}}, "moves"),
        ({"version": 1, "active": A, "mode": "paused", "moves": [1]}, "moves[0]"),
        ({"version": 1, "active": A, "mode": "paused", "moves": [{"at": True}]}, "moves[0].at"),
        ({"version": 1, "active": A, "mode": "paused", "moves": [{"at": 1, "from": A}]}, "moves[0]"),
        (
            {"version": 1, "active": A, "mode": "paused", "moves": [{"at": 1, "from": A, "to": B}]},
            "moves[0].automatic",
        ),
    ],
)
def test_a_bad_state_file_is_named(data: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        state_from_dict(data)


# -- small parts -----------------------------------------------------------------------------------------


def test_policy_and_snapshot_validation() -> None:
    with pytest.raises(ValueError):
        Policy(hold_down=-1)
    with pytest.raises(ValueError):
        Policy(max_hold_factor=0)
    with pytest.raises(ValueError):
        Snapshot(0.0, (), State(A))
    with pytest.raises(ValueError):
        Snapshot(0.0, (up(A), up(A)), State(A))
    with pytest.raises(ValueError):
        desired_weights([A, B], C)
    assert POLICY.max_hold_down == 480.0 == POLICY.quiet


def test_region_view_from_health() -> None:
    h = HealthState(state="down", cause=TIMEOUTS, failures=3)
    view = RegionView.from_health(A, h, Cause.TIMEOUT, 12.5)
    assert view == RegionView(A, "down", TIMEOUTS, Cause.TIMEOUT, 12.5)
    assert view.outage and not view.healthy
    assert RegionView.from_health(A, HealthState()).health == "unknown"
    assert RegionView.from_health(A, HealthState(state="up"), Cause.OK).healthy
    with pytest.raises(ValueError):
        RegionView.from_health(A, HealthState(state="sideways"))


def test_set_weights_names_its_active_region() -> None:
    assert SetWeights({A: 0, B: ACTIVE_WEIGHT}).active == B


# -- properties over generated histories -----------------------------------------------------------------

NAMES = (A, B, C)
KINDS = (None, Cause.OK, Cause.TIMEOUT, Cause.REFUSED, Cause.THROTTLED, Cause.AUTH, Cause.SLOW)


@st.composite
def region_views(draw: st.DrawFn, names: tuple[str, ...]) -> tuple[RegionView, ...]:
    views = []
    for name in names:
        health: Health = draw(st.sampled_from(["up", "down", "unknown"]))
        kind = draw(st.sampled_from(KINDS))
        cause = None if kind in (None, Cause.OK) else f"{kind.value}: x"
        lag = draw(st.one_of(st.none(), st.floats(min_value=0, max_value=5000)))
        views.append(RegionView(name, health, cause, kind, lag))
    return tuple(views)


intents = st.one_of(
    st.none(),
    st.none(),
    st.none(),
    st.just(Pause()),
    st.just(Resume()),
    st.builds(FailoverIntent, st.sampled_from([*NAMES, "mars-1"])),
)
haproxy_events = st.sampled_from(["applied", "applied", "applied", "reload-reset", "unreadable", "both"])
policies = st.builds(
    Policy,
    automatic=st.booleans(),
    failback=st.sampled_from(["manual", "automatic"]),
    hold_down=st.sampled_from([0.0, 1.0, 60.0]),
    max_lag=st.sampled_from([0.0, 1.0]),
    max_hold_factor=st.sampled_from([1, 8, 10]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    policy=policies,
    count=st.integers(min_value=1, max_value=3),
    data=st.data(),
)
def test_invariants_over_generated_histories(policy: Policy, count: int, data: st.DataObject) -> None:
    names = NAMES[:count]
    state = State(names[0])
    haproxy: dict[str, int] | None = desired_weights(names, state.active)
    now = 1000.0
    for _ in range(data.draw(st.integers(min_value=1, max_value=40))):
        now += data.draw(st.sampled_from([0.0, 0.5, 1.0, 30.0, 61.0, 500.0]))
        views = data.draw(region_views(names))
        intent = data.draw(intents)
        happening = data.draw(haproxy_events)
        if happening in ("reload-reset", "both"):
            haproxy = (
                desired_weights(names, names[0]) if data.draw(st.booleans()) else dict.fromkeys(names, 0)
            )
        observed = None if happening in ("unreadable",) else haproxy
        snap = Snapshot(now, views, state, observed)
        d = decide(policy, snap, intent)
        assert d == decide(policy, snap, intent)  # deterministic
        check_decision(policy, snap, intent, d)
        for command in d.commands:
            if isinstance(command, SetWeights):
                haproxy = dict(command.weights)
        state = d.state


def check_decision(policy: Policy, snap: Snapshot, intent: Intent | None, d: Decision) -> None:
    names = [r.name for r in snap.regions]
    before = snap.state
    assert d.state.active in names  # exactly one active region
    assert d.reason and "\n" not in d.reason and d.reason == d.state.reason
    assert d.wake_at is None or d.wake_at > snap.now
    sets = [c for c in d.commands if isinstance(c, SetWeights)]
    assert len(sets) <= 1
    for s in sets:
        assert list(s.weights) == names
        assert sorted(s.weights.values()) == [0] * (len(names) - 1) + [ACTIVE_WEIGHT]
        assert s.active == d.state.active
    if d.state.active != before.active:
        assert len(sets) == 1
    elif snap.weights is None:
        assert sets == []
    persists = [c for c in d.commands if isinstance(c, Persist)]
    assert persists == ([Persist(d.state)] if state_to_dict(d.state) != state_to_dict(before) else [])
    kinds = [e.kind for e in d.commands if isinstance(e, RecordEvent)]
    if d.refused:
        assert isinstance(intent, FailoverIntent)
        assert d.state.active == before.active
        target = snap.region(intent.to)
        assert target is None or target.health == "down"
    automatic = [k for k in kinds if k in ("failover", "failback")]
    assert len(automatic) <= 1
    if automatic:
        old = snap.region(before.active)
        new = snap.region(d.state.active)
        assert old is not None and new is not None
        assert effective_mode(policy, d.state) == "automatic"
        assert not isinstance(intent, FailoverIntent | Pause)
        assert before.hold_until is None or snap.now >= before.hold_until  # the hold-down held
        assert new.health == "up" and not new.auth_failing
        if automatic == ["failover"]:
            assert old.outage  # throttling and auth never move traffic
        else:
            assert new.name == names[0] and policy.failback == "automatic"
            assert new.lag_ms is not None and new.lag_ms <= policy.max_lag * 1000
        assert d.state.hold_until is not None and d.state.hold_until >= snap.now
    elif d.state.active != before.active:
        assert isinstance(intent, FailoverIntent)
        assert kinds.count("operator-failover") == 1
        assert d.state.level == before.level  # operator moves do not grow the hold-down


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_a_sequence_replays_identically(data: st.DataObject) -> None:
    steps = data.draw(st.lists(st.tuples(region_views((A, B)), intents), min_size=1, max_size=20))

    def run() -> list[Decision]:
        sim = Sim(AUTO_BACK)
        return [sim.step(*views, at=float(i * 7), intent=intent) for i, (views, intent) in enumerate(steps)]

    assert run() == run()


# -- a move waits for proof that the target answers now ---------------------------------------------------


def test_a_move_waits_for_the_target_to_answer_after_the_active_began_failing() -> None:
    sim = Sim()
    failing = RegionView(A, "down", TIMEOUTS, Cause.TIMEOUT, failing_since=100.0, last_ok_at=99.0)
    stale = RegionView(B, "up", None, Cause.OK, last_ok_at=99.5)
    d = sim.step(failing, stale, at=100.9)
    assert weights_of(d) is None and d.confirm
    assert "waiting for eu-west-1 to answer" in d.reason and "own network" in d.reason
    assert not [e for e in events(d) if e.kind == "failover"]
    fresh = replace(stale, last_ok_at=100.95)
    d = sim.step(failing, fresh, at=101.0)
    assert weights_of(d) == {A: 0, B: ACTIVE_WEIGHT} and not d.confirm


def test_every_region_failing_at_once_never_moves() -> None:
    """This host's network goes: the active region is seen down first, the other's last answer predates it;
    then the other goes down too. Nothing moves at any step."""
    sim = Sim()
    a = RegionView(A, "down", TIMEOUTS, Cause.TIMEOUT, failing_since=50.0, last_ok_at=49.8)
    b = RegionView(B, "up", None, Cause.OK, last_ok_at=49.9)
    for t in (50.8, 51.0, 51.5):
        assert weights_of(sim.step(a, b, at=t)) is None
    b_failing = RegionView(
        B, "up", "1 consecutive timeout", Cause.TIMEOUT, failing_since=50.8, last_ok_at=49.9
    )
    assert weights_of(sim.step(a, b_failing, at=51.6)) is None
    b_down = RegionView(B, "down", TIMEOUTS, Cause.TIMEOUT, failing_since=50.8, last_ok_at=49.9)
    d = sim.step(a, b_down, at=52.5)
    assert weights_of(d) is None and "own network" in d.reason and not d.confirm
    assert sim.moves() == []
    assert [x.kind for x in alerts(d)] == ["all-down"]


def test_region_view_from_health_carries_the_times_and_kind() -> None:
    h = HealthState(
        state="down", cause=TIMEOUTS, failures=3, kind=Cause.TIMEOUT, failing_since=5.0, last_ok_at=4.0
    )
    v = RegionView.from_health(A, h)
    assert (v.kind, v.failing_since, v.last_ok_at) == (Cause.TIMEOUT, 5.0, 4.0)
    assert v.outage and not v.answered_since(4.5) and v.answered_since(None)


# -- switchover ---------------------------------------------------------------------------------------------


def test_an_operator_switchover_moves_to_a_healthy_region_only() -> None:
    sim = Sim()
    refused = sim.step(up(A), unknown(B), at=5.0, intent=Switchover(B))
    assert refused.refused and "not healthy" in refused.reason and weights_of(refused) is None
    assert "failover --to eu-west-1" in refused.reason
    assert sim.step(up(A), up(B), intent=Switchover("mars-1")).refused
    d = sim.step(up(A), up(B, lag_ms=40), at=6.0, intent=Switchover(B))
    assert weights_of(d) == {A: 0, B: ACTIVE_WEIGHT} and not d.refused
    [event] = [e for e in events(d) if e.kind == "switchover"]
    assert (event.from_region, event.to_region) == (A, B)
    assert "replication lag to eu-west-1 40 ms" in d.reason
    assert d.state.moves[-1].automatic is False and d.state.level == 0
    again = sim.step(up(A), up(B), intent=Switchover(B))
    assert "already active" in again.reason and not again.refused


def test_automatic_failback_asks_the_shell_for_a_switchover() -> None:
    policy = AUTO_BACK
    state = State(B, moves=(Move(0.0, A, B, True, "x"),), hold_until=60.0, level=0, level_from=60.0)
    d = decide(policy, Snapshot(61.0, (up(A, lag_ms=100), up(B)), state, {A: 0, B: 100}))
    assert d.switchover == A and weights_of(d) is None and d.state.active == B
    assert "switching over" in d.reason
