"""Writes the replicator could never apply, kept so that nothing is lost silently and the shard moves on.

One JSON line per write in `state_dir/replication/dead-letters.jsonl` (mode 0600: it holds the items):
when, the table, source and target regions, the key, the error, and the write itself (the item to put, or
the delete). A permanent error (`apply.PERMANENT_ERRORS`: the target refuses the item for what it is) is
retried by nobody: the replicator counts it, alerts, records it here and goes on with the next records, so
the lag and the switchovers that wait for it never wedge on one item. `ddb-sidecar reconcile` lists them.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from sidecar.core.replicate import WriteOp

FILE = "dead-letters.jsonl"


def dead_letter_path(state_dir: Path) -> Path:
    return state_dir / "replication" / FILE


class DeadLetters:
    """Appends dead letters (blocking: call from a worker thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def add(self, source: str, target: str, failed: list[tuple[WriteOp, str]]) -> None:
        lines = [
            json.dumps(
                {
                    "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "table": op.table,
                    "source": source,
                    "target": target,
                    "key": op.key,
                    "version": op.version,
                    "error": error,
                    "write": {"put": op.item} if op.item is not None else {"delete": True},
                },
                sort_keys=True,
            )
            for op, error in failed
        ]
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, ("\n".join(lines) + "\n").encode())
                os.fsync(fd)
            finally:
                os.close(fd)


def read_dead_letters(state_dir: Path) -> list[dict[str, Any]]:
    """Every dead letter recorded under `state_dir` (an unreadable line is shown as such, not skipped)."""
    path = dead_letter_path(state_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    out: list[dict[str, Any]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            entry = {"error": f"line {n} of {path} is not JSON"}
        out.append(entry if isinstance(entry, dict) else {"error": f"line {n} of {path} is not an object"})
    return out
