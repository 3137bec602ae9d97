"""The stream replicator (`replication.mode: streams`): the active region's DynamoDB Streams, applied to the
other regions.

One pipeline per (table, target region). A pipeline finds the table's stream (DescribeTable), lists its
shards (DescribeStream) and reads every shard whose parent is finished (`readable_shards`: parents before
children), each shard in its own task: GetRecords, the tombstone look-ups the echo rule needs, the plan
(`sidecar.core.replicate.plan`), the writes (`Applier`, up to `max_in_flight` requests or transactions at once; a plan
never holds two writes of one item), then the checkpoint, atomically, in `state_dir/replication/`. A
delivery is applied completely before the next one of the same shard is read, so per-item order holds. A
crash re-delivers from the last checkpoint; versioned conditional writes make that harmless.

botocore is blocking: every call runs in the replicator's own thread pool. Reads are abandoned when the
replicator stops (nothing to undo); writes are waited for, so `stop()` and `set_source()` return at a clean
point, with the checkpoints on disk, and no write of the old source can land after the new source's.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from botocore.exceptions import BotoCoreError, ClientError

from sidecar.config import Config, Region
from sidecar.core.replicate import (
    MAX_GROUP_ITEMS,
    REQUIRED_VIEW_TYPE,
    Change,
    RecordError,
    WriteMode,
    WriteOp,
    group_ops,
    needs_tombstone_lookup,
    parse_record,
    plan,
    readable_shards,
    shard_from_description,
    tombstone_id,
)
from sidecar.replication.apply import Applier, SendResult, describe_error, error_code, lookup_tombstones
from sidecar.replication.checkpoint import (
    Checkpoints,
    CheckpointState,
    CheckpointStore,
    ShardCheckpoint,
    checkpoint_path,
)
from sidecar.replication.clients import ClientFactory, CredentialsLike, client_factory
from sidecar.replication.deadletter import DeadLetters, dead_letter_path

logger = logging.getLogger(__name__)

T = TypeVar("T")

GET_RECORDS_LIMIT = 1000
DISCOVER_EVERY = 30.0  # DescribeStream again: DynamoDB rolls shards over every few hours
BACKOFF_INITIAL = 0.2
BACKOFF_MAX = 30.0
RATE_WINDOW = 10.0
STOP_TIMEOUT = 30.0
LOG_REPEAT_EVERY = 60.0
# After a move, the new source's records older than the move (minus this margin for the second-rounded
# ApproximateCreationDateTime and clock skew) are its unreplicated tail from an earlier turn: skipped.
MOVE_MARGIN_MS = 2000


class StreamUnavailable(Exception):
    """The table has no usable stream (or no table); the message says what to run."""


class _Stopping(Exception):
    """The replicator is stopping: leave at this clean point."""


def backoff(attempt: int) -> float:
    """0.2 s, 0.4, 0.8 ... up to 30 s, with jitter (so pipelines that failed together do not retry together)."""
    base: float = BACKOFF_INITIAL * 2.0 ** min(max(attempt - 1, 0), 20)
    return min(base, BACKOFF_MAX) * random.uniform(0.75, 1.0)


def replicated_tables(config: Config) -> list[str]:
    """`tables` and the health table: its heartbeats measure the lag, its fence items carry switchovers."""
    return list(dict.fromkeys([*config.tables, config.health.table]))


def enable_stream_command(region: str, table: str) -> str:
    return (
        f"aws dynamodb update-table --region {region} --table-name {table} "
        f"--stream-specification StreamEnabled=true,StreamViewType={REQUIRED_VIEW_TYPE}"
    )


@dataclass(frozen=True)
class Settings:
    poll_interval: float
    write_mode: WriteMode
    batch_size: int
    max_in_flight: int
    tombstone_table: str
    tombstone_ttl: float

    @classmethod
    def from_config(cls, config: Config) -> Settings:
        r = config.replication
        return cls(
            r.poll_interval, r.write_mode, r.batch_size, r.max_in_flight, config.health.table, r.tombstone_ttl
        )

    def group_size(self, items: int) -> int:
        """Items per group: a transaction's, or (single) a share of the delivery per request slot."""
        if self.write_mode == "transact":
            return self.batch_size
        return max(1, min(MAX_GROUP_ITEMS, -(-items // self.max_in_flight)))


@dataclass
class Counters:
    """Totals since the replicator was built (they survive set_source)."""

    records_read: int = 0
    records_applied: int = 0  # records whose write took effect (coalesced records count too)
    records_superseded: int = 0  # a newer version was already there: a no-op, and a success
    records_echo: int = 0  # the replicator's own writes in this region's stream: skipped
    records_stale: int = 0  # written in the source before its latest move there, never replicated: skipped
    requests: int = 0  # write requests (PutItem, DeleteItem, GetItem of tombstones, TransactWriteItems)
    errors: int = 0
    dead_letters: int = 0  # writes refused for good, recorded in the dead-letter file and skipped
    last_error: str | None = None
    last_error_at: float | None = None


@dataclass
class _ShardProgress:
    reads: int = 0
    failing: bool = False
    caught_up: bool = False  # the last GetRecords returned nothing
    last_created_ms: int | None = None  # of the newest record read
    pending_since_ms: int | None = None  # oldest record read and not yet applied
    answered_ms: float | None = None  # when the source last answered a GetRecords of this shard


class StreamReplicator:
    """Replicates every table in `tables` from `source_region`'s streams into every other region.

    `config_getter` returns the current config (read at start and at each set_source/restart);
    `credentials` returns the current AWS credentials (e.g. `CredentialSource.current`; None: botocore's
    chain); checkpoints live in `state_dir/replication/`. `client_factory` (service, region, endpoint) ->
    client replaces the botocore clients in tests.
    """

    def __init__(
        self,
        config_getter: Callable[[], Config],
        credentials: Callable[[], CredentialsLike] | None,
        state_dir: Path,
        *,
        source_region: str,
        clock: Callable[[], float] = time.time,
        client_factory: ClientFactory | None = None,
        checkpoints: Callable[[str, str, str], Checkpoints] | None = None,
        on_dead_letter: Callable[[str], None] | None = None,
    ) -> None:
        self._config_getter = config_getter
        self.dead_letters = DeadLetters(dead_letter_path(Path(state_dir)))
        self._on_dead_letter = on_dead_letter
        # (source, target, table) -> where that pipeline's checkpoints live: files in state_dir by default;
        # a fleet's leader keeps them in etcd, so the next leader resumes where it stopped.
        self.checkpoints = checkpoints or (
            lambda source, target, table: CheckpointStore(
                checkpoint_path(self.state_dir, source, target, table)
            )
        )
        self._credentials = credentials
        self._factory = client_factory
        self.state_dir = Path(state_dir)
        self._source = source_region
        self._clock = clock
        self.counters = Counters()
        self._clients: dict[tuple[str, str, str], Any] = {}
        self._pipelines: list[_Pipeline] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._lock = asyncio.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._done: deque[tuple[float, int]] = deque()
        self._not_before_ms: int | None = None  # set by set_source, written into the new source's checkpoints

    # -- lifecycle -------------------------------------------------------------------------------------------

    @property
    def source_region(self) -> str:
        return self._source

    @property
    def running(self) -> bool:
        return bool(self._tasks)

    async def start(self) -> None:
        """Start a pipeline per (table, other region). Problems (no stream, a region down) do not raise:
        they show in `errors`/`last_error` and are retried with backoff."""
        async with self._lock:
            await self._start()

    async def stop(self, grace: float = STOP_TIMEOUT) -> None:
        """Stop at a clean point: reads are abandoned, writes in flight finish and are checkpointed.

        After `grace` s the pipelines are cancelled (a write may then still land; it is versioned)."""
        async with self._lock:
            await self._stop(grace)

    async def set_source(self, region: str, *, since: float | None = None) -> None:
        """Replicate from `region` from now on (after a move at `since`, epoch seconds; default now): stop at
        a clean point, persist, start reading the new region's streams from their own checkpoints (or
        from the oldest record). Records `region` holds from before `since` are not replicated: they are
        an unreplicated tail from an earlier turn as the source, older than what the others wrote since."""
        async with self._lock:
            try:
                self._config_getter().region(region)
            except KeyError:
                raise ValueError(f"replication source {region!r} is not a configured region") from None
            if region == self._source:
                return
            was_running = self.running
            await self._stop(STOP_TIMEOUT)
            logger.info("replication source: %s -> %s", self._source, region)
            self._source = region
            moved_at = self._clock() if since is None else since
            self._not_before_ms = int(moved_at * 1000) - MOVE_MARGIN_MS
            if was_running:
                await self._start()

    async def restart(self) -> None:
        """Stop and start again with the current config (tables or regions changed)."""
        async with self._lock:
            await self._stop(STOP_TIMEOUT)
            await self._start()

    async def _start(self) -> None:
        if self._tasks:
            raise RuntimeError("StreamReplicator already started")
        config = self._config_getter()
        try:
            source = config.region(self._source)
        except KeyError:
            raise ValueError(f"replication source {self._source!r} is not a configured region") from None
        targets = [r for r in config.regions if r.name != source.name]
        settings = Settings.from_config(config)
        self._stopping = asyncio.Event()
        self._executor = ThreadPoolExecutor(
            max_workers=min(
                64, max(4, len(replicated_tables(config)) * len(targets) * (settings.max_in_flight + 3))
            ),
            thread_name_prefix="replicator",
        )
        if self._factory is None:
            self._factory = client_factory(self._credentials)
        source_ddb = await self._client("dynamodb", source)
        streams = await self._client("dynamodbstreams", source)
        self._pipelines = []
        for target in targets:
            target_ddb = await self._client("dynamodb", target)
            for table in replicated_tables(config):
                self._pipelines.append(
                    _Pipeline(
                        self,
                        table,
                        source,
                        target,
                        settings,
                        source_ddb,
                        streams,
                        target_ddb,
                        self._not_before_ms,
                    )
                )
        self._tasks = [asyncio.create_task(p.run(), name=f"replicate {p.name}") for p in self._pipelines]
        logger.info(
            "replication (streams) from %s to %s: tables %s; poll %.0f ms, %s writes, %d in flight",
            source.name,
            ", ".join(t.name for t in targets) or "(no other region)",
            ", ".join(replicated_tables(config)),
            settings.poll_interval * 1000,
            settings.write_mode
            if settings.write_mode == "single"
            else f"transact ({settings.batch_size} items)",
            settings.max_in_flight,
        )

    async def _stop(self, grace: float) -> None:
        tasks, self._tasks = self._tasks, []
        if tasks:
            self._stopping.set()
            _, pending = await asyncio.wait(tasks, timeout=grace)
            if pending:
                logger.warning(
                    "replication: %d pipelines still busy after %.0f s; cancelled (a write in flight may "
                    "still land; it is versioned)",
                    len(pending),
                    grace,
                )
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        if self._executor is not None:
            # Abandoned reads finish in their threads on their own; nothing waits for them.
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def _client(self, service: str, region: Region) -> Any:
        key = (service, region.name, region.url)
        client = self._clients.get(key)
        if client is None:
            assert self._factory is not None
            # Creating a client loads its service model from disk: not on the event loop.
            client = await self._run(self._factory, service, region.name, region.url)
            self._clients[key] = client
        return client

    # -- helpers for the pipelines -----------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn` in the replicator's thread pool, waited for even when stopping (writes)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    async def _read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn` in the thread pool, abandoned (raising _Stopping) when the replicator stops first."""
        if self.stopping:
            raise _Stopping
        call = asyncio.ensure_future(self._run(fn, *args, **kwargs))
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({call, stop}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            call.add_done_callback(_ignore_result)
            raise
        finally:
            stop.cancel()
        if call.done():
            return call.result()
        call.add_done_callback(_ignore_result)
        raise _Stopping

    async def _sleep(self, delay: float) -> None:
        """Sleep, or raise _Stopping as soon as the replicator stops."""
        if self.stopping:
            raise _Stopping
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), delay)
        if self.stopping:
            raise _Stopping

    def _note_error(self, message: str) -> None:
        self.counters.errors += 1
        self.counters.last_error = message
        self.counters.last_error_at = self._clock()

    def _note_done(self, records: int) -> None:
        now = self._clock()
        self._done.append((now, records))
        while self._done and self._done[0][0] < now - RATE_WINDOW:
            self._done.popleft()

    # -- metrics -------------------------------------------------------------------------------------------

    @property
    def records_applied(self) -> int:
        return self.counters.records_applied

    @property
    def errors(self) -> int:
        return self.counters.errors

    @property
    def last_error(self) -> str | None:
        return self.counters.last_error

    @property
    def records_per_s(self) -> float:
        """Records applied (or found superseded) per second over the last 10 s."""
        now = self._clock()
        total = sum(n for at, n in self._done if at >= now - RATE_WINDOW)
        return total / RATE_WINDOW

    @property
    def iterator_age_s(self) -> float | None:
        """now - ApproximateCreationDateTime of the last record read, worst shard; 0 for a shard whose last
        read was empty (caught up); None while a shard has not been read yet or its reads fail."""
        if not self.running:
            return None
        now_ms = self._clock() * 1000
        ages = [p.iterator_age_ms(now_ms) for p in self._pipelines]
        if not ages or any(a is None for a in ages):
            return None
        return max(a for a in ages if a is not None) / 1000

    def lag_ms(self) -> dict[str, float | None]:
        """Per target region: age of the oldest record read and not yet applied there (0 when everything
        read is applied; records not read yet add up to `poll_interval`). None: unknown (not read yet,
        or reading the source fails)."""
        now_ms = self._clock() * 1000
        out: dict[str, float | None] = {}
        for p in self._pipelines:
            lag = p.lag_ms(now_ms) if self.running else None
            if p.target.name in out:
                previous = out[p.target.name]
                out[p.target.name] = None if previous is None or lag is None else max(previous, lag)
            else:
                out[p.target.name] = lag
        return out

    def status(self) -> dict[str, Any]:
        """A JSON-ready snapshot for `status` and metrics."""
        lags = self.lag_ms()
        c = self.counters
        return {
            "mode": "streams",
            "source": self._source,
            "running": self.running,
            "lag_ms": None
            if not lags or None in lags.values()
            else max(v for v in lags.values() if v is not None),
            "records_read": c.records_read,
            "records_applied": c.records_applied,
            "records_superseded": c.records_superseded,
            "records_echo": c.records_echo,
            "records_stale": c.records_stale,
            "requests": c.requests,
            "records_per_s": round(self.records_per_s, 1),
            "iterator_age_s": self.iterator_age_s,
            "errors": c.errors,
            "dead_letters": c.dead_letters,
            "dead_letter_file": str(self.dead_letters.path),
            "last_error": c.last_error,
            "last_error_at": _iso(c.last_error_at) if c.last_error_at is not None else None,
            "targets": {
                name: {
                    "lag_ms": lag,
                    "last_apply_lag_ms": max(
                        (
                            p.last_apply_lag_ms
                            for p in self._pipelines
                            if p.target.name == name and p.last_apply_lag_ms is not None
                        ),
                        default=None,
                    ),
                }
                for name, lag in lags.items()
            },
            "pipelines": [p.status() for p in self._pipelines],
        }


def _ignore_result(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


class _Pipeline:
    """One table's stream from the source into one target region."""

    def __init__(
        self,
        owner: StreamReplicator,
        table: str,
        source: Region,
        target: Region,
        settings: Settings,
        source_ddb: Any,
        streams: Any,
        target_ddb: Any,
        not_before_ms: int | None = None,
    ) -> None:
        self.owner = owner
        self.not_before_ms = not_before_ms
        self.table = table
        self.source = source
        self.target = target
        self.settings = settings
        self.source_ddb = source_ddb
        self.streams = streams
        self.name = f"{table} {source.name}->{target.name}"
        self.store = owner.checkpoints(source.name, target.name, table)
        self.applier = Applier(
            target_ddb,
            settings.tombstone_table,
            mode=settings.write_mode,
            tombstone_ttl=settings.tombstone_ttl,
            clock=owner._clock,
        )
        self.state = CheckpointState()
        self.progress: dict[str, _ShardProgress] = {}
        self.phase = "starting"
        self.last_error: str | None = None
        self.last_apply_lag_ms: float | None = None
        self._save_lock = asyncio.Lock()
        self._logged: tuple[str, float] | None = None
        self._stale_logged = False

    # -- errors ----------------------------------------------------------------------------------------------

    def _fail(self, message: str) -> None:
        self.last_error = message
        self.owner._note_error(f"{self.name}: {message}")
        now = time.monotonic()
        if self._logged is None or self._logged[0] != message or now - self._logged[1] > LOG_REPEAT_EVERY:
            logger.warning("replication %s: %s", self.name, message)
            self._logged = (message, now)

    def _recovered(self) -> None:
        if self.last_error is not None:
            logger.info("replication %s: working again", self.name)
            self.last_error = None
            self._logged = None

    # -- the stream --------------------------------------------------------------------------------------

    async def run(self) -> None:
        attempt = 0
        while True:
            try:
                await self._run_stream()
                return
            except _Stopping:
                return
            except StreamUnavailable as exc:
                self.phase = "error"
                self._fail(str(exc))
            except (ClientError, BotoCoreError) as exc:
                self.phase = "error"
                self._fail(describe_error(exc))
            except Exception as exc:  # a bug must not end replication silently: log it, retry
                logger.exception("replication %s failed", self.name)
                self.phase = "error"
                self._fail(f"{type(exc).__name__}: {exc}")
            attempt += 1
            try:
                await self.owner._sleep(backoff(attempt))
            except _Stopping:
                return

    async def _stream_arn(self) -> str:
        try:
            answer = await self.owner._read(self.source_ddb.describe_table, TableName=self.table)
        except ClientError as exc:
            if error_code(exc) == "ResourceNotFoundException":
                raise StreamUnavailable(f"table {self.table} does not exist in {self.source.name}") from exc
            raise
        table = answer["Table"]
        spec = table.get("StreamSpecification") or {}
        arn = table.get("LatestStreamArn")
        if not spec.get("StreamEnabled") or not arn:
            raise StreamUnavailable(
                f"table {self.table} in {self.source.name} has no stream; enable it with: "
                + enable_stream_command(self.source.name, self.table)
            )
        if spec.get("StreamViewType") != REQUIRED_VIEW_TYPE:
            raise StreamUnavailable(
                f"the stream of table {self.table} in {self.source.name} has view type "
                f"{spec.get('StreamViewType')}; replication needs {REQUIRED_VIEW_TYPE}: disable it "
                f"(aws dynamodb update-table --region {self.source.name} --table-name {self.table} "
                "--stream-specification StreamEnabled=false) and enable it again with: "
                + enable_stream_command(self.source.name, self.table)
            )
        return str(arn)

    async def _shards(self, arn: str) -> list[Any]:
        shards: list[Any] = []
        start: str | None = None
        while True:
            kwargs: dict[str, Any] = {"StreamArn": arn}
            if start:
                kwargs["ExclusiveStartShardId"] = start
            answer = await self.owner._read(self.streams.describe_stream, **kwargs)
            description = answer["StreamDescription"]
            shards += [shard_from_description(s) for s in description.get("Shards", [])]
            start = description.get("LastEvaluatedShardId")
            if not start:
                return shards

    async def _run_stream(self) -> None:
        arn = await self._stream_arn()
        state = await self.owner._run(self.store.load)
        if state.stream_arn != arn:
            if state.stream_arn:
                logger.warning(
                    "replication %s: the table's stream changed (%s -> %s, disabled and enabled again?); "
                    "reading the new one from its oldest record",
                    self.name,
                    state.stream_arn,
                    arn,
                )
            state = CheckpointState(stream_arn=arn)
        self.state = state
        if self.not_before_ms is not None and (state.not_before_ms or 0) < self.not_before_ms:
            state.not_before_ms = self.not_before_ms
            await self._save()  # before anything is read: a crash now must not replicate the old tail
        self._stale_logged = False
        self.progress = {}
        tasks: dict[str, asyncio.Task[None]] = {}
        attempt = 0
        try:
            while True:
                wait = DISCOVER_EVERY
                try:
                    shards = await self._shards(arn)
                except ClientError as exc:
                    if error_code(exc) == "ResourceNotFoundException":
                        raise StreamUnavailable(
                            f"the stream of table {self.table} in {self.source.name} is gone: "
                            + describe_error(exc)
                        ) from exc
                    attempt += 1
                    self._fail(f"DescribeStream: {describe_error(exc)}")
                    wait = backoff(attempt)
                except BotoCoreError as exc:
                    attempt += 1
                    self._fail(f"DescribeStream: {describe_error(exc)}")
                    wait = backoff(attempt)
                else:
                    attempt = 0
                    self.phase = "running"
                    listed = {s.shard_id for s in shards}
                    for shard in [
                        s for s, cp in self.state.shards.items() if cp.finished and s not in listed
                    ]:
                        del self.state.shards[shard]  # aged out of the stream: nothing left to wait for
                    for shard_id in readable_shards(shards, self.state.finished):
                        if shard_id not in tasks:
                            tasks[shard_id] = asyncio.create_task(
                                self._read_shard(arn, shard_id), name=f"replicate {self.name} {shard_id}"
                            )
                stop = asyncio.ensure_future(self.owner._stopping.wait())
                try:
                    await asyncio.wait(
                        {*tasks.values(), stop}, timeout=wait, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    stop.cancel()
                if self.owner.stopping:
                    return
                for shard_id, task in list(tasks.items()):
                    if task.done():
                        del tasks[shard_id]
                        task.result()  # a shard task only ends by finishing its shard, or by raising
        finally:
            if tasks:
                if not self.owner.stopping:
                    for task in tasks.values():
                        task.cancel()
                # Stopping: each shard task leaves at its next clean point.
                await asyncio.gather(*tasks.values(), return_exceptions=True)

    # -- one shard -----------------------------------------------------------------------------------------

    async def _iterator(self, arn: str, shard_id: str) -> str:
        checkpoint = self.state.shards.get(shard_id)
        kwargs: dict[str, Any] = {"StreamArn": arn, "ShardId": shard_id}
        if checkpoint is not None and checkpoint.sequence is not None:
            kwargs |= {"ShardIteratorType": "AFTER_SEQUENCE_NUMBER", "SequenceNumber": checkpoint.sequence}
        else:
            kwargs["ShardIteratorType"] = "TRIM_HORIZON"
        answer = await self.owner._read(self.streams.get_shard_iterator, **kwargs)
        return str(answer["ShardIterator"])

    async def _read_shard(self, arn: str, shard_id: str) -> None:
        progress = self.progress.setdefault(shard_id, _ShardProgress())
        iterator: str | None = None
        attempt = 0
        try:
            while True:
                try:
                    if iterator is None:
                        iterator = await self._iterator(arn, shard_id)
                    answer = await self.owner._read(
                        self.streams.get_records, ShardIterator=iterator, Limit=GET_RECORDS_LIMIT
                    )
                except ClientError as exc:
                    iterator = None
                    code = error_code(exc)
                    if code == "ExpiredIteratorException":
                        continue  # the next one starts from the checkpoint
                    if code == "TrimmedDataAccessException":
                        self._fail(
                            f"shard {shard_id}: records were trimmed from the stream before they were "
                            "replicated (the stream keeps 24 h): continuing from the oldest record left; "
                            "the writes in between are missing from the target: run reconcile"
                        )
                        self.state.shards[shard_id] = ShardCheckpoint()
                        await self._save()
                        continue
                    if code == "ResourceNotFoundException":
                        raise StreamUnavailable(
                            f"shard {shard_id} of table {self.table} in {self.source.name}: {describe_error(exc)}"
                        ) from exc
                    progress.failing = True
                    attempt += 1
                    self._fail(f"GetRecords: {describe_error(exc)}")
                    await self.owner._sleep(backoff(attempt))
                    continue
                except BotoCoreError as exc:
                    iterator = None
                    progress.failing = True
                    attempt += 1
                    self._fail(f"GetRecords: {describe_error(exc)}")
                    await self.owner._sleep(backoff(attempt))
                    continue
                attempt = 0
                progress.failing = False
                progress.reads += 1
                progress.answered_ms = self.owner._clock() * 1000
                records = answer.get("Records") or []
                if records:
                    progress.caught_up = False
                    await self._apply(shard_id, records, progress)
                    self._recovered()
                nxt = answer.get("NextShardIterator")
                if nxt is None:
                    self.state.shards.setdefault(shard_id, ShardCheckpoint()).finished = True
                    await self._save()
                    self.progress.pop(shard_id, None)
                    logger.info("replication %s: shard %s finished", self.name, shard_id)
                    return
                iterator = nxt
                if not records:
                    progress.caught_up = True
                    self._recovered()
                    await self.owner._sleep(self.settings.poll_interval)
        except _Stopping:
            return

    async def _apply(self, shard_id: str, records: list[dict[str, Any]], progress: _ShardProgress) -> None:
        counters = self.owner.counters
        try:
            changes: list[Change] = [parse_record(r) for r in records]
        except RecordError as exc:
            raise StreamUnavailable(f"shard {shard_id}: {exc}") from exc
        counters.records_read += len(changes)
        progress.last_created_ms = max(c.created_ms for c in changes)
        progress.pending_since_ms = min(c.created_ms for c in changes)
        lookups = [tombstone_id(self.table, c.key_id) for c in changes if needs_tombstone_lookup(c)]
        tombstones: dict[str, str] = {}
        attempt = 0
        while lookups:
            try:
                tombstones = await self.owner._run(
                    lookup_tombstones, self.source_ddb, self.settings.tombstone_table, lookups
                )
                break
            except (ClientError, BotoCoreError, RuntimeError) as exc:
                attempt += 1
                self._fail(
                    f"reading tombstones in {self.source.name} ({self.settings.tombstone_table}): "
                    + describe_error(exc)
                )
                await self.owner._sleep(backoff(attempt))
        delivery = plan(self.table, changes, self.source.name, tombstones, self.state.not_before_ms)
        counters.records_echo += delivery.echoes
        counters.records_stale += delivery.stale
        if delivery.stale and not self._stale_logged:
            self._stale_logged = True
            logger.warning(
                "replication %s: skipping records written in %s before it became the source again (%s): "
                "they were never replicated, and newer writes made elsewhere since must not be overwritten "
                "by them; `ddb-sidecar reconcile` shows the items that differ",
                self.name,
                self.source.name,
                _iso((self.state.not_before_ms or 0) / 1000 + MOVE_MARGIN_MS / 1000),
            )
        started = time.monotonic()
        await self._write(delivery.ops)
        written = time.monotonic()
        progress.pending_since_ms = None
        if delivery.newest_created_ms is not None:
            self.last_apply_lag_ms = max(0.0, self.owner._clock() * 1000 - delivery.newest_created_ms)
        self.owner._note_done(delivery.records - delivery.echoes - delivery.stale)
        if delivery.last_sequence is not None:
            checkpoint = self.state.shards.setdefault(shard_id, ShardCheckpoint())
            checkpoint.sequence = delivery.last_sequence
            await self._save()
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "replication %s: %d records (%d echoes) -> %d items written in %.0f ms, checkpoint %.0f ms, "
                "newest record %.0f ms old",
                self.name,
                delivery.records,
                delivery.echoes,
                len(delivery.ops),
                (written - started) * 1000,
                (time.monotonic() - written) * 1000,
                self.last_apply_lag_ms or 0,
            )

    async def _write(self, ops: tuple[WriteOp, ...]) -> None:
        """Every op applied or superseded; retried with backoff until then (or until stopping)."""
        counters = self.owner.counters
        slots = asyncio.Semaphore(self.settings.max_in_flight)
        pending = list(ops)
        attempt = 0

        async def send(group: tuple[WriteOp, ...]) -> SendResult:
            async with slots:
                return await self.owner._run(self.applier.send, group)

        while pending:
            groups = group_ops(pending, self.settings.group_size(len(pending)))
            results = await asyncio.gather(*(send(g) for g in groups))
            pending = []
            errors = []
            failed: list[tuple[WriteOp, str]] = []
            for result in results:
                counters.requests += result.requests
                counters.records_applied += sum(op.records for op in result.applied)
                counters.records_superseded += sum(op.records for op in result.superseded)
                pending += result.pending
                failed += result.failed
                if result.error:
                    errors.append(result.error)
            if failed:
                await self._dead_letter(failed)
            if pending:
                attempt += 1
                self._fail(
                    f"writing {len(pending)} items into {self.target.name}: {errors[0] if errors else '?'}"
                )
                await self.owner._sleep(backoff(attempt))

    async def _dead_letter(self, failed: list[tuple[WriteOp, str]]) -> None:
        """Writes the target refuses for good: recorded, counted, alerted; the shard goes on without them."""
        await self.owner._run(self.owner.dead_letters.add, self.source.name, self.target.name, failed)
        self.owner.counters.dead_letters += len(failed)
        message = (
            f"replication {self.name}: {len(failed)} write(s) refused for good by {self.target.name} "
            f"({failed[0][1]}); recorded in {self.owner.dead_letters.path} and skipped, so replication goes on. "
            "`ddb-sidecar reconcile` lists them; fix the item in the source (or the target's limits)"
        )
        logger.error("ALERT replication-dead-letter: %s", message)
        if self.owner._on_dead_letter is not None:
            self.owner._on_dead_letter(message)

    async def _save(self) -> None:
        async with self._save_lock:
            data = self.state.to_json(
                source=self.source.name,
                target=self.target.name,
                table=self.table,
                updated_at=_iso(self.owner._clock()),
            )
            await self.owner._run(self.store.save, data)

    # -- metrics ---------------------------------------------------------------------------------------

    def iterator_age_ms(self, now_ms: float) -> float | None:
        if self.phase != "running" or not self.progress:
            return None
        worst = 0.0
        for p in self.progress.values():
            if p.failing or p.reads == 0:
                return None
            if not p.caught_up and p.last_created_ms is not None:
                worst = max(worst, now_ms - p.last_created_ms)
        return worst

    def lag_ms(self, now_ms: float) -> float | None:
        """The age of the oldest record read and not applied; and, when the source has not answered a read
        for longer than a poll, at least that silence: a GetRecords hanging on a frozen source region must
        not look caught up (what it would return is unknown, so the lag is at least that old)."""
        if self.phase != "running" or not self.progress:
            return None
        worst = 0.0
        poll_ms = self.settings.poll_interval * 1000
        for p in self.progress.values():
            if p.failing or p.reads == 0:
                return None
            if p.pending_since_ms is not None:
                worst = max(worst, now_ms - p.pending_since_ms)
            if p.answered_ms is not None:
                worst = max(worst, now_ms - p.answered_ms - poll_ms)
        return worst

    def status(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "source": self.source.name,
            "target": self.target.name,
            "phase": self.phase,
            "shards_reading": len(self.progress),
            "shards_finished": len(self.state.finished),
            "last_error": self.last_error,
        }
