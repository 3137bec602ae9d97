"""The failover shell: runs the pure controller (`sidecar.core.controller`) against the live world.

It builds a `Snapshot` from the region monitors, calls `decide()` whenever something may have changed (a
region's health, a timer the controller asked for, HAProxy's weights drifting, an operator's intent), and
carries out the commands: weights go to the `WeightKeeper` (the only writer of HAProxy's weights, which
confirms them by reading back), state is persisted atomically in `state_dir`, events go to the daemon's
event log, the log and the webhook. Deciding is synchronous and cheap, so a decision never waits on I/O: a
region seen down moves traffic in the same event-loop turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import orjson

from sidecar.config import Config
from sidecar.core.controller import (
    Alert,
    Decision,
    FailoverIntent,
    Intent,
    Pause,
    Persist,
    Policy,
    RecordEvent,
    RegionView,
    Resume,
    SetWeights,
    Snapshot,
    State,
    decide,
    desired_weights,
    effective_mode,
    initial_state,
    state_from_dict,
    state_to_dict,
)
from sidecar.monitor import RegionMonitor

logger = logging.getLogger(__name__)

STATE_FILE = "controller-state.json"
MOVE_KINDS = frozenset({"failover", "failback", "operator-failover", "reconfigure"})
CONFIRM_EVERY = 0.1  # at most this often, probe the other regions for a move that waits on them


def policy_from(config: Config) -> Policy:
    f = config.failover
    return Policy(automatic=f.automatic, failback=f.failback, hold_down=f.hold_down, max_lag=f.max_lag)


def load_state(path: Path, *, move_aside: bool = True) -> tuple[State | None, str | None]:
    """The persisted state, or None and why not. A file we cannot read is never trusted; the daemon moves
    it aside (`move_aside`) so the next write does not destroy evidence."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"cannot read {path}: {exc.strerror or exc}"
    try:
        data = orjson.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return state_from_dict(data), None
    except (orjson.JSONDecodeError, ValueError) as exc:
        if not move_aside:
            return None, f"{path} is unreadable ({exc})"
        aside = path.with_name(path.name + f".corrupt-{int(time.time())}")
        with contextlib.suppress(OSError):
            path.rename(aside)
        return None, f"{path} is unreadable ({exc}); moved aside to {aside.name}, starting without it"


def save_state(path: Path, state: State) -> None:
    """Atomically: write a temporary file in the same folder, fsync, rename over, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = orjson.dumps(state_to_dict(state), option=orjson.OPT_INDENT_2)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class Failover:
    """The local decider: owns the controller's state and decides from this host's own view of the regions;
    what it decides is carried out by the `Applier` (`apply`)."""

    def __init__(
        self,
        config: Callable[[], Config],
        monitors: Mapping[str, RegionMonitor],
        *,
        apply: Callable[[Mapping[str, int], str], None],
        record: Callable[..., None],
        notify: Callable[[dict[str, Any]], None],
        lag_ms: Callable[[str], float | None] | None = None,
        on_switchover: Callable[[str], None] | None = None,
        views: Callable[[], tuple[RegionView, ...]] | None = None,
        persist: Callable[[State], None] | None = None,
    ) -> None:
        self._config = config
        self.monitors = monitors
        self._apply = apply
        self._record = record
        self._notify = notify
        self._lag_ms = lag_ms
        self._on_switchover = on_switchover
        # Where the regions' views come from (default: this host's monitors; a fleet leader: the vote) and
        # where the state is kept (default: the state file; a fleet leader: etcd).
        self._views = views
        self._persist_to = persist
        # A fleet member follows its leader's decision: no automatic decisions of its own (`follow`).
        self.following = False
        self.state: State | None = None
        self.last: Decision | None = None
        self.moves_total: dict[str, int] = {}
        self.alerts_total: dict[str, int] = {}
        self.persist_error: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending = False
        self._timer: asyncio.TimerHandle | None = None
        self._confirm_at = 0.0
        self._drift: dict[str, int] | None = None

    @property
    def state_path(self) -> Path:
        return self._config().state_dir / STATE_FILE

    @property
    def names(self) -> list[str]:
        return [r.name for r in self._config().regions]

    @property
    def active(self) -> str:
        assert self.state is not None
        return self.state.active

    @property
    def active_or_none(self) -> str | None:
        return self.state.active if self.state is not None else None

    @property
    def desired(self) -> dict[str, int]:
        return desired_weights(self.names, self.active)

    @property
    def mode(self) -> str:
        assert self.state is not None
        return effective_mode(policy_from(self._config()), self.state)

    # -- start-up
    def start(self, observed: Mapping[str, int] | None) -> State:
        """Choose the starting state: adopt what HAProxy does, else what was persisted, else home."""
        self._loop = asyncio.get_running_loop()
        persisted, problem = load_state(self.state_path)
        if problem:
            logger.error("controller state: %s", problem)
            self._record("alert", problem, alert="state-file")
        self.state = initial_state(self.names, persisted, observed)
        self._record("start", self.state.reason, active=self.state.active)
        if persisted is None or persisted.active != self.state.active:
            self._persist(self.state)
        return self.state

    def start_with(self, state: State) -> None:
        """Start from a given state (a new fleet leader: the fleet's stored decision)."""
        self._loop = asyncio.get_running_loop()
        self.state = state

    def follow(self, state: State, reason: str) -> bool:
        """Take the fleet's decision as this host's: persist it and apply its weights (a change of active
        region is a move here). True if the active region changed."""
        before = self.state
        self.state = state
        self._persist(state)
        self._apply(self.desired, reason)
        return before is None or before.active != state.active

    # -- inputs
    def poke(self) -> None:
        """Something changed: decide soon (coalesced: many pokes in one loop turn make one decision)."""
        if self._pending or self._loop is None or self.state is None:
            return
        self._pending = True
        self._loop.call_soon(self._tick)

    def weights_observed(self, observed: Mapping[str, int] | None, confirmed_before: bool) -> None:
        """HAProxy's weights as the keeper read them back. Drift from weights it had confirmed means a
        reload, a restart or another writer: let the controller re-assert and record it."""
        if observed is None or self.state is None or not confirmed_before:
            return
        wanted = self.desired
        if any(observed.get(n) != w for n, w in wanted.items()):
            self._drift = dict(observed)
            self.poke()

    def intent(self, intent: Intent) -> Decision:
        """An operator's command, decided now."""
        return self._decide(intent)

    # -- deciding
    def _tick(self) -> None:
        self._pending = False
        if self.following:
            return
        try:
            self._decide(None)
        except Exception:  # a bug here must not stop the daemon, nor future decisions
            logger.exception("failover decision failed")

    def snapshot(self, weights: Mapping[str, int] | None = None) -> Snapshot:
        assert self.state is not None
        if self._views is not None:
            return Snapshot(time.time(), self._views(), self.state, weights)
        lag = self._lag_ms
        views = tuple(
            RegionView.from_health(name, self.monitors[name].state, lag_ms=lag(name) if lag else None)
            for name in self.names
        )
        return Snapshot(time.time(), views, self.state, weights)

    def _decide(self, intent: Intent | None) -> Decision:
        assert self.state is not None
        drift, self._drift = self._drift, None
        snap = self.snapshot(drift)
        decision = decide(policy_from(self._config()), snap, intent)
        before = self.state
        self.state = decision.state
        self.last = decision
        self._carry_out(decision, before)
        if decision.confirm:
            self._confirm(decision.state.active)
        if decision.switchover is not None and self._on_switchover is not None:
            self._on_switchover(decision.switchover)
        self._schedule(decision.wake_at)
        return decision

    def _carry_out(self, decision: Decision, before: State) -> None:
        for command in decision.commands:
            if isinstance(command, SetWeights):
                self._apply(command.weights, decision.reason)
            elif isinstance(command, Persist):
                self._persist(command.state)
            elif isinstance(command, RecordEvent):
                self._event(command)
            elif isinstance(command, Alert):
                self._alert(command)

    def _event(self, event: RecordEvent) -> None:
        extra: dict[str, Any] = {}
        if event.from_region is not None:
            extra["from"] = event.from_region
        if event.to_region is not None:
            extra["to"] = event.to_region
        if event.kind in MOVE_KINDS:
            self.moves_total[event.kind] = self.moves_total.get(event.kind, 0) + 1
            logger.warning("%s: %s", event.kind, event.reason)
        self._record(event.kind, event.reason, **extra)
        self._notify(self._payload(event.kind, event.reason, extra))

    def _alert(self, alert: Alert) -> None:
        self.alerts_total[alert.kind] = self.alerts_total.get(alert.kind, 0) + 1
        logger.error("ALERT %s: %s", alert.kind, alert.message)
        self._record("alert", alert.message, alert=alert.kind)
        self._notify(self._payload("alert", alert.message, {"alert": alert.kind}))

    def _payload(self, kind: str, reason: str, extra: Mapping[str, Any]) -> dict[str, Any]:
        assert self.state is not None
        return {
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "kind": kind,
            "reason": reason,
            **extra,
            "active_region": self.state.active,
            "mode": self.mode,
        }

    def _persist(self, state: State) -> None:
        if self._persist_to is not None:
            self._persist_to(state)
            return
        try:
            save_state(self.state_path, state)
        except OSError as exc:
            # Traffic has moved already; losing the file only matters after a restart, and then HAProxy's
            # weights are adopted first. Say so loudly rather than undo a move.
            self.persist_error = f"cannot write {self.state_path}: {exc.strerror or exc}"
            logger.error("controller state not persisted: %s", self.persist_error)
        else:
            self.persist_error = None

    def _confirm(self, active: str) -> None:
        now = time.monotonic()
        if now - self._confirm_at < CONFIRM_EVERY:
            return
        self._confirm_at = now
        for name, monitor in self.monitors.items():
            if name != active:
                monitor.probe_now()

    def _schedule(self, wake_at: float | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if wake_at is None or self._loop is None:
            return
        delay = max(0.0, wake_at - time.time()) + 0.01
        self._timer = self._loop.call_later(delay, self.poke)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._loop = None

    # -- what status shows
    def status(self) -> dict[str, Any]:
        assert self.state is not None
        s = self.state
        return {
            "reason": s.reason,
            "hold_until": _iso(s.hold_until),
            "hold_level": s.level,
            "alerts": sorted(s.alerts),
            "moves": [
                {
                    "at": _iso(m.at),
                    "from": m.from_region,
                    "to": m.to_region,
                    "automatic": m.automatic,
                    "reason": m.reason,
                }
                for m in reversed(s.moves[-10:])
            ],
            "persist_error": self.persist_error,
        }


def _iso(at: float | None) -> str | None:
    return None if at is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


__all__ = ["Failover", "FailoverIntent", "Pause", "Resume", "load_state", "policy_from", "save_state"]
