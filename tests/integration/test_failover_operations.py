"""Operating failover: the CLI's failover/pause/resume, state that survives restarts and kill -9, HAProxy
reloads and a runtime socket that goes away, and the watcher that re-renders HAProxy's config.

Real sidecar processes (with their supervised HAProxy) in front of the session's moto regions, through a
fault proxy per region for the tests that need a region to fail.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import BotoCoreError, ClientError

from tests.support.faultproxy import FaultProxy
from tests.support.moto_region import MotoRegion
from tests.support.stack import SidecarStack, new_app_table, pid_alive
from tests.support.wait import wait_until

HOME, OTHER = "us-east-1", "eu-west-1"
STATE_FILE = "controller-state.json"


@pytest.fixture(scope="module")
def table(moto_regions: dict[str, MotoRegion]) -> str:
    return new_app_table(moto_regions.values(), "ops")


@pytest.fixture(scope="module")
def home_proxy(
    moto_regions: dict[str, MotoRegion], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FaultProxy]:
    with FaultProxy(moto_regions[HOME].port, tmp_path_factory.mktemp("fp")) as proxy:
        yield proxy


@pytest.fixture
def stack(
    moto_regions: dict[str, MotoRegion], table: str, home_proxy: FaultProxy, tmp_path: Path
) -> Iterator[SidecarStack]:
    home_proxy.set_mode("pass")
    s = SidecarStack(
        [moto_regions[HOME], moto_regions[OTHER]], [table], tmp_path, endpoints={HOME: home_proxy.url}
    )
    s.start()
    s.wait_regions_up()
    try:
        yield s
    finally:
        home_proxy.set_mode("pass")
        haproxy_pid = _haproxy_pid(s)
        s.stop()
        if haproxy_pid and pid_alive(haproxy_pid):  # an adopted HAProxy is stopped by the sidecar too
            os.kill(haproxy_pid, signal.SIGKILL)


def _haproxy_pid(stack: SidecarStack) -> int | None:
    try:
        pid = stack.status()["haproxy"]["pid"]
    except OSError:
        return None
    return int(pid) if pid else None


def cli(stack: SidecarStack, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return stack.cli(*args, timeout=timeout)


def weights(stack: SidecarStack) -> dict[str, int | None]:
    return {r["name"]: r["weight"] for r in stack.status()["regions"]}


def put(stack: SidecarStack, table: str, key: str) -> None:
    stack.client(connect_timeout=3, read_timeout=3).put_item(
        TableName=table, Item={"pk": {"S": key}, "v": {"S": "x"}}
    )


def where(moto_regions: dict[str, MotoRegion], table: str, key: str) -> set[str]:
    return {
        name
        for name, region in moto_regions.items()
        if "Item" in region.client().get_item(TableName=table, Key={"pk": {"S": key}})
    }


def persisted(stack: SidecarStack) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((stack.workdir / "run" / STATE_FILE).read_text())
    return data


def test_operator_failover_moves_traffic_and_says_what_may_be_behind(
    stack: SidecarStack, moto_regions: dict[str, MotoRegion], table: str
) -> None:
    done = cli(stack, "failover", "--to", OTHER)
    assert done.returncode == 0, done.stderr
    assert f"operator failover from {HOME} to {OTHER}" in done.stdout
    assert "not measured" in done.stdout  # replication lag: what may not have reached eu-west-1 yet
    assert weights(stack) == {HOME: 0, OTHER: 100}
    key = f"op-{uuid.uuid4().hex[:8]}"
    put(stack, table, key)
    assert where(moto_regions, table, key) == {OTHER}
    assert persisted(stack)["active"] == OTHER
    status = stack.status()
    assert status["active_region"] == OTHER
    assert [e for e in status["events"] if e["kind"] == "operator-failover"]
    again = cli(stack, "failover", "--to", OTHER)
    assert again.returncode == 0 and "already active" in again.stdout


def test_operator_failover_refusals_exit_1_and_say_why(stack: SidecarStack, home_proxy: FaultProxy) -> None:
    unknown = cli(stack, "failover", "--to", "mars-north-1")
    assert unknown.returncode == 1
    assert "no such region" in unknown.stderr and HOME in unknown.stderr
    cli(stack, "pause")  # so that the outage below does not move traffic by itself
    home_proxy.set_mode("refuse")
    wait_until(lambda: stack.status()["regions"][0]["state"] == "down", 15, message="home down")
    assert cli(stack, "failover", "--to", OTHER).returncode == 0
    down = cli(stack, "failover", "--to", HOME)
    assert down.returncode == 1
    assert "it is down" in down.stderr and "choose a region that is up" in down.stderr
    assert stack.status()["active_region"] == OTHER


def test_pause_stops_automatic_moves_and_resume_acts_at_once(
    stack: SidecarStack, home_proxy: FaultProxy
) -> None:
    paused = cli(stack, "pause")
    assert paused.returncode == 0 and "paused" in paused.stdout
    assert stack.status()["mode"] == "paused"
    home_proxy.set_mode("refuse")
    wait_until(lambda: stack.status()["regions"][0]["state"] == "down", 15, message="home down")
    # a paused sidecar does not move; give it a few probe intervals to prove it
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        assert stack.status()["active_region"] == HOME
        time.sleep(0.2)
    status = stack.status()
    assert "paused" in status["failover"]["reason"]
    assert [e for e in status["events"] if e["kind"] == "alert" and e.get("alert") == "paused-down"]
    resumed = cli(stack, "resume")
    assert resumed.returncode == 0
    assert stack.status()["active_region"] == OTHER  # acted on the current health at once
    assert persisted(stack)["mode"] == "automatic"


def test_the_state_survives_a_restart_and_a_cold_haproxy_start(
    moto_regions: dict[str, MotoRegion], table: str, home_proxy: FaultProxy, tmp_path: Path
) -> None:
    """After a failover, a clean stop (HAProxy stops too) and a start: eu-west-1 is still active, from the
    persisted state and the rendered file; nothing flips back home."""
    s = SidecarStack(
        [moto_regions[HOME], moto_regions[OTHER]], [table], tmp_path, endpoints={HOME: home_proxy.url}
    )
    s.start()
    try:
        s.wait_regions_up()
        assert cli(s, "failover", "--to", OTHER).returncode == 0
        assert s.stop(remove_workdir=False) == 0
        haproxy_cfg = (s.workdir / "run" / "haproxy.cfg").read_text()
        assert f"server {OTHER} " in haproxy_cfg and "weight 100" in haproxy_cfg.split(f"server {OTHER} ")[1]
        check = cli(s, "render", "--check")
        assert check.returncode == 0, check.stdout + check.stderr  # a deploy's render agrees: no drift
        s.process.start()
        wait_until(lambda: s.status()["active_region"] == OTHER, 30, message="restarted", ignore=(OSError,))
        assert weights(s) == {HOME: 0, OTHER: 100}
        assert "restored the persisted active region eu-west-1" in s.status()["events"][-1]["reason"] or any(
            "eu-west-1" in e["reason"] for e in s.status()["events"] if e["kind"] == "start"
        )
        assert not [e for e in s.status()["events"] if e["kind"] in ("failover", "failback")]
    finally:
        s.stop()


class Writer:
    """The app writing steadily through the stable address, counting what failed and when."""

    def __init__(self, stack: SidecarStack, table: str) -> None:
        self.client = stack.client(connect_timeout=10, read_timeout=10)
        self.table = table
        self.ok: list[float] = []
        self.failed: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(20)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.client.put_item(TableName=self.table, Item={"pk": {"S": f"k-{uuid.uuid4().hex[:8]}"}})
                self.ok.append(time.monotonic())
            except (ClientError, BotoCoreError) as exc:
                self.failed.append((time.monotonic(), str(exc)[:200]))
            self._stop.wait(0.05)


def test_kill_9_and_restart_adopts_haproxy_without_flipping_and_traffic_goes_on(
    stack: SidecarStack, table: str
) -> None:
    assert cli(stack, "failover", "--to", OTHER).returncode == 0
    haproxy_pid = _haproxy_pid(stack)
    assert haproxy_pid
    with Writer(stack, table) as writer:
        wait_until(lambda: len(writer.ok) >= 10, 15, message="writes flowing")
        stack.signal(signal.SIGKILL)
        stack.wait_exit(10)
        assert pid_alive(haproxy_pid), "HAProxy keeps running while the sidecar is dead"
        killed = time.monotonic()
        stack.process.start()  # what systemd's Restart=always does
        wait_until(lambda: stack.status()["haproxy"]["pid"] == haproxy_pid, 30, ignore=(OSError,),
                   message="the restarted sidecar adopted the running HAProxy")  # fmt: skip
        wait_until(lambda: len([t for t in writer.ok if t > killed + 0.5]) >= 10, 30, message="writes go on")
    status = stack.status()
    assert status["active_region"] == OTHER
    assert weights(stack) == {HOME: 0, OTHER: 100}
    assert status["haproxy"]["adopted"] is True
    assert not [e for e in status["events"] if e["kind"] in ("failover", "failback", "weights-reasserted")]
    assert "adopted HAProxy's active region eu-west-1" in " ".join(e["reason"] for e in status["events"])
    # HAProxy retries a refused connection (never sent) while the sidecar restarts: at most the requests
    # in flight at the kill instant fail.
    assert len(writer.failed) <= 1, writer.failed


def test_haproxy_reload_after_a_failover_keeps_the_weights(stack: SidecarStack) -> None:
    assert cli(stack, "failover", "--to", OTHER).returncode == 0
    _master_reload(stack.workdir / "run" / "haproxy-master.sock")  # an operator's (or a deploy's) reload
    wait_until(lambda: weights(stack) == {HOME: 0, OTHER: 100}, 10, message="weights hold after the reload")
    # the reload loaded the rendered file, which already carries eu-west-1's weight: nothing to re-assert
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        assert weights(stack) == {HOME: 0, OTHER: 100}
        time.sleep(0.2)


def _master_reload(path: Path) -> None:
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(b"reload\n")
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(4096):
            pass


def test_runtime_socket_gone_for_10_s_no_crash_and_weights_converge(stack: SidecarStack) -> None:
    runtime = stack.workdir / "run" / "haproxy.sock"
    away = runtime.with_name("haproxy.sock.away")
    runtime.rename(away)
    try:
        done = cli(stack, "failover", "--to", OTHER)
        assert done.returncode == 0, done.stderr
        assert "not confirmed" in done.stderr  # the CLI says HAProxy has not confirmed yet
        assert stack.status()["active_region"] == OTHER
        time.sleep(10)  # the fault: the socket stays away for 10 s
        assert stack.process.returncode is None
        assert stack.status()["haproxy"]["weights_confirmed"] is False
    finally:
        away.rename(runtime)
    wait_until(lambda: weights(stack) == {HOME: 0, OTHER: 100}, 10, message="weights converged")
    assert stack.status()["haproxy"]["weights_confirmed"] is True


def test_template_edits_reload_haproxy_once_and_a_broken_template_changes_nothing(
    moto_regions: dict[str, MotoRegion], table: str, tmp_path: Path
) -> None:
    from sidecar.haproxy.render import builtin_template_path

    template = tmp_path / "haproxy.cfg.j2"
    template.write_text(builtin_template_path().read_text())
    s = SidecarStack(
        [moto_regions[HOME], moto_regions[OTHER]], [table], tmp_path, haproxy={"template": str(template)}
    )
    s.start()
    try:
        s.wait_regions_up()
        assert cli(s, "failover", "--to", OTHER).returncode == 0
        original = template.read_text()
        for i in range(5):  # a burst of edits
            template.write_text(original + f"\n# edit {i}\n")
            time.sleep(0.05)
        wait_until(
            lambda: [e for e in s.status()["events"] if e["kind"] == "haproxy-reloaded"],
            15,
            message="HAProxy reloaded after the template changed",
        )
        time.sleep(1.5)  # longer than the debounce: a second reload would have happened by now
        assert len([e for e in s.status()["events"] if e["kind"] == "haproxy-reloaded"]) == 1
        assert weights(s) == {HOME: 0, OTHER: 100}
        assert "# edit 4" in (s.workdir / "run" / "haproxy.cfg").read_text()

        template.write_text(original + "\nthis is not haproxy configuration {{ oops\n")
        wait_until(
            lambda: [e for e in s.status()["events"] if e["kind"] == "haproxy-config-invalid"],
            15,
            message="the broken template reported",
        )
        assert "# edit 4" in (s.workdir / "run" / "haproxy.cfg").read_text()  # the old config stays
        put(s, table, f"still-{uuid.uuid4().hex[:6]}")  # and HAProxy still serves
        assert s.process.returncode is None
    finally:
        s.stop()


class Hook:
    """A webhook receiver on loopback, in a thread: records every JSON body POSTed to it."""

    def __init__(self) -> None:
        import http.server

        received: list[dict[str, Any]] = []
        self.received = received

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                received.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/ddb?token=s3cr3t"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Hook:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_moves_and_alerts_reach_the_webhook_and_the_url_stays_secret(
    moto_regions: dict[str, MotoRegion], table: str, home_proxy: FaultProxy, tmp_path: Path
) -> None:
    home_proxy.set_mode("pass")
    with Hook() as hook:
        s = SidecarStack(
            [moto_regions[HOME], moto_regions[OTHER]],
            [table],
            tmp_path,
            endpoints={HOME: home_proxy.url},
            extra={"notify": {"webhook": hook.url}},
        )
        s.start()
        try:
            s.wait_regions_up()
            home_proxy.set_mode("refuse")
            wait_until(
                lambda: [e for e in hook.received if e["kind"] == "failover"], 15, message="failover POSTed"
            )
            move = next(e for e in hook.received if e["kind"] == "failover")
            assert (move["from"], move["to"], move["active_region"], move["source"]) == (
                HOME,
                OTHER,
                OTHER,
                "ddb-sidecar",
            )
            assert "us-east-1 down" in move["reason"] and move["at"]
            assert cli(s, "pause").returncode == 0
            wait_until(lambda: [e for e in hook.received if e["kind"] == "pause"], 10, message="pause POSTed")
        finally:
            home_proxy.set_mode("pass")
            s.stop(remove_workdir=False)
        assert "s3cr3t" not in s.log_text()
        assert "s3cr3t" not in (s.workdir / "run" / "haproxy.cfg").read_text()


def test_an_edit_of_sidecar_yaml_is_applied_and_a_broken_one_refused(stack: SidecarStack) -> None:
    def kinds() -> list[str]:
        return [e["kind"] for e in stack.status()["events"]]

    stack.write_config(failover={"hold_down": "5m"})
    wait_until(lambda: "reload" in kinds(), 15, message="the edited config reloaded")
    stack.config_path.write_text(stack.config_path.read_text() + "\nno_such_key: 1\n")
    wait_until(lambda: "reload-refused" in kinds(), 15, message="the broken config refused")
    refused = next(e for e in stack.status()["events"] if e["kind"] == "reload-refused")
    assert "no_such_key" in refused["reason"] and "keeping the running config" in refused["reason"]
    assert stack.process.returncode is None
