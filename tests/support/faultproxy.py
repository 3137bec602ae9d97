"""A fault-injecting TCP proxy for tests, in its own process: put it between the sidecar and a region.

    python -m tests.support.faultproxy --listen 127.0.0.1:P1 --upstream 127.0.0.1:P2 --control 127.0.0.1:P3

From a test, use the handle (it picks free ports, runs the process, talks to the control port):

    with FaultProxy(moto.port, log_dir) as proxy:              # starts in mode "pass"
        stack = SidecarStack(..., endpoints={"us-east-1": proxy.url})
        proxy.set_mode("blackhole")
        proxy.set_mode("http_error", status=503)
        proxy.set_mode("reset_after_request", match=table, times=1)
        proxy.requests("reset_after_request", "PutItem")       # how many requests got that fault

Its own process, so that it never shares (or stalls) the test's event loop and can be SIGSTOPped or killed
on its own (`proxy.process`).

Modes (`set_mode` returns once the mode is in force):
  pass                 forward bytes both ways (moto's `Connection: close` included: the proxy closes the
                       client connection when the upstream closes its own)
  blackhole            read requests and discard them; never answer
  refuse               close the listening socket (connects are refused) and reset every open connection;
                       any other mode opens it again
  reset                reset (RST: SO_LINGER 0, close) every open connection, and each new one at accept
  reset_after_request  forward the request on a fresh upstream connection, wait for the first response byte
                       (so the region has processed it), then reset the client connection: nothing of the
                       answer reaches the client
  delay                seconds=S: hold each request S s before forwarding it and each response S s before
                       relaying it (a one-way latency each way: a round trip gets 2*S longer)
  hold                 seconds=S: hold each request S s before forwarding it; the answer is relayed at once
                       (a request that takes the region S s longer: with operation=Scan, slow Scans)
  skew_date            seconds=S (may be negative): forward, and move the Date header of each answer S s
                       (a region whose clock, or ours, is off: what `doctor` measures)
  http_error           answer every request with a DynamoDB-shaped error, keep-alive: status (500),
                       code (InternalServerError; ServiceUnavailableException for 503), message
  throttle             the same with status 400 and code ProvisionedThroughputExceededException (or e.g.
                       code="ThrottlingException")

The mode is looked up for every request, on new and kept-alive connections alike, so tests need not care
when a connection was opened. Three parameters narrow the request modes (blackhole, reset_after_request,
delay, hold, http_error, throttle):
  match=TEXT  only requests whose bytes contain TEXT get the fault; the others pass (e.g. a table name, to
              leave the sidecar's health probes alone)
  operation=NAME  only requests of that operation (X-Amz-Target without its prefix, e.g. Scan)
  times=N     only the next N matching requests get it; then the proxy is back in mode pass

Counters (`state()`, `requests()`, `connections()`): connections by the mode in force when they were
accepted, requests by the mode actually applied and the operation (X-Amz-Target without its prefix).

Requests must carry Content-Length (no chunked bodies): all the DynamoDB JSON API needs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.utils
import itertools
import json
import logging
import os
import re
import socket
import struct
import sys
import urllib.error
import urllib.request
from collections import Counter, defaultdict, deque
from dataclasses import asdict, dataclass, field
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

from .ports import free_port
from .processes import ManagedProcess
from .wait import wait_until

logger = logging.getLogger("faultproxy")

MODES = (
    "pass",
    "blackhole",
    "refuse",
    "reset",
    "reset_after_request",
    "delay",
    "hold",
    "skew_date",
    "http_error",
    "throttle",
)
# Modes decided per request; `match`, `operation` and `times` apply to these.
REQUEST_MODES = frozenset(
    {"blackhole", "reset_after_request", "delay", "hold", "skew_date", "http_error", "throttle"}
)
DYNAMODB = "com.amazonaws.dynamodb.v20120810"
_REASONS = {400: "Bad Request", 500: "Internal Server Error", 503: "Service Unavailable"}
_MAX_HEAD = 1024 * 1024
# How long reset_after_request waits for the region's first response byte before resetting anyway.
_RESET_WAIT = 10.0
_NARROW = {"match", "operation", "times"}
_PARAMS: dict[str, set[str]] = {
    "pass": set(),
    "refuse": set(),
    "reset": set(),
    "blackhole": _NARROW,
    "reset_after_request": _NARROW,
    "delay": {"seconds", *_NARROW},
    "hold": {"seconds", *_NARROW},
    "skew_date": {"seconds", *_NARROW},
    "http_error": {"status", "code", "message", *_NARROW},
    "throttle": {"status", "code", "message", *_NARROW},
}


# -- the proxy process -----------------------------------------------------------------------------------


@dataclass
class Mode:
    name: str = "pass"
    seconds: float = 0.0
    status: int = 0
    code: str = ""
    message: str = ""
    match: str | None = None
    operation: str | None = None
    times: int | None = None  # requests left before falling back to pass; None: no limit

    @classmethod
    def parse(cls, name: str, params: dict[str, Any]) -> Mode:
        """Validate a mode and its parameters; ValueError says what is wrong."""
        if name not in _PARAMS:
            raise ValueError(f"unknown mode {name!r}; modes: {', '.join(MODES)}")
        unknown = set(params) - _PARAMS[name]
        if unknown:
            raise ValueError(
                f"mode {name} takes {sorted(_PARAMS[name]) or 'no parameters'}, not {sorted(unknown)}"
            )
        mode = cls(name, match=params.get("match"), operation=params.get("operation"))
        if params.get("times") is not None:
            mode.times = int(params["times"])
            if mode.times < 1:
                raise ValueError("times must be at least 1")
        if name in ("delay", "hold"):
            if "seconds" not in params:
                raise ValueError(f"mode {name} needs seconds=")
            mode.seconds = float(params["seconds"])
            if mode.seconds < 0:
                raise ValueError("seconds must not be negative")
        elif name == "skew_date":
            if "seconds" not in params:
                raise ValueError("mode skew_date needs seconds=")
            mode.seconds = float(params["seconds"])
        elif name in ("http_error", "throttle"):
            mode.status = int(params.get("status", 500 if name == "http_error" else 400))
            if not 400 <= mode.status <= 599:
                raise ValueError("status must be 400-599")
            default_code = (
                "ProvisionedThroughputExceededException"
                if name == "throttle"
                else "ServiceUnavailableException"
                if mode.status == 503
                else "InternalServerError"
            )
            mode.code = str(params.get("code", default_code))
            mode.message = str(params.get("message", f"injected by faultproxy ({name})"))
        return mode

    def params(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k in _PARAMS[self.name]}


PASS = Mode()


@dataclass
class _Request:
    raw: bytes
    op: str
    keep_alive: bool
    user_agent: str = ""


@dataclass(eq=False)
class _Client:
    """One accepted client connection and the upstream connection it forwards to (opened on demand)."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    pump: asyncio.Task[None] | None = None
    black: bool = False  # blackholed once: nothing is ever answered on it again
    hold: float = 0.0  # delay for the next response's first chunk
    date_offset: float = 0.0  # seconds added to the Date header of the next response


_DATE_RE = re.compile(rb"\r\n(Date: *)([^\r\n]+)\r\n", re.IGNORECASE)


def _skew_date(data: bytes, offset: float) -> bytes:
    """The response bytes with their Date header moved `offset` s (a head in the first chunk: moto's)."""
    match = _DATE_RE.search(data)
    if match is None:
        return data
    try:
        moved = email.utils.parsedate_to_datetime(match.group(2).decode()) + timedelta(seconds=offset)
    except (TypeError, ValueError):
        return data
    value = email.utils.format_datetime(moved.astimezone(UTC), usegmt=True).encode()
    return data[: match.start(2)] + value + data[match.end(2) :]


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0), not a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    """One HTTP request (head + Content-Length body); None at EOF between requests."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.split(b"\r\n")
    version = lines[0].rsplit(b" ", 1)[-1].upper()
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
    connection = headers.get(b"connection", b"").lower()
    keep_alive = connection != b"close" and (version == b"HTTP/1.1" or connection == b"keep-alive")
    op = headers.get(b"x-amz-target", b"-").decode("latin-1").rpartition(".")[2]
    return _Request(head + body, op, keep_alive, headers.get(b"user-agent", b"").decode("latin-1"))


def _canned(mode: Mode, keep_alive: bool, n: int) -> bytes:
    body = json.dumps(
        {"__type": f"{DYNAMODB}#{mode.code}", "message": mode.message}, separators=(",", ":")
    ).encode()
    head = (
        f"HTTP/1.1 {mode.status} {_REASONS.get(mode.status, 'Error')}\r\n"
        "Content-Type: application/x-amz-json-1.0\r\n"
        f"x-amzn-RequestId: faultproxy-{n}\r\n"
        f"x-amzn-ErrorType: {mode.code}\r\n"
        f"Content-Length: {len(body)}\r\n" + ("" if keep_alive else "Connection: close\r\n") + "\r\n"
    )
    return head.encode() + body


@dataclass
class FaultProxyServer:
    listen: tuple[str, int]
    upstream: tuple[str, int]
    mode: Mode = field(default_factory=Mode)
    server: asyncio.Server | None = None
    clients: set[_Client] = field(default_factory=set)
    connections: Counter[str] = field(default_factory=Counter)
    requests: defaultdict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    _ids: itertools.count[int] = field(default_factory=itertools.count)
    user_agents: deque[str] = field(default_factory=lambda: deque(maxlen=100))  # the last requests' UAs

    # -- control
    async def set_mode(self, mode: Mode) -> None:
        self.mode = mode
        if mode.name == "refuse" and self.server is not None:
            self.server.close()  # closes the listening socket now; wait_closed would wait for the clients
            self.server = None
        elif mode.name != "refuse" and self.server is None:
            await self.open()
        if mode.name in ("refuse", "reset"):
            self.drop_connections()
        logger.info("mode %s %s", mode.name, mode.params())

    async def open(self) -> None:
        self.server = await asyncio.start_server(
            self._serve, *self.listen, reuse_address=True, limit=_MAX_HEAD, backlog=256
        )

    def drop_connections(self) -> None:
        for client in list(self.clients):
            _reset(client.writer)
            if client.upstream is not None:
                client.upstream.close()

    def state(self) -> dict[str, Any]:
        return {
            "mode": self.mode.name,
            "params": self.mode.params(),
            "listening": self.server is not None,
            "open_connections": len(self.clients),
            "connections": dict(self.connections),
            "requests": {mode: dict(ops) for mode, ops in self.requests.items()},
            "user_agents": list(self.user_agents),
        }

    def reset_counts(self) -> None:
        self.connections.clear()
        self.requests.clear()

    # -- data path
    def _mode_for(self, req: _Request) -> Mode:
        """The mode this request gets, spending one of `times`."""
        mode = self.mode
        if (
            mode.name not in REQUEST_MODES
            or (mode.match is not None and mode.match.encode() not in req.raw)
            or (mode.operation is not None and mode.operation != req.op)
        ):
            return PASS
        if mode.times is not None:
            mode.times -= 1
            if mode.times <= 0:
                self.mode = PASS
                logger.info("mode %s used up: back to pass", mode.name)
        return mode

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections[self.mode.name] += 1
        if self.mode.name in ("reset", "refuse"):
            _reset(writer)
            return
        client = _Client(reader, writer)
        self.clients.add(client)
        try:
            await self._requests(client)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            logger.debug("client connection ended: %r", exc)
        finally:
            # The client left (or was reset, or the upstream closed and the pump closed the client).
            self.clients.discard(client)
            if client.pump is not None:
                client.pump.cancel()
            if client.upstream is not None:
                client.upstream.close()
            if not writer.transport.is_closing():
                writer.close()

    async def _requests(self, client: _Client) -> None:
        while (req := await _read_request(client.reader)) is not None:
            mode = self._mode_for(req)
            if client.black or mode.name == "blackhole":
                # Once a request went unanswered, nothing after it on this connection can be answered.
                client.black = True
                self.requests["blackhole"][req.op] += 1
                continue
            self.requests[mode.name][req.op] += 1
            self.user_agents.append(f"{req.op} {req.user_agent}")
            if mode.name in ("http_error", "throttle"):
                client.writer.write(_canned(mode, req.keep_alive, next(self._ids)))
                await client.writer.drain()
                if not req.keep_alive:
                    return
            elif mode.name == "reset_after_request":
                await self._forward_then_reset(client, req)
                return
            else:  # pass, delay, hold, skew_date
                if mode.name == "skew_date":
                    client.date_offset = mode.seconds
                elif mode.seconds:
                    await asyncio.sleep(mode.seconds)
                client.hold = mode.seconds if mode.name == "delay" else 0.0
                if not await self._forward(client, req):
                    return

    async def _forward(self, client: _Client, req: _Request) -> bool:
        if client.upstream is None or client.upstream.is_closing():
            try:
                up_reader, client.upstream = await asyncio.open_connection(*self.upstream)
            except OSError as exc:
                logger.info("upstream %s:%s: %r; resetting the client", *self.upstream, exc)
                _reset(client.writer)
                return False
            client.pump = asyncio.create_task(self._pump(client, up_reader), name="faultproxy-pump")
        client.upstream.write(req.raw)
        await client.upstream.drain()
        return True

    async def _pump(self, client: _Client, up_reader: asyncio.StreamReader) -> None:
        """Upstream -> client until the upstream closes; then close the client too (as a transparent proxy)."""
        try:
            while data := await up_reader.read(65536):
                if client.hold:
                    hold, client.hold = client.hold, 0.0
                    await asyncio.sleep(hold)
                if client.date_offset:
                    data = _skew_date(data, client.date_offset)
                    client.date_offset = 0.0
                client.writer.write(data)
                await client.writer.drain()
        except OSError as exc:
            logger.debug("upstream connection ended: %r", exc)
        finally:
            if client.upstream is not None:
                client.upstream.close()
            if not client.writer.transport.is_closing():
                client.writer.close()

    async def _forward_then_reset(self, client: _Client, req: _Request) -> None:
        # A fresh upstream connection of its own, so that no byte of the answer can reach the client.
        if client.pump is not None:
            client.pump.cancel()
        if client.upstream is not None:
            client.upstream.close()
        up_writer: asyncio.StreamWriter | None = None
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            up_writer.write(req.raw)
            await up_writer.drain()
            async with asyncio.timeout(_RESET_WAIT):
                await up_reader.read(1)  # the region has processed the request
        except (OSError, TimeoutError) as exc:
            logger.info("reset_after_request: upstream %r; resetting anyway", exc)
        finally:
            if up_writer is not None:
                up_writer.close()
            _reset(client.writer)

    # -- control port: a tiny HTTP/1.1 server, one request per connection
    async def control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        status, answer = 200, {}
        try:
            req = await _read_request(reader)
            if req is None:
                return
            line = req.raw.split(b"\r\n", 1)[0].decode("latin-1").split()
            method, path = line[0], line[1]
            body = req.raw.partition(b"\r\n\r\n")[2]
            if method == "POST" and path == "/mode":
                data = json.loads(body or b"{}")
                await self.set_mode(Mode.parse(str(data.get("mode")), dict(data.get("params") or {})))
            elif method == "POST" and path == "/reset-counts":
                self.reset_counts()
            elif method == "POST" and path == "/drop":
                self.drop_connections()
            elif not (method == "GET" and path == "/state"):
                status, answer = (
                    404,
                    {"error": f"no {method} {path}; GET /state, POST /mode|/drop|/reset-counts"},
                )
            if status == 200:
                answer = self.state()
        except (ValueError, TypeError) as exc:
            status, answer = 400, {"error": str(exc)}
        except Exception as exc:  # a bug here must show in the test, not kill the proxy
            logger.exception("control request failed")
            status, answer = 500, {"error": repr(exc)}
        payload = json.dumps(answer).encode()
        writer.write(
            b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
            % (status, len(payload))
            + payload
        )
        with contextlib.suppress(OSError):
            await writer.drain()
        writer.close()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


async def _main(args: argparse.Namespace) -> None:
    proxy = FaultProxyServer(_address(args.listen), _address(args.upstream))
    await proxy.open()
    control = await asyncio.start_server(proxy.control, *_address(args.control), reuse_address=True)
    logger.info("listening on %s, upstream %s, control %s", args.listen, args.upstream, args.control)
    async with control:
        await control.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.faultproxy", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--listen", required=True, help="HOST:PORT the sidecar connects to")
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the real server (e.g. moto)")
    parser.add_argument("--control", required=True, help="HOST:PORT of the control API")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s faultproxy %(levelname)s %(message)s",
        stream=sys.stdout,
    )
    asyncio.run(_main(args))


# -- the handle tests use --------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]


class FaultProxy:
    """The fault proxy process in front of `127.0.0.1:upstream_port`; clients connect to `url`."""

    def __init__(
        self,
        upstream_port: int,
        log_dir: str | os.PathLike[str],
        *,
        upstream_host: str = "127.0.0.1",
        name: str | None = None,
    ) -> None:
        self.port = free_port()
        self.control_port = free_port()
        self.upstream = f"{upstream_host}:{upstream_port}"
        self.process = ManagedProcess(
            name or f"faultproxy-{self.port}",
            [
                sys.executable,
                "-m",
                "tests.support.faultproxy",
                "--listen",
                f"127.0.0.1:{self.port}",
                "--upstream",
                self.upstream,
                "--control",
                f"127.0.0.1:{self.control_port}",
            ],
            log_dir,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            cwd=REPO,
        )

    @property
    def url(self) -> str:
        """Where clients connect: give this to the sidecar as the region's endpoint."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> FaultProxy:
        self.process.start()

        def ready() -> bool:
            self.process.check_running()
            return self.state()["mode"] == "pass"

        try:
            wait_until(
                ready, timeout, interval=0.05, message=f"{self.process.name} control port", ignore=(OSError,)
            )
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self.process.stop()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- control
    def set_mode(self, mode: str, **params: Any) -> dict[str, Any]:
        """Switch to `mode` (see the module docstring); returns the new state once the mode is in force."""
        return self._call("POST", "/mode", {"mode": mode, "params": params})

    def state(self) -> dict[str, Any]:
        """{"mode", "params", "listening", "open_connections", "connections": {mode: n},
        "requests": {mode: {operation: n}}}"""
        return self._call("GET", "/state")

    def requests(self, mode: str | None = None, op: str | None = None) -> int:
        """Requests that got `mode` (any mode: None), for operation `op` (e.g. "PutItem"; any: None)."""
        counts = self.state()["requests"]
        return sum(
            n
            for m, ops in counts.items()
            if mode is None or m == mode
            for o, n in ops.items()
            if op is None or o == op
        )

    def connections(self, mode: str | None = None) -> int:
        """Connections accepted while `mode` was in force (any mode: None)."""
        counts = self.state()["connections"]
        return sum(n for m, n in counts.items() if mode is None or m == mode)

    def reset_counts(self) -> None:
        self._call("POST", "/reset-counts")

    def drop_connections(self) -> None:
        """Reset every open client connection now (the listening socket stays as it is)."""
        self._call("POST", "/drop")

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.control_port}{path}", data=data, method=method
        )
        try:
            with urllib.request.urlopen(request, timeout=5.0) as resp:
                result: dict[str, Any] = json.loads(resp.read())
                return result
        except urllib.error.HTTPError as err:
            with err:
                detail = json.loads(err.read() or b"{}").get("error", "")
            raise ValueError(f"faultproxy {method} {path}: HTTP {err.code}: {detail}") from None

    def __repr__(self) -> str:
        return f"<FaultProxy {self.url} -> {self.upstream} {self.process!r}>"


if __name__ == "__main__":
    main()
