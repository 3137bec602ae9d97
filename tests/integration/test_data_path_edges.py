"""Data-path edge cases that need their own sidecar: client authentication, an unreachable region."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.integration.test_data_path import error_of
from tests.support.moto_region import MotoRegion
from tests.support.ports import free_port
from tests.support.stack import SIDECAR, SidecarStack, new_app_table, raw_post
from tests.support.wait import wait_until

APP_KEY = "AKIAAPPCLIENT0000001"
APP_SECRET = "app-client-secret-value"


@pytest.fixture(scope="module")
def table(moto_regions: dict[str, MotoRegion]) -> str:
    return new_app_table(moto_regions.values(), "edge")


def test_client_signatures_verified_when_clients_set(
    moto_regions: dict[str, MotoRegion], table: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    regions = [moto_regions["us-east-1"], moto_regions["eu-west-1"]]
    extra = {"clients": [{"access_key_id": APP_KEY, "secret_access_key_env": "APP_SECRET"}]}
    with SidecarStack(
        regions, [table], tmp_path_factory.mktemp("auth"), extra=extra, env={"APP_SECRET": APP_SECRET}
    ) as stack:
        good = stack.client(access_key=APP_KEY, secret_key=APP_SECRET)
        good.put_item(TableName=table, Item={"pk": {"S": "signed"}})
        assert "Item" in good.get_item(TableName=table, Key={"pk": {"S": "signed"}})

        wrong_secret = stack.client(access_key=APP_KEY, secret_key="not-the-secret")
        with pytest.raises(ClientError) as err:
            wrong_secret.get_item(TableName=table, Key={"pk": {"S": "signed"}})
        assert error_of(err.value)[:2] == (400, "InvalidSignatureException")

        unknown = stack.client(access_key="AKIAUNKNOWN000000001", secret_key=APP_SECRET)
        with pytest.raises(ClientError) as err:
            unknown.get_item(TableName=table, Key={"pk": {"S": "signed"}})
        assert error_of(err.value)[:2] == (400, "UnrecognizedClientException")

        status, _, body = raw_post(
            stack.url,
            b"{}",
            {"Content-Type": "application/x-amz-json-1.0", "X-Amz-Target": "DynamoDB_20120810.GetItem"},
        )
        assert status == 400
        assert json.loads(body)["__type"].endswith("#MissingAuthenticationTokenException")
        # Still serving the legitimate client.
        assert "Item" in good.get_item(TableName=table, Key={"pk": {"S": "signed"}})
        assert APP_SECRET not in stack.process.log_path.read_text()


def test_unreachable_region_gets_retryable_error_and_daemon_survives(
    moto_regions: dict[str, MotoRegion], table: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    regions = [moto_regions["us-east-1"], moto_regions["eu-west-1"]]
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with SidecarStack(
        regions, [table], tmp_path_factory.mktemp("dead"), endpoints={"eu-west-1": dead}
    ) as stack:
        # Ask the eu-west-1 listener directly, as HAProxy would after a move.
        client = stack.client(url=stack.region_url("eu-west-1"))
        with pytest.raises(ClientError) as err:
            client.get_item(TableName=table, Key={"pk": {"S": "x"}})
        status, code, message = error_of(err.value)
        assert (status, code) == (503, "ServiceUnavailableException")
        assert "not sent" in message.lower()

        def down() -> Any:
            regions_state = {r["name"]: r for r in stack.status()["regions"]}
            return regions_state["eu-west-1"]["state"] == "down" and regions_state["eu-west-1"]

        state = wait_until(down, 10, message="eu-west-1 reported down")
        assert "refused" in state["cause"]
        assert "refused" in state["last_upstream_error"]
        assert state["last_upstream_error_at"]
        text = subprocess.run(
            [str(SIDECAR), "status", "-c", str(stack.config_path)], capture_output=True, text=True, timeout=30
        )
        assert text.returncode == 0, text.stderr
        lines = text.stdout.splitlines()
        assert lines[0].startswith("active region: us-east-1")
        eu = next(i for i, line in enumerate(lines) if line.startswith("eu-west-1"))
        assert " down " in lines[eu] and "refused" in lines[eu]
        assert "last upstream error" in lines[eu + 1] and "refused" in lines[eu + 1]
        # The home region keeps serving through the stable address.
        stack.client().put_item(TableName=table, Item={"pk": {"S": "alive"}})
        assert "Item" in stack.client().get_item(TableName=table, Key={"pk": {"S": "alive"}})


def test_the_apps_user_agent_reaches_dynamodb_with_ours_appended(
    moto_regions: dict[str, MotoRegion], table: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """CloudTrail and AWS support see the app's SDK and version: `<app UA> ddb-sidecar/VERSION`."""
    from tests.support.faultproxy import FaultProxy

    work = tmp_path_factory.mktemp("ua")
    regions = [moto_regions["us-east-1"], moto_regions["eu-west-1"]]
    with FaultProxy(regions[0].port, work) as proxy:
        with SidecarStack(regions, [table], work, endpoints={"us-east-1": proxy.url}) as stack:
            stack.wait_regions_up()
            app = stack.client()
            app.meta.events.register(
                "before-sign.dynamodb.*",
                lambda request, **_: request.headers.__setitem__("User-Agent", "perl-app/1.2 Paws/0.44"),
            )
            app.get_item(TableName=table, Key={"pk": {"S": "ua"}})
            agents = [a for a in proxy.state()["user_agents"] if a.startswith("GetItem ")]
    assert any(a.startswith("GetItem perl-app/1.2 Paws/0.44 ddb-sidecar/") for a in agents), agents
