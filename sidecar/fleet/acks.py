"""The members' acknowledgements of a fleet switchover's fence (P/fence-acks/ID/HOST), as the watch
delivers them; the leader waits on them (sidecar/fleet/switchover.py)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from sidecar.fleet.records import read_json


class FenceAcks:
    """The members' acknowledgements of fleet switchovers, as the watch delivers P/fence-acks/ID/HOST."""

    def __init__(self) -> None:
        self._acks: dict[str, dict[str, dict[str, Any]]] = {}
        self._changed = asyncio.Event()

    def seen(self, rest: str, raw: bytes | None) -> None:
        """`rest`: ID/HOST; `raw`: the record (None: deleted)."""
        ident, _, host = rest.partition("/")
        if raw is None:
            self._acks.get(ident, {}).pop(host, None)
            return
        data = read_json(raw)
        if data is not None and host:
            self._acks.setdefault(ident, {})[host] = data
            self._changed.set()

    async def wait(
        self, ident: str, hosts: list[str], field: str, deadline: float
    ) -> dict[str, dict[str, Any]]:
        """The acknowledgements with `field` set, once every one of `hosts` has given it or at `deadline`
        (loop time). A member that left meanwhile (its lease expired: frozen, or cut off from etcd) is still
        waited for: it may wake up and send writes, so its silence aborts the switchover."""
        loop = asyncio.get_running_loop()
        while True:
            got = {h: a for h, a in self._acks.get(ident, {}).items() if a.get(field)}
            if all(h in got for h in hosts) or loop.time() >= deadline:
                return got
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), max(0.0, deadline - loop.time()))

    def forget(self, ident: str) -> None:
        self._acks.pop(ident, None)
