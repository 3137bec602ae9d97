"""The example Perl client (examples/perl/ddb_client.pl) signs like a real app.

Against a moto region with signature checking on, its signed calls succeed and a wrongly signed one fails.
A scripted local HTTP stub covers what moto cannot show: retries with backoff, and a signature with a
session token (the moto IAM user may only call DynamoDB, so it cannot get an STS token).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotoCredentials

from tests.support.moto_region import MotoRegion
from tests.support.ports import free_port

PERL = shutil.which("perl")
CLIENT = Path(__file__).resolve().parents[2] / "examples" / "perl" / "ddb_client.pl"

pytestmark = pytest.mark.skipif(PERL is None, reason="perl is not installed (Debian: apt-get install perl)")


@dataclass
class PerlResult:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def run_perl(
    endpoint: str, operation: str, body: Any = None, env: dict[str, str] | None = None, *args: str
) -> PerlResult:
    """Run the client once; `env` holds the AWS_* variables (the caller's own AWS_* are never inherited)."""
    assert PERL is not None
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    argv = [PERL, str(CLIENT), "--endpoint", endpoint, *args, operation]
    if body is not None:
        argv.append(body if isinstance(body, str) else json.dumps(body))
    proc = subprocess.run(argv, env={**base, **(env or {})}, capture_output=True, text=True, timeout=30)
    return PerlResult(proc.returncode, proc.stdout, proc.stderr)


# -- against moto (signature checking on) ----------------------------------------------------------------


def test_put_get_query_signed_by_perl(primary_region: MotoRegion, table_name: str) -> None:
    primary_region.create_table(table_name, pk="pk", sk="sk")  # table set-up is not the client's job
    env = primary_region.env()
    item = {"pk": {"S": "user#1"}, "sk": {"S": "order#7"}, "total": {"N": "42"}, "note": {"S": "héllo"}}

    put = run_perl(primary_region.endpoint, "PutItem", {"TableName": table_name, "Item": item}, env)
    assert put.returncode == 0, put.stderr
    assert put.json() == {}

    # What Perl wrote is really in this region, as boto3 sees it.
    key = {"pk": item["pk"], "sk": item["sk"]}
    assert primary_region.client().get_item(TableName=table_name, Key=key)["Item"] == item

    get = run_perl(primary_region.endpoint, "GetItem", {"TableName": table_name, "Key": key}, env)
    assert get.returncode == 0, get.stderr
    assert get.json() == {"Item": item}

    query = run_perl(
        primary_region.endpoint,
        "Query",
        {
            "TableName": table_name,
            "KeyConditionExpression": "pk = :pk",
            "ExpressionAttributeValues": {":pk": {"S": "user#1"}},
        },
        env,
    )
    assert query.returncode == 0, query.stderr
    assert query.json()["Count"] == 1
    assert query.json()["Items"] == [item]


def test_wrong_secret_is_rejected(primary_region: MotoRegion, table_name: str) -> None:
    env = {**primary_region.env(), "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    result = run_perl(primary_region.endpoint, "ListTables", {}, env, "--retries", "0")
    assert result.returncode == 1
    assert result.stdout == ""
    assert "HTTP 403" in result.stderr
    assert "SignatureDoesNotMatch" in result.stderr


def test_error_response_goes_to_stderr(primary_region: MotoRegion, table_name: str) -> None:
    result = run_perl(
        primary_region.endpoint,
        "GetItem",
        {"TableName": table_name, "Key": {"pk": {"S": "x"}}},  # table never created
        primary_region.env(),
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert "HTTP 400" in result.stderr
    assert "ResourceNotFoundException" in result.stderr


def test_usage_error_exits_2(primary_region: MotoRegion) -> None:
    result = run_perl(primary_region.endpoint, "ListTables", "{not json", primary_region.env())
    assert result.returncode == 2
    assert "not valid JSON" in result.stderr


# -- against a scripted stub ------------------------------------------------------------------------------


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes


class ScriptedServer:
    """An HTTP server on 127.0.0.1 answering (status, JSON body) pairs in order, then the last one forever."""

    def __init__(self, script: list[tuple[int, dict[str, Any]]]) -> None:
        self.script = list(script)
        self.requests: list[Recorded] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                with lock:
                    outer.requests.append(Recorded(self.path, headers, body))
                    status, payload = outer.script[min(len(outer.requests), len(outer.script)) - 1]
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/x-amz-json-1.0")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever,
            kwargs={"poll_interval": 0.02},
            name="scripted-server",
            daemon=True,
        )

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def stub_env() -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_REGION": "eu-west-1"}


def _error(name: str) -> dict[str, str]:
    return {"__type": f"com.amazonaws.dynamodb.v20120810#{name}", "message": name}


@pytest.fixture
def scripted(request: pytest.FixtureRequest) -> Iterator[ScriptedServer]:
    with ScriptedServer(request.param) as server:
        yield server


@pytest.mark.parametrize(
    "scripted",
    [[(503, _error("ServiceUnavailableException")), (400, _error("ThrottlingException")), (200, {"ok": 1})]],
    indirect=True,
)
def test_retries_5xx_and_throttling_then_succeeds(scripted: ScriptedServer, stub_env: dict[str, str]) -> None:
    result = run_perl(scripted.endpoint, "ListTables", {}, stub_env, "--retries", "3")
    assert result.returncode == 0, result.stderr
    assert result.json() == {"ok": 1}
    assert len(scripted.requests) == 3
    assert "HTTP 503 ServiceUnavailableException; retrying" in result.stderr
    assert "HTTP 400 ThrottlingException; retrying" in result.stderr
    # Each attempt is signed afresh.
    assert all(r.headers["authorization"].startswith("AWS4-HMAC-SHA256 ") for r in scripted.requests)


@pytest.mark.parametrize("scripted", [[(500, _error("InternalServerError"))]], indirect=True)
def test_gives_up_after_retries(scripted: ScriptedServer, stub_env: dict[str, str]) -> None:
    result = run_perl(scripted.endpoint, "ListTables", {}, stub_env, "--retries", "2")
    assert result.returncode == 1
    assert len(scripted.requests) == 3  # the first attempt and two retries
    assert "HTTP 500" in result.stderr


@pytest.mark.parametrize("scripted", [[(400, _error("ValidationException"))]], indirect=True)
def test_client_errors_are_not_retried(scripted: ScriptedServer, stub_env: dict[str, str]) -> None:
    result = run_perl(scripted.endpoint, "ListTables", {}, stub_env, "--retries", "3")
    assert result.returncode == 1
    assert len(scripted.requests) == 1
    assert "ValidationException" in result.stderr


@pytest.mark.parametrize("scripted", [[(200, {"TableNames": []})]], indirect=True)
def test_signature_with_session_token_matches_botocore(
    scripted: ScriptedServer, stub_env: dict[str, str]
) -> None:
    env = {**stub_env, "AWS_SESSION_TOKEN": "FwoGZXIvYXdzEXAMPLE//token+with/slashes="}
    body = {"TableName": "orders", "Key": {"pk": {"S": "ünïcode"}}}
    result = run_perl(scripted.endpoint, "GetItem", body, env)
    assert result.returncode == 0, result.stderr

    [sent] = scripted.requests
    assert sent.headers["x-amz-target"] == "DynamoDB_20120810.GetItem"
    assert sent.headers["x-amz-security-token"] == env["AWS_SESSION_TOKEN"]
    algorithm, _, fields = sent.headers["authorization"].partition(" ")
    parts = dict(field.strip().split("=", 1) for field in fields.split(","))
    assert algorithm == "AWS4-HMAC-SHA256"
    amz_date = sent.headers["x-amz-date"]
    assert parts["Credential"] == f"AKIDEXAMPLE/{amz_date[:8]}/eu-west-1/dynamodb/aws4_request"
    signed = parts["SignedHeaders"].split(";")
    assert {"host", "x-amz-date", "x-amz-target", "content-type", "x-amz-security-token"} <= set(signed)

    # botocore recomputes the signature over the same headers, body and time.
    request = AWSRequest(
        method="POST",
        url=f"http://{sent.headers['host']}{sent.path}",
        data=sent.body,
        headers={name: sent.headers[name] for name in signed},
    )
    request.context["timestamp"] = amz_date
    signer = SigV4Auth(
        BotoCredentials(env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], env["AWS_SESSION_TOKEN"]),
        "dynamodb",
        "eu-west-1",
    )
    expected = signer.signature(signer.string_to_sign(request, signer.canonical_request(request)), request)
    assert parts["Signature"] == expected
