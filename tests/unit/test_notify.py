"""The webhook notifier against a real aiohttp server on 127.0.0.1: delivery, retries, order, the bounded
queue, shutdown, and a webhook URL that never shows up in logs or errors."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from sidecar.config import Notify
from sidecar.notify import Notifier, _retry_after
from tests.support.ports import free_port
from tests.support.wait import async_wait_until

pytestmark = pytest.mark.timeout(30)

HANG = "hang"
Script = Callable[[int], web.StreamResponse | str]


@dataclass
class Seen:
    at: float
    path: str
    query: str
    headers: dict[str, str]
    body: dict[str, Any]
    status: int | None = None


@dataclass
class Hook:
    """A webhook receiver; `script(n)` answers the n-th request (1-based), or HANG to never answer."""

    script: Script = lambda n: web.Response(status=204)
    port: int = field(default_factory=free_port)
    requests: list[Seen] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    runner: web.AppRunner | None = None

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def delivered(self) -> list[dict[str, Any]]:
        return [s.body for s in self.requests if s.status is not None and 200 <= s.status < 300]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        seen = Seen(
            time.monotonic(),
            request.path,
            request.query_string,
            dict(request.headers),
            json.loads(await request.read()),
        )
        self.requests.append(seen)
        answer = self.script(len(self.requests))
        if answer == HANG:
            await self.release.wait()
            answer = web.Response(status=200)
        assert isinstance(answer, web.StreamResponse)
        seen.status = answer.status
        return answer

    async def start(self) -> Hook:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self.handle)
        # No access log: it would print the (secret) request path.
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def close(self) -> None:
        self.release.set()
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def hooks() -> AsyncIterator[Callable[..., Awaitable[Hook]]]:
    started: list[Hook] = []

    async def make(script: Script | None = None, port: int | None = None) -> Hook:
        hook = Hook(script) if script else Hook()
        if port is not None:
            hook.port = port
        started.append(hook)
        return await hook.start()

    yield make
    for hook in started:
        await hook.close()


@pytest.fixture
async def notifiers() -> AsyncIterator[Callable[..., Notifier]]:
    made: list[Notifier] = []

    def make(
        url: str | None,
        *,
        timeout: float = 2.0,
        attempts: int = 6,
        kinds: list[str] | None = None,
        backoff: float = 0.01,
        **kwargs: Any,
    ) -> Notifier:
        section: dict[str, Any] = {"webhook": url, "timeout": timeout, "attempts": attempts}
        if kinds is not None:
            section["kinds"] = kinds
        notifier = Notifier(Notify.model_validate(section), "test-host", backoff=backoff, **kwargs)
        made.append(notifier)
        return notifier

    yield make
    for notifier in made:
        await notifier.close(0)


def event(n: int = 0, kind: str = "failover") -> dict[str, Any]:
    return {
        "at": "2024-05-01T12:00:00.000Z",
        "kind": kind,
        "reason": f"reason {n}",
        "from": "us-east-1",
        "to": "eu-west-1",
        "n": n,
    }


def status(code: int, **headers: str) -> Script:
    return lambda n: web.Response(status=code, headers=headers)


async def test_delivers_one_event_as_json(hooks: Any, notifiers: Any) -> None:
    hook = await hooks()
    notifier = notifiers(hook.url("/hook"))
    await notifier.start()
    notifier.notify(event(1))
    await async_wait_until(lambda: notifier.sent == 1, 5, message="one event sent")
    [seen] = hook.requests
    assert seen.path == "/hook"
    assert seen.body == {"source": "ddb-sidecar", "host": "test-host", **event(1)}
    assert seen.headers["Content-Type"] == "application/json"
    assert seen.headers["User-Agent"] == "ddb-sidecar"
    assert (notifier.failed, notifier.dropped, notifier.retries, notifier.last_error) == (0, 0, 0, None)
    assert notifier.stats()["target"] == f"http://127.0.0.1:{hook.port}"


async def test_retries_503_then_succeeds(hooks: Any, notifiers: Any) -> None:
    hook = await hooks(lambda n: web.Response(status=503 if n <= 2 else 200))
    notifier = notifiers(hook.url())
    await notifier.start()
    notifier.notify(event())
    await async_wait_until(lambda: notifier.sent == 1, 5, message="sent after two 503s")
    assert len(hook.requests) == 3
    assert (notifier.retries, notifier.failed) == (2, 0)
    assert notifier.last_error == "HTTP 503" and notifier.last_error_at is not None


async def test_429_honours_retry_after(hooks: Any, notifiers: Any) -> None:
    hook = await hooks(
        lambda n: web.Response(status=429, headers={"Retry-After": "0.3"}) if n == 1 else web.Response()
    )
    notifier = notifiers(hook.url(), backoff=0.001)
    await notifier.start()
    notifier.notify(event())
    await async_wait_until(lambda: notifier.sent == 1, 5, message="sent after a 429")
    first, second = hook.requests
    assert second.at - first.at >= 0.25
    assert notifier.retries == 1 and notifier.last_error == "HTTP 429"


async def test_retry_after_is_capped(hooks: Any, notifiers: Any) -> None:
    hook = await hooks(
        lambda n: web.Response(status=503, headers={"Retry-After": "3600"}) if n == 1 else web.Response()
    )
    notifier = notifiers(hook.url(), max_backoff=0.05)
    await notifier.start()
    notifier.notify(event())
    await async_wait_until(lambda: notifier.sent == 1, 3, message="Retry-After capped at max_backoff")


def test_retry_after_parsing() -> None:
    assert _retry_after("2") == 2.0
    assert _retry_after(" 0.5 ") == 0.5
    assert _retry_after("-3") == 0.0
    assert _retry_after(None) is None and _retry_after("") is None and _retry_after("soon") is None
    assert _retry_after("nan") is None
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 100))
    assert 90 <= (_retry_after(future) or 0) <= 101


async def test_gives_up_after_attempts_and_goes_on(hooks: Any, notifiers: Any) -> None:
    hook = await hooks(lambda n: web.Response(status=500 if n <= 3 else 200))
    notifier = notifiers(hook.url(), attempts=3)
    await notifier.start()
    notifier.notify(event(1))
    notifier.notify(event(2))
    await async_wait_until(lambda: notifier.sent == 1, 5, message="second event sent")
    assert len(hook.requests) == 4
    assert (notifier.failed, notifier.retries, notifier.sent) == (1, 2, 1)
    assert [b["n"] for b in hook.delivered] == [2]


@pytest.mark.parametrize("code", [400, 401, 404, 302])
async def test_other_4xx_and_redirects_are_not_retried(
    hooks: Any, notifiers: Any, code: int, caplog: pytest.LogCaptureFixture
) -> None:
    hook = await hooks(status(code, Location="http://127.0.0.1:1/elsewhere"))
    notifier = notifiers(hook.url())
    await notifier.start()
    notifier.notify(event())
    await async_wait_until(lambda: notifier.failed == 1, 5, message="failed without retry")
    await asyncio.sleep(0.1)
    assert len(hook.requests) == 1
    assert (notifier.retries, notifier.sent) == (0, 0)
    assert notifier.last_error == f"HTTP {code}"
    assert any(r.levelno == logging.ERROR and f"HTTP {code}" in r.getMessage() for r in caplog.records)


async def test_connection_refused_is_retried(hooks: Any, notifiers: Any) -> None:
    port = free_port()
    notifier = notifiers(f"http://127.0.0.1:{port}/hook", attempts=10, backoff=0.05)
    await notifier.start()
    notifier.notify(event())
    await async_wait_until(lambda: notifier.retries >= 1, 5, message="a refused connection retried")
    assert notifier.last_error is not None and notifier.last_error.startswith("cannot connect")
    assert notifier.sent == 0
    hook = await hooks(port=port)
    await async_wait_until(lambda: notifier.sent == 1, 10, message="sent once the server is up")
    assert len(hook.requests) == 1 and notifier.failed == 0


async def test_order_is_preserved_across_retries(hooks: Any, notifiers: Any) -> None:
    hook = await hooks(lambda n: web.Response(status=503 if n % 3 == 0 else 200))
    notifier = notifiers(hook.url(), backoff=0.001)
    await notifier.start()
    for n in range(20):
        notifier.notify(event(n))
    await async_wait_until(lambda: notifier.sent == 20, 10, message="all 20 sent")
    assert [b["n"] for b in hook.delivered] == list(range(20))
    assert notifier.retries > 0 and notifier.failed == 0


async def test_queue_overflow_drops_the_oldest(
    hooks: Any, notifiers: Any, caplog: pytest.LogCaptureFixture
) -> None:
    hook = await hooks()
    notifier = notifiers(hook.url(), queue_size=5)
    for n in range(12):  # not started yet: nothing drains the queue
        notifier.notify(event(n))
    assert notifier.dropped == 7 and notifier.pending == 5
    assert any("queue full" in r.getMessage() for r in caplog.records)
    await notifier.start()
    await async_wait_until(lambda: notifier.sent == 5, 5, message="the 5 newest sent")
    assert [b["n"] for b in hook.delivered] == [7, 8, 9, 10, 11]


async def test_notify_never_blocks_on_a_hanging_server(
    hooks: Any, notifiers: Any, caplog: pytest.LogCaptureFixture
) -> None:
    hook = await hooks(lambda n: HANG)
    notifier = notifiers(hook.url(), timeout=0.2, attempts=1)
    await notifier.start()
    started = time.monotonic()
    for n in range(200):
        notifier.notify(event(n))
    assert time.monotonic() - started < 0.5
    # The event loop stays free while the delivery task waits on the server.
    ticks = 0
    loop_started = time.monotonic()
    while time.monotonic() - loop_started < 0.3:
        await asyncio.sleep(0.01)
        ticks += 1
    assert ticks >= 10
    await async_wait_until(lambda: notifier.failed >= 1, 5, message="first event timed out")
    assert notifier.last_error == "no answer within 0.2s"
    caplog.clear()
    started = time.monotonic()
    await notifier.close(0.3)
    assert time.monotonic() - started < 1.5
    assert notifier.sent == 0 and notifier.failed + notifier.dropped == 200
    assert any(f"dropped {notifier.dropped} undelivered" in r.getMessage() for r in caplog.records)


async def test_close_flushes_pending_events(hooks: Any, notifiers: Any) -> None:
    hook = await hooks(lambda n: web.Response(status=503 if n == 2 else 200))
    notifier = notifiers(hook.url())
    await notifier.start()
    for n in range(10):
        notifier.notify(event(n))
    started = time.monotonic()
    await notifier.close(5)
    assert time.monotonic() - started < 5
    assert notifier.sent == 10 and notifier.dropped == 0 and notifier.pending == 0
    assert [b["n"] for b in hook.delivered] == list(range(10))
    notifier.notify(event(99))  # after close: counted, not sent, no error
    assert notifier.dropped == 1


async def test_close_before_start_drops_and_counts(notifiers: Any) -> None:
    notifier = notifiers(f"http://127.0.0.1:{free_port()}/hook")
    notifier.notify(event(1))
    notifier.notify(event(2))
    await notifier.close(1)
    assert notifier.dropped == 2 and notifier.sent == 0


async def test_the_url_never_shows_in_logs_or_errors(
    hooks: Any, notifiers: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret_path = "/hooks/T000SECRET/B000SECRET?token=SECRETTOKEN"
    behaviours: list[Script] = [status(400), status(503), lambda n: HANG]
    used: list[Notifier] = []
    for script in behaviours:
        hook = await hooks(script)
        notifier = notifiers(hook.url(secret_path), timeout=0.2, attempts=2)
        used.append(notifier)
    refused = notifiers(f"http://127.0.0.1:{free_port()}{secret_path}", attempts=2)
    used.append(refused)
    for notifier in used:
        await notifier.start()
        notifier.notify(event())
    await async_wait_until(lambda: all(n.failed == 1 for n in used), 10, message="all four gave up")
    for notifier in used:
        assert notifier.last_error and "SECRET" not in notifier.last_error, notifier.last_error
        assert "SECRET" not in json.dumps(notifier.stats())
        assert "SECRET" not in repr(notifier.config)
        await notifier.close(0)
    assert "SECRET" not in caplog.text
    assert f"{refused.origin} failed (attempt 1 of 2): cannot connect" in caplog.text


async def test_kinds_filter(hooks: Any, notifiers: Any) -> None:
    hook = await hooks()
    notifier = notifiers(hook.url(), kinds=["failover", "alert"])
    await notifier.start()
    for n, kind in enumerate(["start", "failback", "alert", "region-down", "failover"]):
        notifier.notify(event(n, kind))
    await async_wait_until(lambda: notifier.sent == 2, 5, message="two wanted events sent")
    await asyncio.sleep(0.1)
    assert [b["kind"] for b in hook.delivered] == ["alert", "failover"]


async def test_default_kinds_skip_routine_events(hooks: Any, notifiers: Any) -> None:
    hook = await hooks()
    notifier = notifiers(hook.url())
    await notifier.start()
    for n, kind in enumerate(["start", "region-down", "region-up", "reload", "weights-reasserted"]):
        notifier.notify(event(n, kind))
    await async_wait_until(lambda: notifier.sent == 1, 5, message="one wanted event sent")
    await asyncio.sleep(0.1)
    assert [b["kind"] for b in hook.delivered] == ["weights-reasserted"]


async def test_notify_never_raises(hooks: Any, notifiers: Any) -> None:
    hook = await hooks()
    notifier = notifiers(hook.url())
    await notifier.start()
    notifier.notify("not a dict")
    notifier.notify({"kind": "alert", "reason": "odd values", "when": object(), "ratio": 0.5})
    await async_wait_until(lambda: notifier.sent == 1, 5, message="the odd event sent")
    assert hook.delivered[0]["reason"] == "odd values" and hook.delivered[0]["ratio"] == 0.5


async def test_no_webhook_is_a_no_op() -> None:
    notifier = Notifier(Notify(), "test-host")
    assert not notifier.enabled
    await notifier.start()
    notifier.notify(event())
    assert notifier.pending == 0 and notifier.dropped == 0
    await notifier.close(1)


async def test_webhook_from_the_environment(
    hooks: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    hook = await hooks()
    monkeypatch.setenv("TEST_NOTIFY_URL", hook.url("/from-env"))
    notifier = Notifier(Notify(webhook_env="TEST_NOTIFY_URL"), "test-host", backoff=0.01)
    try:
        await notifier.start()
        notifier.notify(event())
        await async_wait_until(lambda: notifier.sent == 1, 5, message="sent to the URL from the env")
    finally:
        await notifier.close(0)
    assert hook.requests[0].path == "/from-env"

    monkeypatch.delenv("TEST_NOTIFY_URL")
    unset = Notifier(Notify(webhook_env="TEST_NOTIFY_URL"), "test-host")
    assert not unset.enabled
    assert any("TEST_NOTIFY_URL is not set" in r.getMessage() for r in caplog.records)

    monkeypatch.setenv("TEST_NOTIFY_URL", "http://hooks.example.com/SECRET")
    insecure = Notifier(Notify(webhook_env="TEST_NOTIFY_URL"), "test-host")
    assert not insecure.enabled
    assert "https" in caplog.text and "SECRET" not in caplog.text
