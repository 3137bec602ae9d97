"""What the fleet's parts use of their member (`FleetMember`): the seam that keeps commands, the fleet
switchover and the replicator's checkpoints apart from the member that owns the etcd session."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, Protocol

from sidecar.config import Config
from sidecar.core.controller import Decision, Intent
from sidecar.core.vote import FleetVote
from sidecar.failover import Failover
from sidecar.fleet.acks import FenceAcks
from sidecar.fleet.etcd import EtcdClient


class FleetContext(Protocol):
    host: str
    state: str  # connected | lost | connecting
    last_error: str | None
    leader: str | None
    members: dict[str, dict[str, Any]]
    client: EtcdClient
    switchover_lock: asyncio.Lock
    acks: FenceAcks
    caught_up: Callable[[str, str, float, float], Awaitable[bool]]

    @property
    def config(self) -> Config: ...

    @property
    def controller(self) -> Failover | None: ...

    @property
    def epoch(self) -> int: ...

    @property
    def lease(self) -> int: ...

    @property
    def is_leader(self) -> bool: ...

    def key(self, *parts: str) -> str: ...

    def vote(self) -> FleetVote: ...

    def event(self, kind: str, reason: str, **extra: Any) -> None: ...

    def lag_ms(self, region: str) -> float | None: ...

    def leader_lag_ms(self, region: str) -> float | None: ...

    def decide(self, intent: Intent) -> Decision: ...

    async def decision_published(self, within: float = 5.0) -> None: ...

    async def leader_put(self, name: str, data: Mapping[str, Any]) -> bool: ...

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None: ...

    async def forget_fence_acks(self, ident: str, *, delay: float) -> None: ...

    async def checkpoint(self, name: str) -> bytes | None: ...

    async def save_checkpoint(self, name: str, data: bytes) -> bool: ...
