"""A region listener: HAProxy's backend server for one region.

Per request: parse (httptools), answer the health check, verify the client's signature when `clients` is
set, admit it through the gate (tables, operation class, size), re-sign it for the region and hand the
bytes to the region's upstream pool; relay the response unchanged (status, body, x-amz-crc32,
x-amzn-RequestId). Everything that can be computed once (error bodies, the health answers, header names)
is computed once. Nothing a client sends can raise out of here: a bug becomes a DynamoDB-shaped 500 and a
log line, and the listener keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import cast

import httptools

from sidecar.core import errors
from sidecar.core.errors import DynamoError
from sidecar.core.gate import Admitted, admit
from sidecar.core.latency import LatencyClass, latency_class
from sidecar.core.operations import OpKind, operation_from_target
from sidecar.proxy.offload import OFFLOAD_BYTES
from sidecar.proxy.region import DataPathPolicy, RegionHealth, RegionRuntime, TrafficWatch
from sidecar.proxy.upstream import UpstreamError, UpstreamResponse

logger = logging.getLogger(__name__)

__all__ = [
    "HEALTH_PATH",
    "DataPathPolicy",
    "RefuseConnection",
    "RegionHealth",
    "RegionListener",
    "RegionRuntime",
    "TrafficWatch",
]

HEALTH_PATH = b"/ddb-sidecar/health"
_MAX_HEADER_BYTES = 64 * 1024
_MAX_URL_BYTES = 8 * 1024
_MAX_PIPELINED = 16
_JSON = b"Content-Type: application/x-amz-json-1.0\r\n"
_HEALTH_UP = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nup\n"
_HEALTH_DOWN = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\ndown\n"
)
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Kinds that may be sent twice when a kept-alive connection dies under them; writes and control-plane
# operations never are (they may have been applied).
_IDEMPOTENT = frozenset({OpKind.READ, OpKind.DESCRIBE, OpKind.ACCOUNT})
# Kinds a switchover holds while replication drains (they change data).
_FENCED = frozenset({OpKind.WRITE, OpKind.CONTROL})
_REASONS = {
    400: b"Bad Request",
    404: b"Not Found",
    408: b"Request Timeout",
    413: b"Payload Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}


_HEADERS_TOO_LARGE = DynamoError(
    431, "RequestHeaderFieldsTooLarge", "request headers larger than 64 KiB; the request was not sent"
)
_URL_TOO_LONG = DynamoError(
    414, "RequestURITooLong", "request URL longer than 8 KiB; the request was not sent"
)


class _Request:
    __slots__ = (
        "admitted",
        "body",
        "headers",
        "held",
        "keep_alive",
        "method",
        "over_budget",
        "received",
        "size",
        "target",
        "too_large",
        "url",
        "user_agent",
    )

    def __init__(self) -> None:
        self.method = b""
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.keep_alive = True
        self.too_large = False
        self.size = 0
        self.received = 0
        self.target: str | None = None
        self.user_agent: bytes | None = None
        self.held = 0  # body bytes taken from the shared budget, given back when the request is done
        self.over_budget = False


def _error_response(error: DynamoError, close: bool = False) -> bytes:
    body = error.body()
    reason = _REASONS.get(error.status, b"Error")
    return (
        b"HTTP/1.1 %d %s\r\n%sx-amzn-ErrorType: %s\r\nContent-Length: %d\r\n%s\r\n"
        % (
            error.status,
            reason,
            _JSON,
            error.code.encode(),
            len(body),
            b"Connection: close\r\n" if close else b"",
        )
        + body
    )


class RegionListener(asyncio.Protocol):
    """One client connection (in practice: one of HAProxy's server connections)."""

    def __init__(self, region: RegionRuntime, on_close: Callable[[RegionListener], None]) -> None:
        self.region = region
        self._on_close = on_close
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._current = _Request()
        self._header_bytes = 0
        # Bytes of the header section as they arrive: httptools hands a header to on_header only once it
        # is whole, buffering it meanwhile, so an endless header is caught here, not there.
        self._in_headers = False
        self._header_section_bytes = 0
        self._parse_error: DynamoError | None = None
        self._add_header = self._current.headers.append
        self._queue: deque[_Request] = deque()
        self._busy = False
        self._closing = False
        self.last_active = time.monotonic()
        self.opened_at = self.last_active
        self.received_any = False  # a connection that never sends a byte is closed after a few seconds
        # When the request being read began; None between requests. Lets the daemon close connections
        # that trickle a request in (slowloris) or sit idle, if anything reaches the listener directly.
        self.partial_since: float | None = None

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        for req in self._queue:
            self._done(req)
        self._queue.clear()
        self._done(self._current)
        self._on_close(self)

    def _done(self, req: _Request) -> None:
        """The request's bytes are no longer held (answered, refused, or its connection gone)."""
        if req.held and self.region.budget is not None:
            self.region.budget.give(req.held)
        req.held = 0

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        self.received_any = True
        mid_headers = self._in_headers
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reply_and_close(
                DynamoError(400, "SerializationException", "protocol upgrades are not supported")
            )
            return
        except httptools.HttpParserError as exc:
            error = self._parse_error or DynamoError(
                400, "SerializationException", f"malformed HTTP request: {str(exc)[:120]}"
            )
            self._reply_and_close(error)
            return
        except Exception:
            logger.exception("listener %s: unexpected error while parsing a request", self.region.name)
            self._reply_and_close(DynamoError(500, "InternalServerError", "ddb-sidecar internal error"))
            return
        if mid_headers and self._in_headers:  # the whole chunk was header bytes
            self._header_section_bytes += len(data)
            if self._header_section_bytes > _MAX_HEADER_BYTES:
                self._reply_and_close(_HEADERS_TOO_LARGE)

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        req = self._current = _Request()
        self._add_header = req.headers.append
        self._header_bytes = 0
        self._header_section_bytes = 0
        self._in_headers = True
        self.partial_since = self.last_active

    def on_url(self, url: bytes) -> None:
        self._current.url += url
        if len(self._current.url) > _MAX_URL_BYTES:
            self._parse_error = _URL_TOO_LONG
            raise httptools.HttpParserError("URL too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        # llhttp itself sets no limit on header size.
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > _MAX_HEADER_BYTES:
            # httptools reports an exception raised here only as "User callback error": keep ours.
            self._parse_error = _HEADERS_TOO_LARGE
            raise httptools.HttpParserError("headers too large")
        self._add_header((name, value))

    def on_headers_complete(self) -> None:
        self._in_headers = False
        req = self._current
        req.method = self._parser.get_method()
        req.keep_alive = self._parser.should_keep_alive()
        limit = self.region.policy().gate.max_body_bytes
        for name, value in req.headers:
            lname = name.lower()
            if lname == b"x-amz-target":
                req.target = value.decode("latin-1")
            elif lname == b"user-agent":
                req.user_agent = value
            elif lname == b"content-length":
                try:
                    req.size = int(value)
                    req.too_large = req.size > limit
                except ValueError:
                    pass  # llhttp already rejects a malformed Content-Length
            elif lname == b"expect" and value.lower() == b"100-continue" and self.transport is not None:
                if not req.too_large:
                    self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        req = self._current
        if req.too_large or req.over_budget:
            return
        budget = self.region.budget
        if budget is not None:
            if not budget.take(len(body)):
                req.over_budget = True  # read on, keep nothing; answered "not sent" when complete
                budget.refused += 1
                self._done(req)
                req.body.clear()
                return
            req.held += len(body)
        req.body.append(body)
        req.received += len(body)
        if req.received > self.region.policy().gate.max_body_bytes:
            req.too_large = True
            req.size = max(req.size, req.received)
            req.body.clear()
            self._done(req)

    def on_message_complete(self) -> None:
        self.partial_since = None
        self._queue.append(self._current)
        if len(self._queue) > _MAX_PIPELINED and self.transport is not None:
            self.transport.pause_reading()
        if not self._busy:
            self._next()

    def expire(
        self, now: float, idle_timeout: float, request_timeout: float, first_byte_timeout: float = 5.0
    ) -> bool:
        """Close the connection if it idled or trickled a request for too long, or sent nothing at all
        within `first_byte_timeout` of opening; True if closed."""
        if self._busy or self._queue or self.transport is None or self._closing:
            return False
        if not self.received_any and now - self.opened_at > first_byte_timeout:
            self._closing = True
            self.transport.close()
            return True
        if self.partial_since is not None and now - self.partial_since > request_timeout:
            self._reply_and_close(
                DynamoError(
                    408, "RequestTimeout", f"the request was not received within {request_timeout:g}s"
                )
            )
            return True
        if self.partial_since is None and now - self.last_active > idle_timeout:
            self._closing = True
            self.transport.close()
            return True
        return False

    # -- request handling
    def _next(self) -> None:
        while self._queue and not self._busy and not self._closing:
            req = self._queue.popleft()
            try:
                self._handle(req)
            except Exception:
                logger.exception("listener %s: unexpected error handling a request", self.region.name)
                self._busy = False
                self._reply_and_close(DynamoError(500, "InternalServerError", "ddb-sidecar internal error"))
        if not self._queue and self.transport is not None and not self._closing:
            self.transport.resume_reading()

    def _handle(self, req: _Request) -> None:
        region = self.region
        path, _, query = req.url.partition(b"?")
        if req.method == b"GET" or req.method == b"HEAD":
            if path == HEALTH_PATH:
                answer = _HEALTH_UP if region.health.healthy else _HEALTH_DOWN
                if req.method == b"HEAD":
                    answer = answer[: answer.index(b"\r\n\r\n") + 4]
                self._write(answer, req.keep_alive)
                return
        if req.method != b"POST" or path != b"/":
            self._refuse(req, errors.not_found(req.url.decode("latin-1")), "route")
            return
        policy = region.policy()
        if req.over_budget:
            self._refuse(req, errors.over_budget(), "over_budget")
            return
        if req.too_large:
            self._refuse(
                req, errors.body_too_large(req.size, policy.gate.max_body_bytes), "too_large", close=True
            )
            return
        body = req.body[0] if len(req.body) == 1 else b"".join(req.body)
        target = req.target
        if policy.verifier is not None:
            failure = policy.verifier.verify(
                req.method.decode(),
                path.decode("latin-1"),
                query.decode("latin-1"),
                [(n.decode("latin-1"), v.decode("latin-1")) for n, v in req.headers],
                body,
                time.time(),
            )
            if failure is not None:
                self._refuse(req, _auth_error(failure.code, failure.message), "auth", _op_label(target))
                return
        offload = region.offload
        if offload is not None and len(body) > OFFLOAD_BYTES:
            # a large body is judged in a worker process: parsing it here could stall every connection
            self._busy = True
            gate = policy.gate

            def judged(future: asyncio.Future[Admitted | DynamoError]) -> None:
                self._busy = False
                if self._closing or self.transport is None:
                    self._done(req)
                    return
                try:
                    decision = future.result()
                except Exception as exc:  # a broken worker: decide here (slower, still correct)
                    logger.error("listener %s: gate worker failed (%r); judging inline", region.name, exc)
                    decision = admit(gate, target, body)
                try:
                    self._admitted(req, body, target, decision)
                except Exception:
                    logger.exception("listener %s: unexpected error handling a request", region.name)
                    self._reply_and_close(errors.internal("ddb-sidecar internal error"))
                    return
                if not self._busy:
                    self._next()

            offload.admit(gate, target, body).add_done_callback(judged)
            return
        self._admitted(req, body, target, admit(policy.gate, target, body))

    def _admitted(
        self, req: _Request, body: bytes, target: str | None, decision: Admitted | DynamoError
    ) -> None:
        """The rest of a request once the gate has judged it: refuse, hold (fence) or forward."""
        region = self.region
        if isinstance(decision, DynamoError):
            self._refuse(req, decision, decision.code, _op_label(target))
            return
        assert target is not None  # admitted requests name an operation
        write = decision.kind in _FENCED
        dest = (region.forward_to or region) if write else region
        fence = region.fence
        if write and fence is not None and fence.closed:
            # A switchover is draining replication: hold the write (reads keep flowing), in order with the
            # connection's later requests, until the fence opens towards the region that takes it.
            self._busy = True

            def release(to: RegionRuntime | None) -> None:
                self._busy = False
                if self._closing or self.transport is None:
                    self._done(req)
                    return
                try:
                    self._forward(req, body, target, decision, to or dest)
                except Exception:
                    logger.exception("listener %s: releasing a held write failed", region.name)
                    self._reply_and_close(errors.internal("ddb-sidecar internal error"))
                    return
                if not self._busy:
                    self._next()

            if not fence.hold(release):
                self._busy = False
                self._refuse(req, errors.switchover_in_progress(fence.max_held), "fence_full",
                             decision.operation.name)  # fmt: skip
            return
        self._forward(req, body, target, decision, dest)

    def _forward(
        self, req: _Request, body: bytes, target: str, decision: Admitted, dest: RegionRuntime
    ) -> None:
        """Sign the request for `dest` (this listener's region, or the active one a switchover moved its
        writes to) and send it; the answer goes back on this connection."""
        if dest.health.state == "down":
            # Fail fast rather than send into a region the probes find down (a blackhole would hold the
            # request for request_timeout, then leave the app unsure whether it was applied). Traffic is
            # only here when no other region can take it: HAProxy's own check answers the same 3 s later.
            cause = dest.health.cause or "down"
            self._refuse(req, errors.region_unreachable(dest.name, f"it is down: {cause}"), "region_down",
                         decision.operation.name)  # fmt: skip
            return
        region = dest
        body = decision.body_for(region.name, body)  # tables named by ARN name the region it goes to
        head = region.signer.request_head(
            region.credentials(), target, body, time.time(), req.user_agent, decision.digest_for(region.name)
        )
        self._busy = True
        started = time.monotonic()
        if not region.stats.in_flight:
            region.busy_since = started
        region.stats.in_flight += 1
        write = decision.kind in _FENCED
        if write:
            region.writes_in_flight += 1
        cls = latency_class(decision.operation.name, len(body))
        fast = cls is LatencyClass.POINT
        if fast:
            if not region.fast_in_flight:
                region.fast_busy_since = started
            region.fast_in_flight += 1

        def reply(response: UpstreamResponse | None, error: UpstreamError | None) -> None:
            self._done(req)
            region.stats.in_flight -= 1
            if write:
                region.writes_in_flight -= 1
            if fast:
                region.fast_in_flight -= 1
            self._busy = False
            now = time.monotonic()
            if response is not None:
                region.last_answer = now
                region.answers += 1
                latency = now - started
                region.latencies.record(cls, latency)
                if fast:
                    region.fast_last_answer = now
                region.stats.upstream_latency.observe(latency)
                region.stats.requests[(decision.operation.name, response.status)] += 1
                watch = region.watch
                if watch is not None and (
                    response.status >= 500 or latency > region.slow_after[cls] or region.suspect
                ):
                    watch(response.status, response.body, latency, None, write, cls)
                if decision.retargeted is not None and response.status == 200:
                    answer = decision.answer_from(region.name, response.body)
                    response = UpstreamResponse(response.status, response.head, answer)
                self._write_response(response, req.keep_alive)
            else:
                assert error is not None
                err = errors.for_upstream_failure(
                    region.name,
                    sent=error.sent,
                    kind=error.kind,
                    detail=error.detail,
                    timeout=region.pool.request_timeout,
                )
                region.stats.upstream_errors[type(error).__name__] += 1
                region.stats.requests[(decision.operation.name, err.status)] += 1
                if region.watch is not None:
                    region.watch(None, None, now - started, error, write, cls)
                self._write(_error_response(err, close=not req.keep_alive), req.keep_alive)
            self._next()

        region.pool.send(head + body, reply, idempotent=decision.kind in _IDEMPOTENT)

    def _refuse(
        self, req: _Request, error: DynamoError, reason: str, op: str = "-", close: bool = False
    ) -> None:
        self._done(req)
        stats = self.region.stats
        stats.refused[reason] += 1
        stats.requests[(op, error.status)] += 1
        keep = req.keep_alive and not close
        self._write(_error_response(error, close=not keep), keep)

    def _write_response(self, response: UpstreamResponse, keep_alive: bool) -> None:
        head = response.head + b"Content-Length: %d\r\n" % len(response.body)
        if not keep_alive:
            head += b"Connection: close\r\n"
        self._write(head + b"\r\n" + response.body, keep_alive)

    def _write(self, data: bytes, keep_alive: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(data)
        if not keep_alive:
            self._closing = True
            transport.close()

    def _reply_and_close(self, error: DynamoError) -> None:
        for req in self._queue:
            self._done(req)
        self._queue.clear()
        if not self._busy:
            self._write(_error_response(error, close=True), keep_alive=False)
        else:
            self._closing = True
            if self.transport is not None:
                self.transport.close()


def _op_label(target: str | None) -> str:
    """The operation as a metrics label: only names of real operations, never what a client made up."""
    op = operation_from_target(target)
    return op.name if op is not None else "-"


def _auth_error(code: str, message: str) -> DynamoError:
    if code == "MissingAuthenticationTokenException":
        return errors.missing_auth()
    if code == "UnrecognizedClientException":
        return errors.unrecognized_client()
    return errors.invalid_signature(message)


class RefuseConnection(asyncio.Protocol):
    """A connection over the listener's cap: one DynamoDB-shaped error (the request was not sent), then
    closed, without reading what it sends."""

    def __init__(self, error: DynamoError) -> None:
        self._answer = _error_response(error, close=True)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t = cast(asyncio.Transport, transport)
        t.write(self._answer)
        t.close()
