"""The data path end to end: real clients -> real HAProxy -> the sidecar -> two moto regions (auth on).

Every item must land in the home region and not in the other; every refusal must be DynamoDB-shaped
JSON that the SDK parses; nothing a client sends may take the daemon down.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.support.moto_region import MotoRegion
from tests.support.stack import (
    SidecarStack,
    isolated_aws_env,
    new_app_table,
    raw_post,
)

REPO = Path(__file__).resolve().parents[2]
PERL_CLIENT = REPO / "examples" / "perl" / "ddb_client.pl"
JSON_CT = "application/x-amz-json-1.0"


@pytest.fixture(scope="module")
def orders(moto_regions: dict[str, MotoRegion]) -> str:
    return new_app_table(moto_regions.values(), "orders", sk="sk")


@pytest.fixture(scope="module")
def stack(moto_regions: dict[str, MotoRegion], orders: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    regions = [moto_regions["us-east-1"], moto_regions["eu-west-1"]]
    with SidecarStack(regions, [orders], tmp_path_factory.mktemp("stack")) as s:
        s.wait_regions_up()
        yield s


def home_item(region: MotoRegion, table: str, pk: str, sk: str) -> dict[str, Any] | None:
    item: dict[str, Any] | None = (
        region.client()
        .get_item(TableName=table, Key={"pk": {"S": pk}, "sk": {"S": sk}}, ConsistentRead=True)
        .get("Item")
    )
    return item


def error_of(exc: ClientError) -> tuple[int, str, str]:
    resp = exc.response
    return resp["ResponseMetadata"]["HTTPStatusCode"], resp["Error"]["Code"], resp["Error"].get("Message", "")


# -- the happy path with every client -----------------------------------------------------------------------


def test_boto3_operations_land_in_home_region_only(
    stack: SidecarStack, orders: str, moto_regions: dict[str, MotoRegion]
) -> None:
    app = stack.client()
    pk = f"cust-{uuid.uuid4().hex[:6]}"
    app.put_item(TableName=orders, Item={"pk": {"S": pk}, "sk": {"S": "1"}, "total": {"N": "42"}})
    got = app.get_item(TableName=orders, Key={"pk": {"S": pk}, "sk": {"S": "1"}}, ConsistentRead=True)
    assert got["Item"]["total"] == {"N": "42"}

    app.batch_write_item(
        RequestItems={
            orders: [{"PutRequest": {"Item": {"pk": {"S": pk}, "sk": {"S": str(i)}}}} for i in range(2, 6)]
        }
    )
    app.transact_write_items(
        TransactItems=[
            {"Put": {"TableName": orders, "Item": {"pk": {"S": pk}, "sk": {"S": "6"}}}},
            {
                "Update": {
                    "TableName": orders,
                    "Key": {"pk": {"S": pk}, "sk": {"S": "1"}},
                    "UpdateExpression": "SET #t = :t",
                    "ExpressionAttributeNames": {"#t": "total"},
                    "ExpressionAttributeValues": {":t": {"N": "43"}},
                }
            },
        ]
    )
    query = app.query(
        TableName=orders, KeyConditionExpression="pk = :p", ExpressionAttributeValues={":p": {"S": pk}}
    )
    assert sorted(i["sk"]["S"] for i in query["Items"]) == ["1", "2", "3", "4", "5", "6"]

    home, other = moto_regions["us-east-1"], moto_regions["eu-west-1"]
    for sk in ["1", "2", "5", "6"]:
        assert home_item(home, orders, pk, sk) is not None, f"item {sk} missing in the home region"
        assert home_item(other, orders, pk, sk) is None, f"item {sk} leaked into eu-west-1"
    assert home_item(home, orders, pk, "1")["total"] == {"N": "43"}


def test_aws_cli_through_stable_address(
    stack: SidecarStack, orders: str, moto_regions: dict[str, MotoRegion]
) -> None:
    aws = shutil.which("aws", path=str(Path(sys.executable).parent)) or shutil.which("aws")
    if aws is None:
        pytest.skip("the AWS CLI is not installed")
    pk = f"cli-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, **isolated_aws_env("AKIAAPPCLI0000000001", "cli-secret")}
    item = json.dumps({"pk": {"S": pk}, "sk": {"S": "a"}, "via": {"S": "aws-cli"}})
    put = subprocess.run(
        [aws, "dynamodb", "put-item", "--endpoint-url", stack.url, "--table-name", orders, "--item", item],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert put.returncode == 0, put.stderr
    get = subprocess.run(
        [
            aws,
            "dynamodb",
            "get-item",
            "--endpoint-url",
            stack.url,
            "--table-name",
            orders,
            "--key",
            json.dumps({"pk": {"S": pk}, "sk": {"S": "a"}}),
            "--consistent-read",
            "--output",
            "json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert get.returncode == 0, get.stderr
    assert json.loads(get.stdout)["Item"]["via"] == {"S": "aws-cli"}
    assert home_item(moto_regions["us-east-1"], orders, pk, "a") is not None
    assert home_item(moto_regions["eu-west-1"], orders, pk, "a") is None


def test_perl_client_through_stable_address(
    stack: SidecarStack, orders: str, moto_regions: dict[str, MotoRegion]
) -> None:
    if shutil.which("perl") is None:
        pytest.skip("perl is not installed")
    pk = f"perl-{uuid.uuid4().hex[:6]}"
    # The app signs with its own key; the sidecar strips it and signs with its own.
    env = {**os.environ, **isolated_aws_env("AKIAPERLAPP000000001", "perl-app-secret")}

    def perl(op: str, body: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "perl",
                str(PERL_CLIENT),
                "--endpoint",
                stack.url,
                "--region",
                "us-east-1",
                op,
                json.dumps(body),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )

    put = perl(
        "PutItem", {"TableName": orders, "Item": {"pk": {"S": pk}, "sk": {"S": "p"}, "lang": {"S": "perl"}}}
    )
    assert put.returncode == 0, put.stderr
    get = perl(
        "GetItem", {"TableName": orders, "Key": {"pk": {"S": pk}, "sk": {"S": "p"}}, "ConsistentRead": True}
    )
    assert get.returncode == 0, get.stderr
    assert json.loads(get.stdout)["Item"]["lang"] == {"S": "perl"}
    refused = perl("PutItem", {"TableName": "not-allowed-table", "Item": {"pk": {"S": pk}}})
    assert refused.returncode == 1
    assert "AccessDeniedException" in refused.stderr
    assert home_item(moto_regions["us-east-1"], orders, pk, "p") is not None
    assert home_item(moto_regions["eu-west-1"], orders, pk, "p") is None


# -- refusals ---------------------------------------------------------------------------------------------


def test_table_outside_config_refused(stack: SidecarStack) -> None:
    with pytest.raises(ClientError) as err:
        stack.client().put_item(TableName="secrets", Item={"pk": {"S": "x"}})
    status, code, message = error_of(err.value)
    assert (status, code) == (400, "AccessDeniedException")
    assert "tables" in message
    metrics = stack.metrics()
    assert 'ddb_sidecar_refused_requests_total{reason="AccessDeniedException",region="us-east-1"}' in metrics
    assert 'ddb_sidecar_requests_total{operation="PutItem",region="us-east-1",status="400"}' in metrics


def test_control_plane_refused(stack: SidecarStack) -> None:
    app = stack.client()
    with pytest.raises(ClientError) as err:
        app.create_table(
            TableName="new-table",
            AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
            BillingMode="PAY_PER_REQUEST",
        )
    status, code, message = error_of(err.value)
    assert (status, code) == (400, "AccessDeniedException")
    assert "allow_control_plane" in message
    with pytest.raises(ClientError) as err:
        app.list_tables()
    assert error_of(err.value)[1] == "AccessDeniedException"


def test_transaction_touching_a_foreign_table_refused(
    stack: SidecarStack, orders: str, moto_regions: dict[str, MotoRegion]
) -> None:
    pk = f"tx-{uuid.uuid4().hex[:6]}"
    with pytest.raises(ClientError) as err:
        stack.client().transact_write_items(
            TransactItems=[
                {"Put": {"TableName": orders, "Item": {"pk": {"S": pk}, "sk": {"S": "1"}}}},
                {"Put": {"TableName": "payroll", "Item": {"pk": {"S": pk}}}},
            ]
        )
    assert error_of(err.value)[:2] == (400, "AccessDeniedException")
    assert home_item(moto_regions["us-east-1"], orders, pk, "1") is None, (
        "a refused transaction was partly applied"
    )


def test_partiql_on_foreign_table_refused(stack: SidecarStack, orders: str) -> None:
    app = stack.client()
    with pytest.raises(ClientError) as err:
        app.execute_statement(Statement='SELECT * FROM "payroll"')
    assert error_of(err.value)[1] == "AccessDeniedException"
    # The allowed table goes through.
    app.execute_statement(Statement=f"SELECT * FROM \"{orders}\" WHERE pk = 'nobody'")


@pytest.mark.parametrize(
    ("operation", "request_body", "says"),
    [
        ("PutItem", {"TableName": "@ORDERS@", "Item": {"pk": {"S": "a"}, "sk": {"S": "1"}}, "tablename": "@SECRET@"},
         "keys are case-sensitive"),
        ("TransactWriteItems", {"TransactItems": [
            {"Put": {"TableName": "@ORDERS@", "Item": {"pk": {"S": "a"}, "sk": {"S": "1"}}}},
            {"put": {"TableName": "@SECRET@", "Item": {"pk": {"S": "smuggled"}}}},
        ]}, "TransactItems[1] has a key 'put'"),
        ("ExecuteStatement", {"Statement": "UPDATE \"@ORDERS@\" SET v = 1 WHERE pk = 'a' AND sk = '1'; "
                                           "INSERT INTO \"@SECRET@\" VALUE {'pk': 'smuggled'}"},
         "`;` outside quotes"),
    ],
)  # fmt: skip
def test_requests_smuggling_another_table_past_the_gate_are_refused(
    stack: SidecarStack, orders: str, moto_regions: dict[str, MotoRegion], operation: str,
    request_body: dict[str, Any], says: str,
) -> None:  # fmt: skip
    """A second spelling of a table-bearing key, a lowercase transaction action, a second PartiQL statement:
    each names a table outside `tables`; the gate refuses the request whole (DynamoDB's lenient parser
    is not what keeps them out)."""
    secret = new_app_table([moto_regions["us-east-1"]], "secret")
    raw = json.dumps(request_body).replace("@ORDERS@", orders).replace("@SECRET@", secret)
    status, _, resp = raw_post(
        stack.url, raw.encode(), {"Content-Type": JSON_CT, "X-Amz-Target": f"DynamoDB_20120810.{operation}"}
    )
    doc = json.loads(resp)
    assert (status, doc["__type"].rsplit("#", 1)[-1]) == (400, "ValidationException"), doc
    assert says in doc["message"]
    assert not moto_regions["us-east-1"].client().scan(TableName=secret)["Items"]


@pytest.mark.parametrize(
    ("body", "headers", "code"),
    [
        (b"{not json", {"X-Amz-Target": "DynamoDB_20120810.GetItem"}, "SerializationException"),
        (b"[1, 2]", {"X-Amz-Target": "DynamoDB_20120810.GetItem"}, "SerializationException"),
        (b"{}", {"X-Amz-Target": "DynamoDB_20120810.GetItem"}, "ValidationException"),
        (b"{}", {"X-Amz-Target": "DynamoDB_20120810.NoSuchOperation"}, "UnknownOperationException"),
        (b"{}", {}, "UnknownOperationException"),
        (b"\xff\xfe\x00garbage", {"X-Amz-Target": "DynamoDB_20120810.PutItem"}, "SerializationException"),
    ],
)
def test_malformed_requests_get_dynamodb_errors(
    stack: SidecarStack, body: bytes, headers: dict[str, str], code: str
) -> None:
    status, resp_headers, resp = raw_post(stack.url, body, {"Content-Type": JSON_CT, **headers})
    assert status == 400
    assert resp_headers["Content-Type"].startswith(JSON_CT)
    doc = json.loads(resp)
    assert doc["__type"].rsplit("#", 1)[-1] == code
    assert doc["message"]
    # The daemon keeps serving.
    stack.client().describe_table  # noqa: B018 - attribute access only; the next call proves liveness
    assert stack.status()["regions"]


def test_oversized_body_refused(stack: SidecarStack, orders: str) -> None:
    body = (
        b'{"TableName": "%s", "Item": {"pk": {"S": "' % orders.encode() + b"x" * (17 * 1024 * 1024) + b'"}}}'
    )
    try:
        status, _, resp = raw_post(
            stack.region_url("us-east-1"),
            body,
            {"Content-Type": JSON_CT, "X-Amz-Target": "DynamoDB_20120810.PutItem"},
        )
    except (ConnectionResetError, BrokenPipeError):
        pytest.fail("the listener dropped the connection instead of answering 413")
    assert status == 413
    assert json.loads(resp)["__type"].endswith("#RequestEntityTooLargeException")


def test_garbage_bytes_do_not_crash_listener(stack: SidecarStack, orders: str) -> None:
    port = stack.region_ports["us-east-1"]
    for payload in [
        b"\x00\x01\x02\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
        b"\r\n" * 100,
    ]:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        assert data == b"" or data.startswith(b"HTTP/1.1 4"), data[:200]
    # Still serving real requests.
    stack.client().get_item(TableName=orders, Key={"pk": {"S": "none"}, "sk": {"S": "none"}})


def test_unknown_path_is_404_json(stack: SidecarStack) -> None:
    status, _headers, body = raw_post(
        stack.region_url("us-east-1") + "/admin", b"{}", {"Content-Type": JSON_CT}
    )
    assert status == 404
    assert json.loads(body)["__type"].endswith("#UnknownOperationException")


def test_health_endpoint_per_region(stack: SidecarStack) -> None:
    for name in stack.region_ports:
        with urllib.request.urlopen(f"{stack.region_url(name)}/ddb-sidecar/health", timeout=2) as resp:
            assert resp.status == 200


# -- operator surfaces --------------------------------------------------------------------------------------


def test_status_and_metrics(stack: SidecarStack, orders: str) -> None:
    stack.client().get_item(TableName=orders, Key={"pk": {"S": "m"}, "sk": {"S": "m"}})
    doc = stack.status()
    assert doc["active_region"] == "us-east-1"
    assert doc["mode"] == "automatic"
    by_name = {r["name"]: r for r in doc["regions"]}
    assert by_name["us-east-1"]["weight"] == 100
    assert by_name["eu-west-1"]["weight"] == 0
    assert all(r["state"] == "up" for r in doc["regions"])
    assert doc["replication"]["mode"] == "global-tables"

    cli = subprocess.run(
        [str(Path(sys.executable).parent / "ddb-sidecar"), "status", "--json", "-c", str(stack.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["active_region"] == "us-east-1"

    metrics = stack.metrics()
    assert 'ddb_sidecar_requests_total{operation="GetItem",region="us-east-1",status="200"}' in metrics
    assert 'ddb_sidecar_upstream_latency_seconds_bucket{le="+Inf",region="us-east-1"}' in metrics
    assert 'ddb_sidecar_region_up{region="eu-west-1"} 1.0' in metrics


def test_secrets_never_logged(stack: SidecarStack) -> None:
    secret = stack.env["AWS_SECRET_ACCESS_KEY"]
    log = stack.process.log_path.read_text()
    assert secret not in log
    assert secret not in json.dumps(stack.status())
    assert secret not in stack.metrics()


def test_response_relayed_unchanged(stack: SidecarStack, orders: str) -> None:
    """Status, body, x-amz-crc32 and x-amzn-RequestId come back as the region sent them."""
    import zlib

    body = json.dumps({"TableName": orders, "Key": {"pk": {"S": "crc"}, "sk": {"S": "crc"}}}).encode()
    headers = {"Content-Type": JSON_CT, "X-Amz-Target": "DynamoDB_20120810.GetItem"}
    for url in (stack.url, stack.region_url("us-east-1")):
        status, resp_headers, resp = raw_post(url, body, headers)
        assert status == 200
        assert int(resp_headers["x-amz-crc32"]) == zlib.crc32(resp) & 0xFFFFFFFF
        assert resp_headers["x-amzn-RequestId"]
        assert int(resp_headers["Content-Length"]) == len(resp)


def test_slow_request_on_listener_is_cut_off(stack: SidecarStack) -> None:
    """A client trickling a request straight into a listener gets a 408 and loses the connection."""
    import time

    timeout_http_request = 10.0  # the config default the stack uses
    port = stack.region_ports["us-east-1"]
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_http_request + 5) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        started = time.monotonic()
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        elapsed = time.monotonic() - started
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert timeout_http_request - 1 <= elapsed <= timeout_http_request + 3


def test_oversized_headers_refused(stack: SidecarStack) -> None:
    port = stack.region_ports["us-east-1"]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 70000 + b"\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 431"), data[:200]
    assert b"64 KiB" in data
