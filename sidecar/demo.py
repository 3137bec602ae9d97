"""`ddb-sidecar demo`: the whole product on loopback, with a live view.

Two moto_server regions (signature checking on), the sidecar with its supervised HAProxy, and a small
client that talks to the stable address like the Perl app would. Two scripted scenarios:

- `outage` (the default): the client writes orders at a steady pace; a quarter of the way through, the home
  region freezes (SIGSTOP of its moto_server: it accepts connections and never answers, like a blackhole).
  The sidecar sees it, moves traffic to eu-west-1, and the client goes on. At the end the demo says what the
  client saw (time without service, failed requests by type, who served after) and checks the data in each
  region, read directly.
- `replica`: the replica region freezes for a third of the run and comes back; the app, served by the home
  region, does not notice. Every acknowledged write ends up in the home region and only there.
- `fleet` is `sidecar.demo_fleet`: three hosts agreeing through a local etcd cluster.
- `drill` is `sidecar.demo_drill`: a whole DR cycle in streams mode, from the outage back home.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sidecar.localregion import Key, LocalRegion

HEALTH_TABLE = "ddb-sidecar-health"
TABLE = "orders"
HOME, OTHER = "us-east-1", "eu-west-1"
SCENARIOS = ("outage", "replica")  # and "fleet": sidecar.demo_fleet, "drill": sidecar.demo_drill

# The outage scenario's application: open-loop writes (a stuck request never delays the next one), each one
# attempt with short timeouts, so that every failure the app would see is counted.
WRITE_RATE = 25.0
CLIENT_TIMEOUT = 2.0
CLIENT_POOL = 32  # clients (and threads): WRITE_RATE x CLIENT_TIMEOUT requests may be stuck at once


def start_regions(regions: list[LocalRegion]) -> Key:
    """Start the local regions, bootstrap IAM, create the app and health tables; the sidecar's key."""
    for region in regions:
        region.start()
    for region in regions:
        region.wait_ready()
        region.bootstrap()
        region.create_table(TABLE, sk="sk")
        region.create_table(HEALTH_TABLE)
    key = regions[0].key
    assert key is not None
    return key


def sidecar_env(key: Key) -> dict[str, str]:
    """The environment of a demo sidecar: the local regions' key, and nothing of the machine's AWS setup."""
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": key.access_key_id,
        "AWS_SECRET_ACCESS_KEY": key.secret_access_key,
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    env.pop("AWS_SESSION_TOKEN", None)
    return env


def _status(admin: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://{admin}/status", timeout=1.0) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data
    except OSError:
        return None


def valid_base_port(base_port: int) -> bool:
    """Whether the demo's ports fit below the ephemeral range; says why not on stderr."""
    if 1024 <= base_port <= 32000:
        return True
    print(
        "--base-port must be between 1024 and 32000 (ports above 32767 are ephemeral here)", file=sys.stderr
    )
    return False


def demo_ports(base_port: int) -> dict[str, int]:
    """The loopback ports of a one-host demo: stable address, stats, admin, region listeners, moto regions."""
    return {
        "listen": base_port,
        "stats": base_port + 4,
        "admin": base_port + 5,
        HOME: base_port + 101,
        OTHER: base_port + 102,
        f"moto-{HOME}": base_port + 201,
        f"moto-{OTHER}": base_port + 202,
    }


def start_sidecar(
    work: Path, config: dict[str, Any], env: dict[str, str], log: Path | None = None
) -> subprocess.Popen[bytes]:
    """Write `work/sidecar.yaml` and start `ddb-sidecar run` on it in `work`, in a session of its own (with
    its HAProxy), logging to `log` (default `work/logs/sidecar.log`)."""
    config_path = work / "sidecar.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    log = log or work / "logs" / "sidecar.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "sidecar", "run", "-c", str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=work,
            start_new_session=True,
        )


def wait_sidecar_up(
    admin: str, sidecar: subprocess.Popen[bytes], timeout: float = 30.0
) -> dict[str, Any] | None:
    """The sidecar's status once every region is up and a region is active; None if it exits or times out."""
    deadline = time.monotonic() + timeout
    while True:
        status = _status(admin)
        if status and all(r["state"] == "up" for r in status["regions"]) and status.get("active_region"):
            return status
        if sidecar.poll() is not None or time.monotonic() > deadline:
            return None
        time.sleep(0.1)


def stop_sidecar(sidecar: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the sidecar's session (it drains and stops its HAProxy); SIGKILL after 15 s."""
    if sidecar.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(sidecar.pid, signal.SIGTERM)
    try:
        sidecar.wait(15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sidecar.pid, signal.SIGKILL)
        sidecar.wait()


def run_demo(duration: float | None, workdir: Path | None, base_port: int, scenario: str = "outage") -> int:
    if scenario not in SCENARIOS:
        print(f"--scenario must be one of {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    if not valid_base_port(base_port):
        return 2
    own_workdir = workdir is None
    work = workdir or Path(tempfile.mkdtemp(prefix="ddbdemo"))
    work.mkdir(parents=True, exist_ok=True)
    ports = demo_ports(base_port)
    regions = [
        LocalRegion(name, ports[f"moto-{name}"], work / "logs" / f"moto-{name}.log") for name in (HOME, OTHER)
    ]
    sidecar: subprocess.Popen[bytes] | None = None

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # unwinds through the finally below, which stops every process

    signal.signal(signal.SIGTERM, interrupted)
    print(f"demo: scenario {scenario}, working in {work}")
    try:
        print("demo: starting two local DynamoDB regions (moto_server, signature checking on) ...")
        key = start_regions(regions)
        for region in regions:
            print(f"  {region.name:<10} {region.endpoint}")
        # The replica scenario probes fast; the outage scenario shows the defaults an operator gets
        # (interval 1 s, timeout 800 ms, fall 3, rise 3; automatic failover, manual failback).
        health: dict[str, Any] = {"table": HEALTH_TABLE}
        if scenario == "replica":
            health.update({"interval": "500ms", "timeout": "400ms", "fall": 2, "rise": 2})
        config: dict[str, Any] = {
            "listen": f"127.0.0.1:{ports['listen']}",
            "regions": [
                {"name": r.name, "endpoint": r.endpoint, "proxy": f"127.0.0.1:{ports[r.name]}"}
                for r in regions
            ],
            "tables": [TABLE],
            "health": health,
            "haproxy": {"manage": True, "stats": f"127.0.0.1:{ports['stats']}"},
            "admin": f"127.0.0.1:{ports['admin']}",
            "state_dir": "run",
        }
        print("demo: starting the sidecar (and its HAProxy) ...")
        sidecar = start_sidecar(work, config, sidecar_env(key))
        admin = config["admin"]
        status = wait_sidecar_up(admin, sidecar)
        if status is None:
            print(f"demo: the sidecar did not come up; see {work / 'logs' / 'sidecar.log'}", file=sys.stderr)
            return 1
        stable = f"http://127.0.0.1:{ports['listen']}"
        print(
            f"demo: stable address {stable}   HAProxy stats http://{config['haproxy']['stats']}/   admin http://{admin}/status"
        )
        if scenario == "replica":
            return _replica(regions, stable, admin, status, duration)
        return _outage(regions, stable, admin, status, duration)
    finally:
        if sidecar is not None:
            stop_sidecar(sidecar)
        for region in regions:
            region.stop()
        if own_workdir:
            shutil.rmtree(work, ignore_errors=True)


def _app_client(stable: str, connect_timeout: float, read_timeout: float, session: Any = None) -> Any:
    import boto3
    from botocore.config import Config

    return (session or boto3.session.Session()).client(
        "dynamodb",
        endpoint_url=stable,
        region_name=HOME,
        # The app's own credentials: the sidecar strips this signature and signs with its own.
        aws_access_key_id="AKIAPERLAPPEXAMPLE01",
        aws_secret_access_key="the-app-does-not-need-real-aws-keys",
        config=Config(
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        ),
    )


class _Stop:
    """SIGINT/SIGTERM end the client loop (and lead to the summary) instead of unwinding at once."""

    def __init__(self) -> None:
        self.requested = False

    def __enter__(self) -> _Stop:
        self._int = signal.signal(signal.SIGINT, self._on_signal)
        self._term = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._int)
        signal.signal(signal.SIGTERM, self._term)


# -- scenario: the replica region freezes and comes back ----------------------------------------------------


def _replica(
    regions: list[LocalRegion], stable: str, admin: str, status: dict[str, Any], duration: float | None
) -> int:
    from botocore.exceptions import BotoCoreError, ClientError

    print("demo: the client writes and reads orders through the stable address (Ctrl-C to stop)\n")
    app = _app_client(stable, 2, 5)
    written: list[str] = []
    ok = failed = 0
    latencies: list[float] = []
    started = time.monotonic()
    next_view = started
    # The scripted outage: the replica region freezes (SIGSTOP: it accepts connections, answers nothing) for
    # a while. The probes see it go down and come back; the app, served by the home region, does not notice.
    span = duration if duration is not None else 30.0
    freeze_at, thaw_at = started + span / 3, started + 2 * span / 3
    frozen = thawed = False
    seen_events: set[tuple[str, str, str]] = {(e["at"], e["kind"], e["reason"]) for e in status["events"]}
    with _Stop() as stop:
        try:
            while not stop.requested and (duration is None or time.monotonic() - started < duration):
                if not frozen and time.monotonic() >= freeze_at:
                    frozen = True
                    print(f"  >>> outage: freezing {regions[1].name} (SIGSTOP)")
                    regions[1].signal(signal.SIGSTOP)
                if frozen and not thawed and time.monotonic() >= thaw_at:
                    thawed = True
                    print(f"  >>> recovery: resuming {regions[1].name} (SIGCONT)")
                    regions[1].signal(signal.SIGCONT)
                order = f"order-{uuid.uuid4().hex[:8]}"
                t0 = time.perf_counter()
                try:
                    app.put_item(
                        TableName=TABLE, Item={"pk": {"S": "demo"}, "sk": {"S": order}, "qty": {"N": "1"}}
                    )
                    app.get_item(
                        TableName=TABLE, Key={"pk": {"S": "demo"}, "sk": {"S": order}}, ConsistentRead=True
                    )
                    written.append(order)
                    ok += 2
                    latencies.append(time.perf_counter() - t0)
                except (ClientError, BotoCoreError) as exc:
                    failed += 1
                    print(f"  client error: {exc}")
                now = time.monotonic()
                if now >= next_view:
                    next_view = now + 1.0
                    status_now = _status(admin)
                    _print_events(status_now, seen_events)
                    _view(status_now, ok, failed, latencies, now - started)
                time.sleep(0.02)
        finally:
            regions[1].signal(signal.SIGCONT)
            app.close()
    # Events since the last view (the region coming back may fall in the last second).
    _print_events(_status(admin), seen_events)

    print("\ndemo: checking where the data went ...")
    counts = {region.name: len(_found(region, written)) for region in regions}
    print(f"  acknowledged writes: {len(written)}; in {HOME}: {counts[HOME]}; in {OTHER}: {counts[OTHER]}")
    good = counts[HOME] == len(written) and counts[OTHER] == 0
    print(
        "demo: "
        + ("every write is in the home region and only there" if good else "UNEXPECTED data placement")
    )
    return 0 if good else 1


# -- scenario: the home region goes dark ------------------------------------------------------------------


@dataclass
class _Write:
    order: str
    started: float
    ended: float
    error: str | None  # None: acknowledged


class _Writer:
    """The application: PutItems of new orders at `rate`/s on a fixed schedule, whatever the answers take."""

    def __init__(self, stable: str, rate: float) -> None:
        import boto3

        self.rate = rate
        self.writes: list[_Write] = []
        self.scheduled = 0
        session = (
            boto3.session.Session()
        )  # clients made here, in one thread; each used by one thread at a time
        self._clients: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for _ in range(CLIENT_POOL):
            self._clients.put(_app_client(stable, CLIENT_TIMEOUT, CLIENT_TIMEOUT, session))
        self._pool = ThreadPoolExecutor(CLIENT_POOL, thread_name_prefix="demo-client")
        self._next = time.monotonic()

    def tick(self, now: float) -> None:
        """Send every write that is due by `now`."""
        while self._next <= now:
            self._next += 1 / self.rate
            self.scheduled += 1
            self._pool.submit(self._put, f"order-{self.scheduled:05d}-{uuid.uuid4().hex[:6]}")

    def _put(self, order: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        client = self._clients.get()
        started = time.monotonic()
        try:
            client.put_item(
                TableName=TABLE, Item={"pk": {"S": "demo"}, "sk": {"S": order}, "qty": {"N": "1"}}
            )
            error = None
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            error = f"{exc.response.get('Error', {}).get('Code', 'ClientError')} (HTTP {status})"
        except BotoCoreError as exc:
            error = type(exc).__name__
        finally:
            self._clients.put(client)
        self.writes.append(_Write(order, started, time.monotonic(), error))

    def close(self) -> None:
        """Wait for the writes in flight (each ends within its timeouts), then close the clients."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        while True:
            try:
                self._clients.get_nowait().close()
            except queue.Empty:
                break

    def counts(self) -> tuple[int, int]:
        ok = sum(1 for w in self.writes if w.error is None)
        return ok, len(self.writes) - ok


def _outage(
    regions: list[LocalRegion], stable: str, admin: str, status: dict[str, Any], duration: float | None
) -> int:
    home, other = regions
    print(
        f"demo: the client writes orders through the stable address, {WRITE_RATE:g} a second (boto3, one attempt, "
        f"{CLIENT_TIMEOUT:g} s timeouts); Ctrl-C to stop\n"
    )
    seen_events: set[tuple[str, str, str]] = {(e["at"], e["kind"], e["reason"]) for e in status["events"]}
    writer = _Writer(stable, WRITE_RATE)
    started = time.monotonic()
    cut_at = started + (max(2.0, duration / 4) if duration is not None else 8.0)
    cut: float | None = None
    next_view = started
    last_status: dict[str, Any] | None = status
    with _Stop() as stop:
        try:
            while not stop.requested and (duration is None or time.monotonic() - started < duration):
                now = time.monotonic()
                if cut is None and now >= cut_at:
                    print(
                        f"  >>> outage: the home region {home.name} goes dark (SIGSTOP of its moto_server: "
                        "connections are accepted, nothing is answered)"
                    )
                    home.signal(signal.SIGSTOP)
                    cut = time.monotonic()
                writer.tick(now)
                if now >= next_view:
                    next_view = now + 1.0
                    last_status = _status(admin) or last_status
                    _print_events(last_status, seen_events)
                    ok, failed = writer.counts()
                    _view(
                        last_status,
                        ok,
                        failed,
                        [w.ended - w.started for w in writer.writes[-100:] if w.error is None],
                        now - started,
                    )
                time.sleep(0.01)
        finally:
            # In-flight writes end within their timeouts; the home region stays frozen until the summary.
            writer.close()
    final = _status(admin) or last_status
    _print_events(final, seen_events)
    if cut is None:
        print("\ndemo: stopped before the outage; nothing to report")
        home.signal(signal.SIGCONT)
        return 0

    writes = sorted(writer.writes, key=lambda w: w.ended)
    before = [w for w in writes if w.ended < cut]
    after = [w for w in writes if w.ended >= cut]
    acked_after = [w for w in after if w.error is None]
    in_other = _found(other, [w.order for w in acked_after])
    first = next((w for w in acked_after if w.order in in_other), None)
    failures = Counter(w.error for w in after if w.error is not None)
    move = next((e for e in (final or {}).get("events", []) if e.get("kind") == "failover"), None)

    print(f"\ndemo: what the client saw (the home region {home.name} was cut {cut - started:.1f} s in)")
    if first is not None:
        print(
            f"  time without service: {first.ended - cut:.2f} s (from the cut to the first write acknowledged "
            f"by {other.name})"
        )
    else:
        print(
            f"  time without service: until the end: no write was acknowledged by {other.name} after the cut"
        )
    detail = ", ".join(f"{kind} x{n}" for kind, n in failures.most_common())
    print(f"  failed requests: {sum(failures.values())}" + (f" ({detail})" if detail else ""))
    served_after = [w for w in acked_after if first is not None and w.ended >= first.ended]
    if first is not None:
        print(
            f"  served after the move by: {other.name} ({len(served_after)} writes acknowledged; "
            f"active region now {(final or {}).get('active_region')})"
        )
    if move is not None:
        print(f"  failover event: {move['at']} {move.get('from')} -> {move.get('to')}: {move['reason']}")
    else:
        print("  failover event: none")

    print(f"\ndemo: resuming {home.name} (SIGCONT) and checking the data in each region, read directly ...")
    home.signal(signal.SIGCONT)
    try:
        home.wait_ready(15)
    except (RuntimeError, TimeoutError) as exc:
        print(f"  {home.name} did not come back: {exc}")
        return 1
    acked_before = [w.order for w in before if w.error is None]
    in_home = _found(home, acked_before)
    print(f"  acknowledged before the cut: {len(acked_before)}; in {home.name}: {len(in_home)}")
    after_move = [w.order for w in served_after]
    moved_in_other = [o for o in after_move if o in in_other]
    print(
        f"  acknowledged after the move: {len(after_move)}; in {other.name}: {len(moved_in_other)}; "
        f"in {home.name}: {len(_found(home, after_move))}"
    )
    failed_writes = [w.order for w in after if w.error is not None]
    if failed_writes:
        late = _found(home, failed_writes)
        print(
            f"  failed writes found in {home.name} after it resumed (so far): {len(late)} of {len(failed_writes)}: "
            "a write that timed out may still have been applied (the frozen region applies it when it "
            "wakes); treat it as unknown, never as not written"
        )
    good = first is not None and len(in_home) == len(acked_before) and len(moved_in_other) == len(after_move)
    print(
        "demo: "
        + (
            f"every write acknowledged after the move is in {other.name}; every one before the cut in {home.name}"
            if good
            else "UNEXPECTED: see above"
        )
    )
    print(
        f"\ndemo: failback is manual (failover.failback: manual): traffic stays on {other.name} until an operator "
        f"moves it back. Next step, once {home.name} is healthy and {other.name}'s writes have reached it:\n"
        f"  ddb-sidecar switchover --to {home.name}    (planned move: holds writes until replication has caught up)\n"
        f"  ddb-sidecar failover --to {home.name}      (immediate move; says what may not be replicated yet)\n"
        "  `ddb-sidecar demo --scenario drill` runs that whole cycle with replication on (this scenario has none "
        "between its two regions): outage, failover, the region's return, reconcile, switchover home, and a "
        "check that both regions hold the same items"
    )
    return 0 if good else 1


# -- shared -------------------------------------------------------------------------------------------------


def _found(region: LocalRegion, orders: list[str]) -> set[str]:
    """The orders whose item is in `region`'s own data (its moto_server read directly, 100 at a time)."""
    found: set[str] = set()
    client = region.client()
    with contextlib.closing(client):
        for i in range(0, len(orders), 100):
            pending: dict[str, Any] = {
                TABLE: {
                    "Keys": [{"pk": {"S": "demo"}, "sk": {"S": o}} for o in orders[i : i + 100]],
                    "ConsistentRead": True,
                }
            }
            deadline = time.monotonic() + 30
            while pending and time.monotonic() < deadline:
                answer = client.batch_get_item(RequestItems=pending)
                found.update(item["sk"]["S"] for item in answer["Responses"].get(TABLE, []))
                pending = answer.get("UnprocessedKeys") or {}
    return found


def _print_events(status: dict[str, Any] | None, seen: set[tuple[str, str, str]]) -> None:
    for event in _new_events(status, seen):
        print(f"  event {event['at']} {event['kind']}: {event['reason']}")


def _new_events(status: dict[str, Any] | None, seen: set[tuple[str, str, str]]) -> list[dict[str, Any]]:
    fresh = []
    for event in reversed((status or {}).get("events", [])):
        key = (event["at"], event["kind"], event["reason"])
        if key not in seen:
            seen.add(key)
            fresh.append(event)
    return fresh


def _view(
    status: dict[str, Any] | None, ok: int, failed: int, latencies: list[float], elapsed: float
) -> None:
    if status is None:
        print(f"[{elapsed:5.1f}s] sidecar not answering   client ok {ok} failed {failed}")
        return
    recent = sorted(latencies[-200:])
    p50 = recent[len(recent) // 2] * 1000 if recent else 0.0
    regions = "  ".join(
        f"{r['name']}: {r['state']:<4} w={r['weight'] if r['weight'] is not None else '?':>3} req={r['requests']:<5} err={r['errors']}"
        for r in status["regions"]
    )
    print(
        f"[{elapsed:5.1f}s] active {status.get('active_region') or 'NONE':<10} {regions}   "
        f"client ok {ok} failed {failed} p50 {p50:.1f} ms"
    )


__all__ = ["SCENARIOS", "run_demo"]
