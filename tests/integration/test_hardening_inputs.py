"""Inputs that must not reach haproxy.cfg, templates, child processes or the signature check (issue 12,
item 5), against the real CLI, a real sidecar with its HAProxy, and the moto regions.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from tests.support.moto_region import MotoRegion
from tests.support.stack import SIDECAR, SidecarStack, base_env, new_app_table, offline_config, raw_post

APP_KEY = "AKIAAPPCLIENT0000002"
APP_SECRET = "app-client-secret-value-2"
AWS_SECRET = "do-not-render-this-aws-secret"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SIDECAR), *args], capture_output=True, text=True, timeout=60, env=env or base_env(), check=False
    )


@pytest.mark.parametrize(
    ("change", "path"),
    [
        # a listener path with a newline added a `0.0.0.0` listener to haproxy.cfg, and passed `haproxy -c`
        ({"regions": [{"name": "us-east-1", "proxy": "unix:/tmp/a.sock\n    bind 0.0.0.0:9999"},
                      {"name": "eu-west-1", "proxy": "127.0.0.1:18102"}]}, "regions[0].proxy"),
        ({"regions": [{"name": "us-east-1\n", "proxy": "127.0.0.1:18101"},
                      {"name": "eu-west-1", "proxy": "127.0.0.1:18102"}]}, "regions[0].name"),
        ({"tables": ["orders\n"]}, "tables[0]"),
        ({"haproxy": {"backend": "dynamodb\n"}}, "haproxy.backend"),
        ({"haproxy": {"runtime_socket": "/tmp/rt.sock level admin"}}, "haproxy.runtime_socket"),
    ],
)  # fmt: skip
def test_values_with_newlines_or_whitespace_never_reach_haproxy_cfg(
    tmp_path: Path, change: dict[str, Any], path: str
) -> None:
    config = offline_config(tmp_path, **change)
    done = cli("validate", "-c", str(config))
    assert done.returncode != 0, done.stdout
    assert f"{path}: contains" in done.stderr, done.stderr
    rendered = cli("render", "-c", str(config))
    assert rendered.returncode != 0
    assert not (tmp_path / "haproxy.cfg").exists()


def test_a_template_cannot_reach_the_environment(tmp_path: Path) -> None:
    template = tmp_path / "evil.cfg.j2"
    template.write_text(
        "global\n# {{ config.region.__func__.__globals__['os'].environ['AWS_SECRET_ACCESS_KEY'] }}\n"
    )
    config = offline_config(tmp_path, haproxy={"template": str(template)})
    done = cli("render", "-c", str(config), env={**base_env(), "AWS_SECRET_ACCESS_KEY": AWS_SECRET})
    assert done.returncode != 0
    assert "not allowed in a template" in done.stderr, done.stderr
    assert AWS_SECRET not in done.stdout + done.stderr
    assert not (tmp_path / "haproxy.cfg").exists()


@pytest.fixture(scope="module")
def table(moto_regions: dict[str, MotoRegion]) -> str:
    return new_app_table(moto_regions.values(), "inputs")


@pytest.fixture(scope="module")
def stack(moto_regions: dict[str, MotoRegion], table: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    regions = [moto_regions["us-east-1"], moto_regions["eu-west-1"]]
    extra = {"clients": [{"access_key_id": APP_KEY, "secret_access_key_env": "APP_SECRET_2"}]}
    with SidecarStack(
        regions, [table], tmp_path_factory.mktemp("inputs"), extra=extra, env={"APP_SECRET_2": APP_SECRET}
    ) as s:
        s.wait_regions_up()
        yield s


def test_haproxy_runs_without_the_sidecars_secrets(stack: SidecarStack) -> None:
    pid = stack.status()["haproxy"]["pid"]
    assert pid
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    names = {entry.split(b"=", 1)[0].decode() for entry in environ if entry}
    assert "AWS_SECRET_ACCESS_KEY" in os.environ or "AWS_SECRET_ACCESS_KEY" in stack.env
    assert not {n for n in names if n.startswith("AWS_")}, names
    assert "APP_SECRET_2" not in names
    assert APP_SECRET.encode() not in b"\0".join(environ)


def signed(url: str, target: str, body: bytes, signed_headers: dict[str, str], late: dict[str, str]) -> Any:
    """A request signed over `signed_headers` (plus host, x-amz-date), then `late` headers added unsigned."""
    request = AWSRequest(method="POST", url=url, data=body, headers=signed_headers)
    SigV4Auth(Credentials(APP_KEY, APP_SECRET), "dynamodb", "us-east-1").add_auth(request)
    headers = {**dict(request.headers.items()), **late}
    return raw_post(url, body, headers)


def test_a_signature_must_cover_the_target_and_content_type(stack: SidecarStack, table: str) -> None:
    body = json.dumps({"TableName": table, "Key": {"pk": {"S": "x"}}}).encode()
    ct = {"Content-Type": "application/x-amz-json-1.0"}
    # Fully signed: served.
    status, _, resp = signed(
        stack.url, "GetItem", body, {**ct, "X-Amz-Target": "DynamoDB_20120810.GetItem"}, {}
    )
    assert status == 200, resp
    # A captured GetItem's signature, with X-Amz-Target (unsigned) now saying DeleteItem: refused.
    status, _, resp = signed(stack.url, "GetItem", body, ct, {"X-Amz-Target": "DynamoDB_20120810.DeleteItem"})
    doc = json.loads(resp)
    assert status == 400 and doc["__type"].endswith("#InvalidSignatureException"), doc
    assert "x-amz-target" in doc["message"]
    status, _, resp = signed(stack.url, "GetItem", body, {"X-Amz-Target": "DynamoDB_20120810.GetItem"}, ct)
    assert status == 400 and "content-type" in json.loads(resp)["message"]
