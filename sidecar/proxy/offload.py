"""The gate for large bodies, in a worker process: no request may stall the event loop.

Parsing JSON costs with the number of values, not the bytes: 16.8 MB of `{"M":{}}` took orjson 1.2 s and
blocked the whole sidecar (HAProxy marked both servers down; a failover followed). A thread does not help:
orjson (like every fast JSON parser) holds the GIL while it parses. So bodies over OFFLOAD_BYTES go to a
small process pool; the loop only pays for handing the bytes over (a copy) and gets back the small
decision. Bodies under it cost at most a few milliseconds inline, whatever their shape.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hashlib
import logging
import multiprocessing
from concurrent.futures.process import BrokenProcessPool

from sidecar.core.errors import DynamoError
from sidecar.core.gate import Admitted, GatePolicy, admit


def admit_and_digest(policy: GatePolicy, target: str | None, body: bytes) -> Admitted | DynamoError:
    """The gate's decision and, for an admitted request, the SHA-256 of each body it may be sent as: SigV4
    hashes the whole payload (~20 ms for 16 MB), better here than on the loop."""
    decision = admit(policy, target, body)
    if not isinstance(decision, Admitted):
        return decision
    digests = {"": hashlib.sha256(body).hexdigest()}
    for region, retargeted in (decision.retargeted or {}).items():
        digests[region] = hashlib.sha256(retargeted.body).hexdigest()
    return dataclasses.replace(decision, digests=digests)


logger = logging.getLogger(__name__)

OFFLOAD_BYTES = 64 * 1024  # inline below this: orjson's worst case there is a few ms
WORKERS = 2


class GateOffload:
    def __init__(self, workers: int = WORKERS) -> None:
        self._workers = workers
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def start(self) -> None:
        # spawn: a clean interpreter, not a fork of a daemon with threads and an event loop
        self._pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=self._workers, mp_context=multiprocessing.get_context("spawn")
        )
        # start the workers now (importing the gate takes a moment), not on the first large request
        for _ in range(self._workers):
            self._pool.submit(admit, GatePolicy(frozenset()), None, b"{}")

    def admit(
        self, policy: GatePolicy, target: str | None, body: bytes
    ) -> asyncio.Future[Admitted | DynamoError]:
        """The gate's decision, computed in a worker process. If the pool broke (a worker killed), a new one
        is started and this request is decided inline (correct, only slower)."""
        loop = asyncio.get_running_loop()
        if self._pool is None:
            self.start()
        assert self._pool is not None
        try:
            return asyncio.wrap_future(self._pool.submit(admit_and_digest, policy, target, body), loop=loop)
        except (BrokenProcessPool, RuntimeError) as exc:
            logger.error("gate worker pool unusable (%s); starting a new one", exc)
            self.stop()
            self.start()
            future: asyncio.Future[Admitted | DynamoError] = loop.create_future()
            future.set_result(admit(policy, target, body))
            return future

    def stop(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
