"""Where the replicator is in each stream: one JSON file per (source, target, table), written atomically.

A checkpoint names, per shard, the sequence number of the last record whose writes the target has
acknowledged, and whether the shard is finished (closed, read to its end, applied). It is written after a
delivery is applied, never before: a crash re-delivers from the last checkpoint (at least once), and the
versioned writes make a re-delivered record a no-op.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger(__name__)

FORMAT = 1


@dataclass
class ShardCheckpoint:
    sequence: str | None = None  # the last record applied; None: nothing yet (start at TRIM_HORIZON)
    finished: bool = False


@dataclass
class CheckpointState:
    stream_arn: str | None = None
    shards: dict[str, ShardCheckpoint] = field(default_factory=dict)
    # Records created before this (epoch ms) are not replicated: this region became the source again then,
    # and its older unreplicated records could overwrite newer writes made elsewhere meanwhile.
    not_before_ms: int | None = None

    @property
    def finished(self) -> set[str]:
        return {shard for shard, cp in self.shards.items() if cp.finished}

    def to_json(self, **extra: Any) -> dict[str, Any]:
        return {
            "format": FORMAT,
            **extra,
            "stream_arn": self.stream_arn,
            "not_before_ms": self.not_before_ms,
            "shards": {
                shard: {"sequence": cp.sequence, "finished": cp.finished} for shard, cp in self.shards.items()
            },
        }

    @classmethod
    def from_json(cls, data: Any) -> CheckpointState:
        if (
            not isinstance(data, dict)
            or data.get("format") != FORMAT
            or not isinstance(data.get("shards"), dict)
        ):
            raise ValueError("not a checkpoint file of format 1")
        shards = {}
        for shard, cp in data["shards"].items():
            sequence = cp.get("sequence")
            if sequence is not None and not (isinstance(sequence, str) and sequence.isdigit()):
                raise ValueError(f"shard {shard}: sequence {sequence!r} is not a sequence number")
            shards[str(shard)] = ShardCheckpoint(sequence, bool(cp.get("finished")))
        arn = data.get("stream_arn")
        not_before = data.get("not_before_ms")
        if not_before is not None and not isinstance(not_before, int):
            raise ValueError(f"not_before_ms {not_before!r} is not a number of milliseconds")
        return cls(str(arn) if arn else None, shards, not_before)


class Checkpoints(Protocol):
    """Where one pipeline (source, target, table) keeps its checkpoints. Called from the replicator's worker
    threads: both may block. `save` raises when the checkpoint could not be kept (the pipeline retries)."""

    def load(self) -> CheckpointState: ...

    def save(self, data: dict[str, Any]) -> None: ...


def checkpoint_path(state_dir: Path, source: str, target: str, table: str) -> Path:
    return state_dir / "replication" / f"{source}--{target}--{table}.json"


class CheckpointStore:
    """Load and save one pipeline's checkpoints (blocking: call from a worker thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> CheckpointState:
        """The saved state; an empty one when there is none. An unreadable file is moved aside (and logged):
        starting over from the oldest record is safe, only slower."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return CheckpointState()
        try:
            return CheckpointState.from_json(json.loads(raw))
        except ValueError as exc:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            with contextlib.suppress(OSError):
                self.path.rename(aside)
            logger.error(
                "replication checkpoint %s is unreadable (%s); moved aside to %s, replicating this table "
                "again from the oldest record in the stream",
                self.path,
                exc,
                aside.name,
            )
            return CheckpointState()

    def save(self, data: dict[str, Any]) -> None:
        """Temporary file in the same folder, fsync, rename over, fsync the folder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps(data, indent=1, sort_keys=True).encode()
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
