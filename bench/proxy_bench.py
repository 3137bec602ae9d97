"""`make bench`: what the sidecar costs on the data path, measured against HAProxy alone in the same run.

Set-up, all on 127.0.0.1:
- a stub DynamoDB: an HAProxy frontend answering every request with a fixed ~300-byte GetItem response and
  its correct x-amz-crc32 (HAProxy is the fastest stub at hand, ~20 µs per request);
- baseline: wrk -> HAProxy -> stub;
- product: wrk -> the sidecar's own rendered HAProxy (stable address) -> region listener -> re-signed ->
  stub.
wrk sends keep-alive POSTs with a 1 KB DynamoDB body. We report req/s and p50/p99 for both, their ratio,
the sidecar's CPU µs per request (from /proc utime+stime over the run) and its resident memory after.
Machines here are shared and noisy: the ratio, measured back to back, is the number to compare.
Then hostile inputs, one after the other, to the tcp sidecar's region listener (a 13 MB body of nested
maps, 4 MB PartiQL statements, endless headers, 16 pipelined 1 MB bodies on 4 connections, a 16 MB batch
that is admitted, so signed): the worst event-loop stall each causes (the worst latency of the listener's
own health check, polled every 5 ms) and the sidecar's RSS after it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib
from pathlib import Path
from typing import Any

import yaml

from sidecar.haproxy.binary import find_haproxy

TABLE = "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    for _ in range(200):
        port = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def stub_body() -> bytes:
    item = {
        "Item": {
            "pk": {"S": "bench-item-000001"},
            "sk": {"S": "2026-11-26T16:00:00Z"},
            "payload": {"S": "x" * 180},
            "qty": {"N": "3"},
        }
    }
    return json.dumps(item, separators=(",", ":")).encode()


def request_body() -> bytes:
    body = {
        "TableName": TABLE,
        "Key": {"pk": {"S": "bench-item-000001"}, "sk": {"S": "2026-11-26T16:00:00Z"}},
        "ProjectionExpression": "pk, sk, payload, qty",
        "ConsistentRead": True,
        "ReturnConsumedCapacity": "NONE",
        "ExpressionAttributeNames": {},
    }
    raw = json.dumps(body, separators=(",", ":"))
    # Pad to 1 KB with a harmless attribute-name map entry.
    pad = 1024 - len(raw) - len(',"#p":""')
    body["ExpressionAttributeNames"] = {"#p": "p" * max(pad, 0)}
    out = json.dumps(body, separators=(",", ":")).encode()
    return out


_HAPROXY_COMMON = """global
    maxconn 4000
defaults
    mode http
    timeout client 30s
    timeout server 30s
    timeout connect 2s
"""


def haproxy_cfg_stub(port: int, body: bytes) -> str:
    crc = zlib.crc32(body) & 0xFFFFFFFF
    return (
        _HAPROXY_COMMON
        + f"""frontend stub
    bind 127.0.0.1:{port}
    http-request return status 200 content-type application/x-amz-json-1.0 hdr x-amz-crc32 {crc} hdr x-amzn-RequestId BENCHREQUESTID0000000000000000000000000000000000 string '{body.decode()}'
"""
    )


def haproxy_cfg_direct(port: int, stub: int) -> str:
    return (
        _HAPROXY_COMMON
        + f"""frontend direct
    bind 127.0.0.1:{port}
    default_backend stub
backend stub
    server stub 127.0.0.1:{stub}
"""
    )


def wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1.0):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer within {timeout}s") from None
            time.sleep(0.05)


def cpu_seconds(pid: int) -> float:
    total = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = io.open("{body}", "rb"):read("*a")
wrk.headers["Content-Type"] = "application/x-amz-json-1.0"
wrk.headers["X-Amz-Target"] = "DynamoDB_20120810.GetItem"
wrk.headers["Authorization"] = "AWS4-HMAC-SHA256 Credential=AKIAAPP/20261126/us-east-1/dynamodb/aws4_request, SignedHeaders=host, Signature=00"
done = function(summary, latency, requests)
  io.write(string.format("JSON {{\\"requests\\": %d, \\"errors\\": %d, \\"duration_us\\": %d, \\"p50_us\\": %d, \\"p99_us\\": %d, \\"non2xx\\": %d}}\\n",
    summary.requests, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.duration, latency:percentile(50), latency:percentile(99), summary.errors.status))
end
"""


def run_wrk(url: str, script: Path, seconds: float, connections: int) -> dict[str, Any]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    match = re.search(r"^JSON (\{.*\})$", out.stdout, re.M)
    if not match:
        raise RuntimeError(f"wrk failed: {out.stdout}\n{out.stderr}")
    data: dict[str, Any] = json.loads(match.group(1))
    data["rps"] = data["requests"] / (data["duration_us"] / 1e6)
    return data


def run_python_load(url: str, body: bytes, seconds: float, connections: int) -> dict[str, Any]:
    """A fallback load generator when wrk is not installed: asyncio keep-alive clients (slower than wrk)."""
    import asyncio

    host, port = url.split("//")[1].rstrip("/").split(":")
    head = (
        f"POST / HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-amz-json-1.0\r\n"
        f"X-Amz-Target: DynamoDB_20120810.GetItem\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    latencies: list[float] = []
    errors = 0

    async def worker(deadline: float) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, int(port))
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            writer.write(head + body)
            status = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            if b" 200 " not in status:
                errors += 1
            latencies.append(time.perf_counter() - t0)
        writer.close()

    async def main() -> float:
        start = time.monotonic()
        await asyncio.gather(*(worker(start + seconds) for _ in range(connections)))
        return time.monotonic() - start

    duration = asyncio.run(main())
    latencies.sort()
    return {
        "requests": len(latencies),
        "errors": 0,
        "non2xx": errors,
        "rps": len(latencies) / duration,
        "p50_us": latencies[len(latencies) // 2] * 1e6,
        "p99_us": latencies[int(len(latencies) * 0.99)] * 1e6,
    }


def _post_raw(port: int, target: str, body: bytes, *, read: bool = True) -> None:
    head = (
        f"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-amz-json-1.0\r\n"
        f"X-Amz-Target: DynamoDB_20120810.{target}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        try:
            sock.sendall(head + body)
            if read:
                sock.recv(65536)
        except OSError:
            pass


def hostile_inputs(port: int, pid: int) -> list[tuple[str, float, float]]:
    """Each hostile input while a thread polls the listener's health check; (input, worst stall, RSS)."""
    nested = b",".join(b'"a%d":{"M":{}}' % i for i in range(850_000))
    item = b'{"TableName":"not-served","Item":{"pk":{"S":"h"},"v":{"M":{%s}}}}' % nested
    # admitted, so signed: SigV4 hashes the whole body (25 items of 650 KB, just under max_body_bytes)
    batch = json.dumps(
        {"RequestItems": {TABLE: [
            {"PutRequest": {"Item": {"pk": {"S": f"k{i}"}, "v": {"S": "x" * 650_000}}}} for i in range(25)
        ]}}
    ).encode()  # fmt: skip
    statement = json.dumps({"Statement": "SELECT * FROM bench WHERE pk = '" + "x" * (4 << 20) + "'"}).encode()

    def endless_header() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            try:
                sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nX-Endless: ")
                for _ in range(256):
                    sock.sendall(b"a" * 16384)
            except OSError:
                pass

    def pipelined() -> None:
        one = b"{" + b" " * (1 << 20) + b"}"
        head = (
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-amz-json-1.0\r\n"
            f"X-Amz-Target: DynamoDB_20120810.GetItem\r\nContent-Length: {len(one)}\r\n\r\n"
        ).encode()
        socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(4)]
        try:
            for sock in socks:
                try:
                    sock.sendall((head + one) * 16)
                except OSError:
                    pass
        finally:
            for sock in socks:
                sock.close()

    cases = [
        (
            "13 MB item of 850,000 nested maps (x2)",
            lambda: [_post_raw(port, "PutItem", item) for _ in range(2)],
        ),
        (
            "4 MB PartiQL statement (x3)",
            lambda: [_post_raw(port, "ExecuteStatement", statement) for _ in range(3)],
        ),
        ("endless header, 4 MB offered (x6)", lambda: [endless_header() for _ in range(6)]),
        ("16 pipelined 1 MB bodies on each of 4 connections", pipelined),
        (
            "16 MB BatchWriteItem of a served table, signed and sent (x3)",
            lambda: [_post_raw(port, "BatchWriteItem", batch) for _ in range(3)],
        ),
    ]
    return [(name, _worst_stall(port, run) * 1000, rss_mb(pid)) for name, run in cases]


def _worst_stall(port: int, run: Any) -> float:
    """The worst latency of the listener's health check, polled every 5 ms while `run()` runs."""
    import threading

    worst = [0.0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                    sock.sendall(b"GET /ddb-sidecar/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    sock.recv(1024)
            except OSError:
                pass
            worst[0] = max(worst[0], time.monotonic() - started)
            stop.wait(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        run()
        time.sleep(0.5)
    finally:
        stop.set()
        watcher.join(15)
    return worst[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="alternating baseline/sidecar rounds")
    parser.add_argument("--profile", type=Path, help="py-spy flame data of each sidecar during its rounds")
    parser.add_argument(
        "--listeners", nargs="+", choices=["tcp", "unix"], default=["tcp", "unix"],
        help="how HAProxy reaches the region listener (default: measure both)",
    )  # fmt: skip
    args = parser.parse_args()

    haproxy = find_haproxy(None)
    work = Path(tempfile.mkdtemp(prefix="bench"))
    procs: list[subprocess.Popen[bytes]] = []
    body = request_body()
    (work / "body.json").write_bytes(body)
    script = work / "post.lua"
    script.write_text(WRK_SCRIPT.format(body=work / "body.json"))
    use_wrk = shutil.which("wrk") is not None

    def spawn(argv: list[str], name: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(work / f"{name}.log", "wb")
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work, start_new_session=True
        )
        log.close()
        procs.append(proc)
        return proc

    try:
        stub_port, direct_port = free_port(), free_port()
        (work / "stub.cfg").write_text(haproxy_cfg_stub(stub_port, stub_body()))
        (work / "direct.cfg").write_text(haproxy_cfg_direct(direct_port, stub_port))
        spawn([haproxy, "-f", str(work / "stub.cfg")], "stub")
        spawn([haproxy, "-f", str(work / "direct.cfg")], "direct")
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": "AKIABENCH00000000001",
            "AWS_SECRET_ACCESS_KEY": "bench-secret",
            "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        env.pop("AWS_SESSION_TOKEN", None)

        # Two sidecars, identical but for how HAProxy reaches the region listener: loopback TCP (the
        # default) and a unix socket (`proxy: unix:PATH`).
        sidecars: dict[str, dict[str, Any]] = {}
        for kind in args.listeners:
            folder = work / kind
            folder.mkdir()
            listen, admin, stats = free_port(), free_port(), free_port()
            region_port = free_port()
            proxy = f"127.0.0.1:{region_port}" if kind == "tcp" else "unix:run/us-east-1.sock"
            config = {
                "listen": f"127.0.0.1:{listen}",
                "regions": [
                    {"name": "us-east-1", "endpoint": f"http://127.0.0.1:{stub_port}", "proxy": proxy}
                ],
                "tables": [TABLE],
                "health": {"table": TABLE},
                "haproxy": {"manage": True, "stats": f"127.0.0.1:{stats}"},
                "admin": f"127.0.0.1:{admin}",
                "logging": {"level": "warning"},
            }
            (folder / "sidecar.yaml").write_text(yaml.safe_dump(config))
            proc = spawn(
                [str(Path(sys.executable).parent / "ddb-sidecar"), "run", "-c", str(folder / "sidecar.yaml")],
                f"sidecar-{kind}",
                env,
            )
            sidecars[kind] = {
                "proc": proc,
                "url": f"http://127.0.0.1:{listen}/",
                "admin": admin,
                "runs": [],
                "region_port": region_port,
            }
        wait_http(f"http://127.0.0.1:{direct_port}/")
        for sc in sidecars.values():
            wait_http(f"http://127.0.0.1:{sc['admin']}/status")
            wait_http(sc["url"])

        def load(url: str) -> dict[str, Any]:
            if use_wrk:
                return run_wrk(url, script, args.seconds, args.connections)
            return run_python_load(url, body, args.seconds, args.connections)

        for sc in sidecars.values():
            load(sc["url"])  # warm-up: connections, caches
        direct_runs: list[dict[str, Any]] = []
        for _ in range(args.rounds):
            direct_runs.append(load(f"http://127.0.0.1:{direct_port}/"))
            for kind, sc in sidecars.items():
                pid = sc["proc"].pid
                cpu0 = cpu_seconds(pid)
                spy = None
                if args.profile and shutil.which("py-spy"):
                    spy = subprocess.Popen(
                        ["py-spy", "record", "-r", "500", "-f", "raw", "-o", f"{args.profile}.{kind}",
                         "-p", str(pid), "-d", str(int(args.seconds))],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )  # fmt: skip
                run = load(sc["url"])
                if spy is not None:
                    spy.wait(30)
                run["cpu_us_per_req"] = (cpu_seconds(pid) - cpu0) / max(run["requests"], 1) * 1e6
                sc["runs"].append(run)

        def best(rows: list[dict[str, Any]]) -> dict[str, Any]:
            return max(rows, key=lambda r: r["rps"])

        direct = best(direct_runs)
        tool = "wrk" if use_wrk else "python load generator (wrk not installed)"
        print(
            f"\nddb-sidecar data-path benchmark ({tool}, {args.connections} keep-alive connections, "
            f"1 KB POST bodies, {args.seconds:g}s x {args.rounds} rounds, best round shown)"
        )
        print(
            f"{'path':<44}{'req/s':>9}{'p50 ms':>8}{'p99 ms':>8}{'ratio':>7}{'CPU us/req':>12}{'RSS MB':>8}"
        )
        print(
            f"{'HAProxy -> stub (baseline)':<44}{direct['rps']:>9.0f}{direct['p50_us'] / 1000:>8.2f}"
            f"{direct['p99_us'] / 1000:>8.2f}{'1.00':>7}{'-':>12}{'-':>8}"
        )
        failed = False
        for kind, sc in sidecars.items():
            through = best(sc["runs"])
            cpu = min(r["cpu_us_per_req"] for r in sc["runs"])
            sc["memory"] = rss_mb(sc["proc"].pid)
            name = f"HAProxy -{'tcp' if kind == 'tcp' else 'unix socket'}-> sidecar -> stub"
            print(
                f"{name:<44}{through['rps']:>9.0f}{through['p50_us'] / 1000:>8.2f}"
                f"{through['p99_us'] / 1000:>8.2f}{through['rps'] / direct['rps']:>7.2f}{cpu:>12.1f}"
                f"{sc['memory']:>8.1f}"
            )
            with urllib.request.urlopen(f"http://127.0.0.1:{sc['admin']}/metrics", timeout=5) as resp:
                connects = re.search(
                    r'^ddb_sidecar_upstream_connects_total\{region="us-east-1"\} (\S+)$',
                    resp.read().decode(),
                    re.M,
                )
            sc["connects"] = connects.group(1) if connects else "?"
            if through["non2xx"] or through.get("errors"):
                print(f"WARNING: the {kind} sidecar returned errors; see", work / f"sidecar-{kind}.log")
                failed = True
        print("bars: ratio >= 0.25, CPU <= 150 us, RSS < 100 MB; goals: ratio >= 0.5, CPU <= 60 us")
        if "tcp" in sidecars:
            sc = sidecars["tcp"]
            print("\nhostile inputs, one after the other, to the tcp sidecar's region listener:")
            print(f"{'input':<58}{'worst loop stall ms':>20}{'RSS after MB':>14}")
            for name, stall, rss in hostile_inputs(sc["region_port"], sc["proc"].pid):
                print(f"{name:<58}{stall:>20.0f}{rss:>14.1f}")
            print("(loop stall: the worst latency of the listener's health check, polled every 5 ms)")
        print(
            "upstream connections opened: "
            + ", ".join(
                f"{kind} {sc['connects']} for {sum(r['requests'] for r in sc['runs'])} requests"
                for kind, sc in sidecars.items()
            )
        )
        return 1 if failed else 0
    finally:
        for proc in reversed(procs):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
