"""The failover controller: which region carries traffic, as a pure function of one snapshot of the world.

Sans-io, like mitmproxy's proxy core: the shell builds a `Snapshot` (each region's health, HAProxy's weights
as read back, replication lag, the time, the controller's own `State`), calls `decide()`, and carries out the
returned commands in order. Every decision comes with a one-line reason (Patroni's habit) and, when waiting
is itself the decision, the time to be called again (`wake_at`). No clock, socket or file in here.

Rules (issue 3):
- the active region is down for an outage-type cause and another region is up: move to the first up region
  in preference order; throttling and auth failures never move traffic (auth failures alert);
- no region up at all: stay; it looks like this host's own network;
- automatic moves are held down for `hold_down`, growing with repeats (see `hold_down_for`);
- failback to the home region: never automatically when `failback: manual`; with `automatic`, only when home
  is up and healthy, the hold-down is over, and replication lag to it is measured and below `max_lag`;
- paused: no automatic moves; an operator's failover works in any mode, starts a hold-down but does not grow it;
- the sidecar is the only writer of weights: when HAProxy's weights drift from the decision, re-assert them.
Invariant: exactly one region has weight 100 in every `SetWeights`, all others 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeAlias

from sidecar.core.health import OUTAGE_CAUSES, Cause, HealthState

Health: TypeAlias = Literal["up", "down", "unknown"]
Mode: TypeAlias = Literal["automatic", "paused"]
Failback: TypeAlias = Literal["manual", "automatic"]

ACTIVE_WEIGHT = 100
MAX_HISTORY = 50  # moves kept in State (and persisted); the hold-down rule needs none of them
STATE_VERSION = 1

_HEALTH: frozenset[str] = frozenset({"up", "down", "unknown"})


# -- settings and inputs -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Policy:
    """The controller's settings; the shell builds it from `config.failover` (durations in seconds)."""

    automatic: bool = True
    failback: Failback = "manual"
    hold_down: float = 60.0
    max_lag: float = 1.0
    max_hold_factor: int = (
        8  # the longest hold-down is hold_down x this; also the quiet period that decays it
    )

    def __post_init__(self) -> None:
        if self.hold_down < 0 or self.max_lag < 0:
            raise ValueError("hold_down and max_lag must not be negative")
        if self.max_hold_factor < 1:
            raise ValueError("max_hold_factor must be at least 1")

    @property
    def max_hold_down(self) -> float:
        return self.hold_down * self.max_hold_factor

    @property
    def quiet(self) -> float:
        """A period without automatic moves that steps the hold-down back by one doubling."""
        return self.max_hold_down


@dataclass(frozen=True, slots=True)
class RegionView:
    """One region as the controller sees it this cycle.

    `kind` is the classification behind `cause` (health's `Cause`); None means "not said", which for a down
    region counts as an outage. `lag_ms` is the replication lag into this region (None: unmeasured).
    `failing_since`: when its current run of outage observations began; `last_ok_at`: when it last answered
    (not an outage). They let a move wait for proof that the target answers *now*: when every region
    fails at once, the fault is this host's network, and the target's last good answer predates it.
    """

    name: str
    health: Health = "unknown"
    cause: str | None = None
    kind: Cause | None = None
    lag_ms: float | None = None
    failing_since: float | None = None
    last_ok_at: float | None = None

    @classmethod
    def from_health(
        cls, name: str, health: HealthState, kind: Cause | None = None, lag_ms: float | None = None
    ) -> RegionView:
        if health.state not in _HEALTH:
            raise ValueError(f"{name}: health state {health.state!r} is not up, down or unknown")
        state: Health = "up" if health.state == "up" else "down" if health.state == "down" else "unknown"
        return cls(
            name,
            state,
            health.cause,
            kind if kind is not None else health.kind,
            lag_ms,
            health.failing_since,
            health.last_ok_at,
        )

    def answered_since(self, at: float | None) -> bool:
        """Has this region answered (not an outage) at or after `at`? `at` unknown: nothing to compare."""
        if at is None:
            return True
        return self.last_ok_at is not None and self.last_ok_at >= at

    @property
    def outage(self) -> bool:
        """Down for a reason that moving traffic can help with (not throttling, not credentials)."""
        return self.health == "down" and (self.kind is None or self.kind in OUTAGE_CAUSES)

    @property
    def auth_failing(self) -> bool:
        return self.kind is Cause.AUTH

    @property
    def healthy(self) -> bool:
        """Up and its last probe clean: fit to fail back to."""
        return self.health == "up" and self.cause is None and self.kind in (None, Cause.OK)

    def describe(self) -> str:
        return f"{self.name} {self.health}" + (f" ({self.cause})" if self.cause else "")


@dataclass(frozen=True, slots=True)
class Move:
    at: float
    from_region: str
    to_region: str
    automatic: bool
    reason: str


@dataclass(frozen=True, slots=True)
class State:
    """What the controller carries from one decision to the next; all but `alerts` and `reason` persist.

    `hold_until`: no automatic move before this time. `level`: the doubling exponent of the last automatic
    move's hold-down; `level_from`: when that hold-down ended (the start of the quiet period that decays it).
    `alerts`: keys of the conditions already alerted on, so each alerts once.
    """

    active: str
    mode: Mode = "automatic"
    moves: tuple[Move, ...] = ()
    hold_until: float | None = None
    level: int = 0
    level_from: float | None = None
    alerts: frozenset[str] = frozenset()
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything one decision looks at. `regions` in preference order (the first is home); `weights` as
    read from HAProxy's runtime API, None when they could not be read."""

    now: float
    regions: tuple[RegionView, ...]
    state: State
    weights: Mapping[str, int] | None = None

    def __post_init__(self) -> None:
        names = [r.name for r in self.regions]
        if not names:
            raise ValueError("a snapshot needs at least one region")
        if len(set(names)) != len(names):
            raise ValueError(f"region names repeat: {names}")

    @property
    def home(self) -> RegionView:
        return self.regions[0]

    def region(self, name: str) -> RegionView | None:
        return next((r for r in self.regions if r.name == name), None)


@dataclass(frozen=True, slots=True)
class FailoverIntent:
    """`ddb-sidecar failover --to REGION`."""

    to: str


@dataclass(frozen=True, slots=True)
class Switchover:
    """The flip of a planned move, once the shell has fenced writes and seen replication catch up
    (`ddb-sidecar switchover --to REGION`, or an automatic failback: `failback`)."""

    to: str
    failback: bool = False


@dataclass(frozen=True, slots=True)
class Pause:
    pass


@dataclass(frozen=True, slots=True)
class Resume:
    pass


Intent: TypeAlias = FailoverIntent | Switchover | Pause | Resume


# -- outputs -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SetWeights:
    """Set HAProxy's server weights: exactly one region 100, the others 0."""

    weights: Mapping[str, int]

    @property
    def active(self) -> str:
        return next(name for name, w in self.weights.items() if w == ACTIVE_WEIGHT)


@dataclass(frozen=True, slots=True)
class Alert:
    kind: str  # auth | all-down | held-down | paused-down
    message: str


@dataclass(frozen=True, slots=True)
class RecordEvent:
    # failover | failback | operator-failover | reconfigure | refused | pause | resume |
    # weights-reasserted | alert-cleared
    kind: str
    reason: str
    from_region: str | None = None
    to_region: str | None = None


@dataclass(frozen=True, slots=True)
class Persist:
    state: State


Command: TypeAlias = SetWeights | Alert | RecordEvent | Persist


@dataclass(frozen=True, slots=True)
class Decision:
    """The new state, the commands to carry out in order, the one-line reason, and when to call again.

    `refused` is true when an operator intent was refused (the CLI exits 1). `confirm` is true when a move
    waits for fresh answers from the other regions: the shell should probe them now. `switchover`: an
    automatic failback is due; the shell runs it as a switchover (fence writes, drain replication) and
    comes back with a `Switchover(to, failback=True)` intent for the flip.
    """

    state: State
    commands: tuple[Command, ...]
    reason: str
    wake_at: float | None = None
    refused: bool = False
    confirm: bool = False
    switchover: str | None = None


# -- the hold-down -------------------------------------------------------------------------------------


def hold_down_for(policy: Policy, level: int) -> float:
    """The hold-down after an automatic move at `level`: hold_down x 2**level, capped at max_hold_down."""
    return min(policy.hold_down * (1 << level), policy.max_hold_down)


def _max_level(policy: Policy) -> int:
    level = 0
    while policy.hold_down * (1 << level) < policy.max_hold_down:
        level += 1
    return level


def next_level(policy: Policy, state: State, now: float) -> int:
    """The doubling exponent for an automatic move made now.

    An automatic move within one quiet period of the previous automatic hold-down's end doubles the
    hold-down (up to the cap); otherwise each full quiet period since that end halves it, down to hold_down.
    """
    if state.level_from is None or policy.hold_down <= 0:
        return 0
    top = _max_level(policy)
    level = min(state.level, top)
    gap = now - state.level_from
    if gap < policy.quiet:
        return min(level + 1, top)
    return max(0, level - int(gap // policy.quiet))


def _held(state: State, now: float) -> bool:
    return state.hold_until is not None and now < state.hold_until


# -- start-up ------------------------------------------------------------------------------------------


def initial_state(
    regions: Sequence[str], persisted: State | None, observed_weights: Mapping[str, int] | None
) -> State:
    """The state to start from: what HAProxy is doing if it weights exactly one region (a restart after
    kill -9 must not flip traffic), else the persisted decision, else home. Mode and history persist."""
    names = list(regions)
    if not names:
        raise ValueError("no regions")
    base = persisted if persisted is not None else State(active=names[0])
    weighted = [n for n in names if observed_weights is not None and observed_weights.get(n, 0) > 0]
    if observed_weights is None:
        seen = "HAProxy's weights unreadable"
    elif not weighted:
        seen = "HAProxy weights no region"
    else:
        seen = f"HAProxy weights {len(weighted)} regions ({', '.join(weighted)})"
    if len(weighted) == 1:
        active = weighted[0]
        reason = f"started: adopted HAProxy's active region {active}"
        if persisted is not None and persisted.active != active:
            reason += f" (the persisted state said {persisted.active})"
    elif persisted is not None and persisted.active in names:
        active = persisted.active
        reason = f"started: {seen}; restored the persisted active region {active}"
    else:
        active = names[0]
        why = (
            f"the persisted active region {persisted.active} is not configured"
            if persisted is not None
            else "no persisted state"
        )
        reason = f"started: {seen}, {why}; home region {active} active"
    return replace(base, active=active, alerts=frozenset(), reason=reason)


def effective_mode(policy: Policy, state: State) -> Mode:
    """`paused` when the operator paused or the config turned automatic failover off."""
    return "automatic" if policy.automatic and state.mode == "automatic" else "paused"


def desired_weights(regions: Sequence[str], active: str) -> dict[str, int]:
    if active not in regions:
        raise ValueError(f"{active} is not one of {list(regions)}")
    return {name: ACTIVE_WEIGHT if name == active else 0 for name in regions}


# -- the decision --------------------------------------------------------------------------------------


@dataclass
class _Step:
    """The working part of one decide() call; local, so decide() stays a function of its arguments."""

    state: State
    reason: str = ""
    wake_at: float | None = None
    refused: bool = False
    events: list[RecordEvent] = field(default_factory=list)
    blocked_by_hold: bool = False
    wants_confirmation: bool = False
    switchover: str | None = None


def decide(policy: Policy, snap: Snapshot, intent: Intent | None = None) -> Decision:
    """One decision cycle: an intent (or None for a timer, probe or weight read) in, commands out."""
    now = snap.now
    names = [r.name for r in snap.regions]
    step = _Step(_sane(policy, snap.state, now))
    prefix = ""
    if step.state.active not in names:
        prefix = _rehome(policy, snap, step) + "; "
    if isinstance(intent, FailoverIntent):
        _operator_failover(policy, snap, step, intent.to)
    elif isinstance(intent, Switchover):
        _switchover(policy, snap, step, intent)
    elif isinstance(intent, Pause):
        _pause(snap, step)
    else:
        if isinstance(intent, Resume):
            prefix += _resume(step)
        _automatic(policy, snap, step)
    reason = prefix + step.reason

    commands: list[Command] = []
    wanted = desired_weights(names, step.state.active)
    if step.state.active != snap.state.active:
        commands.append(SetWeights(wanted))
    elif snap.weights is not None and any(snap.weights.get(n) != w for n, w in wanted.items()):
        had = ", ".join(f"{n}: {snap.weights.get(n, 'missing')}" for n in names)
        reason += f"; re-asserting weights: HAProxy had {{{had}}}"
        commands.append(SetWeights(wanted))
        step.events.append(
            RecordEvent("weights-reasserted", f"HAProxy had {{{had}}}", to_region=step.state.active)
        )

    alerts, raised, cleared = _alerts(policy, snap, step, reason)
    state = replace(step.state, alerts=alerts, reason=reason)
    if _durable(state) != _durable(snap.state):
        commands.append(Persist(state))
    commands.extend(step.events)
    commands.extend(RecordEvent("alert-cleared", f"{key} cleared") for key in cleared)
    commands.extend(raised)
    return Decision(
        state, tuple(commands), reason, step.wake_at, step.refused, step.wants_confirmation, step.switchover
    )


def _sane(policy: Policy, state: State, now: float) -> State:
    """Clamp times that lie further ahead than any hold-down can reach: the wall clock stepped back, or
    persisted state came from a machine whose clock ran ahead. Without this a hold could last for days."""
    limit = now + policy.max_hold_down
    hold_until = state.hold_until
    level_from = state.level_from
    if hold_until is not None and hold_until > limit:
        hold_until = limit
    if level_from is not None and level_from > limit:
        level_from = limit
    if (hold_until, level_from) == (state.hold_until, state.level_from):
        return state
    return replace(state, hold_until=hold_until, level_from=level_from)


def _durable(state: State) -> tuple[object, ...]:
    return (state.active, state.mode, state.moves, state.hold_until, state.level, state.level_from)


def _lag_note(region: RegionView) -> str:
    if region.lag_ms is None:
        return f"replication lag to {region.name} unmeasured"
    return f"replication lag to {region.name} {region.lag_ms:g} ms"


def _move(
    policy: Policy, snap: Snapshot, step: _Step, to: str, *, automatic: bool, kind: str, why: str
) -> None:
    """Make `to` active, start the hold-down, record the move. `why` says what caused it."""
    now = snap.now
    state = step.state
    if automatic:
        level = next_level(policy, state, now)
        hold = hold_down_for(policy, level)
        hold_until: float = now + hold
        level_from: float | None = hold_until
        grown = f" ({1 << level}x: automatic moves repeating)" if level else ""
        note = f"hold-down {hold:g} s{grown}"
    else:
        level, level_from = state.level, state.level_from
        hold_until = now + policy.hold_down
        if state.hold_until is not None and state.hold_until > hold_until:
            hold_until = state.hold_until  # an automatic hold-down already running is not shortened
        note = f"automatic moves held down for {hold_until - now:g} s"
    target = snap.region(to)
    lag = f"; {_lag_note(target)}" if target is not None else ""
    reason = f"{why}{lag}; {note}"
    move = Move(now, state.active, to, automatic, reason)
    step.state = replace(
        state,
        active=to,
        moves=(*state.moves, move)[-MAX_HISTORY:],
        hold_until=hold_until,
        level=level,
        level_from=level_from,
    )
    step.reason = reason
    step.events.append(RecordEvent(kind, reason, move.from_region, to))


def _rehome(policy: Policy, snap: Snapshot, step: _Step) -> str:
    """The active region is no longer configured (a config reload removed it): pick a configured one now,
    whatever the mode or hold-down, without counting it as an automatic move."""
    gone = step.state.active
    ups = [r for r in snap.regions if r.health == "up" and not r.auth_failing]
    to = (next((r for r in ups if r.healthy), None) or (ups[0] if ups else snap.home)).name
    why = f"active region {gone} is no longer configured: moved to {to}"
    _move(policy, snap, step, to, automatic=False, kind="reconfigure", why=why)
    return why


def _pause(snap: Snapshot, step: _Step) -> None:
    active = snap.region(step.state.active)
    assert active is not None
    if step.state.mode == "paused":
        step.reason = f"already paused; {active.describe()}, active"
        return
    step.state = replace(step.state, mode="paused")
    step.reason = f"paused by the operator: no automatic moves until resume; {active.describe()}, active"
    step.events.append(RecordEvent("pause", step.reason))


def _resume(step: _Step) -> str:
    if step.state.mode == "automatic":
        return "already running automatically: "
    step.state = replace(step.state, mode="automatic")
    step.events.append(RecordEvent("resume", "resumed by the operator: automatic moves allowed again"))
    return "resumed: "


def _operator_failover(policy: Policy, snap: Snapshot, step: _Step, to: str) -> None:
    active = step.state.active
    target = snap.region(to)
    ups = [r.name for r in snap.regions if r.health == "up" and r.name != active]
    alternatives = f"regions up: {', '.join(ups)}" if ups else "no other region is up"
    if target is None:
        configured = ", ".join(r.name for r in snap.regions)
        _refuse(step, to, f"refused failover to {to}: no such region (configured: {configured})")
        return
    if to == active:
        step.reason = f"failover to {to}: already active, nothing to do"
        return
    if target.health == "down":
        _refuse(
            step,
            to,
            f"refused failover to {to}: it is down ({target.cause or 'no cause recorded'}); "
            f"choose a region that is up ({alternatives}) or wait until {to} is up again",
        )
        return
    warn = ""
    if target.health == "unknown":
        warn = f" (warning: {to}'s health is unknown, no probe has answered yet: moved without evidence it serves)"
    elif target.auth_failing:
        warn = f" (warning: {to} rejects the sidecar's credentials: {target.cause})"
    why = f"operator failover from {active} to {to}{warn}"
    _move(policy, snap, step, to, automatic=False, kind="operator-failover", why=why)


def _switchover(policy: Policy, snap: Snapshot, step: _Step, intent: Switchover) -> None:
    """The flip of a planned move: the shell has held writes and seen replication reach the target."""
    active, to = step.state.active, intent.to
    target = snap.region(to)
    if target is None:
        configured = ", ".join(r.name for r in snap.regions)
        _refuse(step, to, f"refused switchover to {to}: no such region (configured: {configured})")
        return
    if to == active:
        step.reason = f"switchover to {to}: already active, nothing to do"
        return
    if not target.healthy:
        _refuse(
            step,
            to,
            f"refused switchover to {to}: it is not healthy ({target.describe()}); a planned move needs a "
            f"healthy target (`ddb-sidecar failover --to {to}` moves anyway)",
        )
        return
    if intent.failback:
        why = f"failback to home {to}: switched over with writes held until replication caught up"
        _move(policy, snap, step, to, automatic=True, kind="failback", why=why)
    else:
        why = f"switchover from {active} to {to}: writes held until replication caught up"
        _move(policy, snap, step, to, automatic=False, kind="switchover", why=why)


def _refuse(step: _Step, to: str, reason: str) -> None:
    step.reason = reason
    step.refused = True
    step.events.append(RecordEvent("refused", reason, step.state.active, to))


def _automatic(policy: Policy, snap: Snapshot, step: _Step) -> None:
    state = step.state
    active = snap.region(state.active)
    assert active is not None
    home = snap.home
    if not policy.automatic:
        step.reason = (
            f"{active.describe()}, active; automatic failover is off in the config (failover.automatic)"
        )
        return
    if state.mode == "paused":
        step.reason = f"paused: no automatic decisions; {active.describe()}, active"
        return
    up = [r for r in snap.regions if r.health == "up"]
    if not up:
        every = "; ".join(r.describe() for r in snap.regions)
        if any(r.health == "down" for r in snap.regions):
            step.reason = (
                f"no region is up ({every}): this looks like this host's own network, not a regional "
                f"outage; staying on {active.name}"
            )
        else:
            step.reason = f"no region has answered a probe yet; staying on {active.name}"
        return
    if active.health == "down":
        _active_down(policy, snap, step, active)
        return
    if active.health == "unknown":
        step.reason = f"{active.describe()}, active: waiting for probes"
        return
    step.reason = f"{active.describe()}, active"
    if active.kind is Cause.THROTTLED:
        step.reason += ": throttling is not a regional outage, not moving"
    elif active.auth_failing:
        step.reason += ": credentials rejected, moving would not help"
    if active.name != home.name:
        _failback(policy, snap, step, home)


def _active_down(policy: Policy, snap: Snapshot, step: _Step, active: RegionView) -> None:
    down = f"{active.name} down: {active.cause or 'no cause recorded'}"
    if not active.outage:
        what = (
            "credentials rejected, moving would not help" if active.auth_failing else "not a regional outage"
        )
        step.reason = f"{down}: {what}; not moving"
        return
    candidates = [
        r for r in snap.regions if r.health == "up" and r.name != active.name and not r.auth_failing
    ]
    if not candidates:
        rejected = ", ".join(r.name for r in snap.regions if r.health == "up" and r.auth_failing)
        step.reason = (
            f"{down}; the regions that are up reject the sidecar's credentials ({rejected}); not moving"
        )
        return
    # the first up region in preference order, preferring one whose last probe was clean
    target = next((r for r in candidates if r.healthy), candidates[0])
    fresh = [r for r in candidates if r.answered_since(active.failing_since)]
    if not fresh:
        # When this host loses its network, every region fails at once, but the others' last good answers
        # predate the failure: moving on them would move for the wrong reason. The shell probes them now.
        step.reason = (
            f"{down}; waiting for {', '.join(r.name for r in candidates)} to answer after {active.name} "
            "began failing before moving (if every region fails, this host's own network is at fault)"
        )
        step.wants_confirmation = True
        return
    target = next((r for r in fresh if r.healthy), fresh[0])
    if _held(step.state, snap.now):
        step.reason = f"{down}; held down: not moving to {target.name} before the hold-down ends"
        step.wake_at = step.state.hold_until
        step.blocked_by_hold = True
        return
    _move(
        policy,
        snap,
        step,
        target.name,
        automatic=True,
        kind="failover",
        why=f"{down}; moved to {target.name}",
    )


def _failback(policy: Policy, snap: Snapshot, step: _Step, home: RegionView) -> None:
    if policy.failback == "manual":
        if home.healthy:
            step.reason += (
                f"; home {home.name} is up again, failback is manual: "
                f"`ddb-sidecar failover --to {home.name}` moves back"
            )
        else:
            step.reason += f"; home {home.describe()}"
        return
    if not home.healthy:
        step.reason += f"; failback waits for home {home.describe()}"
        return
    if _held(step.state, snap.now):
        step.reason += f"; failback to {home.name} waits for the hold-down to end"
        step.wake_at = step.state.hold_until
        return
    if home.lag_ms is None:
        step.reason += (
            f"; not failing back to {home.name} automatically: replication lag to it is unmeasured "
            f"(needs to be below max_lag {policy.max_lag * 1000:g} ms); "
            f"`ddb-sidecar failover --to {home.name}` moves back"
        )
        return
    if home.lag_ms > policy.max_lag * 1000:
        step.reason += (
            f"; not failing back to {home.name} yet: replication lag to it {home.lag_ms:g} ms "
            f"is above max_lag {policy.max_lag * 1000:g} ms"
        )
        return
    step.reason += (
        f"; failing back to home {home.name}: up again, hold-down over, replication lag {home.lag_ms:g} ms "
        "below max_lag: switching over (writes held until replication has caught up)"
    )
    step.switchover = home.name


def _alerts(
    policy: Policy, snap: Snapshot, step: _Step, reason: str
) -> tuple[frozenset[str], list[Alert], list[str]]:
    """Edge-triggered alerts: each condition alerts once, when it starts; its key stays while it lasts.

    Keys for held-down and paused-down last for the whole hold-down or pause, so a flapping region alerts at
    most once per hold-down or pause rather than on every flap.
    """
    before = snap.state.alerts
    state = step.state
    current: dict[str, Alert] = {}
    for r in snap.regions:
        if r.auth_failing:
            current[f"auth:{r.name}"] = Alert(
                "auth",
                f"{r.name}: credentials rejected ({r.cause}); moving would not help: fix the credentials",
            )
    if not any(r.health == "up" for r in snap.regions) and any(r.health == "down" for r in snap.regions):
        current["all-down"] = Alert("all-down", reason)
    active = snap.region(state.active)
    active_out = active is not None and active.outage
    if effective_mode(policy, state) == "paused":
        if active_out or "paused-down" in before:
            current["paused-down"] = Alert("paused-down", reason)
    elif _held(state, snap.now):
        key = f"held-down:{state.hold_until!r}"
        if step.blocked_by_hold or key in before:
            current[key] = Alert("held-down", reason)
    keys = frozenset(current)
    raised = [alert for key, alert in current.items() if key not in before]
    cleared = sorted(before - keys)
    return keys, raised, cleared


# -- persistence (pure: the shell reads and writes the file) -------------------------------------------


def state_to_dict(state: State) -> dict[str, Any]:
    """The durable part of the state as JSON-ready data; alerts and the last reason are not kept."""
    return {
        "version": STATE_VERSION,
        "active": state.active,
        "mode": state.mode,
        "hold_until": state.hold_until,
        "level": state.level,
        "level_from": state.level_from,
        "moves": [
            {
                "at": m.at,
                "from": m.from_region,
                "to": m.to_region,
                "automatic": m.automatic,
                "reason": m.reason,
            }
            for m in state.moves
        ],
    }


def state_from_dict(data: Mapping[str, Any]) -> State:
    """The inverse of state_to_dict; ValueError, naming the field, on anything it did not write."""
    if data.get("version") != STATE_VERSION:
        raise ValueError(f"version: expected {STATE_VERSION}, got {data.get('version')!r}")
    active = data.get("active")
    if not isinstance(active, str) or not active:
        raise ValueError("active: expected a region name")
    mode = data.get("mode")
    if mode not in ("automatic", "paused"):
        raise ValueError(f"mode: expected automatic or paused, got {mode!r}")
    level = data.get("level", 0)
    if not isinstance(level, int) or isinstance(level, bool) or level < 0:
        raise ValueError(f"level: expected a non-negative integer, got {level!r}")
    moves_data = data.get("moves", [])
    if not isinstance(moves_data, list):
        raise ValueError("moves: expected a list")
    moves = []
    for i, m in enumerate(moves_data):
        if not isinstance(m, dict):
            raise ValueError(f"moves[{i}]: expected an object")
        at = _number(m.get("at"), f"moves[{i}].at")
        frm, to, reason = m.get("from"), m.get("to"), m.get("reason", "")
        if not isinstance(frm, str) or not isinstance(to, str) or not isinstance(reason, str):
            raise ValueError(f"moves[{i}]: from, to and reason must be strings")
        automatic = m.get("automatic")
        if not isinstance(automatic, bool):
            raise ValueError(f"moves[{i}].automatic: expected true or false")
        moves.append(Move(at, frm, to, automatic, reason))
    return State(
        active=active,
        mode="paused" if mode == "paused" else "automatic",
        moves=tuple(moves)[-MAX_HISTORY:],
        hold_until=_optional_number(data.get("hold_until"), "hold_until"),
        level=level,
        level_from=_optional_number(data.get("level_from"), "level_from"),
    )


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _optional_number(value: object, where: str) -> float | None:
    return None if value is None else _number(value, where)
