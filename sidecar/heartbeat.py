"""Replication lag, measured: a heartbeat item written in the active region and read in the others.

The sidecar writes `heartbeat#ACTIVE#HOST` (in `health.table`) in the active region every
`health.heartbeat_interval`, with the wall-clock time of the write and a sequence number, and reads that item
in every other region four times per interval (consistent reads). When a region first shows a new sequence
number, `seen - written` is a lag sample (true lag <= sample <= true lag + the read interval). Between
samples the lag reported is never less than the age of the newest heartbeat a region shows minus one write
interval, so a replication that stalls is seen growing, not frozen at its last sample.

The key names the host too: several sidecars (one per app server) each measure with their own clock, so
clocks never mix. The same item carries the switchover fence (`fence_visible`): a token written after the
writes are held, and awaited in the target region.

Caveat (documented in docs/architecture.md): DynamoDB replicates per item and orders per partition, not
across the table; a heartbeat that arrived says replication has caught up to that moment for its
partition, and is the best proxy DynamoDB offers. `ddb-sidecar reconcile` checks the rest.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from sidecar.config import Config
from sidecar.monitor import RegionMonitor
from sidecar.proxy.upstream import UpstreamError, UpstreamResponse

logger = logging.getLogger(__name__)

GET = "DynamoDB_20120810.GetItem"
PUT = "DynamoDB_20120810.PutItem"
FENCE_POLL = 0.02


def heartbeat_key(source: str, host: str) -> dict[str, Any]:
    return {"pk": {"S": f"heartbeat#{source}#{host}"}}


@dataclass
class LagEstimate:
    """One target region's lag behind the source, from the heartbeats it shows."""

    source: str = ""
    seq: int = 0  # newest heartbeat seen in the target
    written_at: float | None = None  # its write time (wall clock, s)
    sample_ms: float | None = None  # seen - written when it first appeared

    def observe(self, source: str, seq: int, written_at: float, now: float) -> None:
        if source != self.source:  # the active region changed: start over
            self.source, self.seq, self.written_at, self.sample_ms = source, 0, None, None
        if seq > self.seq or (seq < self.seq and written_at > (self.written_at or 0)):
            # a new heartbeat (or a restarted writer whose counter began again)
            self.seq, self.written_at = seq, written_at
            self.sample_ms = max(0.0, (now - written_at) * 1000)

    def lag_ms(self, now: float, interval: float) -> float | None:
        if self.written_at is None or self.sample_ms is None:
            return None
        stale = (now - self.written_at - interval) * 1000  # no newer heartbeat although one was due
        return round(max(self.sample_ms, stale), 1)


class Heartbeats:
    """Writes the active region's heartbeat and estimates every other region's lag behind it."""

    def __init__(
        self,
        config: Callable[[], Config],
        monitors: Mapping[str, RegionMonitor],
        active: Callable[[], str | None],
        *,
        host: str | None = None,
    ) -> None:
        self._config = config
        self.monitors = monitors
        self._active = active
        self.host = host or socket.gethostname()
        self.estimates: dict[str, LagEstimate] = {}  # per target region (monitors are filled in later)
        self.seq = int(time.time() * 1000)  # grows across restarts without a stored counter
        self.written = 0
        self.errors = 0
        self.last_error: str | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def enabled(self) -> bool:
        # streams mode: the sidecar's own replicator measures its lag (heartbeats are not replicated)
        return self._config().replication.mode == "global-tables" and len(self.monitors) > 1

    def lag_ms(self, region: str) -> float | None:
        """The lag from the active region into `region` (None: unmeasured, or `region` is the active one)."""
        active = self._active()
        est = self.estimates.get(region)
        if not self.enabled or region == active or est is None:
            return None
        if est.source != active:
            return None
        return est.lag_ms(time.time(), self._config().health.heartbeat_interval)

    def max_lag_ms(self) -> float | None:
        lags = [self.lag_ms(r) for r in self.monitors if r != self._active()]
        known = [lag for lag in lags if lag is not None]
        return max(known) if len(known) == len(lags) and known else None

    # -- the loop
    async def run(self) -> None:
        next_write = 0.0
        while True:
            cfg = self._config()
            interval = cfg.health.heartbeat_interval
            active = self._active()
            if self.enabled and active is not None:
                now = time.time()
                if now >= next_write:
                    next_write = now + interval
                    self._background(self._write(active, None))
                for name in self.monitors:
                    if name != active:
                        self._background(self._read(name, active))
            await asyncio.sleep(interval / 4)

    async def _write(self, source: str, fence: str | None) -> bool:
        self.seq += 1
        item = {
            **heartbeat_key(source, self.host),
            "at": {"N": f"{time.time():.6f}"},
            "seq": {"N": str(self.seq)},
            "source": {"S": source},
        }
        if fence is not None:
            item["fence"] = {"S": fence}
        body = {"TableName": self._config().health.table, "Item": item}
        status, answer = await self._call(source, PUT, body, idempotent=False)
        if status == 200:
            self.written += 1
            return True
        self._failed(f"heartbeat write to {source}: HTTP {status} {answer[:200].decode('utf-8', 'replace')}")
        return False

    async def _read(self, region: str, source: str) -> dict[str, Any] | None:
        body = {
            "TableName": self._config().health.table,
            "Key": heartbeat_key(source, self.host),
            "ConsistentRead": True,
        }
        status, answer = await self._call(region, GET, body, idempotent=True)
        if status != 200:
            self._failed(
                f"heartbeat read in {region}: HTTP {status} {answer[:200].decode('utf-8', 'replace')}"
            )
            return None
        try:
            item = orjson.loads(answer).get("Item")
            if not item:
                return None
            seq, at = int(item["seq"]["N"]), float(item["at"]["N"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            self._failed(f"heartbeat read in {region}: unexpected item")
            return None
        self.estimates.setdefault(region, LagEstimate()).observe(source, seq, at, time.time())
        return dict(item)

    async def fence_visible(self, source: str, target: str, token: str, deadline: float) -> bool:
        """Write a fence heartbeat carrying `token` in `source`; True once `target` shows it (monotonic
        `deadline`)."""
        loop = asyncio.get_running_loop()
        while not await self._write(source, token):
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(FENCE_POLL)
        while loop.time() < deadline:
            item = await self._read(target, source)
            if item is not None and item.get("fence", {}).get("S") == token:
                return True
            await asyncio.sleep(FENCE_POLL)
        return False

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._failed(f"heartbeat: {task.exception()!r}")

    def _failed(self, text: str) -> None:
        self.errors += 1
        if self.last_error != text:
            logger.warning("%s", text)
        self.last_error = text

    async def _call(
        self, region: str, target: str, body: dict[str, Any], *, idempotent: bool
    ) -> tuple[int, bytes]:
        """One signed request on the region's probe pool (never queued behind app traffic)."""
        monitor = self.monitors[region]
        runtime = monitor.runtime
        data = orjson.dumps(body)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[tuple[int, bytes]] = loop.create_future()

        def reply(response: UpstreamResponse | None, error: UpstreamError | None) -> None:
            if done.done():
                return
            if response is not None:
                done.set_result((response.status, response.body))
            else:
                done.set_result((0, str(error).encode()))

        try:
            head = runtime.signer.request_head(runtime.credentials(), target, data, time.time())
        except Exception as exc:  # credentials unusable
            return 0, f"cannot sign: {type(exc).__name__}".encode()
        monitor.pool.send(head + data, reply, idempotent=idempotent)
        return await done
