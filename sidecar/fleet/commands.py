"""Operators' commands to the fleet: posted by any member under P/intents/ID, decided by the leader (which
deletes the intent), answered in P/results/ID; the poster returns once every live member has applied the
decision's epoch, or says which have not. A switchover is decided by `run_fleet_switchover`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson

from sidecar.core.controller import Intent, Switchover
from sidecar.fleet.etcd import EtcdError
from sidecar.fleet.records import intent_from_json, intent_to_json, read_json
from sidecar.fleet.switchover import run_fleet_switchover

if TYPE_CHECKING:
    from sidecar.fleet.context import FleetContext

logger = logging.getLogger(__name__)

INTENT_TIMEOUT = 10.0


class FleetUnavailable(Exception):
    """The fleet cannot take a command now (etcd lost, no leader, no answer in time); the message says what
    to do instead."""


class Commands:
    def __init__(self, member: FleetContext) -> None:
        self.member = member
        self._results: dict[str, asyncio.Future[dict[str, Any]]] = {}

    def answered(self, ident: str, raw: bytes) -> None:
        """P/results/ID arrived: the answer to a command this member posted (or another's: ignored)."""
        future = self._results.get(ident)
        data = read_json(raw)
        if future is not None and not future.done() and data is not None:
            future.set_result(data)

    async def post(self, intent: Intent, timeout: float | None = None) -> dict[str, Any]:  # noqa: ASYNC109
        """Post an operator's command to the leader; return its result once every live member has applied it
        (or say which did not). A switchover may take its whole timeout before the leader answers."""
        m = self.member
        if timeout is None:
            timeout = INTENT_TIMEOUT
            if isinstance(intent, Switchover):
                timeout += m.config.failover.switchover_timeout
        if m.state != "connected":
            raise FleetUnavailable(
                f"coordination is {m.state} ({m.last_error or 'etcd unreachable'}): the fleet cannot take "
                "commands now; `--local` acts on this host alone (the fleet's decision wins when etcd is back)"
            )
        ident = uuid.uuid4().hex
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._results[ident] = future
        try:
            body = {**intent_to_json(intent), "from": m.host, "at": time.time()}
            try:
                await m.client.put(m.key("intents", ident), orjson.dumps(body), lease=m.lease)
            except (EtcdError, OSError, TimeoutError) as exc:
                raise FleetUnavailable(
                    f"could not post the command to the fleet ({exc}); nothing changed. Retry, or use `--local` "
                    "to act on this host alone"
                ) from None
            try:
                result = await asyncio.wait_for(future, timeout)
            except TimeoutError:
                raise FleetUnavailable(
                    f"no answer from the fleet's leader ({m.leader or 'none'}) within {timeout:g} s; "
                    "nothing is known to have changed"
                ) from None
        finally:
            self._results.pop(ident, None)
        with contextlib.suppress(EtcdError, OSError, TimeoutError):
            await m.client.delete(m.key("results", ident))
        result["not_applied"] = await self._wait_applied(int(result.get("epoch", 0)), timeout)
        return result

    async def _wait_applied(self, epoch: int, timeout: float) -> list[str]:  # noqa: ASYNC109
        m = self.member
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            behind = sorted(
                host for host, rec in m.members.items() if int(rec.get("applied_epoch", 0) or 0) < epoch
            )
            if not behind or loop.time() >= deadline:
                return behind
            await asyncio.sleep(0.02)

    async def decide(self, ident: str, data: Mapping[str, Any]) -> None:
        """As leader: decide a posted command and answer it."""
        m = self.member
        controller = m.controller
        if controller is None:
            return
        try:
            intent = intent_from_json(data)
        except ValueError as exc:
            answer: dict[str, Any] = {"ok": False, "refused": True, "reason": str(exc), "epoch": m.epoch}
        else:
            if isinstance(intent, Switchover):
                answer = await run_fleet_switchover(m, intent.to, failback=intent.failback)
                await self._answer(ident, answer)
                return
            decision = controller.intent(intent)
            await m.decision_published()
            answer = {
                "ok": not decision.refused,
                "refused": decision.refused,
                "reason": decision.reason,
                "epoch": m.epoch,
                "active_region": decision.state.active,
                "mode": controller.mode,
                "leader": m.host,
            }
        await self._answer(ident, answer)

    async def _answer(self, ident: str, answer: Mapping[str, Any]) -> None:
        m = self.member
        try:
            await m.client.put(m.key("results", ident), orjson.dumps(answer), lease=m.lease)
            await m.client.delete(m.key("intents", ident))
        except (EtcdError, OSError, TimeoutError) as exc:
            logger.warning("fleet: could not answer command %s: %s", ident, exc)
