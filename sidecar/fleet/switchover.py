"""A switchover for the whole fleet: every member's write fence closed before the flip, opened after it.

One host's fence (`sidecar.switchover`) keeps one host's promise; in a fleet every host writes, so the
leader runs the same steps with every live member through etcd:

  P/fence              {id, state: closing | released | aborted, from, to, ...}, written by the leader only
                       (conditioned on its leadership, bound to its lease: a dead leader's fence vanishes)
  P/fence-acks/ID/HOST a member's acknowledgements: `closed` (its fence is closed and its writes already sent
                       to the old region are answered), then `released` (with how long it held writes)

1. The leader writes `closing`; each member closes its fence, waits for its in-flight writes to the old
   region to be answered, and acknowledges.
2. Once every live member has acknowledged (else: `aborted`, nothing moved), the leader writes a fence
   heartbeat in the old region and waits until the new one shows it (replication has caught up).
3. The leader decides the flip (the controller's `Switchover`), publishes the decision, then `released`.
   Members see the decision first (etcd's watch keeps revision order), apply it, then open their fence
   towards the new region.
A member that never hears the end (etcd lost, the leader gone without its lease expiring yet) opens its
fence by itself after the switchover timeout plus a lease, towards the region it has applied: it never
holds the app's writes for longer than that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from sidecar.core.controller import Switchover
from sidecar.proxy.fence import WriteFence
from sidecar.proxy.region import RegionRuntime
from sidecar.switchover import config_refusal

if TYPE_CHECKING:
    from sidecar.fleet.context import FleetContext

logger = logging.getLogger(__name__)

RELEASE_ACK_WAIT = 3.0  # how long the leader waits for the members to report their pause after the flip


class MemberFence:
    """This member's part in a fleet switchover: it closes and opens the local write fence as the leader's
    P/fence says, and acknowledges through `acknowledge(id, record)`."""

    def __init__(
        self,
        fence: WriteFence[RegionRuntime],
        regions: Mapping[str, RegionRuntime],
        *,
        active: Callable[[], str | None],
        acknowledge: Callable[[str, dict[str, Any]], Awaitable[None]],
        record: Callable[..., None],
        spawn: Callable[[Any, str], None],
        grace: Callable[[], float],
    ) -> None:
        self.fence = fence
        self.regions = regions
        self._active = active
        self._acknowledge = acknowledge
        self._record = record
        self._spawn = spawn
        self._grace = grace
        self.current: str | None = None  # the id of the fleet fence this member holds closed
        self._closed_at = 0.0
        self._expiry: asyncio.TimerHandle | None = None
        self._seen: set[str] = set()
        self.last: dict[str, Any] | None = None  # the last fence this member opened: id, pause, held

    def update(self, data: Mapping[str, Any] | None) -> None:
        """P/fence changed (None: deleted, with the leader's lease)."""
        if data is None:
            if self.current is not None:
                self._open("the fleet's fence key went away (its leader is gone)")
            return
        ident, state = str(data.get("id") or ""), data.get("state")
        if state == "closing" and ident and ident not in self._seen:
            self._seen.add(ident)
            self._close(ident, data)
        elif state in ("released", "aborted") and ident == self.current:
            self._open(f"{state} by the leader" + (f": {data['reason']}" if data.get("reason") else ""))

    def _close(self, ident: str, data: Mapping[str, Any]) -> None:
        if self.current is not None:  # a newer switchover replaces one we never heard the end of
            self._open("a newer fleet switchover began")
        self.current = ident
        self.fence.close()
        self._closed_at = time.monotonic()
        timeout = float(data.get("timeout") or 0) or 10.0
        loop = asyncio.get_running_loop()
        self._expiry = loop.call_later(timeout + self._grace(), self._expire, ident)
        source = self.regions.get(str(data.get("from")))
        self._spawn(self._drain_then_ack(ident, source, loop.time() + timeout), "fleet-fence-ack")

    async def _drain_then_ack(self, ident: str, source: RegionRuntime | None, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        while source is not None and source.writes_in_flight > 0:
            if loop.time() >= deadline or self.current != ident:
                return  # no acknowledgement: the leader aborts
            await asyncio.sleep(0.002)
        if self.current == ident:
            await self._acknowledge(ident, {"closed": True, "held": self.fence.held})

    def _expire(self, ident: str) -> None:
        if self.current == ident:
            self._open("no word from the leader within the switchover timeout and a lease", alert=True)

    def _open(self, why: str, *, alert: bool = False) -> None:
        ident, self.current = self.current, None
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        active = self._active()
        target = self.regions.get(active) if active is not None else None
        held = self.fence.open(target)
        pause = (time.monotonic() - self._closed_at) * 1000
        message = (
            f"fleet fence opened ({why}): writes held {pause:.0f} ms ({held} held, released to {active})"
        )
        if alert:
            logger.error("ALERT fleet-fence-expired: %s", message)
            self._record("alert", message, alert="fleet-fence-expired")
        else:
            self._record("fence-released", message, to=active)
        self.last = {"id": ident, "pause_ms": round(pause, 1), "held": held, "released_to": active}
        if ident is not None:
            self._spawn(self._acknowledge(ident, {"released": True, **self.last}), "fleet-fence-release")

    def close(self) -> None:
        if self.current is not None:
            self._open("the sidecar is stopping")


def refusal(member: FleetContext, to: str) -> str | None:
    refused = config_refusal(member.config, to)
    if refused is not None:
        return refused
    tally = member.vote().tallies.get(to)
    if tally is None or tally.up * 2 <= tally.voters:
        seen = f"{tally.up} of {tally.voters} members see it up" if tally is not None else "no member sees it"
        return (
            f"refused switchover to {to}: it is not healthy for the fleet ({seen}); a planned move needs a "
            f"healthy target (`ddb-sidecar failover --to {to}` moves anyway)"
        )
    return None


async def run_fleet_switchover(member: FleetContext, to: str, *, failback: bool = False) -> dict[str, Any]:
    """The leader's side. Returns the command's result (ok, reason, epoch, per-host pauses)."""
    controller = member.controller
    if controller is None:
        return {"ok": False, "refused": True, "reason": "refused: this member no longer leads the fleet"}
    old = controller.active
    base = {"epoch": member.epoch, "leader": member.host, "active_region": old, "mode": controller.mode}
    if to == old:
        return {**base, "ok": True, "refused": False, "reason": f"switchover to {to}: already active"}
    refused = refusal(member, to)
    if refused is None and member.switchover_lock.locked():
        refused = "refused: a switchover is already running in the fleet"
    if refused is not None:
        member.event("refused", refused, **{"from": old, "to": to})
        return {**base, "ok": False, "refused": True, "reason": refused}
    async with member.switchover_lock:
        return await _fenced_flip(member, old, to, failback, base)


async def _fenced_flip(
    member: FleetContext, old: str, to: str, failback: bool, base: dict[str, Any]
) -> dict[str, Any]:
    cfg = member.config
    loop = asyncio.get_running_loop()
    timeout = cfg.failover.switchover_timeout
    deadline = loop.time() + timeout
    ident = uuid.uuid4().hex
    hosts = sorted(member.vote().voters)
    lag_before = member.lag_ms(to)
    fence = {"id": ident, "from": old, "to": to, "failback": failback, "timeout": timeout}
    if not await member.leader_put("fence", {**fence, "state": "closing", "at": time.time()}):
        return {
            **base,
            "ok": False,
            "refused": True,
            "reason": "refused: this member no longer leads the fleet",
        }
    closed_at = time.monotonic()
    outcome = "aborted"
    try:
        closed = await member.acks.wait(ident, hosts, "closed", deadline)
        missing = sorted(set(hosts) - set(closed))
        why: str | None = None
        if missing:
            why = f"{', '.join(missing)} did not acknowledge a closed fence (writes already sent to {old} answered)"
        elif not await member.caught_up(old, to, time.monotonic(), deadline):
            why = f"replication from {old} did not reach {to}"
        decision = None
        if why is None:
            decision = member.decide(Switchover(to, failback=failback))
            if decision.refused or decision.state.active != to:
                why = decision.reason
        if why is not None:
            waited = (time.monotonic() - closed_at) * 1000
            reason = (
                f"refused switchover to {to}: {why} within failover.switchover_timeout {timeout:g} s "
                f"(lag was {_ms(lag_before)}); every member's held writes go to {old}; nothing moved"
                + (". Try again later or raise switchover_timeout" if decision is None else "")
            )
            member.event("refused", reason, **{"from": old, "to": to})
            return {**base, "ok": False, "refused": True, "reason": reason, "pause_ms": round(waited, 1)}
        assert decision is not None
        await member.decision_published()
        epoch = member.epoch
        if await member.leader_put("fence", {**fence, "state": "released", "epoch": epoch}):
            outcome = "released"
        releases = await member.acks.wait(ident, hosts, "released", loop.time() + RELEASE_ACK_WAIT)
        per_host = {
            host: {"pause_ms": ack.get("pause_ms"), "held": ack.get("held", 0)}
            for host, ack in releases.items()
        }
        pauses = [float(p["pause_ms"]) for p in per_host.values() if isinstance(p["pause_ms"], int | float)]
        return {
            **base,
            "ok": True,
            "refused": False,
            "reason": decision.reason,
            "epoch": epoch,
            "active_region": to,
            "mode": member.controller.mode if member.controller is not None else base["mode"],
            "pause_ms": max(pauses) if pauses else None,
            "held_writes": sum(int(p["held"] or 0) for p in per_host.values()),
            "lag_ms": lag_before,
            "hosts": per_host,
            "not_reported": sorted(set(hosts) - set(per_host)),
        }
    finally:
        if outcome != "released":
            with contextlib.suppress(Exception):
                await member.leader_put("fence", {**fence, "state": "aborted"})
        member.spawn(member.forget_fence_acks(ident, delay=RELEASE_ACK_WAIT), "fleet-fence-cleanup")


def _ms(lag: float | None) -> str:
    return "unmeasured" if lag is None else f"{lag:g} ms"
