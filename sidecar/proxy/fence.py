"""The write fence of a switchover: writes are held (reads flow) while replication drains, then released.

Closed, it queues a release callback per held write, in arrival order; `open(to)` calls them all with the
region they go to (the new active region, or None: the region each was meant for). Bounded: beyond
`max_held` writes a request is refused at once ("not sent, safe to retry") rather than held without limit.
How long the fence stays closed is the switchover's business (it always opens it, by its deadline).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

# Where released writes go: the listeners' RegionRuntime. Generic, so the fence needs no data-path type.
Target = TypeVar("Target")


class WriteFence(Generic[Target]):
    def __init__(self, max_held: int = 10_000) -> None:
        self.max_held = max_held
        self.closed = False
        self.closed_at: float | None = None
        self._held: deque[Callable[[Target | None], None]] = deque()
        self.held_total = 0

    @property
    def held(self) -> int:
        return len(self._held)

    def close(self) -> None:
        self.closed = True
        self.closed_at = time.monotonic()

    def hold(self, release: Callable[[Target | None], None]) -> bool:
        if len(self._held) >= self.max_held:
            return False
        self._held.append(release)
        self.held_total += 1
        return True

    def open(self, to: Target | None) -> int:
        """Release every held write towards `to` (None: where each was going); return how many."""
        self.closed = False
        self.closed_at = None
        released = 0
        while self._held:
            release = self._held.popleft()
            try:
                release(to)
            except Exception:  # one broken connection must not keep the others held
                logger.exception("releasing a held write failed")
            released += 1
        return released
