"""A planned move with no loss: hold writes, let replication catch up, flip, release the writes.

1. Close the write fence: every listener holds new writes (reads keep flowing); beyond
   `failover.switchover_timeout` nothing is held any longer.
2. Wait until the writes already sent to the active region have been answered.
3. Write a fence heartbeat in the active region and wait until the target region shows it.
4. Flip (the controller's `Switchover` intent: weights through the keeper), make every other listener send
   its writes to the new region, and release the held writes there.
If 2 or 3 do not finish by the deadline, the held writes go to the old region, nothing moves, and the
result says why. Automatic failback takes the same path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from sidecar.config import Config
from sidecar.core.controller import Switchover
from sidecar.failover import Failover
from sidecar.haproxy.weights import WeightKeeper
from sidecar.monitor import RegionMonitor
from sidecar.proxy.fence import WriteFence
from sidecar.proxy.region import RegionRuntime

logger = logging.getLogger(__name__)


@dataclass
class SwitchoverResult:
    ok: bool
    reason: str
    active_region: str
    pause_ms: float | None = None  # how long writes were held
    held: int = 0  # writes held and released
    lag_ms: float | None = None  # the target's measured lag when the fence closed
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "refused": not self.ok,
            "reason": self.reason,
            "active_region": self.active_region,
            "pause_ms": self.pause_ms,
            "held_writes": self.held,
            "lag_ms": self.lag_ms,
            **self.details,
        }


class SwitchoverContext(Protocol):
    """What a switchover uses of the daemon (and nothing else): the decider, the fence, the regions and
    their health, replication's view, the weight keeper, the event log."""

    config: Config
    failover: Failover
    fence: WriteFence[RegionRuntime]
    regions: dict[str, RegionRuntime]
    monitors: dict[str, RegionMonitor]
    keeper: WeightKeeper
    switchover_lock: asyncio.Lock

    def event(self, kind: str, reason: str, **extra: Any) -> None: ...

    def lag_ms(self, region: str) -> float | None: ...

    async def replication_caught_up(
        self, source: str, target: str, since: float, deadline: float
    ) -> bool: ...


async def run_switchover(daemon: SwitchoverContext, to: str, *, failback: bool = False) -> SwitchoverResult:
    failover = daemon.failover
    old = failover.active
    cfg = daemon.config
    if to == old:
        return SwitchoverResult(True, f"switchover to {to}: already active, nothing to do", old)
    refuse = _refusal(daemon, to)
    if refuse is not None:
        daemon.event("refused", refuse, **{"from": old, "to": to})
        return SwitchoverResult(False, refuse, old)
    if daemon.switchover_lock.locked():
        return SwitchoverResult(False, "refused: a switchover is already running", old)
    async with daemon.switchover_lock:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.failover.switchover_timeout
        fence = daemon.fence
        source = daemon.regions[old]
        lag_before = daemon.lag_ms(to)
        fence.close()
        closed_at = time.monotonic()
        try:
            drained = await _writes_answered(source, deadline)
            answered_at = time.monotonic()
            visible = drained and await daemon.replication_caught_up(old, to, answered_at, deadline)
            if not visible:
                held = fence.open(None)  # back to the old region: nothing moved
                waited = (time.monotonic() - closed_at) * 1000
                why = (
                    f"writes already sent to {old} were still unanswered"
                    if not drained
                    else f"replication from {old} did not reach {to}"
                )
                reason = (
                    f"refused switchover to {to}: {why} within failover.switchover_timeout "
                    f"{cfg.failover.switchover_timeout:g} s (lag was {_ms(lag_before)}); {held} held writes "
                    f"released to {old}; nothing moved. Try again later or raise switchover_timeout"
                )
                daemon.event("refused", reason, **{"from": old, "to": to})
                return SwitchoverResult(False, reason, old, round(waited, 1), held, lag_before)
            decision = failover.intent(Switchover(to, failback=failback))
            if decision.refused or failover.active != to:
                held = fence.open(None)
                return SwitchoverResult(False, decision.reason, failover.active, None, held, lag_before)
            held = fence.open(daemon.regions[to])
            pause = (time.monotonic() - closed_at) * 1000
        finally:
            if fence.closed:  # an exception on the way: never leave writes held
                fence.open(None)
        daemon.event(
            "fence-released",
            f"switchover to {to}: writes held {pause:.0f} ms ({held} held, released to {to}); "
            f"lag into {to} was {_ms(lag_before)} when the fence closed",
            **{"from": old, "to": to},
        )
        confirmed = await daemon.keeper.wait_confirmed(5.0)
        return SwitchoverResult(
            True,
            decision.reason,
            to,
            round(pause, 1),
            held,
            lag_before,
            {"weights_confirmed": confirmed},
        )


def config_refusal(cfg: Config, to: str) -> str | None:
    """Why `to` cannot be switched to whatever its health (a lone host and a fleet alike)."""
    names = [r.name for r in cfg.regions]
    if to not in names:
        return f"refused switchover to {to}: no such region (configured: {', '.join(names)})"
    if cfg.replication.mode == "none":
        return (
            "refused switchover: replication.mode is none, so there is no replication to wait for; "
            f"`ddb-sidecar failover --to {to}` moves at once"
        )
    return None


def _refusal(daemon: SwitchoverContext, to: str) -> str | None:
    refused = config_refusal(daemon.config, to)
    if refused is not None:
        return refused
    monitor = daemon.monitors[to]
    if monitor.state.state != "up" or monitor.state.cause is not None:
        return (
            f"refused switchover to {to}: it is not healthy ({monitor.state.state}"
            f"{': ' + monitor.state.cause if monitor.state.cause else ''}); a planned move needs a healthy "
            f"target (`ddb-sidecar failover --to {to}` moves anyway)"
        )
    return None


async def _writes_answered(source: RegionRuntime, deadline: float) -> bool:
    loop = asyncio.get_running_loop()
    while source.writes_in_flight > 0:
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.002)
    return True


def _ms(lag: float | None) -> str:
    return "unmeasured" if lag is None else f"{lag:g} ms"
