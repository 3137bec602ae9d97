"""`make bench-fleet`: a fleet of three hosts agreeing through etcd, measured.

Real components on 127.0.0.1: a three-member etcd cluster, two moto_server regions with signature checking,
and three hosts, each a `ddb-sidecar run` with its own HAProxy and a fault proxy per region, all with the
default health settings (interval 1 s, timeout 800 ms, fall 3) and `coordination.lease_ttl` 5 s. Each run
starts a fresh fleet (no hold-down carries over). Measured:
- the outage for all: every host's path to us-east-1 blackholed at T0; per host, T0 to the first PutItem
  sent after T0 and acknowledged through that host's stable address (its key then read from eu-west-1's own
  data), and the fleet's worst host; idle (no app traffic; one write per host as soon as its status shows
  eu-west-1 active) and under load (an open-loop generator per host);
- leader change: kill -9 of the leader's sidecar, to the moment every other member names a new leader;
- etcd requests per second at steady state (no app traffic and under load): the sum over the members of
  etcd's own `grpc_server_handled_total` over 10 s. Nothing on the data path touches etcd, so this is lease
  keep-alives, watches and health-driven record updates only.
The default load is 50 writes/s per host (150/s in all). On the 2-core test machine every write crosses a
Python fault proxy, a sidecar and HAProxy, and all of it shares the cores with one moto process: at 100/s
per host only 0-21 writes/s were acknowledged before the cut and the fleet had moved on its own (a real
overload, not the fleet's doing), so the issue's 200/s per host cannot be measured here.
- the switchover's write pause per host: tables replicated us-east-1 -> eu-west-1 by the Global Tables
  stand-in (tests/support/globaltables.py, DELAY_S added to each record), two writer threads per host
  writing as fast as they are answered, `ddb-sidecar switchover --to eu-west-1` typed on a non-leader; per
  host, the longest wait of any write sent while the command ran (the client's view of the pause), beside
  the pause each member reports and the lag the leader measured when the fences closed. Goal: lag + 400 ms.
Raw numbers go to bench/results/fleet-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from bench.failover_bench import LOAD_TIMEOUT, LoadGenerator, app_client, put
from sidecar.fleet.localetcd import LocalEtcdCluster, etcd_version
from tests.support.fleet import HOSTS, Fleet
from tests.support.globaltables import GlobalTables
from tests.support.moto_region import MotoRegion, start_regions
from tests.support.stack import HEALTH_TABLE, new_app_table, stream_tables
from tests.support.traffic import Writers

HOME, OTHER = "us-east-1", "eu-west-1"
RESULTS = Path(__file__).resolve().parent / "results"
LEASE_TTL = 5.0


def now() -> float:
    return time.monotonic()


def etcd_requests(endpoints: list[str]) -> float:
    """The sum of grpc_server_handled_total over every member (requests etcd finished handling)."""
    total = 0.0
    for endpoint in endpoints:
        with urllib.request.urlopen(f"{endpoint}/metrics", timeout=5) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith("grpc_server_handled_total{"):
                    total += float(line.rsplit(" ", 1)[1])
    return total


def etcd_rate(endpoints: list[str], seconds: float = 10.0) -> float:
    before, t = etcd_requests(endpoints), now()
    time.sleep(seconds)
    return (etcd_requests(endpoints) - before) / (now() - t)


def outage(fleet: Fleet, load: str, rate: float, warmup: float) -> dict[str, Any]:
    result: dict[str, Any] = {"load": load, "hosts": {}}
    generators: dict[str, LoadGenerator] = {}
    if load != "idle":
        for host in HOSTS:
            generators[host] = LoadGenerator(
                fleet.stacks[host].url, fleet.table, rate, int(rate * LOAD_TIMEOUT) + 8
            )
        for host, gen in generators.items():
            gen.begin(f"{host}-{uuid.uuid4().hex[:6]}")
        time.sleep(warmup)
        result["etcd_requests_per_s"] = etcd_rate(fleet.etcd_endpoints, 5.0)
    moved_before = [h for h in HOSTS if fleet.status(h)["active_region"] != HOME]
    t0 = now()
    cut_at: dict[str, float] = {}
    for host in HOSTS:  # one after the other (a few ms each): each host's times count from its own cut
        fleet.proxies[host][HOME].set_mode("blackhole")
        cut_at[host] = now()
    result["cut_spread_s"] = cut_at[HOSTS[-1]] - t0
    moved: dict[str, float] = {}
    deadline = t0 + 20
    while len(moved) < len(HOSTS) and now() < deadline:
        for host in HOSTS:
            if host not in moved and fleet.status(host)["active_region"] == OTHER:
                moved[host] = now() - cut_at[host]
        time.sleep(0.05)
    if load == "idle":
        for host in HOSTS:
            client = app_client(fleet.stacks[host].url, 2.0)
            key = f"idle-{host}-{uuid.uuid4().hex[:8]}"
            put(client, fleet.table, key)
            result["hosts"][host] = {
                "status_moved_s": moved.get(host),
                "first_ack_s": now() - cut_at[host],
                "in_other": fleet.holds(OTHER, key),
            }
    else:
        time.sleep(2.0)
        for host, gen in generators.items():
            records = gen.end(drain=LOAD_TIMEOUT + 1)
            gen.close()
            cut = cut_at[host]
            before = [r for r in records if r.ended <= cut and r.error is None and r.ended > cut - 2]
            after = sorted(
                (r for r in records if r.started >= cut and r.error is None), key=lambda r: r.ended
            )
            first = after[0] if after else None
            result["hosts"][host] = {
                "status_moved_s": moved.get(host),
                "first_ack_s": (first.ended - cut) if first else None,
                "in_other": fleet.holds(OTHER, first.key) if first else False,
                "failed": sum(1 for r in records if r.error is not None and r.ended > cut),
                "rate_before": len(before) / 2.0,
            }
    for host in HOSTS:  # what each host said happened (a move before the cut shows here)
        result["hosts"][host]["events"] = [
            f"{e['at']} {e['kind']}: {e['reason'][:160]}" for e in fleet.status(host)["events"][:8]
        ]
    result["moved_before_cut"] = moved_before
    worst = [h["first_ack_s"] for h in result["hosts"].values()]
    result["fleet_worst_s"] = None if None in worst else max(worst)
    return result


def leader_change(fleet: Fleet) -> dict[str, Any]:
    leader = fleet.status(HOSTS[0])["coordination"]["leader"]
    others = [h for h in HOSTS if h != leader]
    stack = fleet.stacks[leader]
    t0 = now()
    stack.signal(signal.SIGKILL)
    new = None
    while now() - t0 < 30:
        names = {fleet.status(h)["coordination"]["leader"] for h in others}
        if len(names) == 1 and (name := names.pop()) in others:
            new = name
            break
        time.sleep(0.02)
    took = now() - t0
    active = {fleet.status(h)["active_region"] for h in others}
    stack.wait_exit(5)
    # Its HAProxy outlived it (by design): the restarted sidecar adopts it, and stops it with the fleet.
    stack.start()
    return {"old": leader, "new": new, "took_s": took, "active_after": sorted(active)}


DELAY_S = 0.3


def switchover(moto: dict[str, MotoRegion], etcd: LocalEtcdCluster, work: Path) -> dict[str, Any]:
    app, health = stream_tables(moto.values(), "benchfleet-so")
    result: dict[str, Any] = {}
    with GlobalTables(moto[HOME], moto[OTHER], [app, health], work, {**moto[HOME].env()}, delay=DELAY_S):
        fleet = Fleet(moto, app, etcd.endpoints, work, lease_ttl=LEASE_TTL, health={"table": health}).start()
        try:
            deadline = now() + 30
            while any(fleet.status(h)["replication"]["lag_ms"] is None for h in HOSTS) and now() < deadline:
                time.sleep(0.1)
            host = next(h for h in HOSTS if h != fleet.leader())
            writers = {h: Writers(fleet.stacks[h], app, threads=2) for h in HOSTS}
            for w in writers.values():
                w.__enter__()
            try:
                time.sleep(2.0)
                t0 = now()
                doc = admin_switchover(fleet, host)
                t1 = now()
                time.sleep(1.0)
            finally:
                for w in writers.values():
                    w.__exit__()
            result = {
                "from_host": host,
                "ok": doc.get("ok"),
                "reason": doc.get("reason"),
                "lag_ms": doc.get("lag_ms"),
                "command_s": t1 - t0,
                "hosts": {
                    h: {
                        "client_max_wait_ms": max(
                            ((at - sent) * 1000 for sent, at, _ in writers[h].acked if t0 <= sent <= t1),
                            default=None,
                        ),
                        "reported_pause_ms": (doc.get("hosts") or {}).get(h, {}).get("pause_ms"),
                        "failed": len(writers[h].failed),
                    }
                    for h in HOSTS
                },
                "active_after": sorted(set(fleet.active().values())),
            }
        finally:
            fleet.stop()
    return result


def admin_switchover(fleet: Fleet, host: str) -> dict[str, Any]:
    """POST /switchover to `host`'s admin API (the CLI's call; its JSON answer has every host's pause)."""
    request = urllib.request.Request(
        f"{fleet.stacks[host].admin_url}/switchover",
        data=json.dumps({"to": OTHER}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return dict(json.loads(resp.read()))
    except urllib.error.HTTPError as exc:
        return dict(json.loads(exc.read()))


def _stat(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.2f} / {max(values):.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate", type=float, default=50.0, help="writes/s per host under load (default 50)")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument(
        "--parts", default="outage,leader,switchover", help="what to measure (default: all three)"
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    work = Path(tempfile.mkdtemp(prefix="benchfleet"))
    moto_list = start_regions([HOME, OTHER], work)
    moto = {r.name: r for r in moto_list}
    results: dict[str, Any] = {
        "rate_per_host": args.rate,
        "runs": args.runs,
        "outage": [],
        "leader": [],
        "switchover": [],
    }
    try:
        table = new_app_table(moto.values(), "benchfleet")
        with LocalEtcdCluster(3, work / "etcd") as etcd:
            results["etcd"] = etcd_version(etcd.binary)
            parts = set(args.parts.split(","))
            for load in ("idle", f"{args.rate:g}/s") if "outage" in parts else ():
                for i in range(args.runs):
                    fleet = Fleet(
                        moto, table, etcd.endpoints, work, lease_ttl=LEASE_TTL, health={"table": HEALTH_TABLE}
                    ).start()
                    try:
                        if load == "idle" and i == 0:
                            results["etcd_requests_per_s_idle"] = etcd_rate(etcd.endpoints, 10.0)
                        r = outage(fleet, load, args.rate, args.warmup)
                    finally:
                        fleet.stop()
                    results["outage"].append(r)
                    per = ", ".join(
                        f"{h} {v['first_ack_s']:.2f}s" if v["first_ack_s"] is not None else f"{h} never"
                        for h, v in r["hosts"].items()
                    )
                    print(
                        f"outage for all, {load}, run {i + 1}: {per}; fleet worst {r['fleet_worst_s']}",
                        flush=True,
                    )
            for i in range(args.runs if "leader" in parts else 0):
                fleet = Fleet(
                    moto, table, etcd.endpoints, work, lease_ttl=LEASE_TTL, health={"table": HEALTH_TABLE}
                ).start()
                try:
                    r = leader_change(fleet)
                finally:
                    fleet.stop()
                results["leader"].append(r)
                print(
                    f"leader change, run {i + 1}: {r['old']} -> {r['new']} in {r['took_s']:.2f} s", flush=True
                )
            for i in range(args.runs if "switchover" in parts else 0):
                r = switchover(moto, etcd, work)
                results["switchover"].append(r)
                waits = ", ".join(
                    f"{h} {v['client_max_wait_ms']:.0f} ms"
                    if v["client_max_wait_ms"] is not None
                    else f"{h} -"
                    for h, v in r["hosts"].items()
                )
                print(
                    f"switchover, run {i + 1}: ok {r['ok']}, lag {r['lag_ms']} ms; longest write: {waits}",
                    flush=True,
                )
    finally:
        for r in moto_list:
            r.stop()
    print(
        f"\nddb-sidecar fleet benchmark: 3 hosts, etcd {results.get('etcd')}, median / max of {args.runs} run(s)"
    )
    print(
        "  first write: that host's cut (us-east-1 blackholed for every host, one after the other within a few ms)"
    )
    print(
        "  to the first write sent after it and acknowledged through that host (key read back from eu-west-1)"
    )
    for load in ("idle", f"{args.rate:g}/s") if results["outage"] else ():
        rows = [r for r in results["outage"] if r["load"] == load]
        for host in HOSTS:
            values = [
                r["hosts"][host]["first_ack_s"] for r in rows if r["hosts"][host]["first_ack_s"] is not None
            ]
            failed = [r["hosts"][host].get("failed", 0) for r in rows]
            ok = all(r["hosts"][host]["in_other"] for r in rows)
            print(f"  {load:<7} {host}: {_stat(values)} s  failed {failed}  in eu-west-1: {ok}")
        worst = [r["fleet_worst_s"] for r in rows if r["fleet_worst_s"] is not None]
        print(f"  {load:<7} fleet worst: {_stat(worst)} s ({len(worst)}/{len(rows)} runs moved every host)")
    changes = [r["took_s"] for r in results["leader"] if r["new"]]
    if results["leader"]:
        moved_nothing = all(r["active_after"] == [HOME] for r in results["leader"])
        print(
            f"  leader change after kill -9: {_stat(changes)} s "
            f"(lease_ttl {LEASE_TTL:g} s; nothing moved: {moved_nothing})"
        )
    for host in HOSTS:
        waits = [r["hosts"][host]["client_max_wait_ms"] for r in results["switchover"] if r["ok"]]
        reported = [r["hosts"][host]["reported_pause_ms"] for r in results["switchover"] if r["ok"]]
        over = [
            r["hosts"][host]["client_max_wait_ms"] - (r["lag_ms"] or 0)
            for r in results["switchover"]
            if r["ok"] and r["hosts"][host]["client_max_wait_ms"] is not None
        ]
        failed = [r["hosts"][host]["failed"] for r in results["switchover"]]
        print(
            f"  switchover {host}: longest write {_stat([w for w in waits if w is not None])} ms, "
            f"reported pause {_stat([p for p in reported if p is not None])} ms, "
            f"longest write minus lag {_stat(over)} ms, failed {failed}"
        )
    oks = [r["ok"] for r in results["switchover"]]
    lags = [r["lag_ms"] for r in results["switchover"] if r["lag_ms"] is not None]
    print(f"  switchover: {sum(bool(o) for o in oks)}/{len(oks)} done, lag at the fence {_stat(lags)} ms")
    idle_rate = results.get("etcd_requests_per_s_idle")
    loaded = [r["etcd_requests_per_s"] for r in results["outage"] if "etcd_requests_per_s" in r]
    if idle_rate is not None:
        print(f"  etcd requests/s at steady state: idle {idle_rate:.1f}, under load {_stat(loaded)}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"fleet-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"raw numbers: {out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
