"""The admin API: status, metrics, and the intents behind the mutating CLI commands.

Who may call it: it listens on loopback (or a 0600 unix socket: `admin: unix:PATH`), and refuses what a
web page in the operator's browser could send: any request with an `Origin` header, and any whose `Host`
is not the admin address (DNS rebinding gives a page a loopback IP under its own name). Mutating endpoints
take a JSON body with `Content-Type: application/json` (no simple cross-origin form post), at most
MAX_BODY bytes, and, with `admin.token_file`, `Authorization: Bearer TOKEN` (what the CLI sends).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from sidecar.config import Address, UnixAddress, admin_token
from sidecar.core.controller import FailoverIntent, Intent, Pause, Resume, Switchover
from sidecar.engine import Daemon, remove_stale_socket
from sidecar.fleet.commands import FleetUnavailable
from sidecar.fleet.member import FleetMember
from sidecar.metrics import metrics_registry, render_metrics

logger = logging.getLogger(__name__)

MAX_BODY = 16 * 1024  # the largest command is a few dozen bytes
MAX_REGION_NAME = 64

DAEMON = web.AppKey("daemon", Daemon)
HOSTS = web.AppKey("hosts", frozenset)
TOKEN = web.AppKey("token", str)
REGISTRY = web.AppKey("registry", CollectorRegistry)


async def _status(request: web.Request) -> web.Response:
    return web.json_response(await request.app[DAEMON].status())


async def _metrics(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    return web.Response(body=render_metrics(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


def _error_json(message: str) -> str:
    return json.dumps({"error": message})


async def _read_intent(request: web.Request) -> dict[str, object]:
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(
            text='{"error": "send Content-Type: application/json"}', content_type="application/json"
        )
    try:
        body = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(
            text='{"error": "the body is not JSON"}', content_type="application/json"
        ) from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text='{"error": "expected a JSON object"}', content_type="application/json")
    return body


async def _run_fleet_intent(daemon: Daemon, fleet: FleetMember, intent: Intent) -> web.Response:
    """A command for the whole fleet: posted to the leader through etcd; answered once every live member
    applied the result (or naming those that did not)."""
    lag = daemon.lag_ms(intent.to) if isinstance(intent, FailoverIntent) else None
    try:
        result = await fleet.intent(intent)
    except FleetUnavailable as exc:
        return web.json_response({"ok": False, "refused": True, "reason": str(exc)}, status=503)
    confirmed = await daemon.keeper.wait_confirmed(5.0)
    not_applied = result.get("not_applied") or []
    reason = str(result.get("reason") or "")
    if not_applied:
        reason += f"; not applied yet by {', '.join(not_applied)}"
    doc: dict[str, object] = {
        "ok": bool(result.get("ok")),
        "refused": bool(result.get("refused")),
        "reason": reason,
        "active_region": result.get("active_region", daemon.failover.active),
        "mode": result.get("mode", daemon.failover.mode),
        "epoch": result.get("epoch"),
        "leader": result.get("leader"),
        "not_applied": not_applied,
        "weights_confirmed": confirmed,
        "weights_error": None if confirmed else daemon.keeper.last_error,
    }
    if isinstance(intent, FailoverIntent) and result.get("ok"):
        doc["lag_ms"] = lag
        doc["unreplicated"] = daemon.unreplicated_note(intent.to, lag)
    if isinstance(intent, Switchover):
        for key in ("pause_ms", "held_writes", "lag_ms", "hosts", "not_reported"):
            if key in result:
                doc[key] = result[key]
    return web.json_response(doc, status=409 if result.get("refused") else 200)


async def _run_intent(request: web.Request, intent: Intent, *, local: bool = False) -> web.Response:
    daemon = request.app[DAEMON]
    if daemon.fleet is not None and not local:
        return await _run_fleet_intent(daemon, daemon.fleet, intent)
    warning = None
    if daemon.fleet is not None and isinstance(intent, FailoverIntent):
        if intent.to not in daemon.regions:
            raise web.HTTPBadRequest(
                text=_error_json(f"no region {intent.to!r} (configured: {', '.join(daemon.regions)})"),
                content_type="application/json",
            )
        warning = daemon.fleet.break_glass(intent.to)
        daemon.event("local-failover", warning, to=intent.to)
    lag = daemon.lag_ms(intent.to) if isinstance(intent, FailoverIntent) else None
    decision, confirmed = await daemon.intent(intent)
    state = decision.state
    doc = {
        "ok": not decision.refused,
        "refused": decision.refused,
        "reason": decision.reason,
        "active_region": state.active,
        "mode": daemon.failover.mode,
        "weights_confirmed": confirmed,
        "weights_error": None if confirmed else daemon.keeper.last_error,
    }
    if isinstance(intent, FailoverIntent) and not decision.refused:
        doc["lag_ms"] = lag
        doc["unreplicated"] = daemon.unreplicated_note(intent.to, lag)
    if warning is not None:
        doc["warning"] = warning
    return web.json_response(doc, status=409 if decision.refused else 200)


def _region(request: web.Request, body: dict[str, object], command: str) -> str:
    """The `to` of a command, refused unless it names a configured region (before anything is built from
    it: an unknown name is never logged, recorded or echoed whole)."""
    to = body.get("to")
    if not isinstance(to, str) or not to:
        raise web.HTTPBadRequest(
            text=_error_json('expected {"to": "REGION"}'), content_type="application/json"
        )
    regions = request.app[DAEMON].regions
    if to not in regions:
        shown = to[:MAX_REGION_NAME].encode("unicode_escape").decode("ascii")
        reason = (
            f"refused {command} to {shown}{'...' if len(to) > MAX_REGION_NAME else ''}: no such region "
            f"(configured: {', '.join(regions)}); nothing changed"
        )
        # 409 like every refused command (the CLI exits 1); the name is never logged nor recorded
        raise web.HTTPConflict(
            text=json.dumps({"ok": False, "refused": True, "reason": reason, "error": reason}),
            content_type="application/json",
        )
    return to


async def _failover(request: web.Request) -> web.Response:
    body = await _read_intent(request)
    to = _region(request, body, "failover")
    return await _run_intent(request, FailoverIntent(to), local=body.get("local") is True)


async def _switchover(request: web.Request) -> web.Response:
    body = await _read_intent(request)
    to = _region(request, body, "switchover")
    daemon = request.app[DAEMON]
    if daemon.fleet is not None:
        # every member's fence, closed before the flip and opened after it (sidecar/fleet/switchover.py)
        return await _run_fleet_intent(daemon, daemon.fleet, Switchover(to))
    result = await daemon.switchover(to)
    doc = result.to_json()
    doc["mode"] = daemon.failover.mode
    return web.json_response(doc, status=200 if result.ok else 409)


async def _pause(request: web.Request) -> web.Response:
    await _read_intent(request)
    return await _run_intent(request, Pause())


async def _resume(request: web.Request) -> web.Response:
    await _read_intent(request)
    return await _run_intent(request, Resume())


async def _alive(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


def allowed_hosts(address: Address | UnixAddress) -> frozenset[str]:
    """The `Host` values the admin API answers: its own address, under the loopback names."""
    if isinstance(address, UnixAddress):
        return frozenset({"localhost", "127.0.0.1"})
    port = address.port
    names = {str(address), f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"}
    return frozenset(names)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _only_local_callers(request: web.Request, handler: Handler) -> web.StreamResponse:
    if "Origin" in request.headers:
        return _refused(
            403, "requests from web pages (with an Origin header) are refused; use the ddb-sidecar CLI"
        )
    host = request.headers.get("Host", "")
    if host.lower() not in request.app[HOSTS]:
        return _refused(
            403,
            "the Host header does not name this admin API (a page reaching it through DNS rebinding?); "
            "call it as the ddb-sidecar CLI does",
        )
    token = request.app[TOKEN]
    if token and request.method != "GET":
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return _refused(
                401, "this admin API needs its token (admin.token_file); the ddb-sidecar CLI sends it"
            )
    return await handler(request)


def _refused(status: int, message: str) -> web.Response:
    return web.json_response({"ok": False, "refused": True, "error": message}, status=status)


def admin_app(daemon: Daemon) -> web.Application:
    app = web.Application(middlewares=[_only_local_callers], client_max_size=MAX_BODY)
    app[DAEMON] = daemon
    app[HOSTS] = allowed_hosts(daemon.config.admin)
    app[TOKEN] = admin_token(daemon.config) or ""
    app[REGISTRY] = metrics_registry(daemon)
    app.router.add_get("/status", _status)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/alive", _alive)
    app.router.add_post("/failover", _failover)
    app.router.add_post("/switchover", _switchover)
    app.router.add_post("/pause", _pause)
    app.router.add_post("/resume", _resume)
    return app


async def start_admin(daemon: Daemon) -> web.AppRunner:
    runner = web.AppRunner(admin_app(daemon), access_log=None, handle_signals=False)
    await runner.setup()
    address = daemon.config.admin
    site: web.BaseSite
    if isinstance(address, UnixAddress):
        address.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_socket(address.path)  # an earlier run's; refused if a live sidecar answers on it
        old = os.umask(0o177)  # created 0600: only this user may drive the sidecar
        try:
            site = web.UnixSite(runner, str(address.path))
            await site.start()
        finally:
            os.umask(old)
        os.chmod(address.path, 0o600)
    else:
        site = web.TCPSite(runner, address.host, address.port, reuse_address=True)
        await site.start()
    logger.info("admin API on %s", address)
    return runner
