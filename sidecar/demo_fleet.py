"""`ddb-sidecar demo --scenario fleet`: three app hosts that agree through etcd, on loopback.

A local three-member etcd cluster, two moto_server regions, and three "hosts" (web-1..3), each a sidecar with
its own HAProxy, ports and state_dir, reaching each region through a relay of its own (so one host can lose
its path to a region alone, as with a broken transit link). A client per host writes orders through that
host's stable address. The script:
1. web-1 alone loses its path to us-east-1: it says it is isolated, its requests fail fast, nothing moves;
2. web-1's path comes back;
3. us-east-1 is cut for every host: the fleet's leader moves all three to eu-west-1.
Each step is printed as it happens, with a line per host every second, and summarised at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sidecar.demo import (
    HEALTH_TABLE,
    TABLE,
    _app_client,
    _found,
    _status,
    sidecar_env,
    start_regions,
    start_sidecar,
)
from sidecar.fleet.localetcd import LocalEtcdCluster
from sidecar.localregion import LocalRegion

HOME, OTHER = "us-east-1", "eu-west-1"
HOSTS = ("web-1", "web-2", "web-3")
WRITE_RATE = 5.0  # per host


class Relay:
    """One host's TCP path to one region, in a thread of its own: `cut()` refuses new connections and resets
    the open ones (the path is gone), `restore()` opens it again."""

    def __init__(self, listen_port: int, target_port: int) -> None:
        self.listen_port, self.target_port = listen_port, target_port
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"relay-{listen_port}", daemon=True
        )

    def start(self) -> Relay:
        self._thread.start()
        self._call(self._open())
        return self

    def cut(self) -> None:
        self._call(self._close())

    def restore(self) -> None:
        self._call(self._open())

    def stop(self) -> None:
        self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _call(self, coro: Any) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _open(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(
                self._serve, "127.0.0.1", self.listen_port, reuse_address=True
            )

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer), return_exceptions=True)
        self._writers.difference_update((writer, up_writer))


class _Client:
    """The app on one host: PutItems at a steady pace through the host's stable address."""

    def __init__(self, host: str, stable: str) -> None:
        self.host, self.client = host, _app_client(stable, 1.0, 2.0)
        self.ok: list[tuple[float, str]] = []
        self.failed: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"app-{host}", daemon=True)

    def start(self) -> _Client:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(1 / WRITE_RATE):
            order = f"{self.host}-{uuid.uuid4().hex[:10]}"
            try:
                self.client.put_item(TableName=TABLE, Item={"pk": {"S": "demo"}, "sk": {"S": order}})
                self.ok.append((time.monotonic(), order))
            except Exception as exc:  # every failure is what the app would see: counted, shown
                code = getattr(exc, "response", {}).get("Error", {}).get("Code") or type(exc).__name__
                self.failed.append((time.monotonic(), str(code)))


def run_fleet_demo(duration: float | None, workdir: Path | None, base_port: int) -> int:
    if not 1024 <= base_port <= 32000:
        print(
            "--base-port must be between 1024 and 32000 (ports above 32767 are ephemeral here)",
            file=sys.stderr,
        )
        return 2
    total = duration or 30.0
    own_workdir = workdir is None
    work = workdir or Path(tempfile.mkdtemp(prefix="ddbfleet"))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    regions = [
        LocalRegion(name, base_port + 201 + i, work / "logs" / f"moto-{name}.log")
        for i, name in enumerate((HOME, OTHER))
    ]
    etcd = LocalEtcdCluster(3, work / "etcd")
    relays: dict[tuple[str, str], Relay] = {}
    sidecars: dict[str, subprocess.Popen[bytes]] = {}
    clients: dict[str, _Client] = {}
    admins: dict[str, str] = {}
    print(f"demo: scenario fleet, working in {work}")
    try:
        print("demo: starting a three-member etcd cluster and two local DynamoDB regions ...")
        etcd.start()
        key = start_regions(regions)
        print(f"  etcd {', '.join(etcd.endpoints)}")
        env = sidecar_env(key)
        for i, host in enumerate(HOSTS):
            port = base_port + 10 * i
            for j, region in enumerate(regions):
                relays[(host, region.name)] = Relay(port + 6 + j, region.port).start()
            admins[host] = f"127.0.0.1:{port + 2}"
            config = {
                "listen": f"127.0.0.1:{port}",
                "regions": [
                    {
                        "name": r.name,
                        "endpoint": f"http://127.0.0.1:{port + 6 + j}",
                        "proxy": f"127.0.0.1:{port + 3 + j}",
                    }
                    for j, r in enumerate(regions)
                ],
                "tables": [TABLE],
                "health": {"table": HEALTH_TABLE},
                "haproxy": {"manage": True, "stats": f"127.0.0.1:{port + 1}"},
                "admin": admins[host],
                "state_dir": "run",
                "coordination": {
                    "backend": "etcd",
                    "endpoints": etcd.endpoints,
                    "prefix": "/ddb-sidecar/demo",
                    "host": host,
                    "lease_ttl": "3s",
                },
            }
            hostdir = work / host
            hostdir.mkdir(exist_ok=True)
            sidecars[host] = start_sidecar(hostdir, config, env, work / "logs" / f"sidecar-{host}.log")
        print("demo: starting three hosts (a sidecar and its HAProxy each) ...")
        if not _wait(lambda: _settled(admins), 45, sidecars):
            print(f"demo: the fleet did not form; see {work / 'logs'}", file=sys.stderr)
            return 1
        for i, host in enumerate(HOSTS):
            stable = f"http://127.0.0.1:{base_port + 10 * i}"
            clients[host] = _Client(host, stable).start()
            print(f"  {host}: stable address {stable}, admin http://{admins[host]}/status")
        return _script(total, admins, relays, clients, regions)
    finally:
        for client in clients.values():
            client.stop()
        for proc in sidecars.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in sidecars.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for relay in relays.values():
            relay.stop()
        for region in regions:
            region.stop()
        etcd.stop_all()
        if own_workdir:
            shutil.rmtree(work, ignore_errors=True)


def _settled(admins: dict[str, str]) -> bool:
    docs = [_status(a) for a in admins.values()]
    if any(d is None for d in docs):
        return False
    fleets = [d["coordination"] for d in docs if d is not None]
    return all(
        f["state"] == "connected" and len(f["members"]) == len(admins) and f["applied_epoch"] >= 1
        for f in fleets
    ) and all(r["state"] == "up" for d in docs if d is not None for r in d["regions"])


def _wait(check: Any, timeout: float, procs: dict[str, subprocess.Popen[bytes]]) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs.values()):
            return False
        if check():
            return True
        time.sleep(0.2)
    return False


def _line(admins: dict[str, str], clients: dict[str, _Client], started: float) -> None:
    parts = []
    for host, admin in admins.items():
        doc = _status(admin) or {}
        fleet = doc.get("coordination") or {}
        mark = "*" if fleet.get("is_leader") else " "
        iso = " ISOLATED" if fleet.get("isolated") else ""
        parts.append(
            f"{mark}{host} {doc.get('active_region', '?'):<9} ok {len(clients[host].ok):>4} "
            f"failed {len(clients[host].failed):>3}{iso}"
        )
    print(f"  t={time.monotonic() - started:5.1f}s  " + " | ".join(parts))


def _cut_all(relays: dict[tuple[str, str], Relay]) -> None:
    for host in HOSTS:
        relays[(host, HOME)].cut()


def _script(
    total: float,
    admins: dict[str, str],
    relays: dict[tuple[str, str], Relay],
    clients: dict[str, _Client],
    regions: list[LocalRegion],
) -> int:
    started = time.monotonic()
    steps: list[tuple[float, str, Callable[[], None]]] = [
        (
            total * 0.2,
            "web-1 alone loses its path to us-east-1 (the others still reach it)",
            lambda: relays[("web-1", HOME)].cut(),
        ),
        (total * 0.45, "web-1's path to us-east-1 is back", lambda: relays[("web-1", HOME)].restore()),
        (total * 0.6, "us-east-1 is cut for every host", lambda: _cut_all(relays)),
    ]
    marks: dict[str, float] = {}
    moved_at: dict[str, float] = {}
    seen: set[tuple[str, str, str]] = set()
    next_line = started
    while (now := time.monotonic()) - started < total:
        while steps and now - started >= steps[0][0]:
            _, what, act = steps.pop(0)
            act()
            marks[what] = time.monotonic()
            print(f"demo: >>> {what}")
        for host, admin in admins.items():
            doc = _status(admin) or {}
            if doc.get("active_region") == OTHER and host not in moved_at:
                moved_at[host] = time.monotonic()
            for e in doc.get("events", [])[::-1]:
                key = (host, e["at"], e["reason"])
                if key not in seen and e["kind"] in (
                    "alert",
                    "failover",
                    "fleet-decision",
                    "leader",
                    "host-rejoined",
                ):
                    seen.add(key)
                    print(f"  [{host}] {e['kind']}: {e['reason']}")
        if now >= next_line:
            _line(admins, clients, started)
            next_line += 1.0
        time.sleep(0.1)
    cut_all = marks.get("us-east-1 is cut for every host")
    print("\ndemo: summary")
    active = {h: (_status(a) or {}).get("active_region") for h, a in admins.items()}
    for host, client in clients.items():
        after = [t for t, _ in client.ok if cut_all is not None and t > cut_all]
        first = f"{min(after) - cut_all:.2f} s" if after and cut_all is not None else "never"
        print(
            f"  {host}: now on {active[host]}; {len(client.ok)} writes acknowledged, {len(client.failed)} failed; "
            f"first write after the cut for all: {first}"
        )
    moved = all(region == OTHER for region in active.values())
    # The data, read from each region directly: every write a host acknowledged after it moved is in
    # eu-west-1 and not in us-east-1 (us-east-1's server is alive: only the paths to it were cut).
    acked = [o for h, c in clients.items() if h in moved_at for t, o in c.ok if t > moved_at[h]]
    in_other, in_home = _found(regions[1], acked), _found(regions[0], acked)
    print(
        f"  acknowledged after each host moved: {len(acked)}; in eu-west-1: {len(in_other)}; in us-east-1: {len(in_home)}"
    )
    good = moved and len(in_other) == len(acked) and not in_home
    print(
        "  one host cut off alone moved nothing; the region cut for all moved every host"
        if good
        else "  not every host moved, or a write is not where it should be: see the logs"
    )
    return 0 if good else 1
