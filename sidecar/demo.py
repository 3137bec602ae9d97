"""`ddb-sidecar demo`: the whole product on loopback, with a live view.

Two moto_server regions (signature checking on), the sidecar with its supervised HAProxy, and a small
client that writes and reads orders through the stable address like the Perl app would. At the end it
checks where the data went: every acknowledged write in the home region, none in the other.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import yaml

from sidecar.localregion import LocalRegion

HEALTH_TABLE = "ddb-sidecar-health"
TABLE = "orders"


def _status(admin: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://{admin}/status", timeout=1.0) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data
    except OSError:
        return None


def run_demo(duration: float | None, workdir: Path | None, base_port: int) -> int:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    if not 1024 <= base_port <= 32000:
        print(
            "--base-port must be between 1024 and 32000 (ports above 32767 are ephemeral here)",
            file=sys.stderr,
        )
        return 2
    own_workdir = workdir is None
    work = workdir or Path(tempfile.mkdtemp(prefix="ddbdemo"))
    work.mkdir(parents=True, exist_ok=True)
    ports = {
        "listen": base_port,
        "stats": base_port + 4,
        "admin": base_port + 5,
        "us-east-1": base_port + 101,
        "eu-west-1": base_port + 102,
        "moto-us-east-1": base_port + 201,
        "moto-eu-west-1": base_port + 202,
    }
    regions = [
        LocalRegion(name, ports[f"moto-{name}"], work / "logs" / f"moto-{name}.log")
        for name in ("us-east-1", "eu-west-1")
    ]
    sidecar: subprocess.Popen[bytes] | None = None

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # unwinds through the finally below, which stops every process

    signal.signal(signal.SIGTERM, interrupted)
    print(f"demo: working in {work}")
    try:
        print("demo: starting two local DynamoDB regions (moto_server, signature checking on) ...")
        for region in regions:
            region.start()
        for region in regions:
            region.wait_ready()
            region.bootstrap()
            region.create_table(TABLE, sk="sk")
            region.create_table(HEALTH_TABLE)
            print(f"  {region.name:<10} {region.endpoint}")
        key = regions[0].key
        assert key is not None
        config: dict[str, Any] = {
            "listen": f"127.0.0.1:{ports['listen']}",
            "regions": [
                {"name": r.name, "endpoint": r.endpoint, "proxy": f"127.0.0.1:{ports[r.name]}"}
                for r in regions
            ],
            "tables": [TABLE],
            "health": {"table": HEALTH_TABLE, "interval": "500ms", "timeout": "400ms", "fall": 2, "rise": 2},
            "haproxy": {"manage": True, "stats": f"127.0.0.1:{ports['stats']}"},
            "admin": f"127.0.0.1:{ports['admin']}",
            "state_dir": "run",
        }
        config_path = work / "sidecar.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": key.access_key_id,
            "AWS_SECRET_ACCESS_KEY": key.secret_access_key,
            "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        env.pop("AWS_SESSION_TOKEN", None)
        print("demo: starting the sidecar (and its HAProxy) ...")
        with open(work / "logs" / "sidecar.log", "ab") as log:
            sidecar = subprocess.Popen(
                [sys.executable, "-m", "sidecar", "run", "-c", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=work,
                start_new_session=True,
            )
        admin = config["admin"]
        deadline = time.monotonic() + 30
        while True:
            status = _status(admin)
            if status and all(r["state"] == "up" for r in status["regions"]) and status.get("active_region"):
                break
            if sidecar.poll() is not None or time.monotonic() > deadline:
                print(
                    f"demo: the sidecar did not come up; see {work / 'logs' / 'sidecar.log'}", file=sys.stderr
                )
                return 1
            time.sleep(0.1)
        stable = f"http://127.0.0.1:{ports['listen']}"
        print(
            f"demo: stable address {stable}   HAProxy stats http://{config['haproxy']['stats']}/   admin http://{admin}/status"
        )
        print("demo: the client writes and reads orders through the stable address (Ctrl-C to stop)\n")

        app = boto3.session.Session().client(
            "dynamodb",
            endpoint_url=stable,
            region_name="us-east-1",
            # The app's own credentials: the sidecar strips this signature and signs with its own.
            aws_access_key_id="AKIAPERLAPPEXAMPLE01",
            aws_secret_access_key="the-app-does-not-need-real-aws-keys",
            config=Config(
                retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=2, read_timeout=5
            ),
        )
        written: list[str] = []
        ok = failed = 0
        latencies: list[float] = []
        started = time.monotonic()
        next_view = started
        stop = False

        def on_signal(signum: int, frame: Any) -> None:
            nonlocal stop
            stop = True

        # The scripted outage: the replica region freezes (SIGSTOP: it accepts connections, answers
        # nothing) for a while. The probes see it go down and come back; the app, served by the home
        # region, does not notice. (Moving traffic off a failed home region is the failover controller's.)
        span = duration if duration is not None else 30.0
        freeze_at, thaw_at = started + span / 3, started + 2 * span / 3
        frozen = thawed = False
        seen_events: set[tuple[str, str, str]] = {(e["at"], e["kind"], e["reason"]) for e in status["events"]}
        previous = signal.signal(signal.SIGINT, on_signal)
        previous_term = signal.signal(signal.SIGTERM, on_signal)
        try:
            while not stop and (duration is None or time.monotonic() - started < duration):
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
                    status = _status(admin)
                    for event in _new_events(status, seen_events):
                        print(f"  event {event['at']} {event['kind']}: {event['reason']}")
                    _view(status, ok, failed, latencies, now - started)
                time.sleep(0.02)
        finally:
            signal.signal(signal.SIGINT, previous)
            signal.signal(signal.SIGTERM, previous_term)
            regions[1].signal(signal.SIGCONT)
            app.close()
        # Events since the last view (the region coming back may fall in the last second).
        for event in _new_events(_status(admin), seen_events):
            print(f"  event {event['at']} {event['kind']}: {event['reason']}")

        print("\ndemo: checking where the data went ...")
        counts = {}
        for region in regions:
            client = region.client()
            with contextlib.closing(client):
                found = 0
                for order in written:
                    item = client.get_item(
                        TableName=TABLE, Key={"pk": {"S": "demo"}, "sk": {"S": order}}, ConsistentRead=True
                    )
                    found += "Item" in item
                counts[region.name] = found
        print(
            f"  acknowledged writes: {len(written)}; in us-east-1: {counts['us-east-1']}; in eu-west-1: {counts['eu-west-1']}"
        )
        good = counts["us-east-1"] == len(written) and counts["eu-west-1"] == 0
        print(
            "demo: "
            + ("every write is in the home region and only there" if good else "UNEXPECTED data placement")
        )
        return 0 if good else 1
    finally:
        if sidecar is not None and sidecar.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(sidecar.pid, signal.SIGTERM)
            try:
                sidecar.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(sidecar.pid, signal.SIGKILL)
                sidecar.wait()
        for region in regions:
            region.stop()
        if own_workdir:
            shutil.rmtree(work, ignore_errors=True)


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
