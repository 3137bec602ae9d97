"""The stream replicator's checkpoints in etcd: in a fleet only the leader replicates, and the next leader
resumes where it stopped.

One key per pipeline, P/checkpoints/SOURCE--TARGET--TABLE, holding the same JSON as the checkpoint files of a
lone sidecar. Not bound to a lease (a checkpoint outlives its leader), and every save is conditioned on the
saver still holding the leader key: a deposed leader's late save is refused by etcd, so two replicators can
never move one checkpoint back and forth.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from sidecar.replication.checkpoint import CheckpointState

if TYPE_CHECKING:
    from sidecar.fleet.context import FleetContext

logger = logging.getLogger(__name__)

T = TypeVar("T")
CALL_TIMEOUT = 10.0


class CheckpointRefused(Exception):
    """etcd did not keep a checkpoint (this member no longer leads, or etcd is unreachable)."""


class EtcdCheckpoints:
    """One pipeline's checkpoints. Like the file store, called from the replicator's worker threads: each
    call runs on the event loop (where the etcd client lives) and the thread waits for it."""

    def __init__(self, member: FleetContext, loop: asyncio.AbstractEventLoop, name: str) -> None:
        self.member = member
        self.loop = loop
        self.name = name

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(CALL_TIMEOUT)

    def load(self) -> CheckpointState:
        data = self._call(self.member.checkpoint(self.name))
        if data is None:
            return CheckpointState()
        try:
            return CheckpointState.from_json(orjson.loads(data))
        except (orjson.JSONDecodeError, ValueError) as exc:
            logger.error(
                "replication checkpoint %s in etcd is unreadable (%s); replicating this table again from the "
                "oldest record in the stream",
                self.name,
                exc,
            )
            return CheckpointState()

    def save(self, data: dict[str, Any]) -> None:
        if not self._call(self.member.save_checkpoint(self.name, orjson.dumps(data))):
            raise CheckpointRefused(
                f"checkpoint {self.name} not saved: this member no longer leads the fleet, or etcd is unreachable"
            )


def etcd_checkpoints(member: FleetContext) -> Callable[[str, str, str], EtcdCheckpoints]:
    loop = asyncio.get_running_loop()
    return lambda source, target, table: EtcdCheckpoints(member, loop, f"{source}--{target}--{table}")
