"""Keep HAProxy's server weights where the sidecar wants them: set, read back, retry, re-assert.

The sidecar is the only writer of the backend's weights. `WeightKeeper` owns that: `set_desired()` records
the wanted weights and wakes a background task, which

- reads HAProxy's weights back (`show info; show servers state BACKEND`, one connection) at once, and
  then every `check_interval` even when nothing changed: runtime weights survive neither a reload nor a
  restart (HAProxy falls back to the config's), and another writer may have changed one. A new worker PID
  in `show info` says HAProxy was reloaded or restarted; weights that differ from the desired ones are
  drift, re-asserted at once with a warning that says what HAProxy had;
- applies the desired weights on ONE command line (`set server B/new weight 100; set server B/old weight 0;
  show servers state B`): HAProxy runs the commands in order, so the servers that get a weight are
  raised before the others are lowered and at no instant does no server carry weight; the answer of the
  trailing `show servers state` confirms (or not) what was written;
- retries with exponential backoff (`backoff_min` doubling to `backoff_max`) while the socket is away,
  HAProxy answers an error, or the read-back differs; it logs once per failure streak and once when it
  recovers. A server HAProxy does not know (a config mismatch) is reported in `last_error` and retried
  at `backoff_max`, and nothing is written meanwhile: HAProxy runs every command of a line even after one
  failed, so lowering the old server while the new one does not exist could leave no server weighted.

Servers HAProxy has but `desired` does not name are left alone. Nothing the socket returns stops the task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from sidecar.haproxy.runtime import (
    RuntimeAPIError,
    RuntimeClient,
    RuntimeUnavailable,
    ServerState,
    parse_servers_state,
    parse_show_info,
    weight_command,
)

logger = logging.getLogger(__name__)

Weights = dict[str, int]


class ConfigMismatch(RuntimeAPIError):
    """The desired weights name a server (or the backend) that HAProxy's configuration does not have."""


class WeightMismatch(RuntimeError):
    """HAProxy's weights, read back right after they were set, are not the ones that were written."""


# -- pure helpers -------------------------------------------------------------------------------------------


def check_weights(weights: Mapping[str, int]) -> Weights:
    """A validated copy of `weights` (server names and 0-256 integer weights); ValueError otherwise."""
    out: Weights = {}
    for server, weight in weights.items():
        weight_command("b", server, weight)  # raises ValueError for a bad name or weight
        out[server] = weight
    return out


def apply_commands(
    backend: str,
    desired: Mapping[str, int],
    current: Mapping[str, int],
    not_running: Collection[str] = (),
) -> list[str]:
    """The `set server ... weight` commands that put `desired` in place, in a safe order.

    Every server in `desired` is set, whatever `current` (HAProxy's last read-back) says: the read-back
    may be stale by the time the line runs (a reload in between), and writing an unchanged weight is
    harmless. Order: servers whose weight goes up first (the new active ones), then the other weighted
    ones, then those that go to 0. Ties by name.

    A server that gets weight while HAProxy's own check has it down (`not_running`: it was down while
    it carried no traffic, e.g. both regions were down and this one came back first) is first forced
    `health up`: the sidecar has just seen its region answer, and HAProxy's next check (`rise 1`) would
    only say so up to one interval later, answering 503 in between. A wrong force is undone by the
    next failed checks.
    """

    def rank(item: tuple[str, int]) -> tuple[int, str]:
        server, weight = item
        if weight > current.get(server, 0):
            return 0, server
        return (1 if weight > 0 else 2), server

    commands = []
    for server, weight in sorted(desired.items(), key=rank):
        if weight > 0 and server in not_running:
            commands.append(f"set server {backend}/{server} health up")
        commands.append(weight_command(backend, server, weight))
    return commands


def weights_of(states: Mapping[str, ServerState]) -> Weights:
    return {name: state.weight for name, state in states.items()}


def differences(desired: Mapping[str, int], observed: Mapping[str, int]) -> dict[str, tuple[int | None, int]]:
    """{server: (HAProxy's weight or None if it has no such server, desired weight)} where they differ."""
    return {
        server: (observed.get(server), weight)
        for server, weight in desired.items()
        if observed.get(server) != weight
    }


def matches(desired: Mapping[str, int], observed: Mapping[str, int]) -> bool:
    """True if every server in `desired` has exactly its desired weight in `observed` (others ignored)."""
    return not differences(desired, observed)


def unknown_servers(desired: Mapping[str, int], observed: Mapping[str, int]) -> list[str]:
    return sorted(set(desired) - set(observed))


def describe(weights: Mapping[str, int] | None) -> str:
    """`eu-west-1=100 us-east-1=0`, sorted by name; `unknown` for None."""
    if weights is None:
        return "unknown"
    return " ".join(f"{server}={weight}" for server, weight in sorted(weights.items())) or "(no servers)"


def check_answers(commands: list[str], answers: list[str]) -> None:
    """Raise for the first `set server` command that did not answer empty (HAProxy's error text)."""
    errors = [
        f"{cmd}: {answer.strip()}" for cmd, answer in zip(commands, answers, strict=True) if answer.strip()
    ]
    if not errors:
        return
    text = "; ".join(errors)
    if any("No such server" in e or "No such backend" in e or "Can't find backend" in e for e in errors):
        raise ConfigMismatch(text)
    raise RuntimeAPIError(text)


# -- the keeper ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ReadBack:
    weights: Weights
    worker_pid: str | None
    not_running: frozenset[str] = frozenset()


class WeightKeeper:
    """Applies, confirms and re-asserts the backend's weights; see the module's docstring."""

    def __init__(
        self,
        runtime: RuntimeClient,
        backend: str,
        *,
        check_interval: float = 1.0,
        backoff_min: float = 0.05,
        backoff_max: float = 2.0,
        on_observed: Callable[[Weights | None], None] | None = None,
        on_applied: Callable[[Weights, float], None] | None = None,
        log: logging.Logger | None = None,
    ) -> None:
        if not 0 < backoff_min <= backoff_max:
            raise ValueError("need 0 < backoff_min <= backoff_max")
        if check_interval <= 0:
            raise ValueError("check_interval must be positive")
        weight_command(backend, "s", 0)  # checks the backend name
        self.runtime = runtime
        self.backend = backend
        self.check_interval = check_interval
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.on_observed = on_observed
        self.on_applied = on_applied
        self.log = log or logger

        # counters, for metrics
        self.applied = 0  # command lines whose read-back confirmed the desired weights
        self.failed_attempts = 0  # attempts that failed (socket away, error, mismatch)
        self.drift_corrections = 0  # drifts (reload, restart, another writer) corrected
        self.reloads_detected = 0  # new worker PIDs seen (HAProxy reloaded or restarted)
        self.last_error: str | None = None
        self.last_error_at: float | None = None  # time.time()
        self.last_check_at: float | None = None  # time.time() of the last successful read-back

        self._desired: Weights | None = None
        self._version = 0  # bumped by every change of the desired weights
        self._confirmed_version: int | None = None
        self._needed_since: float | None = None  # monotonic: when the desired weights stopped holding
        self._drifted = False  # the current need is a drift of weights confirmed before
        self._observed: Weights | None = None
        self._worker_pid: str | None = None
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._started_cycles = 0
        self._finished_cycles = 0
        self._streak_attempts = 0
        self._streak_since: float | None = None
        self._streak_kind: str | None = None
        self._task: asyncio.Task[None] | None = None

    # -- what the daemon reads

    @property
    def desired(self) -> Weights | None:
        return dict(self._desired) if self._desired is not None else None

    @property
    def observed(self) -> Weights | None:
        """HAProxy's weights at the last read-back; None if the last one failed (or none was made yet)."""
        return dict(self._observed) if self._observed is not None else None

    @property
    def confirmed(self) -> bool:
        """The last read-back succeeded and showed the current desired weights."""
        return (
            self._desired is not None
            and self._confirmed_version == self._version
            and self._observed is not None
        )

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def status(self) -> dict[str, Any]:
        return {
            "desired": self.desired,
            "observed": self.observed,
            "confirmed": self.confirmed,
            "last_error": self.last_error,
            "applied": self.applied,
            "failed_attempts": self.failed_attempts,
            "drift_corrections": self.drift_corrections,
            "reloads_detected": self.reloads_detected,
            "worker_pid": self._worker_pid,
        }

    # -- what the daemon calls

    def set_desired(self, weights: Mapping[str, int]) -> None:
        """Record the wanted weights and wake the task at once. Non-blocking; ValueError for bad input."""
        new = check_weights(weights)
        if new == self._desired:
            return
        self._desired = new
        self._version += 1
        self._drifted = False
        self._needed_since = time.monotonic()
        self.log.info("desired HAProxy weights: %s", describe(new))
        self._wake.set()
        self._notify()

    async def kick(self, timeout: float = 5.0) -> bool:  # noqa: ASYNC109 - a deadline, not a cancel scope
        """Read back now (e.g. right after the daemon reloaded HAProxy), re-applying on drift.

        Returns once a read-back that started after this call has finished: True if the desired weights
        are confirmed then; False if they are not, or if no read-back finished within `timeout`.
        """
        target = self._started_cycles + 1
        self._wake.set()
        return await self._wait_for(lambda: self._finished_cycles >= target, timeout) and self.confirmed

    async def wait_confirmed(self, timeout: float) -> bool:  # noqa: ASYNC109 - a deadline
        """Wait until the current desired weights are confirmed by a read-back; False at the deadline."""
        return await self._wait_for(lambda: self.confirmed, timeout)

    def start(self) -> None:
        if self.running:
            return
        self._task = asyncio.create_task(self._run(), name=f"weight-keeper-{self.backend}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    # -- the task

    def _notify(self) -> None:
        progress, self._progress = self._progress, asyncio.Event()
        progress.set()

    async def _wait_for(self, predicate: Callable[[], bool], within: float) -> bool:
        loop = asyncio.get_running_loop()
        end = loop.time() + within
        while not predicate():
            remaining = end - loop.time()
            if remaining <= 0:
                return False
            progress = self._progress
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(progress.wait(), remaining)
        return True

    async def _run(self) -> None:
        backoff = self.backoff_min
        while True:
            self._wake.clear()
            self._started_cycles += 1
            try:
                outcome = await self._cycle()
            except Exception as exc:  # never leave the task dead; say what happened
                self.log.exception("weight keeper: unexpected error")
                self._failed(exc)
                outcome = "config"
            finally:
                self._finished_cycles += 1
                self._notify()
            if outcome == "ok":
                backoff, delay = self.backoff_min, self.check_interval
            elif outcome == "config":  # retrying soon will not fix the config
                delay = self.backoff_max
            else:
                delay = backoff
                backoff = min(backoff * 2, self.backoff_max)
            # set_desired() and kick() cut the wait short, even in backoff.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def _cycle(self) -> Literal["ok", "retry", "config"]:
        """One read-back, and an apply if the desired weights do not hold."""
        try:
            read = await self._read_back()
            desired, version = self._desired, self._version
            if desired is None:
                self._succeeded()
                return "ok"
            if matches(desired, read.weights):
                self._confirm(version, desired, applied=False)
                return "ok"
            unknown = unknown_servers(desired, read.weights)
            if unknown:
                raise ConfigMismatch(
                    f"No such server in backend {self.backend}: {', '.join(unknown)} "
                    f"(HAProxy has {', '.join(sorted(read.weights)) or 'no servers'}); nothing written"
                )
            self._note_drift(version, desired, read.weights)
            await self._apply(desired, read.weights, read.not_running)
            self._confirm(version, desired, applied=True)
            return "ok"
        except ConfigMismatch as exc:
            self._failed(exc)
            return "config"
        except (RuntimeUnavailable, RuntimeAPIError, WeightMismatch, ValueError) as exc:
            self._failed(exc)
            return "retry"

    async def _read_back(self) -> _ReadBack:
        """`show info; show servers state B`: the worker's PID and the backend's weights."""
        try:
            info_text, state_text = await self.runtime.commands(
                ["show info", f"show servers state {self.backend}"]
            )
            try:
                states = parse_servers_state(state_text)
            except RuntimeAPIError as exc:
                if "Can't find backend" in str(exc):
                    raise ConfigMismatch(f"HAProxy has no backend {self.backend}") from None
                raise
        except Exception:
            self._observe(None)
            raise
        pid = parse_show_info(info_text).get("Pid")
        self._seen_worker(pid)
        weights = weights_of(states)
        self._observe(weights)
        return _ReadBack(weights, pid, frozenset(name for name, st in states.items() if not st.up))

    async def _apply(
        self, desired: Weights, current: Weights, not_running: frozenset[str] = frozenset()
    ) -> None:
        cmds = apply_commands(self.backend, desired, current, not_running)
        try:
            answers = await self.runtime.commands([*cmds, f"show servers state {self.backend}"])
            check_answers(cmds, answers[:-1])
            weights = weights_of(parse_servers_state(answers[-1]))
        except Exception:
            self._observe(None)
            raise
        self._observe(weights)
        if not matches(desired, weights):
            raise WeightMismatch(f"HAProxy has {describe(weights)} right after setting {describe(desired)}")

    def _observe(self, weights: Weights | None) -> None:
        self._observed = weights
        if weights is not None:
            self.last_check_at = time.time()
        if self.on_observed is not None:
            try:
                self.on_observed(dict(weights) if weights is not None else None)
            except Exception:
                self.log.exception("weight keeper: on_observed failed")

    def _seen_worker(self, pid: str | None) -> None:
        if pid is None:
            return
        previous, self._worker_pid = self._worker_pid, pid
        if previous is not None and previous != pid:
            self.reloads_detected += 1
            self.log.info(
                "HAProxy reloaded or restarted (worker pid %s -> %s): checking its weights", previous, pid
            )

    def _note_drift(self, version: int, desired: Weights, observed: Weights) -> None:
        """Weights that were confirmed and no longer hold: a reload, a restart or another writer."""
        if self._confirmed_version != version:
            return  # not confirmed yet: a new desired state, or a retry
        self._confirmed_version = None
        self._drifted = True
        self._needed_since = time.monotonic()
        self._notify()
        self.log.warning(
            "HAProxy's weights drifted (reload, restart or another writer): HAProxy had %s (differs: %s); "
            "re-asserting %s",
            describe(observed),
            ", ".join(f"{s} {o} != {d}" for s, (o, d) in sorted(differences(desired, observed).items())),
            describe(desired),
        )

    def _confirm(self, version: int, desired: Weights, *, applied: bool) -> None:
        if version != self._version:  # set_desired ran meanwhile: the next cycle applies the new one
            self._succeeded()
            return
        was_confirmed = self._confirmed_version == version
        self._confirmed_version = version
        elapsed = time.monotonic() - (self._needed_since or time.monotonic())
        if applied:
            self.applied += 1
            if self._drifted:
                self.drift_corrections += 1
            self.log.info("HAProxy weights set and confirmed: %s (%.3fs)", describe(desired), elapsed)
        if applied or not was_confirmed:
            self._needed_since = None
        if (applied or not was_confirmed) and self.on_applied is not None:
            try:
                self.on_applied(dict(desired), elapsed)
            except Exception:
                self.log.exception("weight keeper: on_applied failed")
        self._drifted = False
        self._succeeded()

    def _succeeded(self) -> None:
        if self._streak_attempts:
            elapsed = time.monotonic() - (self._streak_since or time.monotonic())
            what = "weights confirmed" if self.confirmed else "HAProxy's runtime API answers again"
            self.log.info(
                "%s after %d attempts / %.1f s (last error: %s)",
                what,
                self._streak_attempts + 1,
                elapsed,
                self.last_error,
            )
        self._streak_attempts = 0
        self._streak_since = None
        self._streak_kind = None
        self.last_error = None
        self.last_error_at = None

    def _failed(self, exc: BaseException) -> None:
        self.failed_attempts += 1
        if isinstance(exc, RuntimeUnavailable):
            kind, text = "unavailable", f"HAProxy runtime socket unavailable: {exc}"
        elif isinstance(exc, ConfigMismatch):
            kind, text = "config", f"config mismatch: {exc}"
        elif isinstance(exc, RuntimeAPIError):
            kind, text = "api", f"HAProxy runtime API error: {exc}"
        elif isinstance(exc, WeightMismatch):
            kind, text = "mismatch", f"weights not confirmed: {exc}"
        else:
            kind, text = "other", f"{type(exc).__name__}: {exc}"
        self.last_error = text
        self.last_error_at = time.time()
        if not self._streak_attempts:
            self._streak_since = time.monotonic()
        self._streak_attempts += 1
        if kind != self._streak_kind:  # once per streak (and again only if the cause changes)
            self._streak_kind = kind
            level = logging.ERROR if kind == "config" else logging.WARNING
            self.log.log(level, "HAProxy weights (wanted %s): %s; retrying with backoff",
                         describe(self._desired), text)  # fmt: skip
        else:
            self.log.debug("HAProxy weights: attempt %d failed: %s", self._streak_attempts, text)
