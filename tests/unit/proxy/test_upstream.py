"""The upstream pool against real sockets on 127.0.0.1: reuse, limits, and the retry rule for writes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from sidecar.proxy.upstream import (
    Endpoint,
    UpstreamError,
    UpstreamFailed,
    UpstreamPool,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from tests.support.httpstub import LoopbackServer, read_request
from tests.support.ports import free_port

REQUEST = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.0\r\nx-amz-crc32: 2745614147\r\nContent-Length: 2\r\n\r\n{}"


class StubServer(LoopbackServer):
    """A tiny HTTP server whose behaviour per request is scripted by the test."""

    def __init__(self, behaviour: Callable[[int], bytes | None]) -> None:
        super().__init__()
        self.behaviour = behaviour
        self.requests = 0
        self.connections = 0

    async def start(self) -> StubServer:  # type: ignore[override]
        await super().start()
        return self

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                await read_request(reader)
                self.requests += 1
                answer = self.behaviour(self.requests)
                if answer is None:  # hang up without answering
                    writer.transport.abort()
                    return
                if answer == b"silence":
                    await asyncio.sleep(3600)
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass


@pytest.fixture
async def pools() -> AsyncIterator[list[UpstreamPool]]:
    created: list[UpstreamPool] = []
    yield created
    for pool in created:
        await pool.close()


def make_pool(pools: list[UpstreamPool], port: int, **kw: float) -> UpstreamPool:
    pool = UpstreamPool(
        Endpoint("http", "127.0.0.1", port), loop=asyncio.get_running_loop(), name="test", **kw
    )  # type: ignore[arg-type]
    pools.append(pool)
    return pool


async def send(
    pool: UpstreamPool, data: bytes = REQUEST, idempotent: bool = True
) -> tuple[UpstreamResponse | None, UpstreamError | None]:
    fut: asyncio.Future[tuple[UpstreamResponse | None, UpstreamError | None]] = (
        asyncio.get_running_loop().create_future()
    )
    pool.send(data, lambda r, e: fut.set_result((r, e)), idempotent=idempotent)
    return await asyncio.wait_for(fut, 10)


async def test_keep_alive_connection_reused_and_response_relayed(pools: list[UpstreamPool]) -> None:
    stub = await StubServer(lambda n: OK).start()
    try:
        pool = make_pool(pools, stub.port)
        for _ in range(5):
            response, error = await send(pool)
            assert error is None and response is not None
            assert response.status == 200 and response.body == b"{}"
            assert b"x-amz-crc32: 2745614147\r\n" in response.head
            assert b"Content-Length" not in response.head  # the listener sets its own
        assert stub.connections == 1
        assert pool.stats.reused == 4
    finally:
        await stub.close()


async def test_refused_connection_is_unreachable_not_sent(pools: list[UpstreamPool]) -> None:
    pool = make_pool(pools, free_port())
    response, error = await send(pool, idempotent=False)
    assert response is None
    assert isinstance(error, UpstreamUnreachable) and not error.sent and error.kind == "refused"


async def test_timeout_reports_possibly_applied(pools: list[UpstreamPool]) -> None:
    stub = await StubServer(lambda n: b"silence").start()
    try:
        pool = make_pool(pools, stub.port, request_timeout=0.3)
        _response, error = await send(pool, idempotent=False)
        assert isinstance(error, UpstreamTimeout) and error.sent and error.kind == "timeout"
    finally:
        await stub.close()


async def test_dead_reused_connection_retries_reads_but_not_writes(pools: list[UpstreamPool]) -> None:
    # Request 1 answered; request 2 arrives on the kept-alive connection and the server hangs up on it.
    stub = await StubServer(lambda n: OK if n in (1, 3) else None).start()
    try:
        pool = make_pool(pools, stub.port)
        assert (await send(pool))[0] is not None
        response, error = await send(pool, idempotent=True)
        assert error is None and response is not None and response.status == 200
        assert pool.stats.retries == 1
        assert stub.requests == 3  # the read went out twice

        writes = await StubServer(lambda n: OK if n == 1 else None).start()
        try:
            wpool = make_pool(pools, writes.port)
            assert (await send(wpool))[0] is not None
            response, error = await send(wpool, idempotent=False)
            assert response is None and isinstance(error, UpstreamFailed) and error.sent
            assert writes.requests == 2  # the write was not sent again
            assert wpool.stats.retries == 0
        finally:
            await writes.close()
    finally:
        await stub.close()


async def test_connection_limit_queues_requests(pools: list[UpstreamPool]) -> None:
    stub = await StubServer(lambda n: OK).start()
    try:
        pool = make_pool(pools, stub.port, max_connections=2)
        results = await asyncio.gather(*(send(pool) for _ in range(20)))
        assert all(r is not None and r.status == 200 for r, _ in results)
        assert stub.connections <= 2
        assert pool.stats.queued > 0
    finally:
        await stub.close()


async def test_malformed_response_fails_cleanly(pools: list[UpstreamPool]) -> None:
    stub = await StubServer(lambda n: b"NOT HTTP AT ALL\r\n\r\n").start()
    try:
        pool = make_pool(pools, stub.port)
        response, error = await send(pool, idempotent=False)
        assert response is None and isinstance(error, UpstreamFailed)
        # And the pool still works afterwards with a fresh connection.
        stub.behaviour = lambda n: OK
        response, error = await send(pool)
        assert response is not None and response.status == 200
    finally:
        await stub.close()


async def test_chunked_response_is_dechunked(pools: list[UpstreamPool]) -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    stub = await StubServer(lambda n: chunked).start()
    try:
        pool = make_pool(pools, stub.port)
        response, _error = await send(pool)
        assert response is not None and response.body == b"{}"
        assert b"Transfer-Encoding" not in response.head
    finally:
        await stub.close()
