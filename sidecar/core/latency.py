"""How long a DynamoDB request should take depends on what it is.

A GetItem of one small item answers in a few milliseconds; a Scan that returns a 1 MB page, a 100-key
BatchGetItem or a transaction can take a second or more from a healthy region, more across an ocean. So a
request's latency is judged against the recent history of its own class, never against one threshold for
all: a slow Scan is not a sick region. Pure: the shell records latencies and asks for thresholds.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Sequence
from typing import Final


class LatencyClass(enum.IntEnum):
    POINT = 0  # one item, a small body: GetItem, PutItem, UpdateItem, DeleteItem. Should be fast.
    QUERY = 1
    SCAN = 2
    BATCH = 3  # BatchGetItem, BatchWriteItem
    TRANSACT = 4  # TransactGetItems, TransactWriteItems
    STATEMENT = 5  # PartiQL: ExecuteStatement, BatchExecuteStatement, ExecuteTransaction
    LARGE = 6  # any request whose body is large (a 300 KB item takes its time on the wire)
    OTHER = 7  # metadata, control plane, account-level reads


CLASSES: Final = tuple(LatencyClass)

_BY_OPERATION: Final[dict[str, LatencyClass]] = {
    "GetItem": LatencyClass.POINT,
    "PutItem": LatencyClass.POINT,
    "UpdateItem": LatencyClass.POINT,
    "DeleteItem": LatencyClass.POINT,
    "Query": LatencyClass.QUERY,
    "Scan": LatencyClass.SCAN,
    "BatchGetItem": LatencyClass.BATCH,
    "BatchWriteItem": LatencyClass.BATCH,
    "TransactGetItems": LatencyClass.TRANSACT,
    "TransactWriteItems": LatencyClass.TRANSACT,
    "ExecuteStatement": LatencyClass.STATEMENT,
    "BatchExecuteStatement": LatencyClass.STATEMENT,
    "ExecuteTransaction": LatencyClass.STATEMENT,
}

# A body above this is not "a small item": DynamoDB items go up to 400 KB.
LARGE_BODY: Final = 64 * 1024
# Slower than this many times its class's recent p99 is slow (an expected-long class), and a request that
# should be fast and has waited this many times its class's p99 is evidence of a stall.
SLOW_FACTOR: Final = 10.0
# A class's history says nothing until it holds this many answers.
MIN_HISTORY: Final = 20
# Answers remembered per class: the p99 of the last 512 is the 6th slowest.
HISTORY: Final = 512


def latency_class(operation: str, body_size: int) -> LatencyClass:
    """The class a request's latency is judged in."""
    if body_size > LARGE_BODY:
        return LatencyClass.LARGE
    return _BY_OPERATION.get(operation, LatencyClass.OTHER)


def p99(samples: Sequence[float]) -> float | None:
    """The 99th percentile (nearest rank) of `samples`; None when there are none."""
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


def slow_after(cls: LatencyClass, recent_p99: float | None, count: int, base: float) -> float:
    """The latency above which an answer of class `cls` counts as slow (an outage observation).

    Point requests: `health.slow`, the documented threshold (probes are judged by it too). Expected-long
    classes: ten times their own recent p99, never below `health.slow`; without enough history, never (the
    probes still see a slow region): the first Scans an app sends must not be what moves it.
    """
    if cls is LatencyClass.POINT:
        return base
    if recent_p99 is None or count < MIN_HISTORY:
        return math.inf
    return max(base, SLOW_FACTOR * recent_p99)


class RecentLatencies:
    """The last answers' latencies of one region, per class. `record` is on the data path (a deque append);
    percentiles and thresholds are computed by the monitor about once a second."""

    __slots__ = ("_dirty", "_samples")

    def __init__(self) -> None:
        self._samples: list[deque[float]] = [deque(maxlen=HISTORY) for _ in CLASSES]
        self._dirty = [False] * len(CLASSES)

    def record(self, cls: LatencyClass, latency: float) -> None:
        self._samples[cls].append(latency)
        self._dirty[cls] = True

    def count(self, cls: LatencyClass) -> int:
        return len(self._samples[cls])

    def p99(self, cls: LatencyClass) -> float | None:
        return p99(self._samples[cls])

    def changed(self) -> list[LatencyClass]:
        """The classes with new answers since the last call."""
        out = [cls for cls in CLASSES if self._dirty[cls]]
        self._dirty = [False] * len(CLASSES)
        return out
