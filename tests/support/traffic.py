"""The application for failover tests: threads writing new items through the stable address at a pace."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from tests.support.stack import SidecarStack


def put(client: Any, table: str, key: str) -> None:
    client.put_item(TableName=table, Item={"pk": {"S": key}, "v": {"S": "x"}})


@dataclass
class Traffic:
    """The application: four threads writing new items through the stable address at a steady pace
    (one attempt per request, 2 s timeouts: every failure counts)."""

    stack: SidecarStack
    table: str
    rate: float = 40.0
    acked: list[tuple[float, str, str]] = field(default_factory=list)  # (time, key, region in status)
    failed: list[tuple[float, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Traffic:
        for i in range(4):
            t = threading.Thread(target=self._run, args=(i,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)

    def _run(self, worker: int) -> None:
        client = self.stack.client(
            connect_timeout=2, read_timeout=2, retries={"total_max_attempts": 1, "mode": "standard"}
        )
        interval = 4 / self.rate
        while not self._stop.is_set():
            key = f"w{worker}-{uuid.uuid4().hex[:10]}"
            try:
                put(client, self.table, key)
                self.acked.append((time.monotonic(), key, ""))
            except (ClientError, BotoCoreError) as exc:
                self.failed.append((time.monotonic(), type(exc).__name__))
            self._stop.wait(interval)

    def acked_after(self, t: float) -> list[str]:
        return [key for at, key, _ in self.acked if at > t]


class Writers:
    """Several app threads writing unique items through the stable address as fast as they can."""

    def __init__(self, stack: SidecarStack, table: str, threads: int = 4) -> None:
        self.stack, self.table = stack, table
        self.acked: list[tuple[float, float, str]] = []  # (sent, acked, key)
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self) -> Writers:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def _run(self, worker: int) -> None:
        client = self.stack.client(connect_timeout=10, read_timeout=10)
        while not self._stop.is_set():
            key = f"w{worker}-{uuid.uuid4().hex[:12]}"
            sent = time.monotonic()
            try:
                client.put_item(TableName=self.table, Item={"pk": {"S": key}})
                self.acked.append((sent, time.monotonic(), key))
            except (ClientError, BotoCoreError) as exc:
                self.failed.append(f"{key}: {exc}")
            self._stop.wait(0.01)
