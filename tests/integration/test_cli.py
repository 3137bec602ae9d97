"""The `ddb-sidecar` command line as operators and deploy pipelines run it: the real console script.

Exit codes (INTERFACE.md): 0 ok, 1 check failed or refused, 2 usage or config error, 3 daemon unreachable.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.haproxy.binary import find_haproxy
from sidecar.haproxy.render import builtin_template_path
from tests.support.ports import free_port, free_port_block
from tests.support.stack import base_env

SIDECAR = Path(sys.executable).parent / "ddb-sidecar"
# `FILE: path: message`, the path being a dotted/indexed config location or `(file)`.
PROBLEM_LINE = re.compile(r"^(?P<file>[^:]+): (?P<path>[A-Za-z_(][\w.\[\]()]*): (?P<message>.+)$")


def cli(
    *args: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """Run `ddb-sidecar ARGS`; DDB_SIDECAR_CONFIG is unset unless `env` sets it."""
    return subprocess.run(
        [str(SIDECAR), *map(str, args)],
        env={**base_env(), **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def good_config(**changes: Any) -> dict[str, Any]:
    """A valid config on free loopback ports; `changes` replace top-level keys."""
    config: dict[str, Any] = {
        "listen": f"127.0.0.1:{free_port()}",
        "regions": [
            {"name": "us-east-1", "proxy": f"127.0.0.1:{free_port()}"},
            {"name": "eu-west-1", "proxy": f"127.0.0.1:{free_port()}"},
        ],
        "tables": ["orders"],
        "health": {"interval": "1s", "timeout": "800ms"},
        "haproxy": {"stats": f"127.0.0.1:{free_port()}"},
        "admin": f"127.0.0.1:{free_port()}",
    }
    config.update(changes)
    return config


def write_yaml(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short folder (unix socket paths in the config have a 100-byte limit)."""
    folder = Path(tempfile.mkdtemp(prefix="cli"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


# -- validate -----------------------------------------------------------------------------------------------


def test_validate_good_config(workdir: Path) -> None:
    config = write_yaml(workdir / "sidecar.yaml", good_config())
    result = cli("validate", "-c", config)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(f"{config}: ok")
    assert "2 regions, home us-east-1, 1 tables" in result.stdout
    assert result.stderr == ""


def test_validate_reports_every_problem(workdir: Path) -> None:
    port = free_port()
    data = good_config(
        regions=[
            {"name": "us-east-1", "proxy": f"127.0.0.1:{port}"},
            {"name": "us-east-1", "proxy": f"127.0.0.1:{port}"},  # same name, same port
        ],
        health={"interval": "1 sec"},  # malformed duration
        haproxy={"template": "templates/nowhere.cfg.j2", "stats": f"127.0.0.1:{free_port()}"},
        colour="blue",  # unknown key
    )
    config = write_yaml(workdir / "bad.yaml", data)
    result = cli("validate", "-c", config)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""

    problems: dict[str, str] = {}
    lines = result.stderr.splitlines()
    for line in lines:
        match = PROBLEM_LINE.match(line)
        assert match, f"not `FILE: path: message`: {line!r}"
        assert match["file"] == str(config), line
        problems[match["path"]] = match["message"]
    assert problems["regions[1].proxy"] == f"port {port} already used by regions[0].proxy"
    assert problems["regions[1].name"] == "us-east-1 already listed as regions[0]"
    assert "malformed duration '1 sec'" in problems["health.interval"]
    assert problems["haproxy.template"] == f"{workdir.resolve() / 'templates' / 'nowhere.cfg.j2'} not found"
    assert problems["colour"].startswith("unknown key")
    assert len(lines) == 5, result.stderr


def test_validate_reads_config_from_environment(workdir: Path) -> None:
    config = write_yaml(workdir / "from-env.yaml", good_config())
    elsewhere = workdir / "empty"
    elsewhere.mkdir()  # no sidecar.yaml here: the default path would fail
    result = cli("validate", env={"DDB_SIDECAR_CONFIG": str(config)}, cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{config}: ok")

    bad = write_yaml(workdir / "bad-from-env.yaml", good_config(tables=[]))
    result = cli("validate", env={"DDB_SIDECAR_CONFIG": str(bad)}, cwd=elsewhere)
    assert result.returncode == 2
    assert result.stderr.startswith(f"{bad}: tables: ")


def test_validate_missing_file(workdir: Path) -> None:
    missing = workdir / "no-such.yaml"
    result = cli("validate", "-c", missing)
    assert result.returncode == 2
    assert result.stdout == ""
    line = result.stderr.strip()
    assert line.startswith(f"{missing}: (file): not found"), line
    assert "-c PATH" in line and "DDB_SIDECAR_CONFIG" in line, line


# -- render -------------------------------------------------------------------------------------------------


def haproxy_accepts(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [find_haproxy(), "-c", "-f", str(path)], capture_output=True, text=True, timeout=30, check=False
    )


def test_render_writes_once_then_unchanged_and_detects_drift(workdir: Path) -> None:
    config = write_yaml(workdir / "sidecar.yaml", good_config())
    out = workdir / "out" / "haproxy.cfg"

    first = cli("render", "-c", config, "-o", out)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == f"{out}: written"
    check = haproxy_accepts(out)
    assert check.returncode == 0, check.stdout + check.stderr
    rendered = out.read_bytes()
    assert b"weight 100" in rendered and b"weight 0" in rendered
    before = out.stat()

    second = cli("render", "-c", config, "-o", out)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == f"{out}: unchanged"
    after = out.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), "rewritten"

    up_to_date = cli("render", "-c", config, "-o", out, "--check")
    assert up_to_date.returncode == 0, up_to_date.stderr
    assert up_to_date.stdout.strip() == f"{out}: up to date"

    edited = rendered.replace(b"weight 0", b"weight 7", 1)
    assert edited != rendered
    out.write_bytes(edited)
    edited_stat = out.stat()
    drift = cli("render", "-c", config, "-o", out, "--check")
    assert drift.returncode == 1, drift.stdout + drift.stderr
    assert drift.stdout.startswith(f"{out}: differs")
    assert out.read_bytes() == edited, "--check rewrote the file"
    assert (out.stat().st_ino, out.stat().st_mtime_ns) == (edited_stat.st_ino, edited_stat.st_mtime_ns)

    # Rendering again repairs the drift.
    repaired = cli("render", "-c", config, "-o", out)
    assert repaired.returncode == 0, repaired.stderr
    assert repaired.stdout.strip() == f"{out}: written"
    assert out.read_bytes() == rendered


def test_render_refuses_a_config_haproxy_rejects(workdir: Path) -> None:
    out = workdir / "out" / "haproxy.cfg"
    good = write_yaml(workdir / "good.yaml", good_config())
    assert cli("render", "-c", good, "-o", out).returncode == 0
    previous, previous_stat = out.read_bytes(), out.stat()

    template = builtin_template_path().read_text(encoding="utf-8")
    assert "\nglobal\n" in template
    bogus = workdir / "bogus.cfg.j2"
    bogus.write_text(template.replace("\nglobal\n", "\nglobal\n    no-such-directive-here 42\n", 1))
    data = good_config()
    data["haproxy"]["template"] = bogus.name  # relative to the config file's folder
    config = write_yaml(workdir / "bogus.yaml", data)

    result = cli("render", "-c", config, "-o", out)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "nothing written" in result.stderr
    assert "no-such-directive-here" in result.stderr  # HAProxy's own words say what is wrong
    assert out.read_bytes() == previous
    assert (out.stat().st_ino, out.stat().st_mtime_ns) == (previous_stat.st_ino, previous_stat.st_mtime_ns)
    assert sorted(p.name for p in out.parent.iterdir()) == ["haproxy.cfg"], "a temp file was left behind"


# -- status -------------------------------------------------------------------------------------------------


def test_status_without_daemon(workdir: Path) -> None:
    admin_port = free_port()  # bindable, so nothing listens there
    config = write_yaml(workdir / "sidecar.yaml", good_config(admin=f"127.0.0.1:{admin_port}"))
    result = cli("status", "-c", config, timeout=30)
    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stdout == ""
    assert f"not answering on http://127.0.0.1:{admin_port}/status" in result.stderr


# -- demo ---------------------------------------------------------------------------------------------------

DEMO_OFFSETS = (0, 4, 5, 101, 102, 201, 202)
# demo --scenario fleet: eight ports per host (10 apart), the regions at +201/+202
FLEET_DEMO_OFFSETS = (*(10 * host + k for host in range(3) for k in range(8)), 201, 202)


def run_demo(*args: str, timeout: float = 90.0, offsets: tuple[int, ...] = DEMO_OFFSETS) -> str:
    """Run `ddb-sidecar demo ARGS` on a free block of ports; return its output once it exited 0."""
    base = free_port_block(offsets, low=20000, high=31000)
    proc = subprocess.Popen(
        [str(SIDECAR), "demo", *args, "--base-port", str(base)],
        env={**base_env(), "PYTHONUNBUFFERED": "1"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGINT: the demo stops its regions, the sidecar and HAProxy on the way out.
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"the demo did not finish within {timeout:g}s:\n{out}\n{err}")
    assert proc.returncode == 0, out + err
    return out


def test_demo_runs_the_outage_scenario() -> None:
    out = run_demo("--duration", "8")  # the default scenario
    assert "demo: scenario outage" in out, out
    cut = out.index(">>> outage: the home region us-east-1 goes dark")
    moved = re.search(r"event \S+ failover: us-east-1 down: .*moved to eu-west-1", out)
    assert moved and cut < moved.start(), out
    # What the client saw: bounded generously here (a shared machine); `make bench-failover` measures it.
    gap = re.search(
        r"time without service: (\d+\.\d+) s \(from the cut to the first write acknowledged by eu-west-1\)",
        out,
    )
    assert gap and float(gap[1]) < 6.0, out
    failed = re.search(r"failed requests: (\d+)", out)
    assert failed, out
    served = re.search(r"served after the move by: eu-west-1 \((\d+) writes acknowledged", out)
    assert served and int(served[1]) > 0, out
    assert re.search(r"failover event: \S+ us-east-1 -> eu-west-1: us-east-1 down: ", out), out
    # The data, read from each region directly (writes in flight at the cut are not asserted on).
    before = re.search(r"acknowledged before the cut: (\d+); in us-east-1: (\d+)", out)
    assert before and int(before[1]) > 0 and before[1] == before[2], out
    after = re.search(r"acknowledged after the move: (\d+); in eu-west-1: (\d+); in us-east-1: (\d+)", out)
    assert after and after[1] == served[1] == after[2] and after[3] == "0", out
    assert "demo: every write acknowledged after the move is in eu-west-1" in out, out
    assert "ddb-sidecar failover --to us-east-1" in out, out  # failback is manual: the operator's next step


def test_demo_runs_the_replica_scenario() -> None:
    out = run_demo("--scenario", "replica", "--duration", "9")  # 3 s for the replica to come back, under load
    assert "demo: every write is in the home region and only there" in out, out
    assert "client error" not in out, out  # the replica's outage does not reach the app
    down = re.search(r"event \S+ region-down: eu-west-1 down: \d+ consecutive timeout", out)
    up = re.search(r"event \S+ region-up: eu-west-1 up", out)
    assert down and up, out
    assert down.start() < up.start(), out
    freeze = out.index("outage: freezing eu-west-1")
    thaw = out.index("recovery: resuming eu-west-1")
    assert freeze < down.start() and freeze < thaw < up.start(), out
    written = re.search(r"acknowledged writes: (\d+); in us-east-1: (\d+); in eu-west-1: (\d+)", out)
    assert written, out
    assert int(written[1]) > 0 and written[1] == written[2] and written[3] == "0", out
    assert not re.search(r"event \S+ failover:", out), out  # the home region served throughout


def test_demo_refuses_an_unknown_scenario() -> None:
    result = cli("demo", "--scenario", "earthquake", timeout=30)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "earthquake" in result.stderr


def test_demo_runs_the_fleet_scenario() -> None:
    out = run_demo("--scenario", "fleet", "--duration", "24", timeout=150.0, offsets=FLEET_DEMO_OFFSETS)
    alone = out.index(">>> web-1 alone loses its path to us-east-1")
    back = out.index(">>> web-1's path to us-east-1 is back")
    cut = out.index(">>> us-east-1 is cut for every host")
    isolated = out.index("[web-1] alert: web-1 alone sees us-east-1 down")
    assert alone < isolated < cut, out
    # nothing moved while web-1 alone was cut off: the first move comes after the cut for all
    first_move = min(
        out.index(f"[{h}] fleet-decision: applied the fleet's decision") for h in ("web-1", "web-2", "web-3")
    )
    assert back < cut < first_move, out
    for host in ("web-1", "web-2", "web-3"):
        assert re.search(rf"{host}: now on eu-west-1; \d+ writes acknowledged", out), out
    counts = re.search(
        r"acknowledged after each host moved: (\d+); in eu-west-1: (\d+); in us-east-1: (\d+)", out
    )
    assert counts and int(counts[1]) > 0 and counts[1] == counts[2] and counts[3] == "0", out
    assert "the region cut for all moved every host" in out, out


def _processes_mentioning(needles: list[str]) -> list[str]:
    """Command lines of running processes that contain one of `needles`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile
        if any(needle in cmdline for needle in needles):
            found.append(f"{proc.name}: {cmdline}")
    return found


@pytest.mark.timeout(240)
def test_demo_runs_the_drill(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """demo --scenario drill: the whole DR cycle with real processes (two moto regions, the sidecar in streams
    mode with its HAProxy, the reconcile and switchover commands): it passes, every step is shown in order,
    nothing acknowledged is lost, both regions end identical, and nothing it started is left running."""
    workdir = tmp_path / "drill"
    started = time.monotonic()
    out = run_demo("--scenario", "drill", "--workdir", str(workdir), timeout=150.0)
    took = time.monotonic() - started
    with capsys.disabled():
        print(f"\ndemo --scenario drill: {took:.1f} s wall time")
    steps = [
        "steady writes: ",
        "the home region us-east-1 goes dark",
        "us-east-1 returns",
        "reconcile: what did not replicate",
        "switchover home: eu-west-1 -> us-east-1",
        "reconcile --apply: from the active region (us-east-1 again) into eu-west-1",
        "writes stop; final check: both regions, read directly",
    ]
    at = [out.index(f"drill: step {n}/7: {text}") for n, text in enumerate(steps, 1)]
    assert at == sorted(at), out
    failover = re.search(r"event failover: us-east-1 down: .*moved to eu-west-1", out)
    assert failover and at[1] < failover.start() < at[2], out
    assert re.search(r"writes failed for \d+\.\d+ s \(from the cut to the first write acknowledged", out), out
    # what did not replicate is listed by reconcile, then copied by reconcile --apply
    listed = re.search(r"only in us-east-1, never replicated: (\d+) orders: (\d+) acknowledged before", out)
    copied = re.search(r"(\d+) of the (\d+) orders from step 4 copied into eu-west-1", out)
    assert listed and copied and copied[1] == copied[2] == listed[1], out
    assert re.search(r"\$ ddb-sidecar reconcile --json --no-progress --apply", out), out
    held = re.search(r"switchover home: writes held (\d+) ms, 0 failed", out)
    assert held, out
    assert re.search(r"\d+ writes sent: (\d+) acknowledged, every one in both regions", out), out
    assert "lost writes: 0" in out and "both regions identical: yes" in out, out
    assert "drill: PASSED" in out, out
    total = re.search(r"total: (\d+\.\d) s", out)
    assert total, out
    # nothing left running: the sidecar and HAProxy (their command lines name the workdir), the moto regions
    config = yaml.safe_load((workdir / "sidecar.yaml").read_text())
    motos = [f"-p {r['endpoint'].rsplit(':', 1)[1]}" for r in config["regions"]]
    assert not _processes_mentioning([str(workdir), *motos])
