"""Bounded memory and file descriptors on the data path (issue 12, item 2), against a real sidecar, its
HAProxy and the moto regions: an endless header, a huge URL, connections that never speak, more
connections than a listener takes, and the open-files limit raised at start.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.moto_region import MotoRegion
from tests.support.stack import SidecarStack, new_app_table
from tests.support.wait import wait_until


@pytest.fixture(scope="module")
def stack(moto_regions: dict[str, MotoRegion], tmp_path_factory: pytest.TempPathFactory) -> Any:
    table = new_app_table(moto_regions.values(), "bounded")
    regions = [moto_regions["us-east-1"], moto_regions["eu-west-1"]]
    extra = {"proxy": {"max_client_connections": 32, "first_byte_timeout": "1s"}}
    s = SidecarStack(regions, [table], tmp_path_factory.mktemp("bounded"), extra=extra)
    # started as systemd would without LimitNOFILE: a soft open-files limit of 1024
    s.process.argv = ["/bin/sh", "-c", 'ulimit -Sn 1024 && exec "$0" "$@"', *s.process.argv]
    with s:
        s.wait_regions_up()
        s.table = table  # type: ignore[attr-defined]
        yield s


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def answer(sock: socket.socket) -> bytes:
    data = b""
    sock.settimeout(5)
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_an_endless_header_is_cut_at_64_kib_without_memory_growth(stack: SidecarStack) -> None:
    port = stack.region_ports["us-east-1"]
    pid = stack.pid
    assert pid is not None
    before = rss_mb(pid)
    answers = []
    for _ in range(6):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nX-Endless: ")
            sent = 0
            try:
                while sent < 4 * 1024 * 1024:  # it never ends, unless the listener ends it
                    sock.sendall(b"a" * 16384)
                    sent += 16384
            except (BrokenPipeError, ConnectionResetError):
                pass
            answers.append((sent, answer(sock)))
    for sent, data in answers:
        assert data.startswith(b"HTTP/1.1 431"), data[:200]
        assert sent < 4 * 1024 * 1024  # cut off early, not read to the end
    grew = rss_mb(pid) - before
    print(f"\nRSS after 6 endless headers: +{grew:.1f} MB")
    assert grew < 32, grew
    stack.client().describe_table  # noqa: B018
    stack.client().get_item(TableName=stack.table, Key={"pk": {"S": "x"}})  # type: ignore[attr-defined]


def test_a_url_over_8_kib_is_refused(stack: SidecarStack) -> None:
    with socket.create_connection(("127.0.0.1", stack.region_ports["us-east-1"]), timeout=5) as sock:
        sock.sendall(b"POST /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        assert answer(sock).startswith(b"HTTP/1.1 414")


def test_connections_that_never_speak_are_closed(stack: SidecarStack) -> None:
    socks = [
        socket.create_connection(("127.0.0.1", stack.region_ports["eu-west-1"]), timeout=5) for _ in range(20)
    ]
    try:
        started = time.monotonic()
        for sock in socks:
            sock.settimeout(6)
            assert sock.recv(1) == b""  # closed by the listener
        assert time.monotonic() - started < 5
    finally:
        for sock in socks:
            sock.close()


def test_beyond_the_cap_a_connection_is_told_not_sent_and_the_app_goes_on(stack: SidecarStack) -> None:
    port = stack.region_ports["eu-west-1"]  # the standby's listener: the app's traffic uses us-east-1's
    held = []
    try:
        for _ in range(32):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"POST / HTTP/1.1\r\n")  # speaking (not closed as silent), never finishing
            held.append(sock)
        wait_until(lambda: stack.status()["connections"]["open"].get("eu-west-1", 0) >= 32, 5, message="held")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as extra:
            data = answer(extra)
        assert data.startswith(b"HTTP/1.1 503") and b"NOT sent" in data, data[:300]
        assert stack.status()["connections"]["refused"] >= 1
        stack.client().get_item(TableName=stack.table, Key={"pk": {"S": "x"}})  # type: ignore[attr-defined]
    finally:
        for sock in held:
            sock.close()


def test_the_open_files_limit_is_raised_at_start(stack: SidecarStack) -> None:
    limits = Path(f"/proc/{stack.pid}/limits").read_text()
    line = next(row for row in limits.splitlines() if row.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    assert soft == hard, line  # started with a soft limit of 1024: raised to the hard limit
    if hard == "unlimited" or int(hard) > 1024:
        assert soft == "unlimited" or int(soft) > 1024, line


def test_request_bytes_held_at_once_are_bounded(moto_regions: dict[str, MotoRegion], tmp_path: Path) -> None:
    table = new_app_table(moto_regions.values(), "budget")
    regions = [moto_regions["us-east-1"], moto_regions["eu-west-1"]]
    extra = {"proxy": {"max_inflight_bytes": 1024 * 1024}}
    with SidecarStack(regions, [table], tmp_path, extra=extra) as stack:
        port = stack.region_ports["us-east-1"]
        head = (
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-amz-json-1.0\r\n"
            "X-Amz-Target: DynamoDB_20120810.PutItem\r\nContent-Length: {}\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", port), timeout=5) as slow:
            slow.sendall(head.format(1_000_000).encode() + b"{" + b" " * 900_000)  # 900 KB held, unfinished
            wait_until(lambda: stack.status()["connections"]["inflight_bytes"] >= 900_000, 5, message="held")
            body = b'{"TableName": "%s", "Item": {"pk": {"S": "b"}, "v": {"S": "%s"}}}' % (
                table.encode(),
                b"x" * 300_000,
            )
            with socket.create_connection(("127.0.0.1", port), timeout=5) as other:
                other.sendall(head.format(len(body)).encode() + body)
                data = other.recv(65536)
            assert data.startswith(b"HTTP/1.1 503") and b"NOT sent" in data, data[:300]
            assert stack.status()["connections"]["refused_over_budget"] >= 1
        wait_until(lambda: stack.status()["connections"]["inflight_bytes"] == 0, 5, message="given back")
        stack.client().put_item(TableName=table, Item={"pk": {"S": "b"}, "v": {"S": "x" * 300_000}})
