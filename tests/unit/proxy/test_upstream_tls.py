"""The upstream pool against a real TLS server on 127.0.0.1, with certificates from a test CA (trustme).

The region's endpoint is HTTPS: the handshake is part of connecting, so a certificate the pool must not
trust and a handshake that never completes are both "could not connect" (`UpstreamUnreachable`, nothing
sent), bounded by `connect_timeout`. The scenarios run on the default asyncio loop and on uvloop, which the
sidecar runs on in production (sidecar/cli.py) and which has its own TLS implementation.

Teardown order matters with TLS: the server is closed first and the pool is closed once it has seen every
connection go, so no socket outlives the test loop (filterwarnings=error turns a ResourceWarning into a
failure).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trustme

from sidecar.proxy.upstream import (
    Endpoint,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    UpstreamUnreachable,
)
from tests.support.httpstub import LoopbackServer, read_request
from tests.support.wait import async_wait_until

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
    uvloop = None  # type: ignore[assignment]

AWS_NAME = "dynamodb.us-east-1.amazonaws.com"
REQUEST = b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{}"
BODY = b'{"Item":{"pk":{"S":"k"},"blob":{"S":"' + b"x" * 40_000 + b'"}}}'
OK = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.0\r\nx-amzn-RequestId: REQ1\r\n"
    b"x-amz-crc32: 2745614147\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY
)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(ctx)
    return ctx


def trusting_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


class TlsServer(LoopbackServer):
    """HTTP/1.1 over TLS answering every request with OK. `connections` counts completed handshakes
    (asyncio calls the handler only after the handshake), `sni` the server names clients asked for."""

    def __init__(self, ssl_context: ssl.SSLContext, *, close_after_response: bool = False) -> None:
        super().__init__(ssl_context)
        self.close_after_response = close_after_response
        self.connections = 0
        self.requests = 0
        self.sni: list[str | None] = []
        ssl_context.sni_callback = lambda _obj, name, _ctx: self.sni.append(name)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                await read_request(reader)
                self.requests += 1
                writer.write(OK)
                await writer.drain()
                if self.close_after_response:
                    return  # closes the TLS connection (close_notify) without a Connection: close header
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass


class StalledHandshakeServer(LoopbackServer):
    """Accepts TCP and reads whatever comes (a ClientHello), never answers: a handshake that stalls."""

    def __init__(self) -> None:
        super().__init__()
        self.received = b""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                self.received += data
        except ConnectionError:
            pass


Server = TlsServer | StalledHandshakeServer


@contextlib.asynccontextmanager
async def serving(server: Server) -> AsyncIterator[Server]:
    await server.start()
    try:
        yield server
    finally:
        await server.close()


@contextlib.asynccontextmanager
async def upstream(
    endpoint: Endpoint, ssl_context: ssl.SSLContext | None, **kw: float
) -> AsyncIterator[UpstreamPool]:
    pool = UpstreamPool(endpoint, loop=asyncio.get_running_loop(), ssl_context=ssl_context, name="test", **kw)  # type: ignore[arg-type]
    try:
        yield pool
    finally:
        # Entered before `serving`, so the server is gone by now: wait for the pool to see its connections
        # close (their sockets are closed by then) before closing it.
        await async_wait_until(lambda: pool.size == 0, 5, message="the pool to see the server close")
        await pool.close()


async def send(
    pool: UpstreamPool, idempotent: bool = True
) -> tuple[UpstreamResponse | None, UpstreamError | None, float]:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[tuple[UpstreamResponse | None, UpstreamError | None]] = loop.create_future()
    started = time.monotonic()
    pool.send(REQUEST, lambda r, e: fut.set_result((r, e)), idempotent=idempotent)
    response, error = await asyncio.wait_for(fut, 10)
    return response, error, time.monotonic() - started


def https(port: int, host: str = "localhost") -> Endpoint:
    return Endpoint("https", host, port)


# -- scenarios, each run on both loops


async def keep_alive_reuses_one_tls_connection(ca: trustme.CA) -> None:
    server = TlsServer(server_context(ca, AWS_NAME, "localhost"))
    async with upstream(https(server.port), trusting_context(ca)) as pool, serving(server):
        for _ in range(5):
            response, error, _ = await send(pool)
            assert error is None and response is not None
            assert response.status == 200 and response.body == BODY
            assert b"x-amzn-RequestId: REQ1\r\n" in response.head
            assert b"x-amz-crc32: 2745614147\r\n" in response.head
            assert b"Content-Length" not in response.head
        assert server.connections == 1 and server.requests == 5
        assert pool.stats.connects == 1 and pool.stats.reused == 4
        assert server.sni == ["localhost"]


async def certificate_for_another_name_is_unreachable(ca: trustme.CA) -> None:
    server = TlsServer(server_context(ca, "example.org"))
    async with upstream(https(server.port), trusting_context(ca)) as pool, serving(server):
        response, error, _ = await send(pool, idempotent=False)
        assert response is None
        assert isinstance(error, UpstreamUnreachable) and not error.sent and error.kind == "connection"
        assert "TLS" in error.detail and "CERTIFICATE" in error.detail.upper(), error.detail
        assert server.connections == 0 and server.requests == 0
        assert pool.stats.connect_errors == 1 and pool.stats.connects == 0


async def untrusted_ca_is_unreachable(ca: trustme.CA) -> None:
    server = TlsServer(server_context(ca, AWS_NAME, "localhost"))
    # The system trust store only: the test CA is not in it.
    async with upstream(https(server.port), ssl.create_default_context()) as pool, serving(server):
        response, error, _ = await send(pool, idempotent=False)
        assert response is None
        assert isinstance(error, UpstreamUnreachable) and not error.sent and error.kind == "connection"
        assert "TLS" in error.detail and "CERTIFICATE" in error.detail.upper(), error.detail
        assert server.connections == 0 and server.requests == 0


async def plain_http_to_a_tls_port_fails_fast(ca: trustme.CA) -> None:
    server = TlsServer(server_context(ca, "localhost"))
    endpoint = Endpoint("http", "localhost", server.port)
    async with upstream(endpoint, None, request_timeout=3) as pool, serving(server):
        response, error, elapsed = await send(pool, idempotent=False)
        assert response is None and isinstance(error, UpstreamError)
        # The server rejects the bytes as a handshake and hangs up: an error well before the timeout.
        assert elapsed < 2.0, (elapsed, error)
        assert server.connections == 0 and server.requests == 0


async def stalled_handshake_bounded_by_connect_timeout(ca: trustme.CA) -> None:
    server = StalledHandshakeServer()
    async with (
        upstream(https(server.port), trusting_context(ca), connect_timeout=0.5, request_timeout=30) as pool,
        serving(server),
    ):
        response, error, elapsed = await send(pool, idempotent=False)
        assert response is None
        assert isinstance(error, UpstreamUnreachable) and not error.sent and error.kind == "timeout"
        assert 0.45 <= elapsed < 1.5, elapsed
        assert server.received[:1] == b"\x16"  # the TCP connect worked; the ClientHello went unanswered
        assert pool.size == 0 and pool.stats.connect_errors == 1


async def server_closing_an_idle_tls_connection_is_not_an_error(ca: trustme.CA) -> None:
    server = TlsServer(server_context(ca, "localhost"), close_after_response=True)
    async with upstream(https(server.port), trusting_context(ca)) as pool, serving(server):
        response, error, _ = await send(pool)
        assert error is None and response is not None and response.status == 200
        # The server's close_notify reaches the pool: the connection is dropped, not reused.
        await async_wait_until(lambda: pool.size == 0, 5, message="the pool to drop the closed connection")
        response, error, _ = await send(pool, idempotent=False)
        assert error is None and response is not None and response.body == BODY
        assert server.connections == 2 and pool.stats.reused == 0 and pool.stats.failures == 0


SCENARIOS: list[Callable[[trustme.CA], Awaitable[None]]] = [
    keep_alive_reuses_one_tls_connection,
    certificate_for_another_name_is_unreachable,
    untrusted_ca_is_unreachable,
    plain_http_to_a_tls_port_fails_fast,
    stalled_handshake_bounded_by_connect_timeout,
    server_closing_an_idle_tls_connection_is_not_an_error,
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__)
async def test_on_asyncio(scenario: Callable[[trustme.CA], Awaitable[None]], ca: trustme.CA) -> None:
    await asyncio.wait_for(scenario(ca), 30)


@pytest.mark.skipif(uvloop is None, reason="uvloop not installed")
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__)
def test_on_uvloop(scenario: Callable[[trustme.CA], Awaitable[None]], ca: trustme.CA) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(scenario(ca), 30)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(bounded())


async def test_real_aws_name_is_sent_as_sni_and_verified(
    ca: trustme.CA, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The production case: endpoint host is the AWS name, which must be the SNI and the name verified.

    The name is resolved to 127.0.0.1 by patching the loop's resolver (no DNS): asyncio only, uvloop's
    resolver cannot be patched.
    """
    loop = asyncio.get_running_loop()
    real_getaddrinfo = loop.getaddrinfo

    async def resolve(host: object, port: object, *args: object, **kwargs: object) -> object:
        if host == AWS_NAME:
            return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", port))]
        return await real_getaddrinfo(host, port, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(loop, "getaddrinfo", resolve)
    server = TlsServer(server_context(ca, AWS_NAME))
    async with upstream(https(server.port, AWS_NAME), trusting_context(ca)) as pool, serving(server):
        response, error, _ = await send(pool)
        assert error is None and response is not None and response.body == BODY
        assert server.sni == [AWS_NAME]
        # The same certificate does not pass for localhost: the name checked is the endpoint's.
        async with upstream(https(server.port), trusting_context(ca)) as other:
            response, error, _ = await send(other)
            assert isinstance(error, UpstreamUnreachable) and "TLS" in error.detail
