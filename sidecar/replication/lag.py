"""This host's view of replication: the lag into each region and whether a switchover's fence has crossed.

Two sources, by `replication.mode`: heartbeats (`sidecar.heartbeat`, Global Tables replicating them), or the
sidecar's own stream replicator (`streams`). In a fleet, one figure for everyone: the leader measures, the
others report what it published (`FleetContext.leader_lag_ms`); in streams mode only the leader replicates,
its checkpoints in etcd (`sidecar.fleet.checkpoints`), so leadership starts and stops the replicator here.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sidecar.config import Config
from sidecar.fleet.checkpoints import etcd_checkpoints
from sidecar.heartbeat import Heartbeats
from sidecar.replication.clients import CredentialsLike
from sidecar.replication.streams import StreamReplicator

if TYPE_CHECKING:
    from sidecar.fleet.context import FleetContext

logger = logging.getLogger(__name__)


class Replication:
    def __init__(
        self,
        config: Callable[[], Config],
        heartbeats: Heartbeats,
        credentials: Callable[[], CredentialsLike] | None,
        *,
        active: Callable[[], str | None],
        record: Callable[..., None],
        notify: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self._config = config
        self.heartbeats = heartbeats
        self._credentials = credentials
        self._active = active
        self._record = record
        self._notify = notify
        self.replicator: StreamReplicator | None = None
        self.fleet: FleetContext | None = None
        self._lock = asyncio.Lock()

    @property
    def streams(self) -> bool:
        return self._config().replication.mode == "streams"

    def _new_replicator(self, source: str, state_dir: Path) -> StreamReplicator:
        checkpoints = None
        if self.fleet is not None:
            checkpoints = etcd_checkpoints(self.fleet)
        return StreamReplicator(
            self._config,
            self._credentials,
            state_dir,
            source_region=source,
            checkpoints=checkpoints,
            on_dead_letter=self._dead_letter,
        )

    def _dead_letter(self, message: str) -> None:
        self._record("alert", message, alert="replication-dead-letter")
        if self._notify is not None:
            self._notify(
                {
                    "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "kind": "alert",
                    "alert": "replication-dead-letter",
                    "reason": message,
                    "active_region": self._active(),
                }
            )

    # -- lifecycle
    async def start(self, fleet: FleetContext | None) -> None:
        """A lone sidecar in streams mode replicates at once; a fleet member only once it leads."""
        self.fleet = fleet
        active = self._active()
        if self.streams and fleet is None and active is not None:
            self.replicator = self._new_replicator(active, self._config().state_dir)
            await self.replicator.start()

    async def stop(self) -> None:
        replicator, self.replicator = self.replicator, None
        if replicator is not None:
            await replicator.stop()

    async def source_moved(self, to: str) -> None:
        """Traffic moved: replication now runs from the new active region (its own checkpoints)."""
        if self.replicator is not None:
            await self.replicator.set_source(to)

    async def leadership_changed(self) -> None:
        """Streams mode in a fleet: exactly one replicator, the leader's (started when it takes the lead,
        stopped when it loses it, also while etcd is lost: its checkpoints could not be kept)."""
        if not self.streams:
            return
        async with self._lock:
            leading = self.fleet is not None and self.fleet.is_leader
            active = self._active()
            if leading and self.replicator is None and active is not None:
                self.replicator = self._new_replicator(active, self._config().state_dir)
                await self.replicator.start()
                self._record("replicator", f"this host leads the fleet: replicating from {active}")
            elif not leading and self.replicator is not None:
                await self.stop()
                self._record("replicator", "this host no longer leads the fleet: its replicator stopped")

    # -- what is measured
    def lag_ms(self, region: str) -> float | None:
        """Replication lag from the active region into `region`: the stream replicator's own account in
        `streams` mode, heartbeats otherwise (None: unmeasured, or `region` is the active one). In a fleet,
        the leader's figure."""
        if self.fleet is not None and not self.fleet.is_leader:
            return self.fleet.leader_lag_ms(region)
        replicator = self.replicator
        if replicator is not None:
            active = self._active()
            if region == active or replicator.source_region != active:
                return None
            return replicator.lag_ms().get(region)
        if self.streams and self.fleet is not None:
            return None  # the leader's replicator is not running yet
        return self.heartbeats.lag_ms(region)

    def max_lag_ms(self, regions: list[str]) -> float | None:
        active = self._active()
        lags = [self.lag_ms(r) for r in regions if r != active]
        known = [lag for lag in lags if lag is not None]
        return max(known) if known and len(known) == len(lags) else None

    async def caught_up(self, source: str, target: str, since: float, deadline: float) -> bool:
        """Has everything written to `source` up to `since` (monotonic) reached `target`? Heartbeats: a fence
        heartbeat seen in the target. Streams: the replicator's reads of every shard came back empty and
        nothing read is unapplied, twice, more than two polls after `since`."""
        loop = asyncio.get_running_loop()
        replicator = self.replicator
        if replicator is None:
            if self.streams:
                return False  # no replicator here (a fleet member that does not lead): nothing to wait on
            return await self.heartbeats.fence_visible(source, target, uuid.uuid4().hex, deadline)
        settle = 2 * self._config().replication.poll_interval
        good = 0
        while loop.time() < deadline:
            if time.monotonic() - since > settle and replicator.source_region == source:
                lag = replicator.lag_ms().get(target)
                good = good + 1 if lag == 0 and replicator.iterator_age_s == 0 else 0
                if good >= 2:
                    return True
            await asyncio.sleep(0.02)
        return False

    def status(self, regions: list[str]) -> dict[str, Any]:
        return {
            "mode": self._config().replication.mode,
            "lag_ms": self.max_lag_ms(regions),
            "replicator": self.replicator.status() if self.replicator is not None else None,
            "heartbeats_written": self.heartbeats.written,
            "heartbeat_error": self.heartbeats.last_error,
        }
