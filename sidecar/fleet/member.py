"""A member of a fleet: the sidecars of several app hosts agree on one active region through etcd.

Keys under `coordination.prefix` (P below):
  P/members/HOST   this member's record, bound to its lease: version, what it serves, its own view of each
                   region, the decision epoch it has applied, whether it is cut off alone
  P/leader         the leader's host name, bound to the leader's lease, created in a transaction only if
                   absent: at most one leader
  P/decision       the fleet's decision: the controller's state (active region, mode, moves, hold-down), an
                   epoch and the reason. Only the leader writes it, each write conditioned on P/leader being
                   the key it created, so a deposed leader's late write is rejected by etcd
  P/intents/ID     an operator's command, posted by any member; the leader decides it and answers in
  P/results/ID
  P/fence, P/fence-acks/ID/HOST
                   a fleet-wide switchover's write fence (sidecar/fleet/switchover.py)
  P/lag            the replication lag the leader measures, once a second: the fleet's one figure
  P/checkpoints/SOURCE--TARGET--TABLE
                   streams mode: the leader's replicator's checkpoints (sidecar/fleet/checkpoints.py)
Who decides: the leader runs the pure controller (through a `Failover` shell whose views are the fleet
vote, `core.vote`, and whose state lives in P/decision). Who applies: every member, the leader included,
watches P/decision and hands it to its local follower (`Failover.follow`, which calls the `Applier`).
Nothing on the data path waits on etcd. Losing etcd keeps the applied decision (the weights stay), and no
automatic move happens until the fleet is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any

import orjson

from sidecar import __version__
from sidecar.config import Config
from sidecar.core.controller import (
    Decision,
    Intent,
    RegionView,
    State,
    state_from_dict,
    state_to_dict,
)
from sidecar.core.vote import FleetVote, MemberView, fingerprint, isolated, serves, vote, with_lag
from sidecar.failover import Failover
from sidecar.fleet.acks import FenceAcks
from sidecar.fleet.commands import Commands
from sidecar.fleet.etcd import Compare, EtcdClient, EtcdError, KeyValue, LeaseExpired, Op, WatchEvent
from sidecar.fleet.records import read_json, view_from_json, view_to_json
from sidecar.fleet.switchover import MemberFence, run_fleet_switchover
from sidecar.monitor import RegionMonitor
from sidecar.proxy.fence import WriteFence
from sidecar.proxy.region import RegionRuntime

logger = logging.getLogger(__name__)

VERSION = __version__
RETRY = 1.0  # seconds between attempts to reach etcd while it is lost
PUBLISH_EVERY = 0.05  # at most this often, the member record is rewritten after health changes
LAG_EVERY = 1.0  # the leader publishes the replication lag it measures this often
LAG_STALE = 5.0  # a published lag older than this (as received) is unmeasured


class FleetMember:
    """This sidecar's place in the fleet: membership, leadership, the decision, fleet-wide commands."""

    def __init__(
        self,
        config: Callable[[], Config],
        *,
        local: Failover,
        monitors: Mapping[str, RegionMonitor],
        lag_ms: Callable[[str], float | None],
        record: Callable[..., None],
        notify: Callable[[dict[str, Any]], None],
        fence: WriteFence[RegionRuntime],
        regions: Mapping[str, RegionRuntime],
        caught_up: Callable[[str, str, float, float], Awaitable[bool]],
        on_leadership: Callable[[bool], object] | None = None,
        client: EtcdClient | None = None,
    ) -> None:
        self._config = config
        cfg = config()
        self.host = cfg.coordination.host_name()
        self.prefix = cfg.coordination.prefix.rstrip("/")
        self.serves = serves([r.name for r in cfg.regions], cfg.tables, cfg.health.table)
        self.fingerprint = fingerprint(self.serves)
        self.local = local
        self.monitors = monitors
        self._lag_ms = lag_ms
        self._record = record
        self._notify = notify
        ttl = cfg.coordination.lease_ttl
        # Each attempt short, the call as long as 60% of the lease: an etcd election is ridden out, and a
        # lease is still renewed in time when etcd answers again.
        self.client = client or EtcdClient(
            cfg.coordination.endpoints, timeout=min(1.0, ttl / 4), deadline=ttl * 0.6
        )
        self.state = "connecting"  # connected | lost
        self.leader: str | None = None
        self.members: dict[str, dict[str, Any]] = {}
        self.decision: dict[str, Any] | None = None
        self.applied_epoch = 0
        self.isolated = False
        self._alone_since: float | None = None
        self.lost_since: float | None = None
        self.last_error: str | None = None
        self.local_override: str | None = None  # break-glass: the region this host carries against the fleet
        self._lease = 0
        self._leader_rev = 0  # create_revision of the leader key while we hold it
        self._controller: Failover | None = None
        self._publish_record = asyncio.Event()
        self._publish_state: State | None = None
        self._state_published = asyncio.Event()
        self._state_wanted = asyncio.Event()
        self.commands = Commands(self)
        self._refused_alerted: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        # Fleet switchover: this member's fence (every member), the acknowledgements seen (the leader).
        self.caught_up = caught_up
        self.member_fence = MemberFence(
            fence,
            regions,
            active=lambda: self.local.active_or_none,
            acknowledge=self._acknowledge_fence,
            record=self._record,
            spawn=self.spawn,
            grace=lambda: self._config().coordination.lease_ttl + 1.0,
        )
        self.switchover_lock = asyncio.Lock()
        self.acks = FenceAcks()
        self._failback_retry_at = 0.0
        self._on_leadership = on_leadership
        self._leader_lag: dict[str, Any] = {}
        self._leader_lag_at: float | None = None

    # -- keys
    def key(self, *parts: str) -> str:
        return "/".join((self.prefix, *parts))

    @property
    def lease(self) -> int:
        return self._lease

    @property
    def is_leader(self) -> bool:
        return self._controller is not None

    @property
    def controller(self) -> Failover | None:
        """The fleet's decider while this member leads (None otherwise)."""
        return self._controller

    @property
    def config(self) -> Config:
        return self._config()

    def lag_ms(self, region: str) -> float | None:
        return self._lag_ms(region)

    @property
    def epoch(self) -> int:
        return int(self.decision.get("epoch", 0)) if self.decision else 0

    # -- lifecycle
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="fleet-member")

    async def stop(self) -> None:
        self.member_fence.close()
        for pending in list(self._background):
            pending.cancel()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._step_down("stopping")
        if self._lease:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.client.lease_revoke(self._lease), 1.0)
        await self.client.close()

    async def _run(self) -> None:
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except LeaseExpired as exc:  # etcd is there, our lease is not (a long pause): rejoin at once
                logger.warning("fleet: %s; rejoining", exc)
                continue
            except (EtcdError, OSError, TimeoutError) as exc:
                self._lost(f"{type(exc).__name__}: {exc}")
            except Exception as exc:  # a bug must not end coordination for good
                logger.exception("fleet member: unexpected error")
                self._lost(f"internal error: {exc!r}")
            await asyncio.sleep(RETRY)

    async def _session(self) -> None:
        """One connected stretch: lease, record, campaign, watch; returns or raises when etcd is lost."""
        ttl = self._config().coordination.lease_ttl
        self._lease = await self.client.lease_grant(ttl)
        await self.client.put(self.key("members", self.host), self._record_bytes(), lease=self._lease)
        kvs, revision = await self.client.get_prefix(self.prefix + "/")
        self.members.clear()
        self.leader = None
        fence: dict[str, Any] | None = None
        for kv in kvs:
            self._load(kv)
            if kv.key == self.key("fence"):
                fence = read_json(kv.value)
        if self.leader == self.host:
            # our own key from before etcd was lost (its lease may still run): clear it, then campaign anew
            await self.client.txn(
                [Compare.value_is(self.key("leader"), self.host.encode())], [Op.delete(self.key("leader"))]
            )
            self.leader = None
        self._connected()
        if self.decision is not None:
            self._apply_decision(force=True)
        if fence is not None or self.member_fence.current is not None:
            # a fleet switchover that began, or ended, while we were away
            self.member_fence.update(fence if fence is not None and fence.get("id") else None)
        if self.leader is None:
            await self._campaign()
        tasks = [
            asyncio.create_task(self._keepalive(ttl), name="fleet-keepalive"),
            asyncio.create_task(self._watch(revision + 1), name="fleet-watch"),
            asyncio.create_task(self._publisher(), name="fleet-publisher"),
            asyncio.create_task(self._publish_lag(), name="fleet-lag"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            self._step_down("etcd session ended")

    async def _keepalive(self, ttl: float) -> None:
        while True:
            await asyncio.sleep(ttl / 3)
            await self.client.lease_keepalive(self._lease)

    async def _watch(self, start: int) -> None:
        async for events in self.client.watch_prefix(self.prefix + "/", start):
            for event in events:
                self._on_event(event)

    async def _publisher(self) -> None:
        """Writes this member's record after changes (coalesced) and, as leader, the fleet's decision."""
        while True:
            record = asyncio.create_task(self._publish_record.wait())
            state = asyncio.create_task(self._state_wanted.wait())
            try:
                await asyncio.wait([record, state], return_when=asyncio.FIRST_COMPLETED)
            finally:
                record.cancel()
                state.cancel()
            if self._state_wanted.is_set():
                self._state_wanted.clear()
                await self._write_decision()
            if self._publish_record.is_set():
                self._publish_record.clear()
                await self.client.put(self.key("members", self.host), self._record_bytes(), lease=self._lease)
                await asyncio.sleep(PUBLISH_EVERY)

    # -- state of the connection
    def _connected(self) -> None:
        was = self.state
        self.state = "connected"
        self.last_error = None
        if was == "lost":
            down_for = time.time() - (self.lost_since or time.time())
            self.event(
                "coordination-restored", f"etcd reachable again after {down_for:.1f} s; rejoined the fleet"
            )
        self.lost_since = None

    def _lost(self, why: str) -> None:
        self.last_error = why
        if self.state == "lost":
            return
        self.state = "lost"
        self.lost_since = time.time()
        message = (
            f"coordination lost: etcd unreachable ({why}); this host keeps serving {self.local.active_or_none} "
            "with its current weights and makes no automatic move until etcd is back; "
            "`ddb-sidecar failover --to REGION --local` moves this host alone"
        )
        self._alert("coordination-lost", message)

    # -- what etcd says
    def _load(self, kv: KeyValue) -> None:
        rest = kv.key[len(self.prefix) + 1 :]
        if rest == "leader":
            self.leader = kv.value.decode("utf-8", "replace")
        elif rest == "decision":
            data = read_json(kv.value)
            if data is not None:
                self.decision = data
        elif rest.startswith("members/"):
            data = read_json(kv.value)
            if data is not None:
                self.members[rest[len("members/") :]] = data
        elif rest.startswith("fence-acks/"):
            self.acks.seen(rest[len("fence-acks/") :], kv.value)

    def _on_event(self, event: WatchEvent) -> None:
        key = event.kv.key
        rest = key[len(self.prefix) + 1 :]
        if rest == "fence":
            self.member_fence.update(None if event.kind == "delete" else read_json(event.kv.value))
            return
        if rest.startswith("fence-acks/"):
            self.acks.seen(rest[len("fence-acks/") :], None if event.kind == "delete" else event.kv.value)
            return
        if rest == "lag":
            data = read_json(event.kv.value) if event.kind != "delete" else None
            lag = data.get("lag_ms") if data is not None else None
            self._leader_lag = lag if isinstance(lag, dict) else {}
            self._leader_lag_at = time.monotonic() if data is not None else None
            return
        if event.kind == "delete":
            if rest == "leader":
                self.leader = None
                if self._controller is not None:
                    self._step_down("the leader key was deleted")
                self.spawn(self._campaign_safely(), "fleet-campaign")
            elif rest.startswith("members/"):
                self.members.pop(rest[len("members/") :], None)
                self._fleet_changed()
            return
        self._load(event.kv)
        if rest == "decision":
            self._apply_decision()
        elif rest.startswith("members/"):
            self._fleet_changed()
        elif rest.startswith("intents/") and self._controller is not None:
            data = read_json(event.kv.value)
            if data is not None:
                self.spawn(self.commands.decide(rest[len("intents/") :], data), "fleet-intent")
        elif rest.startswith("results/"):
            self.commands.answered(rest[len("results/") :], event.kv.value)

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """A named background task, referenced until done (a bare task may be collected mid-flight)."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- leadership
    async def _campaign_safely(self) -> None:
        try:
            await self._campaign()
        except (EtcdError, OSError, TimeoutError) as exc:
            logger.info("fleet: campaign failed: %s", exc)

    async def _campaign(self) -> None:
        if self.state != "connected" or not self._lease:
            return
        key = self.key("leader")
        result = await self.client.txn(
            [Compare.create_revision(key, "==", 0)],
            [Op.put(key, self.host.encode(), lease=self._lease), Op.get(key)],
            [Op.get(key)],
        )
        got = result.responses[-1]
        if result.succeeded and got:
            self._leader_rev = got[0].create_revision
            self.leader = self.host
            self._lead()
        elif got:
            self.leader = got[0].value.decode("utf-8", "replace")

    def _lead(self) -> None:
        cfg = self._config()
        stored = self._stored_state()
        controller = Failover(
            self._config,
            self.monitors,
            apply=lambda weights, reason: None,  # every member applies the decision from etcd, the leader too
            record=self._record,
            notify=self._notify,
            lag_ms=self._lag_ms,
            views=self._fleet_views,
            persist=self._want_state,
            on_switchover=self._failback_due,
        )
        start = stored or self.local.state or State(cfg.home.name)
        controller.start_with(start)
        self._controller = controller
        self.event(
            "leader", f"{self.host} leads the fleet (members: {', '.join(sorted(self.members)) or '-'})"
        )
        if stored is None:
            self._want_state(start)  # the first decision of a new fleet: what this host does
        controller.poke()
        if self._on_leadership is not None:
            self._on_leadership(True)

    def _step_down(self, why: str) -> None:
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.close()
            self._leader_rev = 0
            logger.warning("fleet: %s no longer leads: %s", self.host, why)
            if self._on_leadership is not None:
                self._on_leadership(False)

    def _stored_state(self) -> State | None:
        if self.decision is None:
            return None
        try:
            return state_from_dict(self.decision["state"])
        except (KeyError, TypeError, ValueError) as exc:
            logger.error(
                "fleet: the stored decision is unreadable (%s); deciding from this host's state", exc
            )
            return None

    def _want_state(self, state: State) -> None:
        """The leader's controller persisted a state: publish it as the fleet's decision."""
        self._publish_state = state
        self._state_published.clear()
        self._state_wanted.set()

    async def _write_decision(self) -> None:
        state = self._publish_state
        if state is None or self._controller is None:
            self._state_published.set()
            return
        previous = self._stored_state()
        epoch = self.epoch + 1
        last = self._controller.last
        data: dict[str, Any] = {
            "epoch": epoch,
            "leader": self.host,
            "state": state_to_dict(state),
            "reason": (last.reason if last is not None else state.reason) or state.reason,
            "at": time.time(),
        }
        if previous is not None and previous.active != state.active:
            data["from"], data["to"] = previous.active, state.active
        leader = self.key("leader")
        result = await self.client.txn(
            [Compare.create_revision(leader, "==", self._leader_rev)],
            [Op.put(self.key("decision"), orjson.dumps(data))],
        )
        if not result.succeeded:
            self._step_down("etcd refused the decision: the leader key is no longer ours")
        else:
            self.decision = data
        self._state_published.set()

    def _fleet_views(self) -> tuple[RegionView, ...]:
        names = [r.name for r in self._config().regions]
        fleet = self.vote()
        return with_lag(fleet.views, {name: self._lag_ms(name) for name in names})

    def vote(self) -> FleetVote:
        names = [r.name for r in self._config().regions]
        members = []
        for host, record in self.members.items():
            raw_regions, raw_served = record.get("regions"), record.get("serves")
            regions: dict[str, Any] = raw_regions if isinstance(raw_regions, dict) else {}
            served: dict[str, Any] = raw_served if isinstance(raw_served, dict) else {}
            members.append(
                MemberView(
                    host,
                    {str(k): str(v) for k, v in served.items()},
                    {n: view_from_json(n, regions[n]) for n in names if isinstance(regions.get(n), dict)},
                )
            )
        return vote(names, members, self.serves)

    # -- following the decision
    def _apply_decision(self, *, force: bool = False) -> None:
        data = self.decision
        if data is None:
            return
        epoch = int(data.get("epoch", 0))
        if epoch <= self.applied_epoch and not force:
            return
        state = self._stored_state()
        if state is None:
            return
        if state.active not in self.monitors:
            logger.error("fleet: decision names unknown region %s; not applied", state.active)
            return
        if self.local_override is not None:
            self.event(
                "fleet-decision",
                f"the fleet's decision (epoch {epoch}) replaces this host's local failover to "
                f"{self.local_override}: {state.active} active",
            )
            self.local_override = None
        before = self.local.active_or_none
        moved = self.local.follow(state, str(data.get("reason") or ""))
        self.applied_epoch = epoch
        if moved and before is not None:
            self.event(
                "fleet-decision",
                f"applied the fleet's decision (epoch {epoch}, leader {data.get('leader')}): {before} -> "
                f"{state.active}: {data.get('reason') or ''}",
                **{"from": before, "to": state.active},
            )
        self.local_changed()

    def local_changed(self) -> None:
        """This host's view of a region changed (or it applied a decision): republish, re-judge isolation."""
        self._publish_record.set()
        self._fleet_changed()

    def _fleet_changed(self) -> None:
        if self._controller is not None:
            self._controller.poke()
        self._check_isolation()
        self._check_refused()

    def _check_isolation(self) -> None:
        """Is this host alone in seeing the active region down? Said (alert, status, record) only once it has
        lasted two probe intervals: at a real outage every member sees it first, for the moment before the
        others' views arrive, and that is not isolation."""
        active = self.local.active_or_none
        alone = fleet_down = False
        if active is not None and active in self.monitors and len(self.members) >= 2:
            mine = RegionView.from_health(active, self.monitors[active].state)
            fleet = dict(zip([r.name for r in self._config().regions], self.vote().views, strict=True))
            alone = isolated(mine, fleet[active])
            fleet_down = fleet[active].health == "down"
        loop = asyncio.get_running_loop()
        if not alone:
            self._alone_since = None
            if self.isolated:
                self.isolated = False
                self._publish_record.set()
                why = (
                    f"most of the fleet now sees {active} down too"
                    if active is not None and fleet_down
                    else f"{self.host} reaches {active} again"
                )
                self.event("host-rejoined", f"no longer isolated: {why}")
            return
        if self.isolated or active is None:
            return
        grace = 2 * self._config().health.interval
        if self._alone_since is None:
            self._alone_since = loop.time()
            loop.call_later(grace + 0.01, self._check_isolation)
            return
        if loop.time() - self._alone_since < grace:
            return
        self.isolated = True
        self._publish_record.set()
        self._alert(
            "host-isolated",
            f"{self.host} alone sees {active} down ({self.monitors[active].state.cause}); the fleet does not, "
            "so this host does not move: its requests fail fast with 503 (not sent, safe to retry). Check this "
            "host's path to the region; `ddb-sidecar failover --to REGION --local` moves it alone",
        )

    def _check_refused(self) -> None:
        for host, why in self.vote().refused:
            if host not in self._refused_alerted:
                self._refused_alerted.add(host)
                self._alert(
                    "member-mismatch",
                    f"fleet member {host} serves something else and is not counted as a voter: {why}. "
                    "Give every member of the fleet the same regions, tables and health.table",
                )

    # -- commands (sidecar/fleet/commands.py)
    async def intent(self, intent: Intent, timeout: float | None = None) -> dict[str, Any]:  # noqa: ASYNC109
        return await self.commands.post(intent, timeout)

    # -- the fleet switchover (sidecar/fleet/switchover.py): what it uses of the member
    def decide(self, intent: Intent) -> Decision:
        assert self._controller is not None
        return self._controller.intent(intent)

    async def decision_published(self, within: float = 5.0) -> None:
        """Wait until the decision the controller just made is in etcd (or `within` passed)."""
        if self._state_wanted.is_set() or not self._state_published.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._state_published.wait(), within)

    async def leader_put(self, name: str, data: Mapping[str, Any]) -> bool:
        """Write P/name bound to our lease, only while the leader key is still ours."""
        if self._controller is None:
            return False
        try:
            result = await self.client.txn(
                [Compare.create_revision(self.key("leader"), "==", self._leader_rev)],
                [Op.put(self.key(name), orjson.dumps(data), lease=self._lease)],
            )
        except (EtcdError, OSError, TimeoutError) as exc:
            logger.warning("fleet: could not write %s: %s", name, exc)
            return False
        if not result.succeeded:
            self._step_down(f"etcd refused {name}: the leader key is no longer ours")
        return result.succeeded

    # -- the leader's replicator (streams mode): checkpoints and the fleet's lag figure
    async def checkpoint(self, name: str) -> bytes | None:
        kv = await self.client.get(self.key("checkpoints", name))
        return kv.value if kv is not None else None

    async def save_checkpoint(self, name: str, data: bytes) -> bool:
        """Not lease-bound (a checkpoint outlives its leader); refused unless the leader key is ours."""
        if self._controller is None:
            return False
        try:
            result = await self.client.txn(
                [Compare.create_revision(self.key("leader"), "==", self._leader_rev)],
                [Op.put(self.key("checkpoints", name), data)],
            )
        except (EtcdError, OSError, TimeoutError) as exc:
            logger.warning("fleet: could not save checkpoint %s: %s", name, exc)
            return False
        return result.succeeded

    async def _publish_lag(self) -> None:
        """As leader, once a second: the replication lag it measures, the fleet's one figure (P/lag)."""
        names = [r.name for r in self._config().regions]
        while True:
            await asyncio.sleep(LAG_EVERY)
            if self._controller is not None:
                lag = {name: self._lag_ms(name) for name in names}
                await self.leader_put("lag", {"lag_ms": lag, "leader": self.host})

    def leader_lag_ms(self, region: str) -> float | None:
        """The lag the leader last published (None: unmeasured, or not heard from within LAG_STALE)."""
        if self._leader_lag_at is None or time.monotonic() - self._leader_lag_at > LAG_STALE:
            return None
        value = self._leader_lag.get(region)
        return float(value) if isinstance(value, int | float) else None

    async def _acknowledge_fence(self, ident: str, ack: dict[str, Any]) -> None:
        try:
            await self.client.put(
                self.key("fence-acks", ident, self.host),
                orjson.dumps({**ack, "at": time.time()}),
                lease=self._lease,
            )
        except (EtcdError, OSError, TimeoutError) as exc:
            logger.warning("fleet: could not acknowledge fence %s: %s", ident, exc)

    async def forget_fence_acks(self, ident: str, *, delay: float) -> None:
        await asyncio.sleep(delay)
        self.acks.forget(ident)
        with contextlib.suppress(EtcdError, OSError, TimeoutError):
            await self.client.delete(self.key("fence-acks", ident) + "/", prefix=True)

    def _failback_due(self, to: str) -> None:
        """The fleet's controller wants an automatic failback: a fleet switchover (one at a time; after a
        refused one, a hold-down before the next try)."""
        if self.switchover_lock.locked() or time.monotonic() < self._failback_retry_at:
            return

        async def failback() -> None:
            result = await run_fleet_switchover(self, to, failback=True)
            if not result.get("ok"):
                self._failback_retry_at = time.monotonic() + max(self._config().failover.hold_down, 1.0)

        self.spawn(failback(), "fleet-failback")

    def break_glass(self, to: str) -> str:
        """`failover --to REGION --local`: this host alone, against the fleet (while etcd is lost)."""
        self.local_override = to
        return (
            f"{self.host} now serves {to} on its own: it disagrees with the fleet "
            f"({self.decision['state']['active'] if self.decision else 'no decision known'}); the fleet's "
            "decision replaces this when etcd is reachable again"
        )

    # -- telling people
    def event(self, kind: str, reason: str, **extra: Any) -> None:
        self._record(kind, reason, **extra)

    def _alert(self, kind: str, message: str) -> None:
        logger.error("ALERT %s: %s", kind, message)
        self._record("alert", message, alert=kind)
        self._notify(
            {
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "kind": "alert",
                "alert": kind,
                "reason": message,
                "host": self.host,
                "active_region": self.local.active_or_none,
            }
        )

    def _record_bytes(self) -> bytes:
        regions = {
            name: view_to_json(RegionView.from_health(name, monitor.state))
            for name, monitor in self.monitors.items()
        }
        return orjson.dumps(
            {
                "host": self.host,
                "version": VERSION,
                "serves": self.serves,
                "fingerprint": self.fingerprint,
                "regions": regions,
                "applied_epoch": self.applied_epoch,
                "isolated": self.isolated,
                "at": time.time(),
            }
        )

    def status(self) -> dict[str, Any]:
        fleet = self.vote()
        return {
            "backend": "etcd",
            "state": self.state,
            "host": self.host,
            "leader": self.leader,
            "is_leader": self.is_leader,
            "members": sorted(self.members),
            "voters": list(fleet.voters),
            "refused_members": [{"host": h, "differs": why} for h, why in fleet.refused],
            "epoch": self.epoch,
            "applied_epoch": self.applied_epoch,
            "fingerprint": self.fingerprint,
            "isolated": self.isolated,
            "local_override": self.local_override,
            "fence": {"closed_for": self.member_fence.current, "last": self.member_fence.last},
            "endpoint": self.client.endpoint,
            "last_error": self.last_error,
            "lost_since": None
            if self.lost_since is None
            else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.lost_since)),
            "regions": {
                name: {"up": t.up, "down": t.down, "voters": t.voters} for name, t in fleet.tallies.items()
            },
            "views": {
                host: {
                    n: v.get("health") for n, v in (rec.get("regions") or {}).items() if isinstance(v, dict)
                }
                for host, rec in sorted(self.members.items())
            },
        }
