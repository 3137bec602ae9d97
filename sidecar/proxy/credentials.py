"""The sidecar's own AWS credentials, from the standard chain, refreshed off the event loop.

botocore resolves environment variables, profiles, SSO, container and instance roles; its
``RefreshableCredentials`` refresh themselves ahead of expiry when ``get_frozen_credentials()`` is called,
but that call may block on the network. So it only ever runs in a worker thread, and the signer reads a
plain attribute (:meth:`CredentialSource.current`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from collections.abc import Callable
from typing import Any

import botocore.session

from sidecar.proxy.sigv4 import Credentials

logger = logging.getLogger(__name__)

NO_CREDENTIALS_MESSAGE = (
    "no AWS credentials found for the sidecar: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
    "(and AWS_SESSION_TOKEN for temporary credentials), or select a profile with AWS_PROFILE, "
    "or run with a container or instance role"
)


class CredentialsUnavailable(Exception):
    """The credential chain produced no usable credentials; the message is meant for the operator."""


def _mask(access_key: str) -> str:
    # Access key ids are not secret, but logs travel: keep enough to tell keys apart.
    return access_key[:4] + "..." + access_key[-4:] if len(access_key) > 8 else "***"


def _from_frozen(frozen: Any) -> Credentials:
    if frozen is None or not frozen.access_key or not frozen.secret_key:
        raise CredentialsUnavailable(NO_CREDENTIALS_MESSAGE)
    return Credentials(frozen.access_key, frozen.secret_key, frozen.token or None)


class CredentialSource:
    """Holds the current credentials and refreshes them in the background.

    ``refresh_every`` bounds the time between two reads of the chain; when botocore knows an expiry,
    the next read is scheduled for when botocore starts refreshing (its advisory window), if sooner.
    A failed read keeps the last good credentials and is retried with exponential backoff starting at
    ``retry_initial`` seconds, capped at ``refresh_every``.
    """

    def __init__(
        self,
        session: botocore.session.Session | None = None,
        refresh_every: float = 60.0,
        *,
        retry_initial: float = 1.0,
        clock: Callable[[], float] = time.time,
    ):
        if refresh_every <= 0:
            raise ValueError("refresh_every must be positive")
        self._session = session
        self._refresh_every = refresh_every
        self._retry_initial = min(retry_initial, refresh_every)
        self._clock = clock
        self._chain: Any = None  # botocore Credentials or RefreshableCredentials
        self._current: Credentials | None = None
        self._task: asyncio.Task[None] | None = None

    def _load(self) -> tuple[Any, Credentials]:
        """Resolve the chain and freeze the credentials (blocking: runs in a worker thread)."""
        session = self._session if self._session is not None else botocore.session.Session()
        try:
            chain = session.get_credentials()
        except Exception as exc:
            raise CredentialsUnavailable(
                f"could not load AWS credentials: {type(exc).__name__}: {exc}"
            ) from exc
        if chain is None:
            raise CredentialsUnavailable(NO_CREDENTIALS_MESSAGE)
        try:
            frozen = chain.get_frozen_credentials()
        except Exception as exc:
            raise CredentialsUnavailable(
                f"could not load AWS credentials: {type(exc).__name__}: {exc}"
            ) from exc
        return chain, _from_frozen(frozen)

    async def start(self) -> None:
        """Load the credentials (raising CredentialsUnavailable if there are none) and start refreshing."""
        if self._task is not None:
            raise RuntimeError("CredentialSource already started")
        loop = asyncio.get_running_loop()
        self._chain, creds = await loop.run_in_executor(None, self._load)
        self._current = creds
        logger.info(
            "AWS credentials loaded (method %s, access key %s, expiry %s)",
            getattr(self._chain, "method", "unknown"),
            _mask(creds.access_key),
            self._expiry_text(),
        )
        self._task = asyncio.create_task(self._refresh_loop(), name="credential-refresh")

    def current(self) -> Credentials:
        """The last good credentials: a plain attribute read, safe on the hot path."""
        creds = self._current
        if creds is None:
            raise RuntimeError("CredentialSource.start() has not completed")
        return creds

    @property
    def expiry(self) -> float | None:
        """When the current credentials expire (Unix time), if botocore knows it."""
        expiry_time = getattr(self._chain, "_expiry_time", None)
        if isinstance(expiry_time, datetime.datetime):
            return expiry_time.timestamp()
        return None

    def _expiry_text(self) -> str:
        expiry = self.expiry
        if expiry is None:
            return "none"
        return datetime.datetime.fromtimestamp(expiry, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    def next_refresh_delay(self) -> float:
        """Seconds until the next read: refresh_every, or sooner when botocore will want to refresh."""
        delay = self._refresh_every
        expiry = self.expiry
        if expiry is not None:
            advisory = getattr(self._chain, "_advisory_refresh_timeout", 15 * 60)
            until_refresh = expiry - advisory - self._clock()
            # Inside the refresh window every read may refresh: poll, but not in a tight loop.
            delay = min(delay, max(until_refresh, min(self._refresh_every, 5.0)))
        return delay

    async def _refresh_loop(self) -> None:
        loop = asyncio.get_running_loop()
        delay = self.next_refresh_delay()
        failures = 0
        while True:
            await asyncio.sleep(delay)
            try:
                frozen = await loop.run_in_executor(None, self._chain.get_frozen_credentials)
                fresh = _from_frozen(frozen)
            except Exception as exc:
                failures += 1
                delay = min(self._refresh_every, self._retry_initial * 2 ** (failures - 1))
                current = self.current()
                logger.warning(
                    "refreshing AWS credentials failed (%s: %s, %d in a row); keeping access key %s "
                    "(expiry %s), retrying in %.1f s",
                    type(exc).__name__,
                    exc,
                    failures,
                    _mask(current.access_key),
                    self._expiry_text(),
                    delay,
                )
                continue
            if failures:
                logger.info("refreshing AWS credentials works again after %d failures", failures)
            failures = 0
            if fresh != self._current:
                logger.info(
                    "AWS credentials refreshed (access key %s, expiry %s)",
                    _mask(fresh.access_key),
                    self._expiry_text(),
                )
                self._current = fresh
            delay = self.next_refresh_delay()

    async def close(self) -> None:
        """Stop refreshing; current() keeps answering the last credentials."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
