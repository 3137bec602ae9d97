"""Polling waits with a deadline: the only way tests wait for something."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar, cast

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """The condition did not hold before the deadline. An AssertionError so pytest shows it as a failure."""


def _describe(
    message: str | Callable[[], str] | None, timeout: float, last: object, error: BaseException | None
) -> str:
    text = message() if callable(message) else (message or "condition")
    detail = f"timed out after {timeout:.2f}s waiting for: {text}; last value: {last!r}"
    if error is not None:
        detail += f"; last exception: {type(error).__name__}: {error}"
    return detail


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float,
    interval: float = 0.02,
    message: str | Callable[[], str] | None = None,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call `predicate` every `interval` s until it returns a truthy value, and return that value.

    Exceptions listed in `ignore` count as "not yet" (e.g. ConnectionRefusedError while a server starts).
    Raises WaitTimeout, with `message` and the last value/exception, once `timeout` s have passed. The
    predicate is always called at least once and once more at the deadline.
    """
    deadline = time.monotonic() + timeout
    last: T | None = None
    error: BaseException | None = None
    while True:
        try:
            last = predicate()
            error = None
        except ignore as exc:
            last, error = None, exc
        if last:
            return last
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise WaitTimeout(_describe(message, timeout, last, error)) from error
        time.sleep(min(interval, remaining))


async def async_wait_until(
    predicate: Callable[[], T | Awaitable[T | None] | None],
    timeout: float,  # noqa: ASYNC109 - same signature as wait_until; the deadline covers every await
    interval: float = 0.02,
    message: str | Callable[[], str] | None = None,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """The asyncio variant of `wait_until`: `predicate` may be a plain function or return an awaitable."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: object = None
    error: BaseException | None = None
    while True:
        try:
            result = predicate()
            if inspect.isawaitable(result):
                result = await asyncio.wait_for(result, max(deadline - loop.time(), 0.001))
            last, error = result, None
        except TimeoutError as exc:
            last, error = None, exc
        except ignore as exc:
            last, error = None, exc
        if last:
            return cast(T, last)
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise WaitTimeout(_describe(message, timeout, last, error)) from error
        await asyncio.sleep(min(interval, remaining))
