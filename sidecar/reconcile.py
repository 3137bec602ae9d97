"""`ddb-sidecar reconcile`: compare a table in two regions item by item, and repair the target on request.

The failback tool: after an outage in which the old region kept writes that never replicated, it lists
what is missing, extra and different in the target (the old region) compared with the source (the active
region), and with `--apply` repairs the target with conditional writes.

How it reads (the pure rules are in `sidecar.core.diff`):
- both regions are scanned with the SAME parallel-Scan segmentation (`Segment`/`TotalSegments`). DynamoDB
  assigns an item to a segment by a hash of its partition key, so one key lands in the same segment in
  both regions, and each segment is diffed on its own. moto does the same (the first byte of MD5 of the
  hash key, modulo TotalSegments).
- an item is kept only as a summary: its key and a 16-byte fingerprint of its comparable form (~200-300
  bytes in Python with short keys). Each side of a segment is sorted by key in memory up to
  `spill_entries` summaries, past that in sorted runs on disk merged back (an external merge sort); then
  the two sorted streams are merged. Memory: at most `workers` x 2 sides x `spill_entries` summaries plus
  one Scan page (1 MB) per worker, whatever the table's size.
- TotalSegments comes from DescribeTable's ItemCount (an estimate DynamoDB refreshes every few hours):
  enough segments for ~`segment_items` items each; a stale estimate costs spills, not memory.
- every key the scans disagree on is read again, consistently, from both regions (BatchGetItem) before it
  is reported or repaired: a write that landed between the two scans, or a segmentation that did not
  match, does not show up as a difference (it is counted as `resolved_on_recheck`).
- reads are rate-limited per region (a token bucket on items read, `rate` items/s; repairs take one token
  each from the target's bucket), throttling errors are retried with backoff and counted.

Writes use conditions (see `sidecar.core.diff.plan_repair`); a ConditionalCheckFailed is reported as
"changed during reconcile, not touched" and never retried.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import logging
import math
import os
import pickle
import queue
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TextIO

import botocore.exceptions
from botocore.config import Config as BotoConfig

from sidecar.adminclient import AdminUnavailable, admin_where, call
from sidecar.config import Config, Region
from sidecar.core.diff import (
    Item,
    ItemKey,
    KeySchema,
    Kind,
    Outcome,
    Repair,
    Summary,
    Tally,
    compare,
    diff_summaries,
    key_of,
    plan_repair,
    summarize,
    summary_key,
    to_wire_json,
)
from sidecar.replication.deadletter import dead_letter_path, read_dead_letters

logger = logging.getLogger(__name__)

DEFAULT_RATE = 1000.0  # items read per second per region
DEFAULT_WORKERS = 4
SEGMENT_ITEMS = 10_000  # items per segment aimed at (from DescribeTable's ItemCount)
SPILL_ENTRIES = 50_000  # summaries per side of a segment held in memory before spilling to disk
MAX_SEGMENTS = 1_000_000  # DynamoDB's limit on TotalSegments
BATCH_GET_KEYS = 100  # DynamoDB's limit per BatchGetItem
SETTLE_BATCH = 50  # differences re-read and repaired together
THROTTLE_CODES = frozenset(
    {"ProvisionedThroughputExceededException", "ThrottlingException", "RequestLimitExceeded"}
)
AUTH_CODES = frozenset(
    {
        "AccessDeniedException",
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "MissingAuthenticationTokenException",
        "SignatureDoesNotMatch",
        "InvalidClientTokenId",
        "ExpiredTokenException",
    }
)
CHANGED_MEANWHILE = "changed during reconcile, not touched"


class ReconcileError(Exception):
    """A reason to stop; `exit_code` follows the CLI's convention."""

    exit_code = 2


class SetupError(ReconcileError):
    """Usage, config, credentials, a missing table, key schemas that differ: exit 2."""

    exit_code = 2


class RegionUnreachable(ReconcileError):
    """A region did not answer (connection, timeout, 5xx after retries): exit 3."""

    exit_code = 3


class RequestFailed(ReconcileError):
    """DynamoDB refused a read for another reason (a ValidationException, say): exit 1."""

    exit_code = 1


# -- what to compare -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    table: str
    source: Region
    target: Region


def active_region(config: Config, timeout: float = 2.0) -> tuple[str, str]:
    """The daemon's active region (GET /status on the admin API), else the config's home region.

    Returns (region, how it was learned) for the report.
    """
    url = admin_where(config) + "/status"
    try:
        _, doc = call(config, "GET", "/status", timeout=timeout)
    except AdminUnavailable as exc:
        return config.home.name, f"the config's home region; {exc}"
    active = doc.get("active_region") if isinstance(doc, dict) else None
    if not isinstance(active, str) or active not in {r.name for r in config.regions}:
        return config.home.name, f"the config's home region; the daemon at {url} reports no active region"
    return active, f"the daemon's active region, from {url}"


def plan_pairs(config: Config, source: str, targets: Sequence[str], tables: Sequence[str]) -> list[Pair]:
    """Every (table, source, target) to compare; raises SetupError naming what is wrong."""
    names = [r.name for r in config.regions]
    problems: list[str] = []
    if source not in names:
        problems.append(f"--from: {source} is not a configured region ({', '.join(names)})")
    for target in targets:
        if target not in names:
            problems.append(f"--to: {target} is not a configured region ({', '.join(names)})")
        elif target == source:
            problems.append(f"--to: {target} is also the source region; compare two different regions")
    for table in tables:
        if table not in config.tables:
            problems.append(f"--table: {table} is not in the config's tables ({', '.join(config.tables)})")
    if not targets and not problems:
        problems.append("only one region is configured: nothing to compare it with")
    if problems:
        raise SetupError("; ".join(problems))
    return [
        Pair(table, config.region(source), config.region(target)) for table in tables for target in targets
    ]


def choose_segments(item_count: int, *, segment_items: int = SEGMENT_ITEMS, workers: int = 1) -> int:
    """TotalSegments so that a segment holds ~segment_items items (at least one segment per worker once the
    table is big enough to share)."""
    wanted = max(math.ceil(max(item_count, 0) / segment_items), 1)
    if item_count > segment_items // 10:
        wanted = max(wanted, workers)
    return min(wanted, MAX_SEGMENTS)


# -- rate limit, progress ----------------------------------------------------------------------------------


class TokenBucket:
    """`rate` tokens per second, up to `burst`; take(n) blocks while the bucket is in debt.

    Taking after the fact (a scan page's item count is known only once it arrived) lets the bucket go into
    debt; the next taker waits it off, so the long-run rate holds. rate <= 0: unlimited.
    """

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(rate, 1.0)
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.burst
        self._at = clock()
        self._lock = threading.Lock()

    def take(self, n: float) -> float:
        """Take n tokens; return the seconds slept."""
        if self.rate <= 0 or n <= 0:
            return 0.0
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
            self._tokens -= n
            wait_s = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait_s > 0:
            self._sleep(wait_s)
        return wait_s


class Progress:
    """One status line on a terminal, redrawn at most every `interval` seconds; silent when disabled."""

    def __init__(
        self,
        stream: TextIO,
        *,
        enabled: bool,
        interval: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.enabled = enabled
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._label = ""
        self._total = 0
        self._done = 0
        self._differences = 0
        self._started = clock()
        self._drawn_at: float | None = None
        self._width = 0

    def start(self, label: str, total_estimate: int) -> None:
        with self._lock:
            self._label, self._total, self._done, self._differences = label, total_estimate, 0, 0
            self._started = self._clock()
            self._drawn_at = None
        self._draw(force=True)

    def advance(self, items: int = 0, differences: int = 0) -> None:
        with self._lock:
            self._done += items
            self._differences += differences
        self._draw()

    def finish(self) -> None:
        self._draw(force=True)
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()

    def line(self) -> str:
        with self._lock:
            elapsed = max(self._clock() - self._started, 1e-9)
            total = max(self._total, self._done)
            pct = f" {100 * self._done / total:3.0f}%" if total else ""
            return (
                f"{self._label}: {self._done:,}/~{total:,} items read{pct}, "
                f"{self._done / elapsed:,.0f}/s, {self._differences:,} differences"
            )

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = self._clock()
        with self._lock:
            if not force and self._drawn_at is not None and now - self._drawn_at < self.interval:
                return
            self._drawn_at = now
        text = self.line()
        pad = max(self._width - len(text), 0)
        self._width = len(text)
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()


# -- one side of a segment, sorted within a memory bound -------------------------------------------------


class SortedSpool:
    """Summaries (key, fingerprint) of one side of a segment, given back sorted by key, duplicates dropped
    (the last wins).

    Holds at most `max_entries` in memory; past that, the buffer is sorted and written to a temporary file,
    and `sorted()` merges the runs (an external merge sort).
    """

    def __init__(self, max_entries: int, directory: Path) -> None:
        self.max_entries = max_entries
        self.directory = directory
        self.count = 0  # summaries added
        self.unique = 0  # distinct keys given back by sorted()
        self.spilled_runs = 0
        self._buffer: list[Summary] = []
        self._runs: list[IO[bytes]] = []

    def add(self, summary: Summary) -> None:
        self._buffer.append(summary)
        self.count += 1
        if len(self._buffer) >= self.max_entries:
            self._spill()

    def _spill(self) -> None:
        self._buffer.sort(key=_first)
        run = tempfile.TemporaryFile(dir=self.directory, prefix="run-")
        for entry in self._buffer:  # one self-contained pickle per entry: no memo kept across them
            pickle.dump(entry, run, protocol=pickle.HIGHEST_PROTOCOL)
        run.seek(0)
        self._runs.append(run)
        self.spilled_runs += 1
        self._buffer = []

    @staticmethod
    def _read(run: IO[bytes]) -> Iterator[Summary]:
        while True:
            try:
                yield pickle.load(run)
            except EOFError:
                return

    def sorted(self) -> Iterator[Summary]:
        self._buffer.sort(key=_first)
        streams: list[Iterator[Summary]] = [self._read(run) for run in self._runs]
        streams.append(iter(self._buffer))
        merged = streams[0] if len(streams) == 1 else heapq.merge(*streams, key=_first)
        pending: Summary | None = None
        for entry in merged:
            if pending is not None and pending[0] != entry[0]:
                self.unique += 1
                yield pending
            pending = entry
        if pending is not None:
            self.unique += 1
            yield pending

    def close(self) -> None:
        for run in self._runs:
            run.close()
        self._runs = []
        self._buffer = []


def _first(entry: Summary) -> ItemKey:
    return entry[0]


# -- clients ---------------------------------------------------------------------------------------------


class Clients:
    """`workers` sets of DynamoDB clients (one per region), created up front and leased to one thread at
    a time. Credentials come from the standard AWS chain (like the daemon), or from `session`."""

    def __init__(self, regions: Sequence[Region], workers: int, session: Any = None) -> None:
        import boto3

        session = session if session is not None else boto3.session.Session()
        try:
            if session.get_credentials() is None:
                raise SetupError(
                    "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, select a "
                    "profile with AWS_PROFILE, or run with a container or instance role"
                )
        except botocore.exceptions.BotoCoreError as exc:
            raise SetupError(f"AWS credentials: {exc}") from None
        config = BotoConfig(
            retries={"mode": "standard", "max_attempts": 3},
            connect_timeout=5,
            read_timeout=30,
            max_pool_connections=4,
        )
        self._pool: queue.Queue[dict[str, Any]] = queue.Queue()
        self._all: list[Any] = []
        for _ in range(workers):
            clients = {
                r.name: session.client("dynamodb", region_name=r.name, endpoint_url=r.url, config=config)
                for r in regions
            }
            self._all += clients.values()
            self._pool.put(clients)

    @contextlib.contextmanager
    def lease(self) -> Iterator[dict[str, Any]]:
        clients = self._pool.get()
        try:
            yield clients
        finally:
            self._pool.put(clients)

    def close(self) -> None:
        for client in self._all:
            with contextlib.suppress(Exception):
                client.close()


# -- the comparison --------------------------------------------------------------------------------------


@dataclass
class Comparison:
    """The outcome of comparing one table from `source` to `target`."""

    table: str
    source: str
    target: str
    apply: bool
    tally: Tally
    segments: int = 0
    source_items: int = 0
    target_items: int = 0
    compared: int = 0  # distinct keys seen by the scans (both sides, or one side only)
    resolved_on_recheck: int = 0
    spilled_segments: int = 0
    throttled: int = 0
    seconds: float = 0.0

    @property
    def equal(self) -> bool:
        return self.tally.unresolved == 0

    def to_json(self) -> dict[str, Any]:
        keys = self.tally.sorted_keys()
        doc: dict[str, Any] = {
            "table": self.table,
            "from": self.source,
            "to": self.target,
            "mode": "apply" if self.apply else "report",
            "equal": self.equal,
            "differences": self.tally.total,
            "missing": {"count": self.tally.counts["missing"], "keys": keys["missing"]},
            "extra": {"count": self.tally.counts["extra"], "keys": keys["extra"]},
            "different": {"count": self.tally.counts["different"], "keys": keys["different"]},
            "keys_truncated": self.tally.truncated,
            "items": {"source": self.source_items, "target": self.target_items, "compared": self.compared},
            "segments": self.segments,
            "seconds": round(self.seconds, 3),
            "items_per_second": round(self.compared / self.seconds, 1) if self.seconds > 0 else None,
            "resolved_on_recheck": self.resolved_on_recheck,
            "spilled_segments": self.spilled_segments,
            "throttled": self.throttled,
        }
        if self.apply:
            doc["repairs"] = dict(self.tally.outcomes)
        return doc


@dataclass
class _Context:
    pair: Pair
    schema: KeySchema
    total: int
    comparison: Comparison
    buckets: dict[str, TokenBucket]
    page_limit: int | None
    lock: threading.Lock = field(default_factory=threading.Lock)


class Reconciler:
    """Runs comparisons. One instance per command; `close()` releases its clients and temporary files.

    `before_repair(pair, repair)` is called just before each conditional write (tests use it to change the
    target item underneath, as a concurrent writer would).
    """

    def __init__(
        self,
        regions: Sequence[Region],
        *,
        apply: bool = False,
        rate: float = DEFAULT_RATE,
        segments: int | None = None,
        workers: int = DEFAULT_WORKERS,
        max_keys: int = 1000,
        segment_items: int = SEGMENT_ITEMS,
        spill_entries: int = SPILL_ENTRIES,
        backup: Path | None = None,
        progress: Progress | None = None,
        session: Any = None,
        before_repair: Callable[[Pair, Repair], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.apply = apply
        self.rate = rate
        self.segments = segments
        self.workers = workers
        self.max_keys = max_keys
        self.segment_items = segment_items
        self.spill_entries = spill_entries
        self.progress = progress or Progress(sys.stderr, enabled=False)
        self.before_repair = before_repair
        self._sleep = sleep
        self._stop = threading.Event()
        self._backup: TextIO | None = None
        self._backup_lock = threading.Lock()
        self._tmp = Path(tempfile.mkdtemp(prefix="ddbsc-reconcile-"))
        self.clients = Clients(regions, workers, session)
        if backup is not None:
            try:
                # The items' data: readable by the operator alone (0600, also when it already exists).
                fd = os.open(backup, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                os.fchmod(fd, 0o600)
                self._backup = os.fdopen(fd, "a", encoding="utf-8")
            except OSError as exc:
                self.close()
                raise SetupError(f"--backup {backup}: {exc.strerror}") from None

    def close(self) -> None:
        self.clients.close()
        if self._backup is not None:
            self._backup.close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> Reconciler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- AWS calls --------------------------------------------------------------------------------------

    def _call(
        self,
        ctx: _Context | None,
        region: str,
        fn: Callable[..., Any],
        *,
        passthrough: bool = False,
        **kwargs: Any,
    ) -> Any:
        """One DynamoDB call: throttling retried with backoff, failures turned into ReconcileErrors
        (`passthrough`: other 4xx errors are raised as they are, for the caller to judge)."""
        delay = 0.2
        for attempt in range(10):
            try:
                return fn(**kwargs)
            except botocore.exceptions.ClientError as exc:
                error = exc.response.get("Error", {})
                code = str(error.get("Code", ""))
                message = str(error.get("Message", ""))
                status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
                if code in THROTTLE_CODES and attempt < 9:
                    if ctx is not None:
                        with ctx.lock:
                            ctx.comparison.throttled += 1
                    self._sleep(delay * random.uniform(0.5, 1.0))
                    delay = min(delay * 2, 20.0)
                    continue
                if code == "ResourceNotFoundException":
                    raise SetupError(f"{region}: {message or 'table not found'}") from None
                if code in AUTH_CODES or status == 403:
                    raise SetupError(
                        f"{region}: the credentials were refused ({code}: {message}); reconcile uses the "
                        "standard AWS credential chain, like the daemon"
                    ) from None
                if status >= 500:
                    raise RegionUnreachable(f"{region}: HTTP {status} {code}: {message}") from None
                if passthrough:
                    raise
                raise RequestFailed(f"{region}: {code}: {message}") from None
            except (
                botocore.exceptions.ConnectionError,
                botocore.exceptions.HTTPClientError,
            ) as exc:
                raise RegionUnreachable(f"{region}: {exc}") from None
            except botocore.exceptions.NoCredentialsError:
                raise SetupError(
                    "no AWS credentials found (standard chain: environment, profile, role)"
                ) from None
        raise RegionUnreachable(f"{region}: still throttled after 10 attempts")  # pragma: no cover

    def describe(self, region: Region, table: str) -> dict[str, Any]:
        with self.clients.lease() as clients:
            doc: dict[str, Any] = self._call(
                None, region.name, clients[region.name].describe_table, TableName=table
            )["Table"]
            return doc

    # -- one comparison ---------------------------------------------------------------------------------

    def run(self, pair: Pair) -> Comparison:
        started = time.monotonic()
        source_desc = self.describe(pair.source, pair.table)
        target_desc = self.describe(pair.target, pair.table)
        schema = KeySchema.from_description(source_desc)
        other = KeySchema.from_description(target_desc)
        if schema != other:
            raise SetupError(
                f"{pair.table}: the key schemas differ between {pair.source.name} ({schema}) and "
                f"{pair.target.name} ({other}); cannot compare"
            )
        counts = [int(d.get("ItemCount") or 0) for d in (source_desc, target_desc)]
        total = self.segments or choose_segments(
            max(counts), segment_items=self.segment_items, workers=self.workers
        )
        comparison = Comparison(
            pair.table,
            pair.source.name,
            pair.target.name,
            self.apply,
            Tally(max_keys=self.max_keys),
            segments=total,
        )
        # Pages no bigger than half a second of the rate, so the bucket paces evenly.
        page_limit = None if self.rate <= 0 else int(min(1000, max(25, self.rate / 2)))
        ctx = _Context(
            pair,
            schema,
            total,
            comparison,
            {pair.source.name: TokenBucket(self.rate), pair.target.name: TokenBucket(self.rate)},
            page_limit,
        )
        self.progress.start(f"{pair.table} {pair.source.name} -> {pair.target.name}", sum(counts))
        try:
            self._run_segments(ctx)
        finally:
            self.progress.finish()
        comparison.seconds = time.monotonic() - started
        return comparison

    def _run_segments(self, ctx: _Context) -> None:
        self._stop.clear()
        pending: set[Future[None]] = set()
        segments = iter(range(ctx.total))
        with ThreadPoolExecutor(self.workers, thread_name_prefix="reconcile") as pool:
            try:
                while True:
                    while len(pending) < 2 * self.workers:
                        segment = next(segments, None)
                        if segment is None:
                            break
                        pending.add(pool.submit(self._segment, ctx, segment))
                    if not pending:
                        break
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        future.result()  # re-raises the first failure
            except BaseException:
                self._stop.set()
                for future in pending:
                    future.cancel()
                raise

    def _scan(self, ctx: _Context, client: Any, region: str, segment: int, spool: SortedSpool) -> None:
        kwargs: dict[str, Any] = {"TableName": ctx.pair.table, "Segment": segment, "TotalSegments": ctx.total}
        if ctx.page_limit:
            kwargs["Limit"] = ctx.page_limit
        while not self._stop.is_set():
            page = self._call(ctx, region, client.scan, **kwargs)
            items = page.get("Items", [])
            for item in items:
                spool.add(summarize(item, ctx.schema))
            self.progress.advance(len(items))
            ctx.buckets[region].take(len(items))
            start = page.get("LastEvaluatedKey")
            if not start:
                return
            kwargs["ExclusiveStartKey"] = start

    def _segment(self, ctx: _Context, segment: int) -> None:
        if self._stop.is_set():
            return
        source, target = ctx.pair.source.name, ctx.pair.target.name
        with self.clients.lease() as clients:
            src = SortedSpool(self.spill_entries, self._tmp)
            tgt = SortedSpool(self.spill_entries, self._tmp)
            try:
                self._scan(ctx, clients[source], source, segment, src)
                self._scan(ctx, clients[target], target, segment, tgt)
                if self._stop.is_set():
                    return
                target_only = 0
                batch: list[tuple[Kind, Summary]] = []
                for kind, summary in diff_summaries(src.sorted(), tgt.sorted()):
                    target_only += kind == "extra"
                    batch.append((kind, summary))
                    if len(batch) >= SETTLE_BATCH:
                        self._settle(ctx, clients, batch)
                        batch = []
                self._settle(ctx, clients, batch)
                with ctx.lock:
                    c = ctx.comparison
                    c.source_items += src.unique
                    c.target_items += tgt.unique
                    c.compared += src.unique + target_only
                    if src.spilled_runs or tgt.spilled_runs:
                        c.spilled_segments += 1
            finally:
                src.close()
                tgt.close()

    def _batch_get(
        self, ctx: _Context, client: Any, region: str, keys: list[dict[str, Any]]
    ) -> dict[ItemKey, Item]:
        """Consistent reads of `keys` (BatchGetItem, unprocessed keys retried with backoff)."""
        found: dict[ItemKey, Item] = {}
        for start in range(0, len(keys), BATCH_GET_KEYS):
            request: dict[str, Any] = {
                ctx.pair.table: {"Keys": keys[start : start + BATCH_GET_KEYS], "ConsistentRead": True}
            }
            delay = 0.05
            while request:
                answer = self._call(ctx, region, client.batch_get_item, RequestItems=request)
                items = answer.get("Responses", {}).get(ctx.pair.table, [])
                for item in items:
                    found[key_of(item, ctx.schema)] = item
                ctx.buckets[region].take(len(items))
                request = answer.get("UnprocessedKeys") or {}
                if request:
                    self._sleep(delay)
                    delay = min(delay * 2, 5.0)
        return found

    def _settle(self, ctx: _Context, clients: dict[str, Any], batch: list[tuple[Kind, Summary]]) -> None:
        """Read the disputed keys again on both sides (consistently), report what still differs, and repair
        it if asked. The scans only kept fingerprints; these reads give the items."""
        if not batch:
            return
        source, target = ctx.pair.source.name, ctx.pair.target.name
        keys = [summary_key(summary, ctx.schema) for _, summary in batch]
        fresh_source = self._batch_get(ctx, clients[source], source, keys)
        fresh_target = self._batch_get(ctx, clients[target], target, keys)
        resolved = 0
        found = 0
        for _, (key, _, _) in batch:
            current = compare(key, fresh_source.get(key), fresh_target.get(key))
            if current is None:
                resolved += 1
                continue
            found += 1
            outcome: Outcome | None = None
            detail: str | None = None
            if self.apply:
                outcome, detail = self._repair(ctx, clients[target], plan_repair(current, ctx.schema))
            with ctx.lock:
                ctx.comparison.tally.add(current, ctx.schema, outcome, detail)
        with ctx.lock:
            ctx.comparison.resolved_on_recheck += resolved
        self.progress.advance(differences=found)

    def _repair(self, ctx: _Context, client: Any, repair: Repair) -> tuple[Outcome, str | None]:
        target = ctx.pair.target.name
        if repair.action == "skip" or repair.condition is None:
            return "skipped", repair.reason
        if self.before_repair is not None:
            self.before_repair(ctx.pair, repair)
        ctx.buckets[target].take(1)
        self._write_backup(ctx, repair)
        request: dict[str, Any] = {
            "TableName": ctx.pair.table,
            "ConditionExpression": repair.condition.expression,
            "ExpressionAttributeNames": repair.condition.names,
        }
        if repair.condition.values:
            request["ExpressionAttributeValues"] = repair.condition.values
        try:
            if repair.action == "put":
                self._call(ctx, target, client.put_item, passthrough=True, Item=repair.item, **request)
            else:
                self._call(ctx, target, client.delete_item, passthrough=True, Key=repair.key_item, **request)
        except botocore.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code == "ConditionalCheckFailedException":
                return "conflict", CHANGED_MEANWHILE
            return "failed", f"{code}: {exc.response.get('Error', {}).get('Message', '')}"
        return "applied", f"{repair.action} if {'absent' if repair.expected is None else 'unchanged'}"

    def _write_backup(self, ctx: _Context, repair: Repair) -> None:
        """The target's item as it was before an overwrite or a delete, one JSON line each."""
        if self._backup is None or repair.expected is None:
            return
        line = json.dumps(
            {
                "table": ctx.pair.table,
                "region": ctx.pair.target.name,
                "action": repair.action,
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "item": to_wire_json(repair.expected),
            },
            sort_keys=True,
        )
        with self._backup_lock:
            self._backup.write(line + "\n")
            self._backup.flush()


# -- the command -----------------------------------------------------------------------------------------


def report_document(comparisons: list[Comparison], source_note: str) -> dict[str, Any]:
    equal = all(c.equal for c in comparisons)
    return {
        "equal": equal,
        "exit_code": 0 if equal else 1,
        "source": source_note,
        "comparisons": [c.to_json() for c in comparisons],
    }


def render_text(doc: dict[str, Any]) -> list[str]:
    """The human summary of a report document."""
    lines = [f"source: {doc['source']}"]
    letters = doc.get("dead_letters") or {}
    if letters.get("count"):
        lines.append(
            f"dead letters: {letters['count']} write(s) the replicator could not apply, in {letters['file']} "
            "(fix the item in the source, then --apply repairs the target):"
        )
        for e in letters.get("entries", [])[-10:]:
            lines.append(
                f"  {e.get('table')} {e.get('source')} -> {e.get('target')} {e.get('key')}: {e.get('error')}"
            )
    for c in doc["comparisons"]:
        rate = f" ({c['items_per_second']:,.0f}/s)" if c.get("items_per_second") else ""
        lines.append(
            f"{c['table']}: {c['from']} -> {c['to']}: {c['items']['compared']:,} keys compared in "
            f"{c['seconds']:.1f}s{rate}, {c['segments']} segments"
        )
        if c["differences"] == 0:
            lines.append("  equal")
        else:
            lines.append(
                f"  missing in {c['to']}: {c['missing']['count']}   extra in {c['to']}: "
                f"{c['extra']['count']}   different: {c['different']['count']}"
            )
            for kind in ("missing", "extra", "different"):
                for entry in c[kind]["keys"]:
                    extra = f" (newer: {entry['newer']})" if "newer" in entry else ""
                    repair = entry.get("repair")
                    if repair:
                        extra += f" -> {repair if repair == 'applied' else entry.get('detail') or repair}"
                    lines.append(f"    {kind:<9} {json.dumps(entry['key'], sort_keys=True)}{extra}")
            if c["keys_truncated"]:
                lines.append("    ... (more keys: raise --max-keys to list them)")
        if "repairs" in c:
            r = c["repairs"]
            lines.append(
                f"  repairs: {r['applied']} applied, {r['conflict']} conflicts ({CHANGED_MEANWHILE}), "
                f"{r['skipped']} skipped, {r['failed']} failed"
            )
        if c["resolved_on_recheck"]:
            lines.append(f"  {c['resolved_on_recheck']} keys differed in the scans but agree on a re-read")
        if c["throttled"]:
            lines.append(f"  throttled {c['throttled']} times (retried with backoff)")
    lines.append("regions equal" if doc["equal"] else "differences remain")
    return lines


def run_reconcile(
    config: Config,
    *,
    source: str | None = None,
    targets: Sequence[str] = (),
    tables: Sequence[str] = (),
    progress: Progress | None = None,
    session: Any = None,
    **options: Any,
) -> dict[str, Any]:
    """Compare (and with apply=True repair) every requested table from the source region to each target.

    The source defaults to the daemon's active region (its admin API), else the config's home region; the
    targets to every other configured region; the tables to the config's `tables`. `options` go to
    `Reconciler`. Returns the report document; raises ReconcileError (SetupError, RegionUnreachable).
    """
    if source is None:
        source, note = active_region(config)
    else:
        note = "--from"
    targets = list(targets) or [r.name for r in config.regions if r.name != source]
    pairs = plan_pairs(config, source, targets, list(tables) or list(config.tables))
    regions = [config.region(source)] + [config.region(t) for t in dict.fromkeys(targets)]
    with Reconciler(regions, progress=progress, session=session, **options) as reconciler:
        comparisons = [reconciler.run(pair) for pair in pairs]
    doc = report_document(comparisons, f"{source} ({note})")
    # What the replicator could never apply (this host's state_dir): the items to look at first.
    letters = read_dead_letters(config.state_dir)
    doc["dead_letters"] = {
        "count": len(letters),
        "file": str(dead_letter_path(config.state_dir)),
        "entries": [
            {k: e.get(k) for k in ("at", "table", "source", "target", "key", "error")} for e in letters[-100:]
        ],
    }
    return doc
