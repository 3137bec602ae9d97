"""The daemon's life: SIGTERM drains and exits 0, SIGHUP reloads (or keeps a config it cannot load), a
crash leaves its HAProxy serving for the restarted sidecar to adopt, and with `haproxy.manage: false` it
drives an HAProxy it does not own.

Each test runs its own `ddb-sidecar run` process (they stop, signal or kill it) in front of the session's
moto regions.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import BotoCoreError, ClientError

from sidecar.haproxy.binary import find_haproxy
from sidecar.haproxy.runtime import RuntimeAPIError, parse_show_proc
from tests.support.faultproxy import FaultProxy
from tests.support.moto_region import MotoRegion
from tests.support.processes import ManagedProcess
from tests.support.stack import (
    DEFAULT_TEST_HEALTH,
    SIDECAR,
    SidecarStack,
    base_env,
    ensure_table,
    new_app_table,
    pid_alive,
    stream_tables,
)
from tests.support.wait import wait_until

HOME, OTHER = "us-east-1", "eu-west-1"


@pytest.fixture(scope="module")
def app_table(moto_regions: dict[str, MotoRegion]) -> str:
    return new_app_table(moto_regions.values(), "life")


@pytest.fixture
def regions(moto_regions: dict[str, MotoRegion]) -> list[MotoRegion]:
    return [moto_regions[HOME], moto_regions[OTHER]]


def item_in(region: MotoRegion, table: str, pk: str) -> bool:
    return "Item" in region.client().get_item(TableName=table, Key={"pk": {"S": pk}}, ConsistentRead=True)


def accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def weights(status: dict[str, Any]) -> dict[str, int | None]:
    return {r["name"]: r["weight"] for r in status["regions"]}


# -- SIGTERM ------------------------------------------------------------------------------------------------


@dataclass
class BusyClients:
    """`count` threads writing through the stable address back to back; each request's start and end.

    Several of them, so that requests are in flight at any instant (one write takes a few ms).
    """

    stack: SidecarStack
    table: str
    count: int = 4
    ok: list[tuple[float, float]] = field(default_factory=list)
    errors: list[tuple[float, float, str]] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> BusyClients:
        for i in range(self.count):
            thread = threading.Thread(target=self._run, name=f"busy-client-{i}")
            self.threads.append(thread)
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(15)
        alive = [t.name for t in self.threads if t.is_alive()]
        assert not alive, f"client threads did not stop: {alive}"

    def _run(self) -> None:
        client = self.stack.client(connect_timeout=2, read_timeout=10)
        try:
            while not self.stopping.is_set():
                started = time.monotonic()
                try:
                    client.put_item(TableName=self.table, Item={"pk": {"S": f"busy-{uuid.uuid4().hex}"}})
                except (ClientError, BotoCoreError) as exc:
                    self.errors.append((started, time.monotonic(), f"{type(exc).__name__}: {exc}"))
                    # After the signal the address goes away: do not spin on refused connections.
                    self.stopping.wait(0.05)
                else:
                    self.ok.append((started, time.monotonic()))
        finally:
            client.close()


def test_sigterm_while_busy_drains_and_exits_zero(
    regions: list[MotoRegion], app_table: str, tmp_path: Path
) -> None:
    with SidecarStack(regions, [app_table], tmp_path) as stack:
        stack.wait_regions_up()
        haproxy_pid = stack.status()["haproxy"]["pid"]
        assert isinstance(haproxy_pid, int) and pid_alive(haproxy_pid)

        with BusyClients(stack, app_table) as busy:
            wait_until(lambda: len(busy.ok) >= 40, 20, message="40 writes through the stable address")
            signalled = time.monotonic()
            stack.signal(signal.SIGTERM)
            code = stack.wait_exit(20)
            exited = time.monotonic()

        assert code == 0, stack.process.log_tail()
        assert exited - signalled < 15, f"took {exited - signalled:.1f}s to stop"
        before = [err for _, ended, err in busy.errors if ended < signalled]
        assert before == [], f"requests failed before the signal: {before[:5]}"
        # Drained: a request in flight when the signal came was answered, not cut.
        cut = [err for started, ended, err in busy.errors if started < signalled <= ended]
        assert cut == [], f"requests in flight at the signal failed: {cut}"
        in_flight = [ended for started, ended in busy.ok if started < signalled <= ended]
        assert in_flight, "no request was in flight at the signal: the drain was not exercised"
        assert not pid_alive(haproxy_pid), f"HAProxy (pid {haproxy_pid}) outlived the sidecar"
        assert not accepts_connections(stack.listen_port), "something still serves the stable address"
        log = stack.log_text()
        assert "stopping: draining in-flight requests" in log
        assert "Traceback" not in log, stack.process.log_tail(80)


def test_sigterm_with_a_replication_target_silent_stops_haproxy_at_once(
    regions: list[MotoRegion], tmp_path: Path
) -> None:
    """The replicator may wait its grace (30 s) for writes into a region that does not answer; HAProxy
    must not wait with it (a supervisor's SIGKILL meanwhile would leave HAProxy orphaned; found by the
    DR drill)."""
    app, health = stream_tables(regions, "stop")
    with FaultProxy(regions[1].port, tmp_path) as other:
        stack = SidecarStack(
            regions, [app], tmp_path, endpoints={OTHER: other.url},
            extra={"health": {**DEFAULT_TEST_HEALTH, "table": health}, "replication": {"mode": "streams"}},
        )  # fmt: skip
        with stack:
            stack.wait_regions_up()
            haproxy_pid = stack.status()["haproxy"]["pid"]
            assert isinstance(haproxy_pid, int) and pid_alive(haproxy_pid)
            other.set_mode("blackhole")
            app_client = stack.client()
            for n in range(20):  # writes the replicator must carry into the silent region
                app_client.put_item(TableName=app, Item={"pk": {"S": f"stop-{n}"}})
            wait_until(
                # the replicator's first call of a write round (its tombstone lookup); probes never send it
                lambda: other.requests("blackhole", "BatchGetItem"),
                20, message="the replicator's writes hang in the silent region",
            )  # fmt: skip
            signalled = time.monotonic()
            stack.signal(signal.SIGTERM)
            wait_until(
                lambda: not pid_alive(haproxy_pid), 10, message="HAProxy stopped while the replicator waits"
            )
            stopped = time.monotonic() - signalled
            assert stack.wait_exit(60) == 0, stack.process.log_tail()
            assert stopped < 10


# -- SIGHUP -------------------------------------------------------------------------------------------------


def put(stack: SidecarStack, table: str, pk: str) -> None:
    client = stack.client()
    try:
        client.put_item(TableName=table, Item={"pk": {"S": pk}})
    finally:
        client.close()


def access_denied(stack: SidecarStack, table: str, pk: str) -> bool:
    try:
        put(stack, table, pk)
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "AccessDeniedException":
            return True
        raise
    return False


def test_sighup_reloads_tables_and_keeps_running_config_when_invalid(
    regions: list[MotoRegion], app_table: str, tmp_path: Path
) -> None:
    second = f"life2-{uuid.uuid4().hex[:8]}"
    for region in regions:
        ensure_table(region, second)
    with SidecarStack(regions, [app_table], tmp_path) as stack:
        stack.wait_regions_up()
        assert access_denied(stack, second, "before-reload"), "a table outside the config was admitted"

        stack.write_config(tables=[app_table, second])
        stack.signal(signal.SIGHUP)
        pk = f"after-reload-{uuid.uuid4().hex[:6]}"
        wait_until(
            lambda: not access_denied(stack, second, pk),
            15,
            interval=0.1,
            message=f"a write to {second} admitted after SIGHUP",
        )
        assert item_in(regions[0], second, pk) and not item_in(regions[1], second, pk)
        assert any(e["kind"] == "reload" for e in stack.status()["events"])
        put(stack, app_table, "first-table-still-served")

        # A config the daemon cannot load: it says so and keeps the one it runs.
        stack.write_config(tables=[app_table, second], health={"interval": "whenever"})
        stack.signal(signal.SIGHUP)
        wait_until(
            lambda: "SIGHUP: config not reloaded, keeping the running one" in stack.log_text(),
            10,
            interval=0.1,
            message="the daemon logging that it kept the running config",
        )
        assert "health.interval: malformed duration" in stack.log_text()
        stack.process.check_running()
        pk = f"after-bad-reload-{uuid.uuid4().hex[:6]}"
        put(stack, second, pk)
        assert item_in(regions[0], second, pk)
        assert [e["kind"] for e in stack.status()["events"]].count("reload") == 1
        assert stack.stop() == 0


# -- kill -9 ------------------------------------------------------------------------------------------------


def test_sigkill_of_sidecar_leaves_haproxy_serving_and_the_restart_adopts_it(
    regions: list[MotoRegion], app_table: str, tmp_path: Path
) -> None:
    """While the sidecar is dead, HAProxy keeps the stable address and the last weights; the restarted
    sidecar adopts it (no second HAProxy), and a clean stop then stops it."""
    stack = SidecarStack(regions, [app_table], tmp_path)
    stack.start()
    haproxy_pid = stack.status()["haproxy"]["pid"]
    try:
        assert isinstance(haproxy_pid, int) and pid_alive(haproxy_pid)
        stack.signal(signal.SIGKILL)
        assert stack.wait_exit(5) == -signal.SIGKILL
        assert pid_alive(haproxy_pid) and accepts_connections(stack.listen_port)
        stack.process.start()
        wait_until(
            lambda: stack.status()["haproxy"]["pid"] == haproxy_pid,
            30,
            message="the restarted sidecar adopted the running HAProxy",
            ignore=(OSError,),
        )
        status = stack.status()
        assert status["haproxy"]["adopted"] is True
        assert status["active_region"] == regions[0].name
        assert stack.stop(remove_workdir=False) == 0
        wait_until(lambda: not pid_alive(haproxy_pid), 15, interval=0.05, message="HAProxy stopped with it")
    finally:
        stack.stop()
        if pid_alive(haproxy_pid):  # HAProxy runs in a process group of its own: never leak it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(haproxy_pid, signal.SIGKILL)


# -- haproxy.manage: false ----------------------------------------------------------------------------------


@pytest.fixture
def unmanaged(
    regions: list[MotoRegion], app_table: str, tmp_path: Path
) -> Iterator[tuple[SidecarStack, ManagedProcess]]:
    """A sidecar configured with manage: false (not started) and an HAProxy we run ourselves from its config."""
    stack = SidecarStack(regions, [app_table], tmp_path, haproxy={"manage": False})
    haproxy: ManagedProcess | None = None
    try:
        render = subprocess.run(
            [str(SIDECAR), "render", "-c", str(stack.config_path)],
            env=base_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert render.returncode == 0, render.stderr
        cfg = stack.workdir / "run" / "haproxy.cfg"
        assert render.stdout.strip() == f"{cfg}: written"
        master = stack.workdir / "run" / "haproxy-master.sock"
        haproxy = ManagedProcess(
            f"haproxy-{stack.listen_port}",
            [find_haproxy(), "-W", "-S", f"{master},mode,600", "-f", str(cfg)],
            tmp_path,
        ).start()
        runtime = stack.workdir / "run" / "haproxy.sock"

        def answers(process: ManagedProcess = haproxy) -> bool:
            # Like HAProxyProcess: the master CLI lists a worker and the worker's runtime socket answers
            # (the master may open its CLI after the worker's socket is up).
            process.check_running()
            if not parse_show_proc(unix_command(master, "show proc")).workers:
                return False
            return "Name: HAProxy" in unix_command(runtime, "show info")

        wait_until(
            answers,
            10,
            interval=0.05,
            message="our HAProxy answering on its master and runtime sockets",
            ignore=(OSError, RuntimeAPIError),
        )
        yield stack, haproxy
    finally:
        stack.stop(remove_workdir=False)
        if haproxy is not None:
            haproxy.stop()
        shutil.rmtree(stack.workdir, ignore_errors=True)


def unix_command(path: Path, command: str) -> str:
    """One command on an HAProxy unix socket (runtime API or master CLI), synchronously."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        sock.connect(str(path))
        sock.sendall(command.encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


def test_unmanaged_haproxy_is_driven_not_owned(
    unmanaged: tuple[SidecarStack, ManagedProcess], regions: list[MotoRegion], app_table: str
) -> None:
    stack, haproxy = unmanaged
    runtime = stack.workdir / "run" / "haproxy.sock"
    master = stack.workdir / "run" / "haproxy-master.sock"
    procs_before = parse_show_proc(unix_command(master, "show proc"))
    assert procs_before.master.pid == haproxy.pid
    stack.start()
    stack.wait_regions_up()

    status = stack.status()
    assert status["haproxy"]["managed"] is False
    assert status["haproxy"]["pid"] is None  # not ours
    assert status["haproxy"]["weights_error"] is None
    assert weights(status) == {HOME: 100, OTHER: 0}
    assert status["active_region"] == HOME
    # The weights are HAProxy's, read from its runtime socket: change one behind the sidecar's back.
    assert unix_command(runtime, "set server dynamodb/eu-west-1 weight 7").strip() == ""
    assert weights(stack.status()) == {HOME: 100, OTHER: 7}
    assert unix_command(runtime, "set server dynamodb/eu-west-1 weight 0").strip() == ""
    assert weights(stack.status()) == {HOME: 100, OTHER: 0}

    client = stack.client()
    try:
        first = f"unmanaged-{uuid.uuid4().hex[:6]}"

        def written() -> bool:
            try:
                client.put_item(TableName=app_table, Item={"pk": {"S": first}})
            except ClientError as exc:  # HAProxy's 503 until its checks see the sidecar's listeners
                if exc.response["Error"]["Code"] != "ServiceUnavailableException":
                    raise
                return False
            return True

        wait_until(written, 15, interval=0.1, message="a write through HAProxy to the sidecar")
        pks = [first] + [f"unmanaged-{uuid.uuid4().hex[:6]}" for _ in range(5)]
        for pk in pks[1:]:
            client.put_item(TableName=app_table, Item={"pk": {"S": pk}})
    finally:
        client.close()
    for pk in pks:
        assert item_in(regions[0], app_table, pk), f"{pk} missing in {HOME}"
        assert not item_in(regions[1], app_table, pk), f"{pk} leaked into {OTHER}"

    assert stack.stop(remove_workdir=False) == 0
    haproxy.check_running()
    # The same master and workers (not stopped, restarted or reloaded), still serving the stable address.
    procs_after = parse_show_proc(unix_command(master, "show proc"))
    assert procs_after.master.pid == haproxy.pid
    assert procs_after.worker_pids == procs_before.worker_pids
    assert accepts_connections(stack.listen_port)
    assert "Name: HAProxy" in unix_command(runtime, "show info")
