"""The admin API: status, metrics, and the intents behind the mutating CLI commands.

Mutating endpoints take a JSON body with `Content-Type: application/json`: a web page the operator happens
to have open cannot send that cross-origin without a preflight, so it cannot move traffic (the API
listens on loopback only).
"""

from __future__ import annotations

import json
import logging

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from sidecar.core.controller import FailoverIntent, Intent, Pause, Resume, Switchover
from sidecar.engine import Daemon
from sidecar.fleet.commands import FleetUnavailable
from sidecar.fleet.member import FleetMember
from sidecar.metrics import metrics_registry, render_metrics

logger = logging.getLogger(__name__)

DAEMON = web.AppKey("daemon", Daemon)
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


async def _failover(request: web.Request) -> web.Response:
    body = await _read_intent(request)
    to = body.get("to")
    if not isinstance(to, str) or not to:
        raise web.HTTPBadRequest(
            text=_error_json('expected {"to": "REGION"}'), content_type="application/json"
        )
    return await _run_intent(request, FailoverIntent(to), local=body.get("local") is True)


async def _switchover(request: web.Request) -> web.Response:
    body = await _read_intent(request)
    to = body.get("to")
    if not isinstance(to, str) or not to:
        raise web.HTTPBadRequest(
            text=_error_json('expected {"to": "REGION"}'), content_type="application/json"
        )
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


def admin_app(daemon: Daemon) -> web.Application:
    app = web.Application()
    app[DAEMON] = daemon
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
    site = web.TCPSite(runner, daemon.config.admin.host, daemon.config.admin.port, reuse_address=True)
    await site.start()
    logger.info("admin API on http://%s", daemon.config.admin)
    return runner
