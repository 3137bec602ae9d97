"""`make bench-replication`: the stream replicator under 200 writes/s, and how fast it drains a backlog.

Real components on 127.0.0.1: two moto_server regions with signature checking (us-east-1 the source,
eu-west-1 the target), the app table with a NEW_AND_OLD_IMAGES stream in both, the tombstone (health)
table in both, and the replicator as its own process (`python -m sidecar.replication`), as the daemon
would run it. For each write mode (`single`, `transact`):

1. live: an open-loop writer sends `--rate` writes/s to the source for `--duration` s (a scheduler thread
   queues each write at its due time, worker threads with a boto3 client each send them): 60% PutItems of
   new items, 30% UpdateItems of live items, 10% DeleteItems. One new item in `--sample-every` is a lag
   sample: the time its PutItem was acknowledged by the source, and the time it was first readable in the
   target (a poller sends one consistent BatchGetItem for every outstanding sample every 20 ms, so a lag
   carries up to ~20 ms of polling plus a BatchGetItem). Throughput: records the replicator applied per
   second (its own counter, logged every 0.5 s) over the writing window, then the time it needs to catch
   up once the writes stop.
2. backlog: the replicator stopped (SIGTERM), `--backlog` more writes, the replicator started again: the
   time from its start to caught up, i.e. the most items/s it applies here.
Finally the target must equal the source (every item, without the `ddbsc:` attributes).

moto serves roughly 300-500 requests/s per process here and copies a whole table for every transaction
(its rollback), so absolute numbers are moto's more than the replicator's. Raw numbers go to
bench/results/replication-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import random
import re
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from botocore.exceptions import BotoCoreError, ClientError

from sidecar.core.replicate import strip_bookkeeping
from tests.support.moto_region import MotoRegion, start_regions
from tests.support.processes import ManagedProcess
from tests.support.stack import isolated_aws_env

SOURCE, TARGET = "us-east-1", "eu-west-1"
RESULTS = Path(__file__).resolve().parent / "results"
POLL_EVERY = 0.02
# The replicator's status lines: "2026-11-26 19:08:48,519 INFO sidecar.replication: replication status: {...}"
STATUS = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) .*replication status: (\{.*\})$")
# moto loses writes when transactions on one table overlap and one is cancelled: one at a time there.
MODES: dict[str, dict[str, Any]] = {
    "single": {"write_mode": "single", "max_in_flight": 8},
    "transact": {"write_mode": "transact", "batch_size": 50, "max_in_flight": 1},
}


def now() -> float:
    return time.monotonic()


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a live process (Linux /proc), 0 if unknown."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


class Writer:
    """Open-loop writes at `rate`/s: the scheduler decides each write, workers send them."""

    def __init__(self, region: MotoRegion, table: str, rate: float, threads: int, sample_every: int) -> None:
        self.region = region
        self.table = table
        self.rate = rate
        self.sample_every = sample_every
        self.rng = random.Random(42)
        self.live: list[str] = []  # keys that may be updated or deleted (never a pending sample)
        # Keys with a write in flight: never a second one at the same time. moto does not serialize the
        # writes of an item with their stream records (DynamoDB does): two at once can leave the stream
        # in another order than the table.
        self.busy: set[str] = set()
        self.busy_lock = threading.Lock()
        self.samples: dict[str, float] = {}  # key -> acknowledged at (monotonic)
        self.sample_lock = threading.Lock()
        self.counts = {"put": 0, "update": 0, "delete": 0}
        self.errors: dict[str, int] = {}
        self.acked = 0
        self.sent = 0
        self.max_delay = 0.0
        self._n = 0
        self._queue: queue.SimpleQueue[tuple[str, str, bool] | None] = queue.SimpleQueue()
        self._workers = [
            threading.Thread(target=self._work, args=(region.client(read_timeout=30),), daemon=True)
            for _ in range(threads)
        ]
        for worker in self._workers:
            worker.start()

    def _next(self) -> tuple[str, str, bool]:
        roll = self.rng.random()
        index = self.rng.randrange(len(self.live)) if self.live else 0
        with self.busy_lock:
            free = bool(self.live) and self.live[index] not in self.busy
            if roll < 0.6 or len(self.live) < 50 or not free:
                key = f"item-{self._n:07d}"
                self._n += 1
                sample = self._n % self.sample_every == 0
                if not sample:
                    self.live.append(key)
                kind = "put"
            else:
                key, sample = self.live[index], False
                if roll < 0.9:
                    kind = "update"
                else:
                    kind = "delete"
                    self.live[index] = self.live[-1]
                    self.live.pop()
            self.busy.add(key)
        return kind, key, sample

    def _work(self, client: Any) -> None:
        while (job := self._queue.get()) is not None:
            kind, key, sample = job
            try:
                if kind == "put":
                    client.put_item(
                        TableName=self.table,
                        Item={"pk": {"S": key}, "v": {"N": "1"}, "data": {"S": "x" * 100}},
                    )
                elif kind == "update":
                    client.update_item(
                        TableName=self.table,
                        Key={"pk": {"S": key}},
                        UpdateExpression="ADD v :one",
                        ExpressionAttributeValues={":one": {"N": "1"}},
                    )
                else:
                    client.delete_item(TableName=self.table, Key={"pk": {"S": key}})
            except (ClientError, BotoCoreError) as exc:
                name = type(exc).__name__
                self.errors[name] = self.errors.get(name, 0) + 1
                continue
            finally:
                with self.busy_lock:
                    self.busy.discard(key)
            if sample:
                with self.sample_lock:
                    self.samples[key] = now()
            self.counts[kind] += 1
            self.acked += 1
        client.close()

    def run(self, seconds: float) -> float:
        """Schedule writes for `seconds`; return the achieved rate of scheduling."""
        start = now() + 0.05
        i = 0
        while True:
            due = start + i / self.rate
            if due >= start + seconds:
                break
            delay = due - now()
            if delay > 0:
                time.sleep(delay)
            else:
                self.max_delay = max(self.max_delay, -delay)
            self._queue.put(self._next())
            i += 1
        self.sent += i
        return i / seconds

    def burst(self, count: int) -> None:
        """`count` writes as fast as the workers go (no samples)."""
        for _ in range(count):
            kind, key, sample = self._next()
            if sample:
                self.live.append(key)
            self._queue.put((kind, key, False))
        self.sent += count

    def drain(self, timeout: float) -> None:
        deadline = now() + timeout
        while self.acked + sum(self.errors.values()) < self.sent and now() < deadline:
            time.sleep(0.02)

    def close(self) -> None:
        for _ in self._workers:
            self._queue.put(None)
        for worker in self._workers:
            worker.join(5)


class LagPoller:
    """Polls the target for every acknowledged sample not seen yet; records when it first appears."""

    def __init__(self, region: MotoRegion, table: str, writer: Writer) -> None:
        self.client = region.client(read_timeout=30)
        self.table = table
        self.writer = writer
        self.lags: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lag-poller", daemon=True)

    def start(self) -> LagPoller:
        self._thread.start()
        return self

    def outstanding(self) -> int:
        with self.writer.sample_lock:
            return len(set(self.writer.samples) - set(self.lags))

    def _run(self) -> None:
        while not self._stop.is_set():
            with self.writer.sample_lock:
                waiting = [k for k in self.writer.samples if k not in self.lags][:100]
            if waiting:
                with contextlib.suppress(ClientError, BotoCoreError):
                    answer = self.client.batch_get_item(
                        RequestItems={
                            self.table: {"Keys": [{"pk": {"S": k}} for k in waiting], "ConsistentRead": True}
                        }
                    )
                    seen = now()
                    for item in answer["Responses"].get(self.table, []):
                        key = item["pk"]["S"]
                        self.lags[key] = seen - self.writer.samples[key]
            self._stop.wait(POLL_EVERY)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.client.close()


class Replicator:
    """`python -m sidecar.replication` as a process; its status lines read back from its log."""

    def __init__(self, config: Path, work: Path, name: str, env: dict[str, str]) -> None:
        self.process = ManagedProcess(
            name,
            [
                sys.executable,
                "-m",
                "sidecar.replication",
                "-c",
                config,
                "--source",
                SOURCE,
                "--status-every",
                "0.5",
            ],
            work,
            env=env,
        )
        self._offset = 0
        self.statuses: list[tuple[float, dict[str, Any]]] = []  # (wall-clock time it was logged, status)

    def start(self) -> None:
        self.process.start()

    def stop(self) -> None:
        self.process.stop()

    def poll(self) -> dict[str, Any] | None:
        """Read new status lines; the latest status."""
        with contextlib.suppress(FileNotFoundError), open(self.process.log_path, "rb") as log:
            log.seek(self._offset)
            data = log.read()
            end = data.rfind(b"\n") + 1
            self._offset += end
            for line in data[:end].decode("utf-8", "replace").splitlines():
                match = STATUS.search(line)
                if match:
                    logged = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S").timestamp()
                    self.statuses.append((logged + int(match.group(2)) / 1000, json.loads(match.group(3))))
        return self.statuses[-1][1] if self.statuses else None

    def wait_caught_up(self, records: int, timeout: float) -> float | None:
        """Seconds until the replicator has read `records` and has nothing pending; None on timeout."""
        started = now()
        while now() - started < timeout:
            self.process.check_running()
            status = self.poll()
            if status and status["records_read"] >= records and status["lag_ms"] == 0:
                return now() - started
            time.sleep(0.1)
        return None


def contents(region: MotoRegion, table: str) -> dict[str, Any]:
    ddb = region.client(read_timeout=60)
    out: dict[str, Any] = {}
    kwargs: dict[str, Any] = {"TableName": table, "ConsistentRead": True}
    while True:
        page = ddb.scan(**kwargs)
        out.update({i["pk"]["S"]: strip_bookkeeping(i) for i in page["Items"]})
        if "LastEvaluatedKey" not in page:
            return out
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def applied_rate(statuses: list[tuple[float, dict[str, Any]]], start: float, end: float) -> float | None:
    """Records applied or found superseded per second between two moments (from the status counters)."""
    window = [(t, s["records_applied"] + s["records_superseded"]) for t, s in statuses if start <= t <= end]
    if len(window) < 2 or window[-1][0] <= window[0][0]:
        return None
    return (window[-1][1] - window[0][1]) / (window[-1][0] - window[0][0])


def run_mode(
    mode: str, regions: dict[str, MotoRegion], work: Path, args: argparse.Namespace
) -> dict[str, Any]:
    source, target = regions[SOURCE], regions[TARGET]
    table = f"replbench-{mode}-{uuid.uuid4().hex[:6]}"
    health = f"{table}-h"
    for region in regions.values():
        region.create_table(table, stream=True)
        region.create_table(health, stream=True)
    config = work / f"{mode}.yaml"
    settings = {**MODES[mode], **({"max_in_flight": args.max_in_flight} if args.max_in_flight else {})}
    if args.poll_interval:
        settings["poll_interval"] = args.poll_interval
    config.write_text(
        yaml.safe_dump(
            {
                "regions": [
                    {"name": name, "endpoint": region.endpoint, "proxy": f"127.0.0.1:{8101 + i}"}
                    for i, (name, region) in enumerate(regions.items())
                ],
                "tables": [table],
                "health": {"table": health},
                "state_dir": f"state-{mode}",
                "replication": {"mode": "streams", **settings},
                "logging": {"level": "debug" if args.debug else "info"},
            }
        )
    )
    key = source.credentials
    replicator = Replicator(
        config, work, f"replicator-{mode}", isolated_aws_env(key.access_key_id, key.secret_access_key)
    )
    writer = Writer(source, table, args.rate, args.threads, args.sample_every)
    poller = LagPoller(target, table, writer)
    result: dict[str, Any] = {"mode": mode, "settings": settings, "table": table}
    try:
        replicator.start()
        deadline = now() + 30
        while replicator.poll() is None and now() < deadline:
            replicator.process.check_running()
            time.sleep(0.1)
        poller.start()
        cpu0 = {
            "replicator": cpu_seconds(replicator.process.pid),
            "moto_source": cpu_seconds(source.process.pid),
            "moto_target": cpu_seconds(target.process.pid),
        }
        result["load_average_before"] = load_average()
        t0 = time.time()
        print(f"  {mode}: {args.rate:g} writes/s for {args.duration:g} s ...", flush=True)
        result["achieved_rate"] = round(writer.run(args.duration), 1)
        t1 = time.time()
        writer.drain(30)
        caught_up = replicator.wait_caught_up(writer.acked, 120)
        result["catch_up_after_writes_s"] = round(caught_up, 2) if caught_up is not None else None
        deadline = now() + 30
        while poller.outstanding() and now() < deadline:
            time.sleep(0.05)
        lags = [v * 1000 for v in poller.lags.values()]
        final = replicator.poll() or {}
        cpu = {
            "replicator": cpu_seconds(replicator.process.pid),
            "moto_source": cpu_seconds(source.process.pid),
            "moto_target": cpu_seconds(target.process.pid),
        }
        records = max(final.get("records_read", 0), 1)
        result["cpu_ms_per_record"] = {k: round((cpu[k] - cpu0[k]) * 1000 / records, 2) for k in cpu}
        result["load_average_after"] = load_average()
        result.update(
            writes=writer.acked,
            write_counts=dict(writer.counts),
            write_errors=dict(writer.errors),
            max_schedule_delay_ms=round(writer.max_delay * 1000, 1),
            replicated_per_s=round(applied_rate(replicator.statuses, t0 + 2, t1) or 0, 1),
            samples=len(writer.samples),
            samples_never_seen=poller.outstanding(),
            lag_ms_p50=round(pct(lags, 50) or 0, 1),
            lag_ms_p90=round(pct(lags, 90) or 0, 1),
            lag_ms_p99=round(pct(lags, 99) or 0, 1),
            lag_ms_max=round(max(lags), 1) if lags else None,
            lag_ms_mean=round(statistics.fmean(lags), 1) if lags else None,
            replicator_errors=final.get("errors"),
            replicator_last_error=final.get("last_error"),
            replicator_requests=final.get("requests"),
        )
        poller.stop()
        # Backlog: stopped, more writes, started again.
        if args.backlog:
            replicator.stop()
            before = writer.acked
            writer.burst(args.backlog)
            writer.drain(120)
            replicator.statuses.clear()
            replicator._offset = replicator.process.log_path.stat().st_size
            replicator.start()
            took = replicator.wait_caught_up(writer.acked - before, 300)
            result["backlog"] = writer.acked - before
            # From the process start (about 1 s of Python start-up in it) to caught up.
            result["backlog_s"] = round(took, 2) if took is not None else None
            # From its own counters, while it was applying.
            busy = [t for t, s in replicator.statuses if s["records_read"] > 0]
            if took is not None and busy:
                first = busy[0] - 0.5  # it began reading at most one status interval before
                done = replicator.statuses[-1][1]
                total = done["records_applied"] + done["records_superseded"]
                result["backlog_items_per_s"] = round(total / max(replicator.statuses[-1][0] - first, 0.5), 1)
        print("  comparing source and target ...", flush=True)
        in_source, in_target = contents(source, table), contents(target, table)
        result["target_equals_source"] = in_source == in_target
        if in_source != in_target:
            differ = sorted(
                k for k in set(in_source) | set(in_target) if in_source.get(k) != in_target.get(k)
            )
            result["differences"] = {
                "count": len(differ),
                "first": {k: [in_source.get(k), in_target.get(k)] for k in differ[:10]},
            }
    finally:
        writer.close()
        poller.stop()
        replicator.stop()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=list(MODES),
        default=["single"],
        help="write modes to measure (transact against moto: moto copies the whole table for every action)",
    )
    parser.add_argument("--rate", type=float, default=200.0, help="writes per second to the source")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of writes")
    parser.add_argument("--threads", type=int, default=16, help="writer threads")
    parser.add_argument("--sample-every", type=int, default=10, help="one new item in N is a lag sample")
    parser.add_argument("--backlog", type=int, default=3000, help="writes for the backlog phase (0: skip)")
    parser.add_argument("--max-in-flight", type=int, default=None, help="override replication.max_in_flight")
    parser.add_argument("--poll-interval", default=None, help="override replication.poll_interval (250ms)")
    parser.add_argument("--debug", action="store_true", help="the replicator logs every delivery (timings)")
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args()

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    work = Path(tempfile.mkdtemp(prefix="replbench"))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"replication-{stamp}.json"
    started = time.time()
    results: list[dict[str, Any]] = []
    regions: list[MotoRegion] = []
    try:
        print(f"replication benchmark: logs in {work}")
        regions = start_regions([SOURCE, TARGET], work, verify=False)
        by_name = {r.name: r for r in regions}
        for mode in args.modes:
            try:
                results.append(run_mode(mode, by_name, work, args))
            except Exception as exc:
                results.append({"mode": mode, "error": f"{type(exc).__name__}: {exc}"})
            print(json.dumps(results[-1], indent=1), flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping every process", file=sys.stderr)
    finally:
        for region in regions:
            region.stop()
        if results:
            RESULTS.mkdir(parents=True, exist_ok=True)
            out.write_text(
                json.dumps(
                    {
                        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                        "duration_s": round(time.time() - started, 1),
                        "settings": {k: v for k, v in vars(args).items() if k != "keep_logs"},
                        "cpus": os.cpu_count(),
                        "runs": results,
                    },
                    indent=2,
                )
                + "\n"
            )
        if args.keep_logs:
            print(f"logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"{'mode':<9} {'writes/s':>8} {'replicated/s':>12} {'lag p50':>8} {'lag p99':>8} {'max':>8} "
          f"{'catch-up':>8} {'backlog items/s':>15} {'errors':>6} equal")  # fmt: skip
    ok = bool(results)
    for r in results:
        if "error" in r:
            print(f"{r['mode']:<9} ERROR {r['error'][:200]}")
            ok = False
            continue
        print(
            f"{r['mode']:<9} {r['achieved_rate']:>8.0f} {r['replicated_per_s']:>12.0f} "
            f"{r['lag_ms_p50']:>6.0f}ms {r['lag_ms_p99']:>6.0f}ms {r['lag_ms_max'] or 0:>6.0f}ms "
            f"{r['catch_up_after_writes_s'] if r['catch_up_after_writes_s'] is not None else '-':>7}s "
            f"{r.get('backlog_items_per_s', '-'):>15} {r['replicator_errors']:>6} {r['target_equals_source']}"
        )
        ok = ok and bool(r["target_equals_source"])
    print(f"\nraw numbers: {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
