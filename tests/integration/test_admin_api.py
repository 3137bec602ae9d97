"""The admin API takes commands only from the operator (issue 12, item 3): not from a web page (an Origin
header, or a Host that is not the admin address: DNS rebinding), with a token when configured, over a 0600
unix socket when configured, with bounded and validated input, and the CLI never goes through a proxy.
Real sidecar, HAProxy and moto regions.
"""

from __future__ import annotations

import http.client
import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.moto_region import MotoRegion
from tests.support.stack import SidecarStack, new_app_table


@pytest.fixture(scope="module")
def table(moto_regions: dict[str, MotoRegion]) -> str:
    return new_app_table(moto_regions.values(), "admin")


@pytest.fixture(scope="module")
def stack(moto_regions: dict[str, MotoRegion], table: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    regions = [moto_regions["us-east-1"], moto_regions["eu-west-1"]]
    with SidecarStack(regions, [table], tmp_path_factory.mktemp("admin")) as s:
        s.wait_regions_up()
        yield s


def post(port: int, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **headers})
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(raw)
    except ValueError:
        return resp.status, {"raw": raw[:200]}


def cli(
    stack: SidecarStack, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return stack.cli(*args, env=env)


@pytest.mark.parametrize(
    "headers",
    [
        {"Host": f"rebind.example:{0}", "Origin": "http://rebind.example:{0}"},  # DNS rebinding, as found
        {"Host": "rebind.example:{0}"},
        {"Origin": "http://localhost:{0}"},
    ],
)
def test_a_web_page_cannot_drive_the_admin_api(stack: SidecarStack, headers: dict[str, str]) -> None:
    filled = {k: v.format(stack.admin_port) for k, v in headers.items()}
    status, doc = post(stack.admin_port, "/pause", b"{}", filled)
    assert status == 403, doc
    assert stack.status()["mode"] == "automatic"
    conn = http.client.HTTPConnection("127.0.0.1", stack.admin_port, timeout=10)
    conn.request("GET", "/status", headers=filled)
    assert conn.getresponse().status == 403
    conn.close()


def test_unknown_regions_are_refused_before_anything_is_kept_or_logged(stack: SidecarStack) -> None:
    events_before = len(stack.status()["events"])
    log_before = len(stack.log_text())
    huge = "x" * (1024 * 1024)
    status, _ = post(stack.admin_port, "/failover", json.dumps({"to": huge}).encode(), {})
    assert status == 413  # the body limit, before the JSON is even read
    forged = "eu-west-9\n2026-12-04 00:00:00,000 WARNING sidecar.engine: FORGED operator approved"
    for path in ("/failover", "/switchover"):
        status, doc = post(stack.admin_port, path, json.dumps({"to": forged}).encode(), {})
        assert status == 409 and "no such region" in doc["error"] and "\n" not in doc["error"], doc
    status, doc = post(stack.admin_port, "/failover", json.dumps({"to": "x" * 5000}).encode(), {})
    assert status == 409 and len(doc["error"]) < 300, doc
    after = stack.status()
    assert len(after["events"]) == events_before  # nothing recorded
    assert after["active_region"] == "us-east-1"
    log = stack.log_text()[log_before:]
    assert huge[:1000] not in log and "x" * 200 not in log
    assert not [line for line in log.splitlines() if "FORGED" in line and not line.startswith("20")]


def test_the_cli_never_goes_through_an_http_proxy(stack: SidecarStack) -> None:
    # an operator's shell during an incident: a proxy that does not answer
    dead = {"http_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "no_proxy": ""}
    done = cli(stack, "status", env=dead)
    assert done.returncode == 0, done.stderr
    assert "us-east-1" in done.stdout


def test_a_token_guards_the_commands_and_the_cli_sends_it(
    moto_regions: dict[str, MotoRegion], table: str, tmp_path: Path
) -> None:
    token_file = tmp_path / "admin.token"
    token_file.write_text("0123456789abcdef0123456789abcdef\n")
    token_file.chmod(0o600)
    regions = [moto_regions["us-east-1"], moto_regions["eu-west-1"]]
    stack = SidecarStack(regions, [table], tmp_path)
    stack.write_config(admin={"address": f"127.0.0.1:{stack.admin_port}", "token_file": str(token_file)})
    with stack:
        status, doc = post(stack.admin_port, "/pause", b"{}", {})
        assert status == 401 and "token" in doc["error"], doc
        status, _ = post(stack.admin_port, "/pause", b"{}", {"Authorization": "Bearer wrong"})
        assert status == 401
        assert stack.status()["mode"] == "automatic"  # reading needs no token
        done = cli(stack, "pause")
        assert done.returncode == 0, done.stderr
        assert stack.status()["mode"] == "paused"
        token_file.chmod(0o644)
        refused = cli(stack, "validate")
        assert refused.returncode != 0 and "admin.token_file" in refused.stderr, refused.stderr
        assert "chmod 600" in refused.stderr


def test_the_admin_api_on_a_unix_socket(
    moto_regions: dict[str, MotoRegion], table: str, tmp_path: Path
) -> None:
    regions = [moto_regions["us-east-1"], moto_regions["eu-west-1"]]
    stack = SidecarStack(regions, [table], tmp_path)
    socket_path = stack.workdir / "run" / "admin.sock"
    stack.write_config(admin=f"unix:{socket_path}")
    with stack:
        mode = os.stat(socket_path).st_mode
        assert stat.S_ISSOCK(mode) and mode & 0o777 == 0o600
        done = cli(stack, "pause")
        assert done.returncode == 0, done.stderr
        assert stack.status()["mode"] == "paused"
        with pytest.raises(OSError):  # nothing on the TCP port
            http.client.HTTPConnection("127.0.0.1", stack.admin_port, timeout=2).request("GET", "/status")
