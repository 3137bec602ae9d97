"""CredentialSource: the standard chain, background refresh in a thread, failures keep the last good keys."""

from __future__ import annotations

import asyncio
import datetime
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.credentials import RefreshableCredentials

from sidecar.proxy.credentials import CredentialSource, CredentialsUnavailable
from sidecar.proxy.sigv4 import Credentials

_AWS_VARIABLES = [
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_CREDENTIAL_EXPIRATION",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_CREDENTIAL_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
]


@pytest.fixture
def aws_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An environment where the chain sees nothing of this machine: empty files, no metadata service."""
    for name in _AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, variable in [("config", "AWS_CONFIG_FILE"), ("credentials", "AWS_SHARED_CREDENTIALS_FILE")]:
        (tmp_path / name).write_text("")
        monkeypatch.setenv(variable, str(tmp_path / name))
    (tmp_path / "boto").write_text("")
    monkeypatch.setenv("BOTO_CONFIG", str(tmp_path / "boto"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return tmp_path


async def _wait_for(condition: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.002)


@pytest.fixture
async def sources() -> Any:
    """Closes every CredentialSource a test creates, even when the test fails."""
    created: list[CredentialSource] = []
    yield created
    for source in created:
        await source.close()


async def test_environment_credentials(
    aws_files: Path, monkeypatch: pytest.MonkeyPatch, sources: list[CredentialSource]
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDENVEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "env-token")
    source = CredentialSource()
    sources.append(source)
    await source.start()
    assert source.current() == Credentials("AKIDENVEXAMPLE", "env-secret", "env-token")
    assert source.expiry is None
    assert "env-secret" not in repr(source.current())


async def test_profile_credentials(
    aws_files: Path, monkeypatch: pytest.MonkeyPatch, sources: list[CredentialSource]
) -> None:
    (aws_files / "credentials").write_text(
        "[default]\naws_access_key_id = AKIDDEFAULT\naws_secret_access_key = default-secret\n\n"
        "[sidecar]\naws_access_key_id = AKIDPROFILE\naws_secret_access_key = profile-secret\n"
    )
    monkeypatch.setenv("AWS_PROFILE", "sidecar")
    source = CredentialSource()
    sources.append(source)
    await source.start()
    assert source.current() == Credentials("AKIDPROFILE", "profile-secret", None)


async def test_no_credentials_is_a_clear_error(aws_files: Path) -> None:
    source = CredentialSource()
    with pytest.raises(CredentialsUnavailable, match="AWS_ACCESS_KEY_ID") as raised:
        await source.start()
    assert "instance role" in str(raised.value)
    with pytest.raises(RuntimeError, match="start"):
        source.current()


async def test_broken_chain_is_a_clear_error(aws_files: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_PROFILE", "missing-profile")
    with pytest.raises(CredentialsUnavailable, match="missing-profile"):
        await CredentialSource().start()


async def test_partial_environment_is_a_clear_error(aws_files: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDENVEXAMPLE")
    with pytest.raises(CredentialsUnavailable, match="AWS_SECRET_ACCESS_KEY"):
        await CredentialSource().start()


# --- refreshable credentials -------------------------------------------------------------------------


class _StubSession:
    """Stands in for botocore.session.Session: the chain resolved to the given credentials."""

    def __init__(self, credentials: Any):
        self._credentials = credentials

    def get_credentials(self) -> Any:
        return self._credentials


def _iso(when: datetime.datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


class _Refresher:
    """A refresh function that counts calls, records their thread, and can block or fail on demand.

    Each credential set expires 5 minutes after it is issued: inside botocore's mandatory refresh
    window, so every get_frozen_credentials() call refreshes.
    """

    def __init__(self) -> None:
        self.calls = 0
        self.threads: set[int] = set()
        self.open = threading.Event()
        self.open.set()
        self.entered = threading.Event()
        self.fail: Exception | None = None
        self.times: list[float] = []  # when each call passed the gate

    def metadata(self, n: int) -> dict[str, str]:
        expiry = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=5)
        return {
            "access_key": f"ASIAREFRESH{n:04d}",
            "secret_key": f"refresh-secret-{n}",
            "token": f"token-{n}",
            "expiry_time": _iso(expiry),
        }

    def __call__(self) -> dict[str, str]:
        self.threads.add(threading.get_ident())
        self.entered.set()
        assert self.open.wait(10), "test never released the refresh"
        self.calls += 1
        self.times.append(time.monotonic())
        if self.fail is not None:
            raise self.fail
        return self.metadata(self.calls)

    def credentials(self) -> RefreshableCredentials:
        return RefreshableCredentials.create_from_metadata(
            metadata=self.metadata(0), refresh_using=self, method="test-refresh"
        )


@pytest.fixture
def refresher() -> Iterator[_Refresher]:
    refresher = _Refresher()
    yield refresher
    refresher.fail = None
    refresher.open.set()  # never leave a worker thread blocked behind us


async def test_refresh_runs_in_a_thread_and_current_never_blocks(
    refresher: _Refresher, sources: list[CredentialSource]
) -> None:
    source = CredentialSource(_StubSession(refresher.credentials()), refresh_every=0.01)
    sources.append(source)
    await source.start()
    assert refresher.calls == 1  # the initial load already refreshed (mandatory window)
    assert source.current().access_key == "ASIAREFRESH0001"
    assert source.expiry is not None and source.expiry > time.time()

    # Hold the next refresh inside the refresh function, in its worker thread.
    refresher.open.clear()
    refresher.entered.clear()
    await _wait_for(refresher.entered.is_set)
    held = source.current()
    started = time.perf_counter()
    for _ in range(10_000):
        assert source.current() is held
    assert time.perf_counter() - started < 0.5
    await asyncio.wait_for(asyncio.sleep(0.005), timeout=1)  # the event loop keeps running meanwhile
    assert source.current() is held

    refresher.open.set()
    await _wait_for(lambda: source.current().access_key != held.access_key)
    assert source.current().secret_key.startswith("refresh-secret-")
    assert threading.get_ident() not in refresher.threads


async def _fail_next_refresh(refresher: _Refresher, error: Exception) -> None:
    """Make refreshes fail from the next call on, with no successful refresh still in flight."""
    refresher.open.clear()
    refresher.entered.clear()
    await _wait_for(refresher.entered.is_set)  # the next call is parked before its fail check
    refresher.fail = error
    refresher.open.set()


async def test_refresh_failure_keeps_last_good_credentials(
    refresher: _Refresher, sources: list[CredentialSource], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    source = CredentialSource(_StubSession(refresher.credentials()), refresh_every=0.05, retry_initial=0.005)
    sources.append(source)
    await source.start()

    await _fail_next_refresh(refresher, RuntimeError("metadata service unreachable"))
    good = source.current()
    failed_from = refresher.calls
    await _wait_for(lambda: refresher.calls >= failed_from + 3)
    assert source.current() is good
    warnings = [
        r for r in caplog.records if r.name == "sidecar.proxy.credentials" and r.levelno == logging.WARNING
    ]
    assert warnings
    message = warnings[0].getMessage()
    assert "metadata service unreachable" in message
    assert f"keeping access key ASIA...{good.access_key[-4:]}" in message

    refresher.fail = None
    await _wait_for(lambda: source.current() != good)
    assert "works again" in caplog.text
    for n in range(refresher.calls + 1):
        assert f"refresh-secret-{n}" not in caplog.text
        assert f"token-{n}" not in caplog.text


async def test_refresh_backoff_is_bounded(refresher: _Refresher, sources: list[CredentialSource]) -> None:
    """Failures back off exponentially from retry_initial, up to refresh_every."""
    source = CredentialSource(_StubSession(refresher.credentials()), refresh_every=0.03, retry_initial=0.002)
    sources.append(source)
    await source.start()
    await _fail_next_refresh(refresher, RuntimeError("down"))
    first = refresher.calls
    await _wait_for(lambda: len(refresher.times) >= first + 8)
    gaps = [b - a for a, b in zip(refresher.times[first:], refresher.times[first + 1 :], strict=False)]
    expected = [min(0.03, 0.002 * 2**k) for k in range(len(gaps))]  # 2, 4, 8, 16, 30, 30 ... ms
    for gap, floor in zip(gaps, expected, strict=True):
        assert gap >= floor * 0.9, (gaps, expected)


async def test_next_refresh_follows_expiry(refresher: _Refresher, sources: list[CredentialSource]) -> None:
    now = [time.time()]
    source = CredentialSource(_StubSession(refresher.credentials()), refresh_every=60.0, clock=lambda: now[0])
    sources.append(source)
    await source.start()
    await source.close()
    expiry = source.expiry
    assert expiry is not None
    # botocore refreshes 15 minutes ahead of expiry: schedule the read for then, if sooner.
    now[0] = expiry - 2 * 3600
    assert source.next_refresh_delay() == 60.0
    now[0] = expiry - 15 * 60 - 30
    assert source.next_refresh_delay() == pytest.approx(30.0)
    now[0] = expiry - 10 * 60  # inside the refresh window: poll, without spinning
    assert source.next_refresh_delay() == 5.0


async def test_static_credentials_have_no_expiry(sources: list[CredentialSource]) -> None:
    from botocore.credentials import Credentials as BotocoreCredentials

    source = CredentialSource(
        _StubSession(BotocoreCredentials("AKIDSTATIC", "static-secret")), refresh_every=30.0
    )
    sources.append(source)
    await source.start()
    assert source.expiry is None
    assert source.next_refresh_delay() == 30.0
    assert source.current() == Credentials("AKIDSTATIC", "static-secret", None)


async def test_close_stops_the_task(refresher: _Refresher) -> None:
    source = CredentialSource(_StubSession(refresher.credentials()), refresh_every=0.002)
    await source.start()
    await _wait_for(lambda: refresher.calls >= 3)
    tasks = [t for t in asyncio.all_tasks() if t.get_name() == "credential-refresh"]
    assert len(tasks) == 1
    await source.close()
    assert tasks[0].done()
    calls = refresher.calls
    await asyncio.sleep(0.02)  # ten refresh periods
    assert refresher.calls == calls
    assert source.current().access_key.startswith("ASIAREFRESH")  # still answers after close
    await source.close()  # idempotent


async def test_start_twice_is_an_error(sources: list[CredentialSource]) -> None:
    from botocore.credentials import Credentials as BotocoreCredentials

    source = CredentialSource(_StubSession(BotocoreCredentials("AKIDSTATIC", "static-secret")))
    sources.append(source)
    await source.start()
    with pytest.raises(RuntimeError, match="already started"):
        await source.start()
