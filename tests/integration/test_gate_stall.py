"""No request stalls the event loop (issue 12, item 1): hostile bodies of up to 16 MB are judged in a
worker process, and DynamoDB's own statement limit is enforced before a statement is read. Real sidecar,
HAProxy and moto regions; the loop's responsiveness is seen from outside, as the health check's latency.
The figure itself is measured by `make bench` (worst loop stall under hostile bodies); the bound here is
only a wide one (a stall on the loop is over a second per body on these machines).
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.support.moto_region import MotoRegion
from tests.support.stack import SidecarStack, new_app_table

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def hostile_item(table: str, nested: int) -> bytes:
    members = b",".join(b'"a%d":{"M":{}}' % i for i in range(nested))
    return b'{"TableName":"%s","Item":{"pk":{"S":"h"},"v":{"M":{%s}}}}' % (table.encode(), members)


def post(port: int, target: str, body: bytes) -> tuple[int, dict[str, Any]]:
    head = (
        f"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-amz-json-1.0\r\n"
        f"X-Amz-Target: DynamoDB_20120810.{target}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.split(b"\r\n\r\n", 1)[1] or b"{}")


@pytest.fixture(scope="module")
def stack(moto_regions: dict[str, MotoRegion], tmp_path_factory: pytest.TempPathFactory) -> Any:
    table = new_app_table(moto_regions.values(), "stall")
    regions = [moto_regions["us-east-1"], moto_regions["eu-west-1"]]
    with SidecarStack(regions, [table], tmp_path_factory.mktemp("stall")) as s:
        s.wait_regions_up()
        s.table = table  # type: ignore[attr-defined]
        yield s


def test_hostile_bodies_do_not_stall_the_loop(stack: SidecarStack, tmp_path: Path) -> None:
    port = stack.region_ports["us-east-1"]
    health = f"{stack.region_url('eu-west-1')}/ddb-sidecar/health"
    worst = 0.0
    stop = threading.Event()

    def watch() -> None:
        nonlocal worst
        while not stop.is_set():
            started = time.monotonic()
            try:
                with _NO_PROXY.open(health, timeout=10) as resp:
                    resp.read()
            except OSError:
                pass
            worst = max(worst, time.monotonic() - started)
            stop.wait(0.005)

    body = hostile_item("not-served", 850_000)  # read whole by the gate, then refused: never sent upstream
    assert 15_000_000 < len(body) < 16 * 1024 * 1024
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        answers = [post(port, "PutItem", body) for _ in range(2)]
        table = stack.table  # type: ignore[attr-defined]
        statement = f"SELECT * FROM \"{table}\" WHERE pk = '{'x' * (4 * 1024 * 1024)}'"
        big = json.dumps({"Statement": statement}).encode()
        answers += [post(port, "ExecuteStatement", big) for _ in range(3)]
    finally:
        stop.set()
        watcher.join(10)
    print(f"\nworst health-check latency while hostile bodies were judged: {worst * 1000:.0f} ms")
    for status, doc in answers[2:]:
        assert status == 400 and doc["__type"].endswith("#ValidationException"), doc
        assert "8192" in doc["message"]
    for status, doc in answers[:2]:
        assert status == 400 and doc["__type"].endswith("#AccessDeniedException"), doc
    assert worst < 0.5, worst
    assert all(r["state"] == "up" for r in stack.status()["regions"])
