"""The admin API: status, metrics, and (later) the intents behind the mutating CLI commands."""

from __future__ import annotations

import logging

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from sidecar.engine import Daemon
from sidecar.metrics import metrics_registry, render_metrics

logger = logging.getLogger(__name__)

DAEMON = web.AppKey("daemon", Daemon)
REGISTRY = web.AppKey("registry", CollectorRegistry)


async def _status(request: web.Request) -> web.Response:
    return web.json_response(await request.app[DAEMON].status())


async def _metrics(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    return web.Response(body=render_metrics(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _alive(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


def admin_app(daemon: Daemon) -> web.Application:
    app = web.Application()
    app[DAEMON] = daemon
    app[REGISTRY] = metrics_registry(daemon)
    app.router.add_get("/status", _status)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/alive", _alive)
    return app


async def start_admin(daemon: Daemon) -> web.AppRunner:
    runner = web.AppRunner(admin_app(daemon), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, daemon.config.admin.host, daemon.config.admin.port, reuse_address=True)
    await site.start()
    logger.info("admin API on http://%s", daemon.config.admin)
    return runner
