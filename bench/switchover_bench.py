"""`make bench-switchover`: the write pause of a planned switchover with 300 ms of replication delay.

Real components on 127.0.0.1: two moto_server regions, one-way replication us-east-1 -> eu-west-1 with a
fixed delay (tests/support/globaltables.py, standing in for Global Tables), `ddb-sidecar run` with its
HAProxy, and an app of boto3 threads writing unique items through the stable address at ~200/s. Each run
starts a fresh sidecar, lets the lag be measured, then runs `ddb-sidecar switchover --to eu-west-1` and
records: the pause the sidecar reports (writes held), the longest write latency the app saw around the
switchover (what the app feels), the lag measured before, and whether every acknowledged write is in
eu-west-1 and none written after the switch is in us-east-1. Goal: pause <= replication delay + 250 ms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from tests.support.globaltables import GlobalTables
from tests.support.moto_region import MotoRegion, start_regions
from tests.support.stack import SIDECAR, SidecarStack
from tests.support.wait import wait_until

HOME, OTHER = "us-east-1", "eu-west-1"


class App:
    """Open-loop-ish writers: `threads` threads, each writing then pausing so the total is ~`rate`/s."""

    def __init__(self, stack: SidecarStack, table: str, rate: float, threads: int = 16) -> None:
        self.stack, self.table, self.rate, self.threads = stack, table, rate, threads
        self.acked: list[tuple[float, float, str]] = []
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._workers = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self) -> App:
        for w in self._workers:
            w.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for w in self._workers:
            w.join(30)

    def _run(self, worker: int) -> None:
        client = self.stack.client(connect_timeout=10, read_timeout=10)
        interval = self.threads / self.rate
        next_at = time.monotonic()
        while not self._stop.is_set():
            key = f"b{worker}-{uuid.uuid4().hex[:12]}"
            sent = time.monotonic()
            try:
                client.put_item(TableName=self.table, Item={"pk": {"S": key}})
                self.acked.append((sent, time.monotonic(), key))
            except (ClientError, BotoCoreError) as exc:
                self.failed.append(type(exc).__name__)
            next_at = max(next_at + interval, time.monotonic())
            self._stop.wait(max(0.0, next_at - time.monotonic()))


def one_run(regions: dict[str, MotoRegion], work: Path, delay: float, rate: float, n: int) -> dict[str, Any]:
    suffix = uuid.uuid4().hex[:8]
    app_table, health = f"sb-app-{suffix}", f"sb-health-{suffix}"
    for region in regions.values():
        region.create_table(app_table, stream=True)
        region.create_table(health, stream=True)
    src, dst = regions[HOME], regions[OTHER]
    result: dict[str, Any] = {"run": n, "delay_ms": delay * 1000}
    with GlobalTables(src, dst, [app_table, health], work, {**src.env()}, delay=delay):
        stack = SidecarStack(
            [src, dst],
            [app_table],
            work,
            extra={"health": {"table": health}, "failover": {"switchover_timeout": "5s"}},
        )
        stack.start()
        try:
            stack.wait_regions_up()
            wait_until(
                lambda: stack.status()["replication"]["lag_ms"] is not None, 30, message="lag measured"
            )
            with App(stack, app_table, rate) as app:
                time.sleep(3.0)  # steady load before the switch
                result["lag_before_ms"] = stack.status()["replication"]["lag_ms"]
                t0 = time.monotonic()
                done = subprocess.run(
                    [str(SIDECAR), "switchover", "--to", OTHER, "-c", str(stack.config_path)],
                    capture_output=True, text=True, timeout=60, env=stack.env, check=False,
                )  # fmt: skip
                t1 = time.monotonic()
                time.sleep(2.0)
            result["ok"] = done.returncode == 0
            result["cli"] = (done.stdout + done.stderr).strip()
            status = stack.status()
            fence = next((e for e in status["events"] if e["kind"] == "fence-released"), None)
            result["fence_event"] = fence["reason"] if fence else None
            around = [ack - sent for sent, ack, _ in app.acked if t0 - 1.0 <= sent <= t1 + 0.5]
            before = [ack - sent for sent, ack, _ in app.acked if sent < t0 - 1.0]
            result["app_max_write_ms_around"] = round(max(around) * 1000, 1) if around else None
            result["app_p50_write_ms_before"] = round(statistics.median(before) * 1000, 1) if before else None
            result["rate_before"] = round(len([a for a in app.acked if t0 - 2.0 <= a[0] < t0]) / 2.0, 1)
            result["failed"] = len(app.failed)
            import re

            m = re.search(r"writes held (\d+) ms \((\d+) held", result["cli"])
            result["pause_ms"] = float(m.group(1)) if m else None
            result["held"] = int(m.group(2)) if m else None
            time.sleep(delay + 1.0)
            keys = [k for _, _, k in app.acked]
            result["acked"] = len(keys)
            result["missing_in_new"] = len(set(keys) - dst.present(app_table, keys))
            after = [k for s, _, k in app.acked if s > t1]
            result["after_switch_in_old"] = len(src.present(app_table, after))
        finally:
            stack.stop()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--delay", type=float, default=0.3, help="replication delay in seconds")
    parser.add_argument("--rate", type=float, default=200.0, help="app writes per second")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="swbench"))
    regions_list = start_regions([HOME, OTHER], work)
    regions = {r.name: r for r in regions_list}
    results = []
    try:
        for n in range(1, args.runs + 1):
            r = one_run(regions, work, args.delay, args.rate, n)
            results.append(r)
            print(
                f"run {n}: ok={r['ok']} pause {r['pause_ms']} ms ({r['held']} held), app's longest write around "
                f"the switch {r['app_max_write_ms_around']} ms (p50 before {r['app_p50_write_ms_before']} ms), "
                f"lag before {r['lag_before_ms']} ms, {r['rate_before']} writes/s, failed {r['failed']}, "
                f"missing in {OTHER} {r['missing_in_new']}, written to {HOME} after the switch {r['after_switch_in_old']}",
                flush=True,
            )
    finally:
        for region in regions_list:
            region.stop()
    pauses = [r["pause_ms"] for r in results if r["pause_ms"] is not None]
    goal = args.delay * 1000 + 250
    if pauses:
        print(
            f"\nswitchover write pause with {args.delay * 1000:.0f} ms replication delay: median "
            f"{statistics.median(pauses):.0f} ms, max {max(pauses):.0f} ms (goal <= {goal:.0f} ms: "
            f"{'met' if max(pauses) <= goal else 'MISSED'})"
        )
    out = Path(__file__).parent / "results" / f"switchover-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"settings": vars(args), "runs": results}, indent=2))
    print(f"raw numbers: {out}")
    ok = all(r["ok"] and not r["missing_in_new"] and not r["after_switch_in_old"] for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
