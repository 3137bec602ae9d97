"""The daemon: builds the data path from the config, runs probes and HAProxy, owns all runtime state.

The region listeners and upstream pools do the per-request work; this module wires them, feeds probe
results through the pure health classification in `sidecar.core.health`, supervises HAProxy when
`haproxy.manage` is true, and exposes a snapshot for the admin API.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from sidecar.config import Address, Config, UnixAddress
from sidecar.core.gate import GatePolicy
from sidecar.core.health import (
    Cause,
    HealthState,
    ProbeOutcome,
    classify_failure,
    classify_response,
    error_code,
    observe,
)
from sidecar.haproxy.binary import find_haproxy
from sidecar.haproxy.process import HAProxyProcess
from sidecar.haproxy.render import render_to_file
from sidecar.haproxy.runtime import RuntimeClient, RuntimeUnavailable
from sidecar.proxy.credentials import CredentialSource
from sidecar.proxy.listener import DataPathPolicy, RegionListener, RegionRuntime
from sidecar.proxy.sigv4 import ClientVerifier, DynamoDBRequestSigner
from sidecar.proxy.upstream import Endpoint, UpstreamError, UpstreamPool, UpstreamResponse

logger = logging.getLogger(__name__)

PROBE_TARGET = "DynamoDB_20120810.GetItem"
HOME_WEIGHT = 100


def canary_key(region: str) -> dict[str, Any]:
    """Each region probes its own item, so replicated probe writes never conflict."""
    return {"pk": {"S": f"canary#{region}"}}


def initial_weights(config: Config) -> dict[str, int]:
    return {r.name: (HOME_WEIGHT if i == 0 else 0) for i, r in enumerate(config.regions)}


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


def data_path_policy(config: Config) -> DataPathPolicy:
    gate = GatePolicy(
        tables=frozenset(config.tables),
        allow_control_plane=config.proxy.allow_control_plane,
        max_body_bytes=config.proxy.max_body_bytes,
    )
    verifier = ClientVerifier(config.client_secrets()) if config.clients else None
    return DataPathPolicy(gate=gate, verifier=verifier)


class _ProbeRegion:
    """The health prober's own signer and pool for a region: probes never queue behind app traffic."""

    def __init__(self, runtime: RegionRuntime, pool: UpstreamPool) -> None:
        self.runtime = runtime
        self.pool = pool
        self.state = HealthState()


class Daemon:
    """Everything `ddb-sidecar run` runs; start(), then wait on `stopped`, then stop()."""

    def __init__(self, config: Config, *, credentials: CredentialSource | None = None) -> None:
        self.config = config
        self.started_at = time.time()
        self.credentials = credentials or CredentialSource()
        self._policy = data_path_policy(config)
        self.regions: dict[str, RegionRuntime] = {}
        self._probe: dict[str, _ProbeRegion] = {}
        self._servers: list[asyncio.Server] = []
        self._connections: set[RegionListener] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.events: deque[Event] = deque(maxlen=100)
        self.haproxy: HAProxyProcess | None = None
        self.runtime = RuntimeClient(str(config.haproxy.runtime_socket))
        self.weights = initial_weights(config)
        self.stopped = asyncio.Event()

    # -- lifecycle
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await self.credentials.start()
        cfg = self.config
        for region in cfg.regions:
            endpoint = Endpoint.parse(region.url)
            signer = DynamoDBRequestSigner(region.name, endpoint.host_header)
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
            self.regions[region.name] = runtime
            probe_pool = UpstreamPool(
                endpoint,
                loop=loop,
                connect_timeout=min(cfg.proxy.connect_timeout, cfg.health.timeout),
                request_timeout=cfg.health.timeout,
                max_connections=2,
                idle_timeout=cfg.proxy.idle_timeout,
                name=f"{region.name}-probe",
            )
            self._probe[region.name] = _ProbeRegion(runtime, probe_pool)
        try:
            for region in cfg.regions:
                runtime = self.regions[region.name]
                server = await self._listen(region.proxy, runtime)
                self._servers.append(server)
                logger.info("region %s: listening on %s, upstream %s", region.name, region.proxy, region.url)
            for name, probe in self._probe.items():
                self._spawn(self._probe_loop(probe), f"probe-{name}")
            self._spawn(self._expire_connections(), "listener-connection-sweeper")
            if cfg.haproxy.manage:
                await self._start_haproxy()
        except BaseException:
            await self.stop()
            raise
        self.event("start", f"ddb-sidecar started; home region {cfg.home.name}")

    async def _listen(self, where: Address | UnixAddress, runtime: RegionRuntime) -> asyncio.Server:
        loop = asyncio.get_running_loop()

        def factory() -> RegionListener:
            return self._new_connection(runtime)

        if isinstance(where, UnixAddress):
            path = where.path
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_socket():
                _remove_stale_socket(path)
            server = await loop.create_unix_server(factory, str(path), backlog=1024)
            path.chmod(0o600)  # HAProxy runs as our user; nobody else may sign with our credentials
            return server
        return await loop.create_server(factory, where.host, where.port, reuse_address=True, backlog=1024)

    async def _start_haproxy(self) -> None:
        cfg = self.config
        binary = find_haproxy(cfg.haproxy.binary)
        result = render_to_file(cfg, weights=self.weights, binary=binary)
        logger.info("haproxy config %s (%s)", result.path, "written" if result.changed else "unchanged")
        self.haproxy = HAProxyProcess(
            binary,
            cfg.haproxy.config,
            cfg.haproxy.master_socket,
            log_path=cfg.state_dir / "haproxy.log",
            runtime_socket=cfg.haproxy.runtime_socket,
        )
        await self.haproxy.start()
        logger.info("haproxy started (pid %s), stable address %s", self.haproxy.pid, cfg.listen)

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.haproxy is not None:
            await self.haproxy.stop()
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
        for probe in self._probe.values():
            await probe.pool.close()
        await self.credentials.close()
        self.stopped.set()

    def request_stop(self) -> None:
        self.stopped.set()

    def reload(self, config: Config) -> list[str]:
        """Apply a changed config; return what needs a restart to take effect."""
        needs_restart = []
        old = self.config
        if [(r.name, r.proxy, r.url) for r in config.regions] != [
            (r.name, r.proxy, r.url) for r in old.regions
        ]:
            needs_restart.append("regions")
        for key in ("listen", "admin", "haproxy", "state_dir"):
            if getattr(config, key) != getattr(old, key):
                needs_restart.append(key)
        self._policy = data_path_policy(config)
        self.config = config.model_copy(update={k: getattr(old, k) for k in needs_restart})
        for probe in self._probe.values():
            probe.pool.request_timeout = self.config.health.timeout
        self.event(
            "reload",
            "config reloaded" + (f"; restart to apply {', '.join(needs_restart)}" if needs_restart else ""),
        )
        return needs_restart

    # -- the data path's view
    def policy(self) -> DataPathPolicy:
        return self._policy

    def _new_connection(self, runtime: RegionRuntime) -> RegionListener:
        conn = RegionListener(runtime, self._connections.discard)
        self._connections.add(conn)
        return conn

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("background task %s died: %r", task.get_name(), task.exception())

    def event(self, kind: str, reason: str, **extra: Any) -> None:
        self.events.append(Event(time.time(), kind, reason, tuple(extra.items())))
        logger.info("event %s: %s", kind, reason)

    async def _expire_connections(self) -> None:
        """Close listener connections that idle past HAProxy's keep-alive or trickle a request in."""
        hp = self.config.haproxy
        idle = hp.timeout_client * 2  # HAProxy closes its own idle server connections well before this
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for conn in list(self._connections):
                conn.expire(now, idle, hp.timeout_http_request)

    # -- probes
    async def _probe_loop(self, probe: _ProbeRegion) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            outcome = await self._probe_once(probe)
            self._record_probe(probe, outcome)
            interval = self.config.health.interval  # read each time: SIGHUP may change it
            next_at += interval
            now = loop.time()
            if next_at < now:  # a slow probe: skip the missed slots rather than bursting
                next_at = now + interval
            await asyncio.sleep(next_at - now)

    async def _probe_once(self, probe: _ProbeRegion) -> ProbeOutcome:
        cfg = self.config
        runtime = probe.runtime
        body = orjson.dumps(
            {"TableName": cfg.health.table, "Key": canary_key(runtime.name), "ConsistentRead": True}
        )
        loop = asyncio.get_running_loop()
        done: asyncio.Future[tuple[UpstreamResponse | None, UpstreamError | None]] = loop.create_future()

        def reply(response: UpstreamResponse | None, error: UpstreamError | None) -> None:
            if not done.done():
                done.set_result((response, error))

        started = time.monotonic()
        try:
            head = runtime.signer.request_head(runtime.credentials(), PROBE_TARGET, body, time.time())
        except Exception as exc:  # credentials unusable: not the region's fault
            return ProbeOutcome(Cause.AUTH, f"cannot sign the probe: {type(exc).__name__}")
        probe.pool.send(head + body, reply, idempotent=True)
        response, error = await done
        latency = time.monotonic() - started
        if error is not None:
            return classify_failure(error.kind, error.detail)
        assert response is not None
        return classify_response(
            response.status, error_code(response.status, response.body), latency, cfg.health.slow
        )

    def _record_probe(self, probe: _ProbeRegion, outcome: ProbeOutcome) -> None:
        before = probe.state
        probe.state = observe(before, outcome, fall=self.config.health.fall, rise=self.config.health.rise)
        health = probe.runtime.health
        health.state = probe.state.state
        health.cause = probe.state.cause
        health.latency_ms = round(outcome.latency * 1000, 2) if outcome.latency is not None else None
        health.checked_at = time.time()
        if before.state != probe.state.state:
            self.event(
                "region-" + probe.state.state,
                f"{probe.runtime.name} {probe.state.state}"
                + (f": {probe.state.cause}" if probe.state.cause else ""),
                region=probe.runtime.name,
            )

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
        active = None
        if weights:
            active = next((name for name, w in weights.items() if w > 0), None)
        regions = []
        for name, runtime in self.regions.items():
            health = runtime.health
            regions.append(
                {
                    "name": name,
                    "state": health.state,
                    "cause": health.cause,
                    "latency_ms": health.latency_ms,
                    "weight": weights.get(name) if weights else None,
                    "desired_weight": self.weights.get(name),
                    "endpoint": self.config.region(name).url,
                    "requests": runtime.stats.total(),
                    "errors": runtime.stats.errors(),
                    "upstream_connections": runtime.pool.size,
                    "last_upstream_error": runtime.pool.stats.last_error,
                    "last_upstream_error_at": _iso(runtime.pool.stats.last_error_at),
                }
            )
        return {
            "active_region": active if weights is not None else _desired_active(self.weights),
            "mode": "automatic" if self.config.failover.automatic else "paused",
            "regions": regions,
            "haproxy": {
                "managed": self.config.haproxy.manage,
                "pid": self.haproxy.pid if self.haproxy else None,
                "restarts": self.haproxy.restarts if self.haproxy else None,
                "weights_error": weights_error,
            },
            "replication": {"mode": self.config.replication.mode, "lag_ms": None},
            "events": [e.to_json() for e in reversed(self.events)],
            "uptime_s": round(time.time() - self.started_at, 1),
        }


def _remove_stale_socket(path: Path) -> None:
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


def _iso(at: float | None) -> str | None:
    return None if at is None else datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _desired_active(weights: dict[str, int]) -> str | None:
    return next((name for name, w in weights.items() if w > 0), None)
