"""`make bench-failover`: how long a home-region outage takes the app's writes away, idle and under load.

Real components, all on 127.0.0.1: two moto_server regions with signature checking (us-east-1 the home
region, eu-west-1 the other), a fault proxy in front of each, `ddb-sidecar run` with its own HAProxy and the
default health and failover settings (interval 1 s, timeout 800 ms, fall 3), boto3 as the application.

For every fault mode and load level, each run starts a fresh sidecar (no hold-down carries over), waits until
both regions are up, then cuts the home region at T0 and measures:
- time without service: T0 to the first PutItem acknowledged through the stable address whose item is in
  eu-west-1's own data (read from that moto process directly, not through the sidecar);
- failed client requests after T0, by error type;
- when the sidecar's status said it moved (active_region, polled every 50 ms) and when its log recorded the
  decision.
Load levels:
- idle: no app traffic at all during the outage (the sidecar sees it only through its own probes); once
  the admin API (polled every 50 ms) shows HAProxy's weights serving eu-west-1, the app writes once: the
  time to that acknowledgement is what an idle app would have seen at worst (up to 50 ms of polling in it);
- 200 req/s: an open-loop generator (a scheduler and a pool of worker threads, each with its own boto3
  client: 2 s timeouts, one attempt) starts a few seconds before the cut and runs until a few seconds after
  the move. The pool is big enough for every request of the outage to be stuck at once, so a stuck request
  never delays the schedule (the largest delay is reported).
Fault modes: blackhole (connections accepted, nothing answered), refuse (connection refused), reset (TCP
reset), http_error (every request answered 500 InternalServerError), sigstop (kill -STOP of the home moto
process: TCP accepted by the kernel, nothing answered, like a frozen host).

moto serves roughly 300-500 requests/s per process on these machines; the achieved rate before the cut is
printed. Raw numbers go to bench/results/failover-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
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
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from tests.support.faultproxy import FaultProxy
from tests.support.moto_region import MotoRegion, start_regions
from tests.support.ports import free_port
from tests.support.stack import HEALTH_TABLE, SidecarStack, new_app_table

HOME, OTHER = "us-east-1", "eu-west-1"
ONE_ATTEMPT: dict[str, Any] = {"total_max_attempts": 1, "mode": "standard"}
RESULTS = Path(__file__).resolve().parent / "results"

# name -> (what is done to the home region, the fault proxy mode and its parameters; None: SIGSTOP moto)
FAULTS: dict[str, tuple[str, tuple[str, dict[str, Any]] | None]] = {
    "blackhole": ("fault proxy accepts, never answers", ("blackhole", {})),
    "refuse": ("fault proxy refuses connections", ("refuse", {})),
    "reset": ("fault proxy resets every connection", ("reset", {})),
    "http_error": ("fault proxy answers 500 InternalServerError", ("http_error", {"status": 500})),
    "sigstop": ("kill -STOP of the home moto process", None),
}
LOADS = ("idle", "200/s")

# What others take to move traffic off a dead primary, with their default settings (for reference).
PEERS = [
    ("HAProxy, default checks (inter 2s, fall 3)", "~6 s"),
    ("Patroni, defaults", "~20 s"),
    ("GitHub orchestrator (MySQL)", "10-13 s"),
    ("Route 53 health check failover", "30 s + DNS TTL"),
]
TARGETS = {"idle": 3.0, "200/s": 1.0}

PROBE_EVERY = 0.05  # idle: the pause between write attempts after the move, if one fails
PROBE_TIMEOUT = 0.5
LOAD_TIMEOUT = 2.0
NO_MOVE_DEADLINE = 20.0  # a run that has not moved by then is recorded as "did not move"


def now() -> float:
    return time.monotonic()


def error_type(exc: BaseException) -> str:
    """`InternalServerError (500)` for an answer, the botocore class name for a transport failure."""
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return f"{err.get('Code', 'ClientError')} ({status})"
    return type(exc).__name__


_SESSION = boto3.session.Session()  # one loader for every client: the service model is read once


def app_client(url: str, timeout: float) -> Any:
    """The application's boto3 client: any credentials (the sidecar re-signs), one attempt, short timeouts.
    Create clients in one thread (a Session is not thread-safe); a client may then be used in another."""
    return _SESSION.client(
        "dynamodb",
        endpoint_url=url,
        region_name=HOME,
        aws_access_key_id="AKIABENCHAPPEXAMPLE1",
        aws_secret_access_key="bench-app-secret-not-used-upstream",
        config=BotoConfig(
            retries=ONE_ATTEMPT, connect_timeout=timeout, read_timeout=timeout, max_pool_connections=2
        ),
    )


def put(client: Any, table: str, key: str) -> None:
    client.put_item(TableName=table, Item={"pk": {"S": key}, "v": {"S": "bench"}})


# -- the open-loop load generator ------------------------------------------------------------------------


@dataclass
class Request:
    key: str
    due: float  # when the schedule said to send it
    started: float
    ended: float
    error: str | None  # None: acknowledged


class LoadGenerator:
    """PutItems at `rate`/s on a fixed schedule, whatever the answers take: a scheduler thread queues each
    request at its due time; `threads` workers (one boto3 client each) send them. Created once per benchmark
    (the clients point at one stable address that every fresh sidecar reuses); `begin()`/`end()` per run."""

    def __init__(self, url: str, table: str, rate: float, threads: int) -> None:
        self.table = table
        self.rate = rate
        self.records: list[Request] = []
        self._queue: queue.SimpleQueue[tuple[str, float] | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._scheduler: threading.Thread | None = None
        self.sent = 0
        self._workers = []
        for i in range(threads):
            worker = threading.Thread(
                target=self._work, args=(app_client(url, LOAD_TIMEOUT),), name=f"load-{i}", daemon=True
            )
            worker.start()
            self._workers.append(worker)

    def _work(self, client: Any) -> None:
        while (job := self._queue.get()) is not None:
            key, due = job
            started = now()
            try:
                put(client, self.table, key)
                error = None
            except (ClientError, BotoCoreError) as exc:
                error = error_type(exc)
            self.records.append(Request(key, due, started, now(), error))
        client.close()

    def begin(self, prefix: str) -> float:
        self.records = []
        self.sent = 0
        self._stop.clear()
        start = now() + 0.05
        self._scheduler = threading.Thread(
            target=self._schedule, args=(prefix, start), name="load-scheduler", daemon=True
        )
        self._scheduler.start()
        return start

    def _schedule(self, prefix: str, start: float) -> None:
        i = 0
        while not self._stop.is_set():
            due = start + i / self.rate
            delay = due - now()
            if delay > 0 and self._stop.wait(delay):
                break
            self._queue.put((f"{prefix}-{i:06d}", due))
            self.sent = i = i + 1

    def end(self, drain: float) -> list[Request]:
        """Stop scheduling; wait (at most `drain` s) for the requests in flight; return this run's records."""
        self._stop.set()
        if self._scheduler is not None:
            self._scheduler.join(5)
        deadline = now() + drain
        while len(self.records) < self.sent and now() < deadline:
            time.sleep(0.02)
        return list(self.records)

    def close(self) -> None:
        self._stop.set()
        for _ in self._workers:
            self._queue.put(None)
        for worker in self._workers:
            worker.join(LOAD_TIMEOUT * 2 + 1)


# -- watching the sidecar ----------------------------------------------------------------------------------


class StatusPoller:
    """Polls `GET /status` every 50 ms: when the sidecar said it moved, and what it said."""

    def __init__(self, admin_url: str, every: float = 0.05) -> None:
        self.admin_url = admin_url
        self.every = every
        self.moved_at: float | None = None  # active_region became OTHER
        self.serving_at: float | None = None  # HAProxy's weights (as read back) serve OTHER
        self.home_down_at: float | None = None
        self.event: dict[str, Any] | None = None
        self.last: dict[str, Any] | None = None
        self.errors = 0
        # (when, what) each time the controller's one-line reason or a region's state/cause changed
        self.changes: list[tuple[float, str]] = []
        self._seen: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status-poller", daemon=True)

    def start(self) -> StatusPoller:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with urllib.request.urlopen(f"{self.admin_url}/status", timeout=1.0) as resp:
                    status = json.loads(resp.read())
            except (OSError, ValueError):
                self.errors += 1
            else:
                at = now()
                self.last = status
                if self.moved_at is None and status.get("active_region") == OTHER:
                    self.moved_at = at
                if self.serving_at is None and (status.get("haproxy") or {}).get("serving_region") == OTHER:
                    self.serving_at = at
                home = next((r for r in status.get("regions", []) if r["name"] == HOME), None)
                if self.home_down_at is None and home is not None and home["state"] == "down":
                    self.home_down_at = at
                watched = {"reason": str((status.get("failover") or {}).get("reason"))}
                for r in status.get("regions", []):
                    watched[r["name"]] = f"{r['state']} w={r.get('weight')} {r.get('cause') or ''}".strip()
                for name, text in watched.items():
                    if self._seen.get(name) != text:
                        self._seen[name] = text
                        self.changes.append((at, f"{name}: {text}"))
                if self.event is None:
                    self.event = next(
                        (e for e in status.get("events", []) if e.get("kind") == "failover"), None
                    )
            self._stop.wait(self.every)


LOG_MOVE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) WARNING \S+: failover: ", re.M)


def logged_move(log: Path, offset: int) -> float | None:
    """The wall-clock time of the first `failover:` line the sidecar logged after `offset` (text log format,
    local time with milliseconds)."""
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    match = LOG_MOVE.search(text)
    if not match:
        return None
    return time.mktime(time.strptime(match[1], "%Y-%m-%d %H:%M:%S")) + int(match[2]) / 1000


# -- one run -----------------------------------------------------------------------------------------------


@dataclass
class Bench:
    regions: dict[str, MotoRegion]
    proxies: dict[str, FaultProxy]
    table: str
    stable_port: int
    log_dir: Path
    load: LoadGenerator | None
    warmup: float
    after: float
    direct: dict[str, Any] = field(default_factory=dict)
    cut_in_force: str | None = None  # the fault applied and not yet undone

    def __post_init__(self) -> None:
        self.direct = {name: region.client() for name, region in self.regions.items()}
        self.rng = random.Random()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.stable_port}"

    def cut(self, fault: str) -> None:
        self.cut_in_force = fault
        action = FAULTS[fault][1]
        if action is None:
            self.regions[HOME].sigstop()
        else:
            mode, params = action
            self.proxies[HOME].set_mode(mode, **params)

    def restore(self) -> None:
        """Undo the fault; a SIGSTOPped moto gets SIGCONT and must answer again (its backlog applied)."""
        fault, self.cut_in_force = self.cut_in_force, None
        if fault is not None and FAULTS[fault][1] is None:
            self.regions[HOME].sigcont()
            self.regions[HOME].wait_ready(30)
        for proxy in self.proxies.values():
            proxy.set_mode("pass")
            # A blackholed connection stays silent in any mode: reset them, so that the sidecar's requests
            # still waiting on them end now rather than at its request timeout (it drains them on stop).
            proxy.drop_connections()

    def in_region(self, region: str, keys: Iterable[str]) -> set[str]:
        """The keys whose item is in `region`'s own data (moto read directly; BatchGetItem, 100 at a time)."""
        keys = list(keys)
        found: set[str] = set()
        client = self.direct[region]
        for i in range(0, len(keys), 100):
            pending: dict[str, Any] = {
                self.table: {"Keys": [{"pk": {"S": k}} for k in keys[i : i + 100]], "ConsistentRead": True}
            }
            deadline = now() + 30
            while pending and now() < deadline:
                answer = client.batch_get_item(RequestItems=pending)
                found.update(item["pk"]["S"] for item in answer["Responses"].get(self.table, []))
                pending = answer.get("UnprocessedKeys") or {}
        return found

    def run(self, fault: str, load: str, number: int) -> dict[str, Any]:
        result: dict[str, Any] = {"fault": fault, "load": load, "run": number, "moved": False}
        for proxy in self.proxies.values():
            proxy.set_mode("pass")
        stack = SidecarStack(
            [self.regions[HOME], self.regions[OTHER]],
            [self.table],
            self.log_dir,
            endpoints={name: p.url for name, p in self.proxies.items()},
            # Default health and failover settings; only the addresses and the health table are ours.
            extra={"health": {"table": HEALTH_TABLE}, "listen": f"127.0.0.1:{self.stable_port}"},
        )
        stack.listen_port = self.stable_port  # the stable address every run's sidecar takes over
        log = stack.process.log_path
        log_offset = log.stat().st_size if log.exists() else 0
        poller: StatusPoller | None = None
        prefix = f"{fault}-{load.replace('/', '')}-{number}-{uuid.uuid4().hex[:6]}"
        try:
            t = now()
            stack.start(timeout=30)
            stack.wait_regions_up(timeout=30)
            result["startup_s"] = round(now() - t, 2)
            active = stack.status()["active_region"]
            if active != HOME:
                raise RuntimeError(f"a fresh sidecar serves {active}, not {HOME}")
            poller = StatusPoller(stack.admin_url).start()
            if load == "idle":
                probe = app_client(self.url, PROBE_TIMEOUT)
                try:
                    # Idle, only the probes see the outage: cut at a random phase of their 1 s schedule
                    # (a fixed delay after start-up would always measure the same phase).
                    result["phase_s"] = round(self.rng.uniform(0, 1.0), 3)
                    time.sleep(result["phase_s"])
                    t0, t0_wall = now(), time.time()
                    self.cut(fault)
                    result["cut_call_ms"] = round((now() - t0) * 1000, 1)
                    self._idle(probe, prefix, t0, result, poller)
                finally:
                    probe.close()
            else:
                assert self.load is not None
                records = self._loaded(fault, prefix, poller, result)
                t0, t0_wall = result.pop("_t0"), result.pop("_t0_wall")
                self._account(records, t0, result)
            deadline = now() + 2.0  # let the status catch up with HAProxy's weights (idle runs end early)
            while poller.serving_at is None and poller.moved_at is not None and now() < deadline:
                time.sleep(0.02)
            poller.stop()
            result.update(self._sidecar_view(poller, t0, t0_wall, logged_move(log, log_offset)))
        finally:
            if poller is not None:
                poller.stop()
            try:
                self.restore()
            finally:
                stack.stop()
        if load != "idle":
            self._verify(result)
        return result

    def _idle(self, probe: Any, prefix: str, t0: float, result: dict[str, Any], poller: StatusPoller) -> None:
        """Truly idle: the app sends nothing during the outage. Once HAProxy's weights (read back by the
        sidecar, watched through the admin API, not the data path) serve eu-west-1, the app's next write is
        sent at once: the time to its acknowledgement is what an idle app would have seen at worst."""
        while now() - t0 < NO_MOVE_DEADLINE and poller.serving_at is None:
            time.sleep(0.005)
        attempts, failures = 0, Counter[str]()
        while now() - t0 < NO_MOVE_DEADLINE:
            key = f"{prefix}-{attempts:05d}"
            attempts += 1
            try:
                put(probe, self.table, key)
            except (ClientError, BotoCoreError) as exc:
                failures[error_type(exc)] += 1
                time.sleep(PROBE_EVERY)
                continue
            acked = now()
            if key in self.in_region(OTHER, [key]):
                result.update(moved=True, no_service_s=round(acked - t0, 3))
                break
            result["acked_elsewhere"] = result.get("acked_elsewhere", 0) + 1
        result.update(attempts=attempts, failed=sum(failures.values()), failed_by_type=dict(failures))

    def _loaded(self, fault: str, prefix: str, poller: StatusPoller, result: dict[str, Any]) -> list[Request]:
        assert self.load is not None
        gen = self.load
        started = gen.begin(prefix)
        try:
            time.sleep(self.warmup + self.rng.uniform(0, 1.0))  # a random phase of the probe schedule
            t0, t0_wall = now(), time.time()
            self.cut(fault)
            result["cut_call_ms"] = round((now() - t0) * 1000, 1)
            result["_t0"], result["_t0_wall"] = t0, t0_wall
            window = min(2.0, t0 - started)
            before = [r for r in gen.records if t0 - window <= r.started < t0]
            result["rate_before_cut"] = round(sum(1 for r in before) / window, 1)
            result["acked_rate_before_cut"] = round(sum(1 for r in before if r.error is None) / window, 1)
            # Until the status says it moved and an acknowledgement came after that, then a few seconds more.
            while now() - t0 < NO_MOVE_DEADLINE:
                moved = poller.moved_at
                if moved is not None and any(r.error is None and r.ended > moved for r in gen.records[-50:]):
                    break
                time.sleep(0.02)
            time.sleep(self.after)
        finally:
            records = gen.end(drain=LOAD_TIMEOUT * 2 + 1)
        return records

    def _account(self, records: list[Request], t0: float, result: dict[str, Any]) -> None:
        before = [r for r in records if r.ended < t0]
        after = [r for r in records if r.ended >= t0]
        failures = Counter(r.error for r in after if r.error is not None)
        acked_after = sorted((r for r in after if r.error is None), key=lambda r: r.ended)
        in_other = self.in_region(OTHER, [r.key for r in acked_after])
        first = next((r for r in acked_after if r.key in in_other), None)
        lag = sorted(r.started - r.due for r in records)
        worst = max(records, key=lambda r: r.started - r.due, default=None)
        result.update(
            sent=len(records),
            acked=sum(1 for r in records if r.error is None),
            failed_before_cut=sum(1 for r in before if r.error is not None),
            failed=sum(failures.values()),
            failed_by_type=dict(failures),
            window_s=round(max((r.ended for r in records), default=t0) - min(r.due for r in records), 2)
            if records
            else 0.0,
            max_schedule_lag_ms=round(lag[-1] * 1000, 1) if lag else None,
            p99_schedule_lag_ms=round(lag[int(len(lag) * 0.99)] * 1000, 1) if lag else None,
            max_schedule_lag_due_s=round(worst.due - t0, 2) if worst is not None else None,
        )
        if first is not None:
            result.update(moved=True, no_service_s=round(first.ended - t0, 3))
            result["last_failure_s"] = round(
                max((r.ended for r in after if r.error is not None), default=t0) - t0, 3
            )
        # For the data check after the region is restored (reads of the home region need it answering).
        result["_acked_after"] = [(r.key, r.ended - t0) for r in acked_after]
        result["_in_other"] = in_other

    def _verify(self, result: dict[str, Any]) -> None:
        """Every write acknowledged after the cut is somewhere: in eu-west-1, or (served before the move) in
        us-east-1. One in neither would be a lost acknowledged write."""
        acked = result.pop("_acked_after", [])
        in_other = result.pop("_in_other", set())
        rest = [k for k, _ in acked if k not in in_other]
        in_home = self.in_region(HOME, rest) if rest else set()
        first_other = result.get("no_service_s")
        result["data"] = {
            "acked_after_cut": len(acked),
            "in_eu_west_1": len(in_other),
            "in_us_east_1": len(in_home),
            "missing": len(rest) - len(in_home),
            # Acknowledged after the first write landed in eu-west-1, yet not in eu-west-1: a flap back.
            "after_move_not_in_eu_west_1": sum(
                1 for k, at in acked if first_other is not None and at > first_other and k not in in_other
            ),
        }

    @staticmethod
    def _sidecar_view(
        poller: StatusPoller, t0: float, t0_wall: float, logged: float | None
    ) -> dict[str, Any]:
        def since(at: float | None) -> float | None:
            return None if at is None else round(at - t0, 3)

        event = poller.event or {}
        return {
            "status_home_down_s": since(poller.home_down_at),
            "status_moved_s": since(poller.moved_at),
            "weights_moved_s": since(poller.serving_at),
            "logged_move_s": None if logged is None else round(logged - t0_wall, 3),
            "event": {k: event.get(k) for k in ("at", "from", "to", "reason")} if event else None,
            "status_changes": [[round(at - t0, 3), what] for at, what in poller.changes],
        }


# -- the report --------------------------------------------------------------------------------------------


def _stat(values: list[float | int], fmt: str) -> str:
    if not values:
        return "-"
    return f"{format(statistics.median(values), fmt)} / {format(max(values), fmt)}"


def summarize(results: list[dict[str, Any]], faults: list[str], loads: list[str], runs: int) -> bool:
    """Print the table; True when every run moved and no acknowledged write went missing."""
    print(f"\nddb-sidecar failover benchmark: median / max of {runs} run(s) per scenario")
    print("  no service: cut -> first PutItem acknowledged through the stable address and found in eu-west-1")
    print("  status: cut -> GET /status says active_region eu-west-1 (polled every 50 ms)")
    print("  failed: client requests that failed after the cut; req/s: acknowledged in the 2 s before it")
    print(
        "  idle: no app traffic during the outage; one write as soon as the admin API (polled every 50 ms) "
        "shows HAProxy serving eu-west-1"
    )
    print(
        f"{'fault':<11}{'load':<7}{'moved':>6}{'no service s':>15}{'status s':>15}{'failed':>13}"
        f"{'req/s':>7}  target"
    )
    ok = True
    for load in loads:
        for fault in faults:
            rows = [r for r in results if r["fault"] == fault and r["load"] == load]
            if not rows:
                continue
            moved = [r for r in rows if r.get("moved")]
            ok = ok and len(moved) == len(rows)
            ok = ok and all(r.get("data", {}).get("missing", 0) == 0 for r in rows)
            gaps = [r["no_service_s"] for r in moved]
            rate = [r["acked_rate_before_cut"] for r in rows if "acked_rate_before_cut" in r]
            target = TARGETS[load]
            verdict = "no move" if len(moved) < len(rows) else ("ok" if max(gaps) <= target else "MISSED")
            print(
                f"{fault:<11}{load:<7}{f'{len(moved)}/{len(rows)}':>6}{_stat(gaps, '.2f'):>15}"
                f"{_stat([r['status_moved_s'] for r in rows if r.get('status_moved_s') is not None], '.2f'):>15}"
                f"{_stat([r['failed'] for r in rows], 'g'):>13}"
                f"{(f'{statistics.median(rate):.0f}' if rate else '-'):>7}  {verdict} (<= {target:g} s)"
            )
    slow = [r for r in results if not r.get("moved") or r["no_service_s"] > TARGETS[r["load"]]]
    if slow:
        print("\nruns over the target: what the sidecar's status said after the cut (s: text)")
        for r in slow:
            gap = f"{r['no_service_s']:.2f} s" if r.get("moved") else "did not move"
            print(f"  {r['fault']}, {r['load']}, run {r['run']}: {r.get('error') or gap}")
            for at, what in [c for c in r.get("status_changes", []) if c[0] >= 0][:8]:
                print(f"    {at:6.2f}: {what[:150]}")
    kinds: dict[str, Counter[str]] = {}
    for r in results:
        kinds.setdefault(f"{r['fault']}, {r['load']}", Counter()).update(r.get("failed_by_type", {}))
    print("\nfailed requests by type (all runs):")
    for name, counter in kinds.items():
        print(f"  {name:<20} " + (", ".join(f"{k} x{v}" for k, v in counter.most_common()) or "none"))
    loaded = [r for r in results if "data" in r]
    if loaded:
        missing = sum(r["data"]["missing"] for r in loaded)
        flaps = sum(r["data"]["after_move_not_in_eu_west_1"] for r in loaded)
        lag = max((r.get("max_schedule_lag_ms") or 0) for r in loaded)
        print(
            f"\ndata check (200/s runs, moto read directly): acknowledged writes missing from both regions: "
            f"{missing}; acknowledged after the move but not in eu-west-1: {flaps}; "
            f"largest delay of the load schedule: {lag:.0f} ms"
        )
    print("\nfor reference, time to move off a dead primary elsewhere (their defaults):")
    for name, figure in PEERS:
        print(f"  {name:<44} {figure}")
    print(f"  {'ddb-sidecar targets':<44} 1 s under traffic, 3 s idle")
    return ok


# -- main --------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per scenario (default 3)")
    parser.add_argument("--faults", nargs="+", choices=list(FAULTS), default=list(FAULTS))
    parser.add_argument("--loads", nargs="+", choices=list(LOADS), default=list(LOADS))
    parser.add_argument("--rate", type=float, default=200.0, help="the loaded runs' PutItems per second")
    parser.add_argument(
        "--threads", type=int, default=512, help="load generator workers (rate x 2 s timeout, and then some)"
    )
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of load before the cut")
    parser.add_argument("--after", type=float, default=2.0, help="seconds of load after the move")
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs (path printed)")
    args = parser.parse_args()
    if args.runs < 1 or args.rate <= 0 or args.threads < 1:
        parser.error("--runs, --rate and --threads must be positive")
    loads = [load for load in LOADS if load in args.loads]
    if "200/s" in loads and args.rate != 200.0:
        loads = [f"{args.rate:g}/s" if load == "200/s" else load for load in loads]
        TARGETS[loads[-1]] = TARGETS["200/s"]

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # unwinds through the finally blocks below, which stop every process

    signal.signal(signal.SIGTERM, interrupted)
    work = Path(tempfile.mkdtemp(prefix="failbench"))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"failover-{stamp}.json"
    results: list[dict[str, Any]] = []
    started = time.time()
    regions: list[MotoRegion] = []
    proxies: dict[str, FaultProxy] = {}
    load: LoadGenerator | None = None
    complete = False
    try:
        print(f"failover benchmark: logs in {work}; {args.runs} run(s) x {len(args.faults)} faults x {loads}")
        regions = start_regions([HOME, OTHER], work, verify=False)
        by_name = {r.name: r for r in regions}
        for region in regions:
            proxies[region.name] = FaultProxy(region.port, work, name=f"faultproxy-{region.name}").start()
        table = new_app_table(regions, "failbench")
        stable_port = free_port()
        if any(load_ != "idle" for load_ in loads):
            load = LoadGenerator(f"http://127.0.0.1:{stable_port}", table, args.rate, args.threads)
        bench = Bench(by_name, proxies, table, stable_port, work, load, args.warmup, args.after)
        # 512 boto3 clients are ~850,000 objects: a full collection of them stalls every thread for 0.2-0.4 s
        # (seen as a hole in the load schedule). They live until the end: keep them out of the collector.
        gc.freeze()
        for number in range(1, args.runs + 1):
            for fault in args.faults:
                for load_name in loads:
                    try:
                        result = bench.run(fault, load_name, number)
                    except Exception as exc:  # one broken run (e.g. a start-up timeout) must not end the rest
                        result = {"fault": fault, "load": load_name, "run": number, "moved": False,
                                  "failed": 0, "error": f"{type(exc).__name__}: {exc}"}  # fmt: skip
                    results.append(result)
                    _print_run(result)
        complete = True
    except KeyboardInterrupt:
        print("\ninterrupted: stopping every process", file=sys.stderr)
    finally:
        if load is not None:
            load.close()
        for proxy in proxies.values():
            with contextlib.suppress(Exception):
                proxy.stop()
        for region in regions:
            region.stop()
        if results:
            RESULTS.mkdir(parents=True, exist_ok=True)
            settings = {k: v for k, v in vars(args).items() if k != "keep_logs"}
            out.write_text(
                json.dumps(
                    {
                        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                        "duration_s": round(time.time() - started, 1),
                        "complete": complete,
                        "settings": {
                            **settings,
                            "health": "defaults (interval 1s, timeout 800ms, fall 3, rise 3)",
                            "failover": "defaults (automatic, failback manual, hold_down 60s)",
                            "probe_every_s": PROBE_EVERY,
                            "probe_timeout_s": PROBE_TIMEOUT,
                            "load_timeout_s": LOAD_TIMEOUT,
                        },
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
    ok = summarize(results, args.faults, loads, args.runs)
    print(f"\nraw numbers: {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}")
    print(f"total time: {time.time() - started:.0f} s")
    return 0 if ok and complete else 1


def _print_run(r: dict[str, Any]) -> None:
    if "error" in r:
        print(f"  {r['fault']:<10} {r['load']:<6} run {r['run']}: ERROR {r['error'][:300]}", flush=True)
        return
    gap = f"{r['no_service_s']:.2f} s" if r.get("moved") else "DID NOT MOVE"
    status = r.get("status_moved_s")
    parts = [
        f"{r['fault']:<10} {r['load']:<6} run {r['run']}: no service {gap}",
        f"status moved {status:.2f} s" if status is not None else "status never moved",
        f"failed {r['failed']}",
    ]
    if "rate_before_cut" in r:
        parts.append(f"{r['rate_before_cut']:.0f} req/s before the cut")
    elif "attempts" in r:
        parts.append(f"{r['attempts']} probe attempts")
    print("  " + ", ".join(parts), flush=True)


if __name__ == "__main__":
    sys.exit(main())
