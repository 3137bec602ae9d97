"""The daemon: builds the data path from the config, runs the monitors, the failover shell and HAProxy.

The region listeners and upstream pools do the per-request work; `sidecar.monitor` watches each region
(probes and passive signals), `sidecar.failover` runs the pure controller and moves traffic through the
`WeightKeeper` (HAProxy's runtime API, confirmed by read-back). This module wires them, supervises (or
adopts) HAProxy when `haproxy.manage` is true, re-renders and reloads it when its template or the config
change, and exposes a snapshot for the admin API.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import socket
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sidecar import __version__
from sidecar.account import learn_account
from sidecar.applier import Applier
from sidecar.config import Address, Config, ConfigError, UnixAddress, load_config
from sidecar.core.controller import Decision, Intent, desired_weights
from sidecar.core.errors import DynamoError
from sidecar.core.gate import GatePolicy
from sidecar.core.health import Cause, HealthState
from sidecar.failover import STATE_FILE, Failover, load_state
from sidecar.fleet.member import FleetMember
from sidecar.haproxy.binary import find_haproxy
from sidecar.haproxy.process import HAProxyProcess
from sidecar.haproxy.render import render_to_file, template_path
from sidecar.haproxy.runtime import RuntimeClient, RuntimeUnavailable
from sidecar.haproxy.weights import WeightKeeper
from sidecar.heartbeat import Heartbeats
from sidecar.limits import connection_cap, raise_nofile_limit
from sidecar.monitor import MAX_OUTSTANDING, RegionMonitor
from sidecar.notify import Notifier
from sidecar.proxy.budget import ByteBudget
from sidecar.proxy.credentials import CredentialSource
from sidecar.proxy.fence import WriteFence
from sidecar.proxy.listener import DataPathPolicy, RefuseConnection, RegionListener, RegionRuntime
from sidecar.proxy.offload import GateOffload
from sidecar.proxy.sigv4 import ClientVerifier, DynamoDBRequestSigner
from sidecar.proxy.upstream import Endpoint, UpstreamPool
from sidecar.replication.lag import Replication
from sidecar.replication.streams import StreamReplicator
from sidecar.switchover import SwitchoverResult, run_switchover
from sidecar.watch import FileWatcher

logger = logging.getLogger(__name__)

SWEEP_EVERY = 0.02  # stall detection (blackholes under traffic) and slow-connection expiry
# A sweep that runs this late saw the event loop stalled (our own pause, not the region's): skip it, the
# answers may be sitting unread in socket buffers.
SWEEP_LATE = 0.1


def active_weights(config: Config) -> dict[str, int]:
    """The weights a freshly rendered haproxy.cfg carries: the persisted active region's, else home's.
    So a deploy pipeline's `render` and a cold HAProxy start never undo a failover."""
    names = [r.name for r in config.regions]
    persisted, _ = load_state(config.state_dir / STATE_FILE, move_aside=False)
    active = persisted.active if persisted is not None and persisted.active in names else names[0]
    return desired_weights(names, active)


@dataclass(frozen=True, slots=True)
class Event:
    at: float
    kind: str
    reason: str
    extra: tuple[tuple[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "at": _iso(self.at),
            "kind": self.kind,
            "reason": self.reason,
        }
        out.update(self.extra)
        return out


def data_path_policy(config: Config, learned_account: str | None = None) -> DataPathPolicy:
    gate = GatePolicy(
        tables=frozenset(config.tables),
        allow_control_plane=config.proxy.allow_control_plane,
        max_body_bytes=config.proxy.max_body_bytes,
        regions=frozenset(region.name for region in config.regions),
        account=config.account_id or learned_account,
    )
    verifier = ClientVerifier(config.client_secrets()) if config.clients else None
    return DataPathPolicy(gate=gate, verifier=verifier)


class Daemon:
    """Everything `ddb-sidecar run` runs; start(), then wait on `stopped`, then stop()."""

    def __init__(
        self,
        config: Config,
        *,
        credentials: CredentialSource | None = None,
        config_path: Path | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.started_at = time.time()
        self.credentials = credentials or CredentialSource()
        self._policy = data_path_policy(config)
        self.learned_account: str | None = None  # from the health table's ARN (sidecar.account)
        self.regions: dict[str, RegionRuntime] = {}
        self.monitors: dict[str, RegionMonitor] = {}
        self._servers: list[asyncio.Server] = []
        self._connections: set[RegionListener] = set()
        self._open_per_listener: dict[str, int] = {}
        self.connection_cap = config.proxy.max_client_connections
        self.connections_refused = 0
        self.budget = ByteBudget(config.proxy.max_inflight_bytes)
        self.offload = GateOffload()
        self._tasks: set[asyncio.Task[None]] = set()
        self.events: deque[Event] = deque(maxlen=200)
        self.haproxy: HAProxyProcess | None = None
        self.runtime = RuntimeClient(str(config.haproxy.runtime_socket))
        self.keeper = WeightKeeper(
            self.runtime, config.haproxy.backend, check_interval=1.0, on_observed=self._weights_observed
        )
        self.notifier = Notifier(config.notify)
        self.applier = Applier(self.keeper, on_move=self._moved)
        self.heartbeats = Heartbeats(lambda: self.config, self.monitors, lambda: self.failover.active_or_none)
        self.replication = Replication(
            lambda: self.config,
            self.heartbeats,
            self.credentials.current,
            active=lambda: self.failover.active_or_none,
            record=self.event,
            notify=self.notifier.notify,
        )
        self.failover = Failover(
            lambda: self.config,
            self.monitors,
            apply=self.applier.apply,
            record=self.event,
            notify=self.notifier.notify,
            lag_ms=self.lag_ms,
            on_switchover=self._failback_due,
        )
        # With coordination: this host's place in the fleet; the local decider then follows the leader.
        self.fleet: FleetMember | None = None
        self.fence: WriteFence[RegionRuntime] = WriteFence()
        self.switchover_lock = asyncio.Lock()
        self._failback_retry_at = 0.0
        self._render_task: asyncio.Task[None] | None = None
        self._config_digest: str | None = None
        if config_path is not None and config_path.is_file():
            self._config_digest = hashlib.sha256(config_path.read_bytes()).hexdigest()
        self.watcher: FileWatcher | None = None
        self._render_lock = asyncio.Lock()
        self._confirmed_weights: dict[str, int] | None = None
        self._health_table_alerted: dict[str, str] = {}  # region -> the problem alerted
        self.stopped = asyncio.Event()

    @property
    def weights(self) -> dict[str, int]:
        """The weights the sidecar wants HAProxy to use (before start: the home region's)."""
        if self.failover.state is None:
            return active_weights(self.config)
        return self.failover.desired

    # -- lifecycle
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await self.credentials.start()
        self.offload.start()
        cfg = self.config
        pools = len(cfg.regions) * (cfg.proxy.max_connections + MAX_OUTSTANDING)
        self.connection_cap, lowered = connection_cap(
            cfg.proxy.max_client_connections, len(cfg.regions), pools, raise_nofile_limit()
        )
        if lowered:
            logger.warning("%s", lowered)
        for region in cfg.regions:
            endpoint = Endpoint.parse(region.url)
            signer = DynamoDBRequestSigner(
                region.name, endpoint.host_header, user_agent=f"ddb-sidecar/{__version__}"
            )
            pool = UpstreamPool(
                endpoint,
                loop=loop,
                connect_timeout=cfg.proxy.connect_timeout,
                request_timeout=cfg.proxy.request_timeout,
                max_connections=cfg.proxy.max_connections,
                idle_timeout=cfg.proxy.idle_timeout,
                name=region.name,
            )
            runtime = RegionRuntime(region.name, signer, pool, self.credentials.current, self.policy)
            runtime.fence = self.fence
            runtime.budget = self.budget
            runtime.offload = self.offload
            self.regions[region.name] = runtime
            probe_pool = UpstreamPool(
                endpoint,
                loop=loop,
                connect_timeout=min(cfg.proxy.connect_timeout, cfg.health.timeout),
                request_timeout=cfg.health.timeout,
                max_connections=MAX_OUTSTANDING,
                idle_timeout=cfg.proxy.idle_timeout,
                name=f"{region.name}-probe",
            )
            self.monitors[region.name] = RegionMonitor(
                runtime, probe_pool, lambda: self.config, self._health_changed, self._region_quiet
            )
        try:
            for region in cfg.regions:
                runtime = self.regions[region.name]
                server = await self._listen(region.proxy, runtime)
                self._servers.append(server)
                logger.info("region %s: listening on %s, upstream %s", region.name, region.proxy, region.url)
            # Adopt what a running HAProxy does (a restart after kill -9 must not flip traffic), else the
            # persisted decision, else home.
            observed = await self._read_weights_at_start()
            self.failover.start(observed)
            self.applier.apply(self.failover.desired, "start")  # the keeper applies it once it runs
            self._route_writes_to(self.failover.active)
            if cfg.coordination.enabled:
                # Until the fleet's decision arrives, this host keeps what it adopted and moves nothing.
                self.failover.following = True
                self.fleet = FleetMember(
                    lambda: self.config,
                    local=self.failover,
                    monitors=self.monitors,
                    lag_ms=self.lag_ms,
                    record=self.event,
                    notify=self.notifier.notify,
                    fence=self.fence,
                    regions=self.regions,
                    caught_up=self.replication.caught_up,
                    on_leadership=lambda _: self._spawn(
                        self.replication.leadership_changed(), "replicator-leadership"
                    ),
                )
                self.fleet.start()
            for name, monitor in self.monitors.items():
                self._spawn(monitor.run(), f"monitor-{name}")
            self._spawn(self.heartbeats.run(), "heartbeats")
            if cfg.account_id is None:
                self._spawn(learn_account(self.regions, cfg.health.table, self._account_learned), "account")
            await self.replication.start(self.fleet)
            self._spawn(self._sweep(), "listener-sweeper")
            if cfg.haproxy.manage:
                await self._start_haproxy()
            self.keeper.start()
            await self.notifier.start()
            if cfg.haproxy.manage:
                await self._start_watcher()
        except BaseException:
            await self.stop()
            raise
        self.event(
            "started",
            f"ddb-sidecar started; home region {cfg.home.name}, active region {self.failover.active}",
        )

    async def _read_weights_at_start(self) -> dict[str, int] | None:
        """HAProxy's weights, if one is already running on our runtime socket (None otherwise)."""
        if not self.config.haproxy.runtime_socket.exists():
            return None
        error = None
        for _ in range(3):  # a reloading HAProxy may miss one exchange; a dead one refuses at once
            weights, error = await self.haproxy_weights()
            if weights is not None:
                return weights
            await asyncio.sleep(0.2)
        logger.info("no running HAProxy to adopt weights from: %s", error)
        return None

    async def _listen(self, where: Address | UnixAddress, runtime: RegionRuntime) -> asyncio.Server:
        loop = asyncio.get_running_loop()

        def factory() -> asyncio.Protocol:
            return self._new_connection(runtime)

        if isinstance(where, UnixAddress):
            path = where.path
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_socket():
                remove_stale_socket(path)
            server = await loop.create_unix_server(factory, str(path), backlog=1024)
            path.chmod(0o600)  # HAProxy runs as our user; nobody else may sign with our credentials
            return server
        return await loop.create_server(factory, where.host, where.port, reuse_address=True, backlog=1024)

    async def _start_haproxy(self) -> None:
        cfg = self.config
        binary = find_haproxy(cfg.haproxy.binary)
        result = render_to_file(cfg, weights=self.failover.desired, binary=binary)
        logger.info("haproxy config %s (%s)", result.path, "written" if result.changed else "unchanged")
        self.haproxy = HAProxyProcess(
            binary,
            cfg.haproxy.config,
            cfg.haproxy.master_socket,
            log_path=cfg.state_dir / "haproxy.log",
            runtime_socket=cfg.haproxy.runtime_socket,
            on_restart=self._haproxy_restarted,
            secret_env=cfg.secret_env_names(),
        )
        await self.haproxy.start()
        if self.haproxy.adopted:
            self.event("haproxy-adopted", f"adopted the running HAProxy (master pid {self.haproxy.pid})")
            if result.changed:  # it runs an older rendering: load ours (weights are re-asserted after)
                await self.haproxy.reload()
        logger.info("haproxy running (pid %s), stable address %s", self.haproxy.pid, cfg.listen)

    async def _haproxy_restarted(self) -> None:
        # A new HAProxy starts from the rendered file, which carries the active region's weights; read back
        # at once anyway, so status and the keeper agree without waiting for the periodic check.
        self.event(
            "haproxy-restarted", f"HAProxy restarted (pid {self.haproxy.pid if self.haproxy else '?'})"
        )
        await self.keeper.kick()

    async def _start_watcher(self) -> None:
        paths = [template_path(self.config)]
        if self.config_path is not None:
            paths.append(self.config_path)
        self.watcher = FileWatcher(paths, self._files_changed, debounce=0.5)
        self.watcher.start()

    async def _files_changed(self, changed: frozenset[Path]) -> None:
        """The template or the config file changed: reload the config, re-render, reload HAProxy."""
        if self.config_path is not None and self.config_path.resolve() in {p.resolve() for p in changed}:
            try:
                self.reload_config_file(only_if_changed=True)
            except ConfigError as exc:
                self.event(
                    "reload-refused",
                    f"{self.config_path} changed but is invalid; keeping the running config: "
                    + "; ".join(exc.problems),
                )
                return
        await self.rerender(reload=True, why=", ".join(sorted(p.name for p in changed)) + " changed")

    async def rerender(self, *, reload: bool, why: str) -> bool:
        """Render haproxy.cfg with the active region's weights; with `reload`, reload HAProxy when the file
        changed. An invalid rendering writes nothing and leaves HAProxy as it is. True if all went well."""
        if not self.config.haproxy.manage:
            return True
        async with self._render_lock:
            cfg = self.config
            try:
                binary = find_haproxy(cfg.haproxy.binary)
                result = await asyncio.to_thread(
                    render_to_file, cfg, weights=self.failover.desired, binary=binary
                )
            except Exception as exc:  # RenderError, a missing binary, a full disk: the old config stays
                self.event("haproxy-config-invalid", f"{why}: not applied, HAProxy keeps its config: {exc}")
                return False
            if not result.changed:
                return True
            if not reload or self.haproxy is None:
                return True
            try:
                outcome = await self.haproxy.reload()
            except RuntimeUnavailable as exc:
                self.event("haproxy-reload-failed", f"{why}: HAProxy not reloaded: {exc}")
                return False
            if not outcome.success:
                self.event(
                    "haproxy-reload-failed", f"{why}: HAProxy refused the new config: {outcome.reason}"
                )
                return False
            self.event("haproxy-reloaded", f"{why}: HAProxy reloaded hitlessly")
        await self.keeper.kick()
        return True

    async def stop(self) -> None:
        if self.watcher is not None:
            await self.watcher.stop()
        if self.fleet is not None:
            await self.fleet.stop()
        self.failover.close()
        if self.failover.state is not None and self.haproxy is not None:
            # A move's re-render may still be queued: the file must name the active region before HAProxy
            # stops, so that its next cold start routes right.
            await self.rerender(reload=False, why="stopping")
        for server in self._servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.keeper.stop()
        self.offload.stop()
        # The replicator may wait up to its grace (30 s) for writes into a region that does not answer;
        # HAProxy need not wait for it (a supervisor's SIGKILL meanwhile would orphan HAProxy).
        await asyncio.gather(self.replication.stop(), self._stop_haproxy())
        # Let in-flight requests finish (bounded), then close what remains.
        deadline = time.monotonic() + 5.0
        while any(r.stats.in_flight for r in self.regions.values()) and time.monotonic() < deadline:  # noqa: ASYNC110 - a bounded drain over several counters
            await asyncio.sleep(0.02)
        for conn in list(self._connections):
            if conn.transport is not None:
                conn.transport.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        for runtime in self.regions.values():
            await runtime.pool.close()
        for monitor in self.monitors.values():
            await monitor.pool.close()
        await self.notifier.close(2.0)
        await self.credentials.close()
        self.stopped.set()

    async def _stop_haproxy(self) -> None:
        if self.haproxy is not None:
            await self.haproxy.stop()

    def request_stop(self) -> None:
        self.stopped.set()

    def reload_config_file(self, *, only_if_changed: bool) -> bool:
        """Load `config_path` and apply it (SIGHUP: always; the watcher: only when its bytes differ from the
        last applied, so an edit followed by a SIGHUP is applied once). ConfigError when it is invalid."""
        assert self.config_path is not None
        try:
            digest: str | None = hashlib.sha256(self.config_path.read_bytes()).hexdigest()
        except OSError:
            digest = None  # load_config says what is wrong with the file
        if only_if_changed and digest is not None and digest == self._config_digest:
            return False
        self.reload(load_config(self.config_path))
        self._config_digest = digest
        return True

    def reload(self, config: Config) -> list[str]:
        """Apply a changed config; return what needs a restart to take effect."""
        needs_restart = []
        old = self.config
        if [(r.name, r.proxy, r.url) for r in config.regions] != [
            (r.name, r.proxy, r.url) for r in old.regions
        ]:
            needs_restart.append("regions")
        for key in ("listen", "admin", "haproxy", "state_dir", "notify", "coordination"):
            if getattr(config, key) != getattr(old, key):
                needs_restart.append(key)
        self._policy = data_path_policy(config, self.learned_account)
        self.config = config.model_copy(update={k: getattr(old, k) for k in needs_restart})
        for monitor in self.monitors.values():
            monitor.pool.request_timeout = self.config.health.timeout
            monitor.refresh_thresholds()  # health.slow may have changed
        self.event(
            "reload",
            "config reloaded" + (f"; restart to apply {', '.join(needs_restart)}" if needs_restart else ""),
        )
        self.failover.poke()  # failover settings may have changed
        return needs_restart

    # -- failover wiring
    def _region_quiet(self, monitor: RegionMonitor) -> None:
        """The active region failed once, or has left requests unanswered for a while: ask the others now,
        so that if it goes down the controller already has their fresh answers and moves at once."""
        if monitor.name != self.failover.active_or_none:
            return
        for other in self.monitors.values():
            if other is not monitor:
                other.probe_now()

    def _health_changed(self, monitor: RegionMonitor, before: HealthState) -> None:
        self._check_health_table(monitor)
        after = monitor.state
        if after.suspect and not before.suspect:
            self._region_quiet(monitor)
        if before.state != after.state:
            self.event(
                "region-" + after.state,
                f"{monitor.name} {after.state}" + (f": {after.cause}" if after.cause else ""),
                region=monitor.name,
            )
        self.failover.poke()
        if self.fleet is not None:
            self.fleet.local_changed()

    def _account_learned(self, account: str) -> None:
        """The health table's ARN told us our AWS account: table ARNs can be checked from now on."""
        self.learned_account = account
        self._policy = data_path_policy(self.config, account)
        logger.info("AWS account %s (from the health table's ARN): table ARNs of it are accepted", account)

    def _check_health_table(self, monitor: RegionMonitor) -> None:
        """Alert once when the probes find the health table missing or keyed wrong in a region (and say
        when it is fixed): the region still answers, but write failures and lag go unseen there."""
        problem = monitor.health_table_problem
        if problem is None:
            if self._health_table_alerted.pop(monitor.name, None) is not None:
                self.event("health-table-ok", f"the health table answers in {monitor.name} again")
            return
        if monitor.name in self._health_table_alerted:
            return
        self._health_table_alerted[monitor.name] = problem
        table = self.config.health.table
        message = (
            f"health table {table} in {monitor.name}: {problem}; it is missing or its key is not `pk` (S), so "
            f"the sidecar cannot see write failures or replication lag there. Create it: aws dynamodb "
            f"create-table --region {monitor.name} --table-name {table} --attribute-definitions "
            "AttributeName=pk,AttributeType=S --key-schema AttributeName=pk,KeyType=HASH "
            "--billing-mode PAY_PER_REQUEST (and replicate it like the app's tables)"
        )
        logger.error("ALERT health-table: %s", message)
        self.failover.alerts_total["health-table"] = self.failover.alerts_total.get("health-table", 0) + 1
        self.event("alert", message, alert="health-table", region=monitor.name)
        self.notifier.notify(
            {
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "kind": "alert",
                "alert": "health-table",
                "reason": message,
                "region": monitor.name,
                "active_region": self.failover.active_or_none,
            }
        )

    def _weights_observed(self, observed: dict[str, int] | None) -> None:
        """A read-back of HAProxy's weights. It is a drift only when HAProxy had confirmed the current desired
        weights and no longer has them (a reload, a restart, another writer), not while a flip is under way."""
        desired = self.keeper.desired
        if observed is None or desired is None:
            return
        if all(observed.get(n) == w for n, w in desired.items()):
            self._confirmed_weights = desired
        elif self._confirmed_weights == desired:
            self._confirmed_weights = None
            self.failover.weights_observed(observed, confirmed_before=True)

    def _moved(self, from_region: str, to_region: str, reason: str) -> None:
        """Traffic moved (the keeper is already flipping HAProxy): answer the requests stuck in a region
        that is down, and make the rendered file say which region is active."""
        monitor = self.monitors.get(from_region)
        runtime = self.regions.get(from_region)
        if monitor is not None and runtime is not None and monitor.state.state == "down":
            # Down for timeouts (a blackhole): nothing in flight will be answered, free the app's threads
            # now. Down for other reasons: only what has waited longer than a probe's timeout.
            older_than = 0.0 if monitor.state.kind is Cause.TIMEOUT else self.config.health.timeout
            aborted = runtime.pool.abort_stalled(
                older_than, f"{from_region} is down, traffic moved to {to_region}"
            )
            if aborted:
                logger.warning("answered %d requests stuck in %s (down) with errors", aborted, from_region)
        self._route_writes_to(to_region)
        self._render_task = self._spawn(
            self.rerender(reload=False, why=f"moved to {to_region}"), "render-after-move"
        )
        self._spawn(self.replication.source_moved(to_region), "replicator-set-source")

    def _route_writes_to(self, active: str) -> None:
        """Writes that reach a listener other than the active region's (in flight in HAProxy at a move)
        go to the active region: once a region has taken over, no write lands in the old one."""
        target = self.regions.get(active)
        for name, runtime in self.regions.items():
            runtime.forward_to = None if name == active else target

    def _failback_due(self, to: str) -> None:
        """The controller wants an automatic failback: run it as a switchover (at most one at a time; after
        a refused one, wait a hold-down before trying again)."""
        if self.switchover_lock.locked() or time.monotonic() < self._failback_retry_at:
            return

        async def failback() -> None:
            result = await run_switchover(self, to, failback=True)
            if not result.ok:
                self._failback_retry_at = time.monotonic() + max(self.config.failover.hold_down, 1.0)

        self._spawn(failback(), "failback")

    @property
    def replicator(self) -> StreamReplicator | None:
        return self.replication.replicator

    def lag_ms(self, region: str) -> float | None:
        return self.replication.lag_ms(region)

    def max_lag_ms(self) -> float | None:
        return self.replication.max_lag_ms(list(self.regions))

    async def replication_caught_up(self, source: str, target: str, since: float, deadline: float) -> bool:
        return await self.replication.caught_up(source, target, since, deadline)

    async def switchover(self, to: str) -> SwitchoverResult:
        """This host's switchover (with coordination, the admin API posts it to the fleet instead)."""
        result = await run_switchover(self, to)
        await self._rendered(5.0)
        return result

    async def intent(self, intent: Intent, *, confirm_within: float = 5.0) -> tuple[Decision, bool]:
        """An operator's command; returns the decision and whether HAProxy confirmed the weights (and,
        after a move, once the rendered haproxy.cfg says so too: a reload right after cannot undo it)."""
        decision = self.failover.intent(intent)
        confirmed = await self.keeper.wait_confirmed(confirm_within)
        await self._rendered(confirm_within)
        return decision, confirmed

    async def _rendered(self, within: float) -> None:
        task = self._render_task
        if task is not None and not task.done():
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), within)

    def unreplicated_note(self, to: str, lag: float | None) -> str:
        """What an immediate failover to `to` may leave behind: writes not yet replicated into it (`lag`:
        the measured lag into `to` just before the move)."""
        if lag is None:
            return (
                f"replication lag into {to} is not measured: writes acknowledged by the previous region "
                f"shortly before the move may not be in {to} yet (global tables usually replicate within "
                "a second; `ddb-sidecar reconcile` compares the tables)"
            )
        return (
            f"replication lag into {to} was {lag:g} ms at the move: writes acknowledged in the last "
            f"{lag:g} ms before it may not be in {to} (`ddb-sidecar reconcile` finds and repairs them)"
        )

    async def _sweep(self) -> None:
        """Every SWEEP_EVERY: stalled regions (a blackhole under traffic); every second: listener
        connections that idle past HAProxy's keep-alive or trickle a request in."""
        next_expiry = time.monotonic() + 1.0
        last = time.monotonic()
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            now = time.monotonic()
            late = now - last - SWEEP_EVERY
            last = now
            if late < SWEEP_LATE:
                for monitor in self.monitors.values():
                    monitor.sweep(now)
            if now >= next_expiry:
                next_expiry = now + 1.0
                hp = self.config.haproxy
                idle = hp.timeout_client * 2  # HAProxy closes its idle server connections well before
                for conn in list(self._connections):
                    conn.expire(now, idle, hp.timeout_http_request, self.config.proxy.first_byte_timeout)

    # -- the data path's view
    def policy(self) -> DataPathPolicy:
        return self._policy

    def _new_connection(self, runtime: RegionRuntime) -> asyncio.Protocol:
        open_here = self._open_per_listener.get(runtime.name, 0)
        if open_here >= self.connection_cap:
            self.connections_refused += 1
            return RefuseConnection(
                DynamoError(
                    503,
                    "ServiceUnavailable",
                    f"ddb-sidecar: listener {runtime.name} holds its maximum of {self.connection_cap} "
                    "connections (proxy.max_client_connections); the request was NOT sent, it is safe to retry",
                )
            )
        self._open_per_listener[runtime.name] = open_here + 1
        conn = RegionListener(runtime, self._connection_closed)
        self._connections.add(conn)
        return conn

    def _connection_closed(self, conn: RegionListener) -> None:
        if conn in self._connections:
            self._connections.discard(conn)
            name = conn.region.name
            self._open_per_listener[name] = max(0, self._open_per_listener.get(name, 0) - 1)

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("background task %s died: %r", task.get_name(), task.exception())

    def event(self, kind: str, reason: str, **extra: Any) -> None:
        self.events.append(Event(time.time(), kind, reason, tuple(extra.items())))
        logger.info("event %s: %s", kind, reason)

    # -- status
    async def haproxy_weights(self) -> tuple[dict[str, int] | None, str | None]:
        try:
            states = await self.runtime.servers_state(self.config.haproxy.backend)
        except RuntimeUnavailable as exc:
            return None, f"HAProxy runtime socket unavailable: {exc}"
        except Exception as exc:  # a reply we could not parse must not break status
            return None, f"HAProxy runtime API error: {exc}"
        return {name: s.weight for name, s in states.items()}, None

    async def status(self) -> dict[str, Any]:
        weights, weights_error = await self.haproxy_weights()
        regions = []
        for name, runtime in self.regions.items():
            monitor = self.monitors.get(name)
            health = monitor.state if monitor is not None else HealthState()
            latency = monitor.probe_latency if monitor is not None else None
            regions.append(
                {
                    "name": name,
                    "state": health.state,
                    "cause": health.cause,
                    "latency_ms": round(latency * 1000, 2) if latency is not None else None,
                    "weight": weights.get(name) if weights else None,
                    "desired_weight": self.weights.get(name),
                    "suspect": health.suspect,
                    "lag_ms": self.lag_ms(name),
                    "last_ok_at": _iso(health.last_ok_at),
                    "endpoint": self.config.region(name).url,
                    "requests": runtime.stats.total(),
                    "errors": runtime.stats.errors(),
                    "in_flight": runtime.stats.in_flight,
                    "upstream_connections": runtime.pool.size,
                    "health_table_problem": monitor.health_table_problem if monitor is not None else None,
                    **_last_error(runtime.pool, monitor.pool if monitor is not None else None),
                }
            )
        started = self.failover.state is not None
        return {
            "active_region": self.failover.active if started else _desired_active(self.weights),
            "mode": self.failover.mode if started else "automatic",
            "regions": regions,
            # whose table ARNs the gate accepts (None until the health table's ARN told us)
            "account_id": self.config.account_id or self.learned_account,
            "failover": self.failover.status() if started else None,
            "connections": {
                "open": dict(self._open_per_listener),
                "cap_per_listener": self.connection_cap,
                "refused": self.connections_refused,
                "inflight_bytes": self.budget.used,
                "inflight_bytes_limit": self.budget.limit,
                "refused_over_budget": self.budget.refused,
            },
            "haproxy": {
                "managed": self.config.haproxy.manage,
                "pid": self.haproxy.pid if self.haproxy else None,
                "adopted": self.haproxy.adopted if self.haproxy else None,
                "restarts": self.haproxy.restarts if self.haproxy else None,
                "serving_region": _desired_active(weights) if weights else None,
                "weights_confirmed": self.keeper.confirmed,
                "weights_error": weights_error or self.keeper.last_error,
            },
            "replication": self.replication.status(list(self.regions)),
            "fence": {
                "closed": self.fence.closed,
                "held": self.fence.held,
                "held_total": self.fence.held_total,
            },
            "coordination": self.fleet.status()
            if self.fleet is not None
            else {"backend": "none", "state": "off"},
            "events": [e.to_json() for e in reversed(self.events)],
            "uptime_s": round(time.time() - self.started_at, 1),
        }


def remove_stale_socket(path: Path) -> None:
    """Remove a socket file left by a dead process; refuse one a live process still answers on."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(0.5)
        probe.connect(str(path))
    except OSError:
        path.unlink(missing_ok=True)
    else:
        raise OSError(errno.EADDRINUSE, f"{path} is in use by a running process (another ddb-sidecar?)")
    finally:
        probe.close()


def _last_error(*pools: UpstreamPool | None) -> dict[str, str | None]:
    """The most recent upstream error of a region, from app traffic or probes (a region that is down gets
    no app traffic, but the operator still wants to see why)."""
    errors = [
        (p.stats.last_error_at, p.stats.last_error) for p in pools if p is not None and p.stats.last_error
    ]
    if not errors:
        return {"last_upstream_error": None, "last_upstream_error_at": None}
    at, text = max(errors, key=lambda e: e[0] or 0.0)
    return {"last_upstream_error": text, "last_upstream_error_at": _iso(at)}


def _iso(at: float | None) -> str | None:
    return None if at is None else datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _desired_active(weights: dict[str, int]) -> str | None:
    return next((name for name, w in weights.items() if w > 0), None)
