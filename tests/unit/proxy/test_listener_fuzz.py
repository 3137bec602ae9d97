"""The region listener fed arbitrary and adversarial input: it never raises, never logs an internal error,
and every answer is well-formed HTTP with a DynamoDB-shaped JSON body (or the health text).

The listener runs in-process on a recording transport; the upstream is a recording pool that answers at
once, so the property runs thousands of cases a second. Real sockets are covered by the integration tests.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import httptools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.core.gate import GatePolicy
from sidecar.proxy.listener import DataPathPolicy, RegionListener, RegionRuntime
from sidecar.proxy.sigv4 import ClientVerifier, Credentials, DynamoDBRequestSigner
from sidecar.proxy.upstream import UpstreamResponse, UpstreamUnreachable

OK_BODY = b'{"Item":{"pk":{"S":"a"}}}'
OK = UpstreamResponse(200, b"HTTP/1.1 200 OK\r\nx-amz-crc32: 1\r\nx-amzn-RequestId: R\r\n", OK_BODY)


class RecordingTransport:
    def __init__(self) -> None:
        self.data = b""
        self.closed = False
        self.paused = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.data += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


class RecordingPool:
    request_timeout = 10.0

    def __init__(self, fail: bool = False) -> None:
        self.sent: list[bytes] = []
        self.fail = fail

    def send(self, data: bytes, reply: Any, *, idempotent: bool) -> None:
        self.sent.append(data)
        if self.fail:
            reply(None, UpstreamUnreachable("connect to 127.0.0.1:1 refused", "refused"))
        else:
            reply(OK, None)


def make_listener(
    pool: RecordingPool, verifier: ClientVerifier | None = None
) -> tuple[RegionListener, RecordingTransport]:
    policy = DataPathPolicy(GatePolicy(frozenset({"orders"}), max_body_bytes=4096), verifier)
    creds = Credentials("AKIAFUZZ000000000001", "fuzz-secret")
    runtime = RegionRuntime(
        "us-east-1",
        DynamoDBRequestSigner("us-east-1", "dynamodb.us-east-1.amazonaws.com"),
        pool,  # type: ignore[arg-type]
        lambda: creds,
        lambda: policy,
    )
    runtime.health.state = "up"
    listener = RegionListener(runtime, lambda _: None)
    transport = RecordingTransport()
    listener.connection_made(transport)  # type: ignore[arg-type]
    return listener, transport


class _Responses:
    """httptools callbacks collecting every response in a stream, one record per message."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self.messages.append({"headers": {}, "body": b"", "done": False})

    def on_header(self, name: bytes, value: bytes) -> None:
        self.messages[-1]["headers"][name.lower()] = value

    def on_headers_complete(self) -> None:
        self.messages[-1]["status"] = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.messages[-1]["body"] += body

    def on_message_complete(self) -> None:
        self.messages[-1]["done"] = True


def parse_responses(data: bytes) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """Every response the listener wrote, parsed strictly; fails on anything that is not HTTP/1.1."""
    sink = _Responses()
    if data:
        sink.parser.feed_data(data)
    out = []
    for message in sink.messages:
        assert message["done"], f"incomplete response in {data[:300]!r}"
        assert int(message["headers"][b"content-length"]) == len(message["body"])
        out.append((message["status"], message["headers"], message["body"]))
    return out


def check_answers(transport: RecordingTransport) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    responses = parse_responses(transport.data)
    for status, headers, body in responses:
        if status == 200 and body in (b"up\n", OK_BODY):
            continue
        assert headers[b"content-type"] == b"application/x-amz-json-1.0", headers
        doc = json.loads(body)
        assert "#" in doc["__type"] and doc["message"]
        assert status != 500 or "internal error" not in doc["message"], doc
    return responses


@pytest.fixture(autouse=True)
def no_internal_errors(caplog: pytest.LogCaptureFixture) -> Any:
    caplog.set_level(logging.ERROR, logger="sidecar.proxy.listener")
    yield
    assert not caplog.records, [r.getMessage() for r in caplog.records]


SETTINGS = settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@SETTINGS
@given(st.binary(max_size=2048), st.integers(min_value=1, max_value=64))
def test_arbitrary_bytes_never_crash(data: bytes, chunk: int) -> None:
    listener, transport = make_listener(RecordingPool())
    for i in range(0, len(data), chunk):
        if transport.closed:
            break
        listener.data_received(data[i : i + chunk])
    check_answers(transport)


# No HEAD here: a response to HEAD carries Content-Length without a body, so a stream of responses can
# only be split knowing which request each answers. HEAD has its own test below.
METHODS = st.sampled_from([b"POST", b"GET", b"PUT", b"DELETE", b"OPTIONS", b"POST "])
PATHS = st.sampled_from([b"/", b"/ddb-sidecar/health", b"/x", b"/?a=b", b"//", b"/%00", b"*"])
TARGETS = st.sampled_from(
    [
        b"DynamoDB_20120810.GetItem",
        b"DynamoDB_20120810.PutItem",
        b"DynamoDB_20120810.CreateTable",
        b"DynamoDB_20120810.ExecuteStatement",
        b"DynamoDB_20120810.Nope",
        b"DynamoDBStreams_20120810.GetRecords",
        b"",
        b"DynamoDB_20120810.GetItem\xff",
    ]
)
BODIES = st.one_of(
    st.just(b'{"TableName":"orders","Key":{"pk":{"S":"a"}}}'),
    st.just(b'{"TableName":"secrets","Key":{"pk":{"S":"a"}}}'),
    st.just(b'{"TableName":"orders","TableName":"secrets"}'),
    st.just(b'{"Statement":"SELECT * FROM \\"orders\\""}'),
    st.just(b"x" * 5000),
    st.binary(max_size=300),
    st.builds(
        lambda v: json.dumps(v).encode(),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=10),
            lambda kids: (
                st.lists(kids, max_size=3)
                | st.dictionaries(
                    st.sampled_from(["TableName", "Key", "RequestItems", "orders", "Statement"]),
                    kids,
                    max_size=3,
                )
            ),
            max_leaves=8,
        ),
    ),
)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    method, path, body = draw(METHODS), draw(PATHS), draw(BODIES)
    headers = [b"Host: x"]
    if draw(st.booleans()):
        headers.append(b"X-Amz-Target: " + draw(TARGETS))
    framing = draw(st.sampled_from(["length", "chunked", "none", "wrong-length"]))
    if framing == "length":
        headers.append(b"Content-Length: %d" % len(body))
        payload = body
    elif framing == "wrong-length":
        headers.append(b"Content-Length: %d" % (len(body) + draw(st.integers(-3, 3))))
        payload = body
    elif framing == "chunked":
        headers.append(b"Transfer-Encoding: chunked")
        payload = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
    else:
        payload = b""
    if draw(st.booleans()):
        headers.append(b"Connection: close")
    if draw(st.booleans()):
        headers.append(b"Expect: 100-continue")
    return method + b" " + path + b" HTTP/1.1\r\n" + b"\r\n".join(headers) + b"\r\n\r\n" + payload


@SETTINGS
@given(st.lists(requests(), min_size=1, max_size=4), st.integers(min_value=1, max_value=200), st.booleans())
def test_request_shaped_input_pipelined_never_crashes(reqs: list[bytes], chunk: int, fail: bool) -> None:
    pool = RecordingPool(fail=fail)
    listener, transport = make_listener(pool)
    data = b"".join(reqs)
    for i in range(0, len(data), chunk):
        if transport.closed:
            break
        listener.data_received(data[i : i + chunk])
    data_out = transport.data.replace(b"HTTP/1.1 100 Continue\r\n\r\n", b"")
    transport.data = data_out
    responses = check_answers(transport)
    # Only admitted requests reach the pool, and only for tables in the policy.
    for sent in pool.sent:
        assert b'"secrets"' not in sent
        assert b"Authorization: AWS4-HMAC-SHA256 Credential=AKIAFUZZ000000000001/" in sent
    assert len(pool.sent) <= len(responses)


def test_pipelined_requests_answered_in_order() -> None:
    pool = RecordingPool()
    listener, transport = make_listener(pool)
    get = b'{"TableName":"orders","Key":{"pk":{"S":"a"}}}'
    one = b"POST / HTTP/1.1\r\nX-Amz-Target: DynamoDB_20120810.GetItem\r\nContent-Length: %d\r\n\r\n%s" % (
        len(get),
        get,
    )
    bad = b"POST / HTTP/1.1\r\nX-Amz-Target: DynamoDB_20120810.Nope\r\nContent-Length: 2\r\n\r\n{}"
    health = b"GET /ddb-sidecar/health HTTP/1.1\r\n\r\n"
    listener.data_received(one + bad + health + one)
    statuses = [s for s, _, _ in check_answers(transport)]
    assert statuses == [200, 400, 200, 200]
    assert len(pool.sent) == 2


def test_head_health_check_has_no_body() -> None:
    listener, transport = make_listener(RecordingPool())
    listener.data_received(
        b"HEAD /ddb-sidecar/health HTTP/1.1\r\n\r\nGET /ddb-sidecar/health HTTP/1.1\r\n\r\n"
    )
    head, _, rest = transport.data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: 3" in head
    assert rest.startswith(b"HTTP/1.1 200") and rest.endswith(b"\r\n\r\nup\n")
