"""Pooled keep-alive HTTP/1.1 connections to one region's DynamoDB endpoint.

Why not aiohttp's ClientSession here: on these machines an aiohttp server + client costs ~150 µs per
proxied request before any signing, five times the budget of the whole hot path (FIELD-NOTES.md). The
DynamoDB JSON API needs a tiny subset of HTTP/1.1 (POST /, Content-Length bodies, keep-alive), so the data
path speaks it directly over asyncio protocols, with httptools (llhttp, the parser behind uvicorn) doing
the parsing. Callbacks, not coroutines: a request costs no task, no future.

Retry policy (ARCHITECTURE.md: never retry a write unless it provably never reached the region):
- the connection could not be opened: nothing was sent, the caller gets `UpstreamUnreachable`;
- a reused connection died before any response byte: a read is retried once on a fresh connection,
  a write is reported as `UpstreamFailed` (outcome unknown; the app's SDK decides, as it would with AWS).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools

logger = logging.getLogger(__name__)

# Response headers that describe one hop, not the message: never relayed.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"content-length",
        b"proxy-connection",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"upgrade",
    }
)


class UpstreamError(Exception):
    """A request did not get a response from the region."""

    sent: bool = True

    def __init__(self, detail: str, kind: str = "connection") -> None:
        super().__init__(detail)
        self.detail = detail
        # timeout | refused | connection: what the health classification needs to know.
        self.kind = kind


class UpstreamUnreachable(UpstreamError):
    """The connection could not be opened: the request was not sent."""

    sent = False


class UpstreamTimeout(UpstreamError):
    """Sent, but no complete response within the request timeout: it may have been applied."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail, "timeout")


class UpstreamFailed(UpstreamError):
    """Sent, then the connection broke (reset, EOF, garbage): it may have been applied."""


@dataclass(slots=True)
class UpstreamResponse:
    status: int
    # Status line and relayable headers, each ending in CRLF; no Content-Length, no final blank line.
    head: bytes
    body: bytes


ReplyCallback = Callable[[UpstreamResponse | None, UpstreamError | None], None]


@dataclass(frozen=True, slots=True)
class Endpoint:
    scheme: str
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) endpoint: {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname, port)

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"


@dataclass(slots=True)
class PoolStats:
    """Counters the metrics endpoint reads; plain ints so the hot path pays nothing for them."""

    connects: int = 0
    connect_errors: int = 0
    reused: int = 0
    timeouts: int = 0
    failures: int = 0
    retries: int = 0
    queued: int = 0
    last_error: str | None = None
    last_error_at: float | None = None

    def error(self, kind: str, detail: str) -> None:
        self.last_error = f"{kind}: {detail}"
        self.last_error_at = time.time()


class _Exchange:
    """One request in flight: its bytes, who to tell, and whether it may be retried."""

    __slots__ = ("attempts", "data", "idempotent", "reply", "started")

    def __init__(self, data: bytes, reply: ReplyCallback, idempotent: bool, started: float) -> None:
        self.data = data
        self.reply = reply
        self.idempotent = idempotent
        self.attempts = 0
        self.started = started


class _UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "_body",
        "_exchange",
        "_headers",
        "_parser",
        "_pool",
        "_reason",
        "_received",
        "_timer",
        "idle_since",
        "reused",
        "transport",
    )

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._exchange: _Exchange | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._headers: list[bytes] = []
        self._body: list[bytes] = []
        self._reason = b""
        self._received = False
        self.idle_since = 0.0
        self.reused = False

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamFailed(f"malformed response from {self._pool.endpoint.host}: {exc}"))

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._pool._forget(self)
        if self._exchange is not None:
            reason = type(exc).__name__ if exc else "closed by the server"
            self._fail(UpstreamFailed(f"connection to {self._pool.endpoint.host} lost ({reason})"))

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        self._headers = []
        self._body = []
        self._reason = b""

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in _HOP_BY_HOP:
            self._headers.append(name + b": " + value + b"\r\n")

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        exchange = self._exchange
        if exchange is None:  # an unsolicited response: the connection is not trustworthy
            self._close()
            return
        status = self._parser.get_status_code()
        head = b"HTTP/1.1 %d %s\r\n" % (status, self._reason) + b"".join(self._headers)
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        keep = self._parser.should_keep_alive()
        self._finish()
        if keep:
            self._pool._release(self)
        else:
            self._close()
        exchange.reply(UpstreamResponse(status, head, body), None)

    # -- used by the pool
    def start(self, exchange: _Exchange, timeout: float) -> None:
        self._exchange = exchange
        self._received = False
        exchange.attempts += 1
        loop = self._pool.loop
        self._timer = loop.call_at(loop.time() + timeout, self._on_timeout)
        assert self.transport is not None
        self.transport.write(exchange.data)

    def _on_timeout(self) -> None:
        self._timer = None
        self._pool.stats.timeouts += 1
        self._fail(
            UpstreamTimeout(
                f"no response from {self._pool.endpoint.host} within {self._pool.request_timeout:g}s"
            )
        )

    def _finish(self) -> None:
        self._exchange = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fail(self, error: UpstreamError) -> None:
        exchange = self._exchange
        received = self._received
        reused = self.reused
        self._finish()
        self._close()
        if exchange is None:
            return
        # A kept-alive connection the server had already closed: nothing came back. Only a read may be
        # sent again (the write may have been applied).
        if (
            isinstance(error, UpstreamFailed)
            and reused
            and not received
            and exchange.idempotent
            and exchange.attempts == 1
        ):
            self._pool.stats.retries += 1
            self._pool._dispatch(exchange, fresh=True)
            return
        self._pool.stats.failures += 1
        self._pool.stats.error(type(error).__name__, error.detail)
        exchange.reply(None, error)

    def _close(self) -> None:
        self._pool._forget(self)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class UpstreamPool:
    """Keep-alive connections to one endpoint, at most `max_connections` at once."""

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        loop: asyncio.AbstractEventLoop,
        connect_timeout: float = 2.0,
        request_timeout: float = 10.0,
        max_connections: int = 64,
        idle_timeout: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
        name: str = "",
    ) -> None:
        self.endpoint = endpoint
        self.loop = loop
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.name = name or endpoint.host
        if endpoint.scheme == "https" and ssl_context is None:
            ssl_context = ssl.create_default_context()
        self._ssl = ssl_context if endpoint.scheme == "https" else None
        self._idle: list[_UpstreamConnection] = []
        self._all: set[_UpstreamConnection] = set()
        self._connecting = 0
        self._waiting: deque[_Exchange] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False
        self.stats = PoolStats()

    # -- public
    def send(self, data: bytes, reply: ReplyCallback, *, idempotent: bool) -> None:
        """Send one complete request; `reply` is called exactly once, with a response or an error."""
        if self._closed:
            reply(None, UpstreamUnreachable(f"{self.name}: the sidecar is shutting down"))
            return
        self._dispatch(_Exchange(data, reply, idempotent, self.loop.time()), fresh=False)

    def abort_stalled(self, older_than: float, why: str) -> int:
        """Answer now the requests that have waited longer than `older_than` seconds for this region.

        Used when traffic moves away from a region found down: its stuck requests would otherwise hold the
        application's threads until `request_timeout`. Sent ones get a timeout (may or may not have been
        applied: never resent); queued ones, never sent, get "not sent, safe to retry". Returns how many.
        """
        now = self.loop.time()
        aborted = 0
        for conn in list(self._all):
            exchange = conn._exchange
            if exchange is not None and now - exchange.started > older_than:
                conn._fail(
                    UpstreamTimeout(
                        f"no response from {self.endpoint.host} after {now - exchange.started:.1f}s; {why}"
                    )
                )
                aborted += 1
        waiting, self._waiting = self._waiting, deque()
        for exchange in waiting:
            if now - exchange.started > older_than:
                exchange.reply(None, UpstreamUnreachable(f"{self.name}: {why}; the request was not sent"))
                aborted += 1
            else:
                self._waiting.append(exchange)
        return aborted

    @property
    def size(self) -> int:
        return len(self._all) + self._connecting

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in list(self._tasks):
            task.cancel()
        for conn in list(self._all):
            conn._close()
        while self._waiting:
            exchange = self._waiting.popleft()
            exchange.reply(None, UpstreamUnreachable(f"{self.name}: the sidecar is shutting down"))
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- internals
    def _dispatch(self, exchange: _Exchange, *, fresh: bool) -> None:
        if not fresh:
            idle = self._idle
            while idle:
                conn = idle.pop()
                if conn.transport is not None and not conn.transport.is_closing():
                    conn.reused = True
                    self.stats.reused += 1
                    conn.start(exchange, self.request_timeout)
                    return
                self._all.discard(conn)
        if self.size >= self.max_connections:
            self.stats.queued += 1
            self._waiting.append(exchange)
            return
        self._connecting += 1
        task = self.loop.create_task(self._connect_and_send(exchange), name=f"upstream-connect-{self.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect_and_send(self, exchange: _Exchange) -> None:
        ep = self.endpoint
        try:
            try:
                async with asyncio.timeout(self.connect_timeout):
                    _, conn = await self.loop.create_connection(
                        lambda: _UpstreamConnection(self),
                        ep.host,
                        ep.port,
                        ssl=self._ssl,
                        server_hostname=ep.host if self._ssl else None,
                    )
            finally:
                self._connecting -= 1
        except asyncio.CancelledError:
            exchange.reply(None, UpstreamUnreachable(f"{self.name}: the sidecar is shutting down"))
            raise
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            self.stats.connect_errors += 1
            detail = _describe_connect_error(exc, ep, self.connect_timeout)
            kind = (
                "timeout"
                if isinstance(exc, TimeoutError)
                else "refused"
                if isinstance(exc, ConnectionRefusedError)
                else "connection"
            )
            self.stats.error("connect", detail)
            exchange.reply(None, UpstreamUnreachable(detail, kind))
            self._drain_waiting_after_failure(detail)
            return
        self.stats.connects += 1
        self._all.add(conn)
        self._ensure_sweeper()
        remaining = self.request_timeout - (self.loop.time() - exchange.started)
        conn.start(exchange, max(remaining, 0.001))

    def _drain_waiting_after_failure(self, detail: str) -> None:
        # Requests queued behind a full pool whose connect just failed: give each its own attempt, so a
        # transient failure does not fail them all, but do not start more connects than the limit.
        while self._waiting and self.size < self.max_connections:
            self._dispatch(self._waiting.popleft(), fresh=True)

    def _release(self, conn: _UpstreamConnection) -> None:
        if self._waiting:
            conn.reused = True
            self.stats.reused += 1
            conn.start(self._waiting.popleft(), self.request_timeout)
            return
        conn.idle_since = self.loop.time()
        self._idle.append(conn)

    def _forget(self, conn: _UpstreamConnection) -> None:
        if conn in self._all:
            self._all.discard(conn)
            with contextlib.suppress(ValueError):
                self._idle.remove(conn)
            if self._waiting and not self._closed and self.size < self.max_connections:
                self._dispatch(self._waiting.popleft(), fresh=True)

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None and not self._closed:
            self._sweeper = self.loop.call_later(self.idle_timeout / 2, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle longer than `idle_timeout`, before the server closes them under us."""
        self._sweeper = None
        limit = self.loop.time() - self.idle_timeout
        for conn in [c for c in self._idle if c.idle_since < limit]:
            conn._close()
        if self._all:
            self._ensure_sweeper()


def _describe_connect_error(exc: BaseException, ep: Endpoint, timeout: float) -> str:
    where = f"{ep.host}:{ep.port}"
    if isinstance(exc, TimeoutError):
        return f"connect to {where} timed out after {timeout:g}s"
    if isinstance(exc, ConnectionRefusedError):
        return f"connect to {where} refused"
    if isinstance(exc, ssl.SSLError):
        # verify_message tells a wrong name from an untrusted CA; reason alone says only VERIFY_FAILED.
        return (
            f"TLS handshake with {where} failed: {getattr(exc, 'verify_message', None) or exc.reason or exc}"
        )
    return f"connect to {where} failed: {getattr(exc, 'strerror', None) or type(exc).__name__}"
