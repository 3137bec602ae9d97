"""A webhook notifier: one JSON POST per engine event, in order, with retries, never in the caller's way.

`Notifier.notify(event)` only filters by `notify.kinds` and puts the event in a bounded queue (when full
the oldest event is dropped and counted); one background task posts the queue's events one at a time.
Connection errors, timeouts, 5xx and 429 are retried with exponential backoff (0.5 s, 1, 2, 4 ... capped
at 30 s; a `Retry-After` header is honoured up to the same cap) until `notify.attempts` attempts; any
other non-2xx answer is final. The webhook URL often embeds a token, so it is never logged nor put in
`last_error`: log lines name only `scheme://host[:port]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import socket
import time
from collections import deque
from typing import Any

import aiohttp

from .config import Notify, url_origin, webhook_problem

logger = logging.getLogger(__name__)

SOURCE = "ddb-sidecar"
USER_AGENT = "ddb-sidecar"
QUEUE_SIZE = 1000


class _Retryable(Exception):
    """An attempt that failed in a way worth another attempt."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _Final(Exception):
    """An attempt that failed in a way no retry will fix (a 4xx other than 429, a redirect)."""


class Notifier:
    """Posts engine events to `notify.webhook` (or the URL in `$notify.webhook_env`).

    A no-op (notify() returns at once, start() and close() do nothing) when no webhook is configured or
    the variable named by `webhook_env` holds no valid URL at construction time.

    Counters for metrics: `sent`, `failed` (gave up on the event), `dropped` (queue overflow, or still
    queued when close() ran out of time), `retries`, and `last_error` / `last_error_at` (time.time()).
    """

    def __init__(
        self,
        config: Notify,
        hostname: str | None = None,
        *,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        queue_size: int = QUEUE_SIZE,
    ) -> None:
        self.config = config
        self.hostname = hostname if hostname is not None else socket.gethostname()
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.kinds = frozenset(config.kinds)
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self.retries = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self._url = self._resolve_url(config)
        self.origin = url_origin(self._url) if self._url else None
        self._queue: deque[tuple[bytes, str]] = deque()
        self._queue_size = max(1, queue_size)
        self._in_flight = False
        self._closed = False
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None

    @staticmethod
    def _resolve_url(config: Notify) -> str | None:
        url = config.url()
        if url is None:
            if config.webhook_env is not None:
                logger.error(
                    "notify: environment variable %s is not set; webhook notifications are off",
                    config.webhook_env,
                )
            return None
        if problem := webhook_problem(url):
            where = (
                f"the URL in environment variable {config.webhook_env}"
                if config.webhook_env
                else "notify.webhook"
            )
            logger.error("notify: %s %s; webhook notifications are off", where, problem)
            return None
        return url

    @property
    def enabled(self) -> bool:
        return self._url is not None

    @property
    def pending(self) -> int:
        """Events queued or being delivered."""
        return len(self._queue) + (1 if self._in_flight else 0)

    def stats(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "target": self.origin,
            "sent": self.sent,
            "failed": self.failed,
            "dropped": self.dropped,
            "retries": self.retries,
            "pending": self.pending,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
        }

    async def start(self) -> None:
        """Open the HTTP session and start the delivery task (events queued before start() go out now)."""
        if not self.enabled or self._task is not None or self._closed:
            return
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.config.timeout),
            headers={"content-type": "application/json", "user-agent": USER_AGENT},
        )
        self._task = asyncio.create_task(self._run(), name="ddb-sidecar-notify")
        logger.info("notify: webhook notifications to %s for %s", self.origin, ", ".join(sorted(self.kinds)))

    def notify(self, event: dict[str, Any]) -> None:
        """Queue `event` for delivery if its kind is wanted. Never blocks, never raises."""
        if self._url is None:
            return
        try:
            if event.get("kind") not in self.kinds:
                return
            if self._closed:
                self.dropped += 1
                return
            body = json.dumps(
                {"source": SOURCE, "host": self.hostname, **event}, default=str, ensure_ascii=False
            ).encode()
            if len(self._queue) >= self._queue_size:
                _, oldest = self._queue.popleft()
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 100 == 0:
                    logger.warning(
                        "notify: queue full (%d events); dropped the oldest (%s), %d dropped so far",
                        self._queue_size,
                        oldest,
                        self.dropped,
                    )
            self._queue.append((body, str(event["kind"])))
            self._idle.clear()
            self._wake.set()
        except Exception:  # a notification must never break the caller
            logger.exception("notify: could not queue an event")

    async def close(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109 - a flush deadline, not a call timeout
        """Give queued events up to `timeout` seconds to go out, then drop the rest and close the session."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._task is not None and not self._task.done():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._idle.wait(), timeout)
        finally:
            left = self.pending
            if self._task is not None:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            if self._session is not None:
                await self._session.close()
            self._queue.clear()
            self._in_flight = False
            if left:
                self.dropped += left
                logger.warning(
                    "notify: dropped %d undelivered event(s) to %s on shutdown (after %.1fs)",
                    left,
                    self.origin,
                    timeout,
                )

    async def _run(self) -> None:
        while True:
            while not self._queue:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
            body, kind = self._queue.popleft()
            self._in_flight = True
            try:
                await self._deliver(body, kind)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not stop later notifications
                logger.exception("notify: unexpected error delivering a %s event", kind)
                self.failed += 1
            finally:
                self._in_flight = False

    async def _deliver(self, body: bytes, kind: str) -> None:
        attempts = self.config.attempts
        for attempt in range(1, attempts + 1):
            try:
                await self._post(body)
            except _Final as exc:
                self._error(str(exc))
                self.failed += 1
                logger.error(
                    "notify: webhook %s refused a %s event: %s; not retrying", self.origin, kind, exc
                )
                return
            except _Retryable as exc:
                self._error(str(exc))
                if attempt >= attempts:
                    self.failed += 1
                    logger.error(
                        "notify: gave up on a %s event to %s after %d attempt(s): %s",
                        kind,
                        self.origin,
                        attempts,
                        exc,
                    )
                    return
                delay = min(self.backoff * 2 ** (attempt - 1), self.max_backoff)
                if exc.retry_after is not None:
                    delay = min(max(delay, exc.retry_after), self.max_backoff)
                self.retries += 1
                logger.info(
                    "notify: %s event to %s failed (attempt %d of %d): %s; retrying in %.2fs",
                    kind,
                    self.origin,
                    attempt,
                    attempts,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
            else:
                self.sent += 1
                return

    async def _post(self, body: bytes) -> None:
        assert self._session is not None and self._url is not None
        try:
            async with self._session.post(self._url, data=body, allow_redirects=False) as resp:
                status = resp.status
                retry_after = _retry_after(resp.headers.get("retry-after"))
        except TimeoutError:
            raise _Retryable(f"no answer within {self.config.timeout:g}s") from None
        except aiohttp.ClientConnectorCertificateError:
            raise _Retryable("TLS certificate verification failed") from None
        except aiohttp.ClientConnectorError as exc:
            raise _Retryable(self._redact(f"cannot connect: {_os_reason(exc.os_error)}")) from None
        except aiohttp.ServerDisconnectedError:
            raise _Retryable("server disconnected") from None
        except (aiohttp.ClientError, OSError) as exc:
            # Only the class (and an OS reason): aiohttp's messages may quote the request URL.
            reason = _os_reason(exc) if isinstance(exc, OSError) else type(exc).__name__
            raise _Retryable(self._redact(reason)) from None
        if 200 <= status < 300:
            return
        if status == 429 or status >= 500:
            raise _Retryable(f"HTTP {status}", retry_after)
        raise _Final(f"HTTP {status}")

    def _error(self, message: str) -> None:
        self.last_error = message
        self.last_error_at = time.time()

    def _redact(self, text: str) -> str:
        """`text` without the webhook URL or its path and query (belt and braces: we build the messages)."""
        if not self._url:
            return text
        text = text.replace(self._url, self.origin or "(webhook)")
        rest = self._url.split("://", 1)[-1]
        slash = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=-1)
        if slash >= 0 and len(rest) - slash > 1:
            text = text.replace(rest[slash:], "/...")
        return text


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delay-seconds, or an HTTP date); None when absent or malformed."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)
