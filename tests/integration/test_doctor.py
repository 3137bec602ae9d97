"""`ddb-sidecar doctor` against real moto regions (signature checking on), with each problem planted.

Every failure must name the check and carry the exact fix; a healthy host must pass with exit 0.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.localregion import bootstrap_iam
from tests.support.faultproxy import FaultProxy
from tests.support.moto_region import MotoRegion
from tests.support.ports import free_port
from tests.support.stack import (
    DEFAULT_TEST_HEALTH,
    SIDECAR,
    SidecarStack,
    isolated_aws_env,
    offline_config,
    stream_tables,
)

HOME, OTHER = "us-east-1", "eu-west-1"


def doctor(config: Path, key: Any) -> tuple[int, dict[str, Any]]:
    proc = subprocess.run(
        [str(SIDECAR), "doctor", "--json", "-c", str(config)],
        capture_output=True, text=True, timeout=120, check=False,
        env=isolated_aws_env(key.access_key_id, key.secret_access_key),
    )  # fmt: skip
    assert proc.stdout, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def checks(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in report["checks"]}


def failed(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: c for n, c in checks(report).items() if c["status"] == "fail"}


def region_config(
    tmp_path: Path, regions: dict[str, str], app: str, health: str, mode: str = "streams", **extra: Any
) -> Path:
    return offline_config(
        tmp_path,
        regions=[
            {"name": name, "endpoint": url, "proxy": f"127.0.0.1:{free_port()}"}
            for name, url in regions.items()
        ],
        tables=[app],
        health={"table": health},
        replication={"mode": mode},
        **extra,
    )


@pytest.fixture
def streams(moto_regions: dict[str, MotoRegion]) -> tuple[str, str]:
    return stream_tables(moto_regions.values(), "doc")


def endpoints(moto_regions: dict[str, MotoRegion]) -> dict[str, str]:
    return {HOME: moto_regions[HOME].endpoint, OTHER: moto_regions[OTHER].endpoint}


def test_a_healthy_host_passes(
    moto_regions: dict[str, MotoRegion], streams: tuple[str, str], tmp_path: Path
) -> None:
    app, health = streams
    code, report = doctor(
        region_config(tmp_path, endpoints(moto_regions), app, health), moto_regions[HOME].credentials
    )
    assert failed(report) == {}
    assert code == 0 and report["ok"]
    found = checks(report)
    for region in (HOME, OTHER):
        assert found[f"clock {region}"]["status"] == "pass"
        for table in (app, health):
            assert found[f"table {table} {region}"]["status"] == "pass"
            assert "NEW_AND_OLD_IMAGES" in found[f"table {table} {region}"]["detail"]
            assert found[f"access {table} {region}"]["status"] == "pass"
    assert found["account"]["detail"].startswith("123456789012")
    secret = moto_regions[HOME].credentials.secret_access_key
    assert secret not in json.dumps(report), "no secret in the report"
    for name in ("config", "credentials", "haproxy", "daemon", "ports", "state_dir"):
        assert found[name]["status"] == "pass", found[name]


def test_a_table_missing_in_one_region_wrong_health_key_and_stream_off(
    moto_regions: dict[str, MotoRegion], tmp_path: Path, table_name: str
) -> None:
    home, other = moto_regions[HOME], moto_regions[OTHER]
    app, health, quiet = f"{table_name}-app", f"{table_name}-h", f"{table_name}-q"
    home.create_table(app, sk="sk", stream=True)  # missing in eu-west-1
    for region in (home, other):
        region.create_table(health, pk="id", stream=True)  # keyed wrong
        region.create_table(quiet, stream=region is home)  # no stream in eu-west-1
    config = region_config(tmp_path, endpoints(moto_regions), app, health)
    config.write_text(config.read_text().replace(f"- {app}", f"- {app}\n- {quiet}"))
    code, report = doctor(config, home.credentials)
    assert code == 1 and not report["ok"]
    problems = failed(report)
    missing = problems[f"table {app} {OTHER}"]
    assert missing["detail"] == "missing"
    assert f"aws dynamodb create-table --region {OTHER} --table-name {app}" in missing["fix"]
    assert (
        "--attribute-definitions AttributeName=pk,AttributeType=S AttributeName=sk,AttributeType=S "
        "--key-schema AttributeName=pk,KeyType=HASH AttributeName=sk,KeyType=RANGE"
    ) in missing["fix"], "the key seen at home, with its types"
    for region in (HOME, OTHER):
        wrong = problems[f"table {health} {region}"]
        assert "pk (S) alone" in wrong["detail"] and "id (S, hash)" in wrong["detail"]
        assert f"create-table --region {region} --table-name {health}" in wrong["fix"]
    off = problems[f"table {quiet} {OTHER}"]
    assert "stream is off" in off["detail"]
    assert off["fix"] == (
        f"aws dynamodb update-table --region {OTHER} --table-name {quiet} "
        "--stream-specification StreamEnabled=true,StreamViewType=NEW_AND_OLD_IMAGES"
    )
    assert f"table {quiet} {HOME}" not in problems


def test_global_tables_mode_says_which_replica_is_missing(
    moto_regions: dict[str, MotoRegion], streams: tuple[str, str], tmp_path: Path
) -> None:
    app, health = streams
    config = region_config(tmp_path, endpoints(moto_regions), app, health, mode="global-tables")
    code, report = doctor(config, moto_regions[HOME].credentials)
    assert code == 1
    # moto has no Global Tables: every table reports the replica it lacks, with the command that adds it
    problem = failed(report)[f"table {app} {HOME}"]
    assert f"not a global table replica in {OTHER}" in problem["detail"]
    assert f"--replica-updates 'Create={{RegionName={OTHER}}}'" in problem["fix"]


def test_a_key_without_permission(tmp_path: Path, table_name: str) -> None:
    region = MotoRegion(HOME, tmp_path / "moto", free_calls=6).start()
    try:
        region.wait_ready()
        region.bootstrap(seed=7)
        limited = bootstrap_iam(
            region.endpoint, HOME, seed=8, user="reader",
            policy={"Version": "2012-10-17", "Statement": [
                {"Effect": "Allow", "Action": ["dynamodb:GetItem", "dynamodb:DescribeTable"], "Resource": "*"}]},
        )  # fmt: skip
        app, health = f"{table_name}-a", f"{table_name}-h"
        region.create_table(app, stream=True)
        region.create_table(health, stream=True)
        code, report = doctor(region_config(tmp_path, {HOME: region.endpoint}, app, health), limited)
        assert code == 1
        problems = failed(report)
        for table in (app, health):
            refused = problems[f"access {table} {HOME}"]
            assert refused["detail"] == "the sidecar's credentials may not dynamodb:PutItem"
            assert refused["fix"].startswith(
                f"allow dynamodb:PutItem on arn:aws:dynamodb:{HOME}:123456789012:table/{table}"
            )
        assert set(problems) == {f"access {app} {HOME}", f"access {health} {HOME}"}
    finally:
        region.stop()


@pytest.fixture
def skewed(moto_regions: dict[str, MotoRegion], tmp_path: Path) -> Iterator[FaultProxy]:
    with FaultProxy(moto_regions[OTHER].port, tmp_path) as proxy:
        yield proxy


@pytest.mark.parametrize(("seconds", "status"), [(-400, "fail"), (60, "warn")])
def test_clock_skew_measured_against_dynamodb_date(
    moto_regions: dict[str, MotoRegion], streams: tuple[str, str], skewed: FaultProxy, tmp_path: Path,
    seconds: int, status: str,
) -> None:  # fmt: skip
    app, health = streams
    skewed.set_mode("skew_date", seconds=seconds)
    config = region_config(tmp_path, {HOME: moto_regions[HOME].endpoint, OTHER: skewed.url}, app, health)
    code, report = doctor(config, moto_regions[HOME].credentials)
    clock = checks(report)[f"clock {OTHER}"]
    assert clock["status"] == status, clock
    ahead = "ahead of" if seconds < 0 else "behind"
    measured = re.match(r"this host is (\d+) s", clock["detail"])
    assert measured is not None and abs(int(measured.group(1)) - abs(seconds)) <= 2, clock  # Date: 1 s steps
    assert ahead in clock["detail"] and "timesyncd" in clock["fix"]
    assert checks(report)[f"clock {HOME}"]["status"] == "pass"
    assert code == (1 if status == "fail" else 0)


def test_busy_ports_bad_state_dir_and_unreachable_etcd(
    moto_regions: dict[str, MotoRegion], streams: tuple[str, str], tmp_path: Path
) -> None:
    app, health = streams
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        config = region_config(
            tmp_path, endpoints(moto_regions), app, health, mode="none",
            listen=f"127.0.0.1:{port}", state_dir=str(blocker / "state"),
            coordination={"backend": "etcd", "endpoints": [f"http://127.0.0.1:{free_port()}"]},
        )  # fmt: skip
        code, report = doctor(config, moto_regions[HOME].credentials)
    assert code == 1
    problems = failed(report)
    assert (
        f"listen 127.0.0.1:{port}" in problems["ports"]["detail"] and "ss -ltnp" in problems["ports"]["fix"]
    )
    assert str(blocker / "state") in problems["state_dir"]["detail"]
    assert "start etcd" in problems["etcd"]["fix"]


def test_a_broken_config_is_one_failure_with_its_path(
    tmp_path: Path, moto_regions: dict[str, MotoRegion]
) -> None:
    config = offline_config(tmp_path, health={"interval": "soon"})
    code, report = doctor(config, moto_regions[HOME].credentials)
    assert code == 1
    assert [c["name"] for c in report["checks"]] == ["config"]
    assert "health.interval" in report["checks"][0]["detail"]


def test_while_the_sidecar_runs_its_sockets_are_checked(
    moto_regions: dict[str, MotoRegion], streams: tuple[str, str], tmp_path: Path
) -> None:
    app, health = streams
    regions = [moto_regions[HOME], moto_regions[OTHER]]
    with SidecarStack(
        regions, [app], tmp_path / "stack", extra={"health": {**DEFAULT_TEST_HEALTH, "table": health}}
    ) as stack:
        stack.wait_regions_up()
        _, report = doctor(stack.config_path, moto_regions[HOME].credentials)
    found = checks(report)
    assert found["daemon"]["detail"].startswith("running")
    assert found["runtime socket"]["status"] == "pass", found["runtime socket"]
    assert found["master socket"]["status"] == "pass", found["master socket"]
    assert "ports" not in found, "a running sidecar holds its own ports"
