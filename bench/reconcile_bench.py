"""`make bench-reconcile`: how fast `ddb-sidecar reconcile` compares a table, and how much memory it takes.

Two moto_server regions with signature checking (us-east-1, eu-west-1) on 127.0.0.1, one table with
`--items` items per region (~200 bytes each, a `ddbsc:ts` attribute), loaded with BatchWriteItem from
several threads, and `--differences` planted differences (a third missing in eu-west-1, a third extra, a
third different). Then, for every rate in `--rates`, the real CLI as a subprocess (default rates: unlimited, and the CLI's default 1000):

    ddb-sidecar reconcile -c CONFIG --json --from us-east-1 --to eu-west-1 --rate R

and we measure the wall time, the keys compared per second (the report's `items.compared` over its
`seconds`), and the peak RSS of the reconcile process (its VmHWM, polled). The report is checked against
the planted differences. moto is the bottleneck here (one process per region, ~300-500 requests/s, a Scan
page costs it a pass over the whole table); against DynamoDB the rate limit is what bounds the speed.
Raw numbers go to bench/results/reconcile-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from tests.support.moto_region import MotoRegion, start_regions
from tests.support.ports import free_port
from tests.support.stack import base_env, isolated_aws_env

HOME, OTHER = "us-east-1", "eu-west-1"
RESULTS = Path(__file__).resolve().parent / "results"
SIDECAR = Path(sys.executable).parent / "ddb-sidecar"


def make_item(i: int, variant: str = "") -> dict[str, Any]:
    return {
        "pk": {"S": f"order#{i:08d}"},
        "customer": {"S": f"customer#{i % 5000:05d}"},
        "total": {"N": str((i * 7919) % 100000 / 100)},
        "status": {"S": "shipped" if i % 3 else "paid"},
        "note": {"S": (variant or "n") * 100},
        "ddbsc:ts": {"N": str(1_700_000_000_000 + i)},
    }


def load(region: MotoRegion, table: str, items: list[dict[str, Any]], threads: int) -> float:
    """BatchWriteItem, 25 items a request, from `threads` threads (one client each); seconds taken."""
    started = time.monotonic()
    batches = [items[i : i + 25] for i in range(0, len(items), 25)]
    local = threading.local()
    clients: list[Any] = []
    lock = threading.Lock()

    def client() -> Any:
        if not hasattr(local, "client"):
            local.client = region.client(retries={"mode": "standard", "max_attempts": 10})
            with lock:
                clients.append(local.client)
        return local.client

    def send(batch: list[dict[str, Any]]) -> None:
        request: dict[str, Any] = {table: [{"PutRequest": {"Item": item}} for item in batch]}
        while request:
            request = client().batch_write_item(RequestItems=request).get("UnprocessedItems") or {}

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(send, batches))
    return time.monotonic() - started


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM of a running process: its peak resident set since exec (ru_maxrss of a forked child would
    include the parent's size at fork time)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return None
    return None


def run_reconcile(config: Path, env: dict[str, str], rate: float, workers: int) -> dict[str, Any]:
    cmd = [str(SIDECAR), "reconcile", "-c", str(config), "--json", "--from", HOME, "--to", OTHER]
    cmd += ["--rate", str(rate), "--workers", str(workers), "--max-keys", "100000"]
    started = time.monotonic()
    peak = 0.0
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        while True:  # VmHWM only grows: the last reading before the exit is the peak
            peak = max(peak, peak_rss_mb(proc.pid) or 0.0)
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                break
            time.sleep(0.05)
        wall = time.monotonic() - started
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"reconcile exited {proc.returncode}: {stderr[-2000:]}")
    return {
        "wall_s": wall,
        "peak_rss_mb": peak,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "exit": proc.returncode,
        "report": json.loads(stdout),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=100_000, help="items per region")
    parser.add_argument("--differences", type=int, default=300)
    parser.add_argument("--rates", default="0,1000", help="comma-separated --rate values (0: unlimited)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--load-threads", type=int, default=8, help="loader threads per region")
    args = parser.parse_args(argv)

    log_dir = Path(tempfile.mkdtemp(prefix="reconcile-bench-"))
    regions = start_regions([HOME, OTHER], log_dir, verify=False)
    try:
        home, other = regions
        table = f"bench-{uuid.uuid4().hex[:8]}"
        for region in regions:
            region.create_table(table)
        n, d = args.items, args.differences
        third = d // 3
        missing = set(range(0, third))  # only in us-east-1
        different = set(range(third, 2 * third))
        source = [make_item(i) for i in range(n)]
        target = [make_item(i, "d") if i in different else make_item(i) for i in range(n) if i not in missing]
        target += [make_item(n + i) for i in range(d - 2 * third)]  # extra: only in eu-west-1
        print(f"loading {len(source):,} items into {HOME} and {len(target):,} into {OTHER} ...", flush=True)
        with ThreadPoolExecutor(2) as pool:
            took = list(
                pool.map(
                    lambda job: load(job[0], table, job[1], args.load_threads),
                    [(home, source), (other, target)],
                )
            )
        print(f"loaded in {max(took):.1f} s ({HOME} {took[0]:.1f} s, {OTHER} {took[1]:.1f} s)", flush=True)
        del source, target

        config = log_dir / "sidecar.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "listen": f"127.0.0.1:{free_port()}",
                    "regions": [
                        {"name": r.name, "endpoint": r.endpoint, "proxy": f"127.0.0.1:{free_port()}"}
                        for r in regions
                    ],
                    "tables": [table],
                    "haproxy": {"stats": f"127.0.0.1:{free_port()}"},
                    "admin": f"127.0.0.1:{free_port()}",
                }
            )
        )
        env = {**base_env(), **isolated_aws_env(*home.credentials)}
        runs = []
        for rate in [float(r) for r in args.rates.split(",")]:
            result = run_reconcile(config, env, rate, args.workers)
            (c,) = result["report"]["comparisons"]
            ok = (c["missing"]["count"], c["extra"]["count"], c["different"]["count"]) == (
                len(missing),
                d - 2 * third,
                len(different),
            )
            row = {
                "rate": rate,
                "workers": args.workers,
                "wall_s": round(result["wall_s"], 2),
                "compare_s": c["seconds"],
                "keys_compared": c["items"]["compared"],
                "items_per_s": c["items_per_second"],
                "items_read_per_s": round((c["items"]["source"] + c["items"]["target"]) / c["seconds"], 1),
                "segments": c["segments"],
                "spilled_segments": c["spilled_segments"],
                "peak_rss_mb": round(result["peak_rss_mb"], 1),
                "reconcile_cpu_s": round(result["cpu_s"], 1),
                "differences_found": c["differences"],
                "report_correct": ok,
            }
            runs.append(row)
            label = "unlimited" if rate <= 0 else f"{rate:g} items/s per region"
            print(
                f"--rate {label}: {row['keys_compared']:,} keys compared in {row['compare_s']:.1f} s = "
                f"{row['items_per_s']:,.0f} keys/s ({row['items_read_per_s']:,.0f} items read/s, both "
                f"regions), {row['segments']} segments, peak RSS {row['peak_rss_mb']:.0f} MB, "
                f"reconcile CPU {row['reconcile_cpu_s']:.1f} s, "
                f"{row['differences_found']} differences, report {'correct' if ok else 'WRONG'}",
                flush=True,
            )
        RESULTS.mkdir(exist_ok=True)
        out = RESULTS / f"reconcile-{time.strftime('%Y%m%d-%H%M%S')}.json"
        out.write_text(
            json.dumps(
                {
                    "items_per_region": n,
                    "differences": d,
                    "load_s": [round(t, 1) for t in took],
                    "runs": runs,
                    "cpus": os.cpu_count(),
                },
                indent=2,
            )
        )
        print(f"raw numbers: {out}")
        return 0 if all(r["report_correct"] for r in runs) else 1
    finally:
        for region in regions:
            region.stop()


if __name__ == "__main__":
    sys.exit(main())
