"""SigV4 signing and client verification: AWS's published vectors, botocore parity, hostile input."""

from __future__ import annotations

import datetime
import hashlib
import json
import re
from collections.abc import Iterator
from typing import Any
from unittest import mock
from urllib.parse import urlsplit

import boto3
import botocore.auth
import botocore.credentials
import pytest
from botocore.awsrequest import AWSRequest, AWSResponse
from botocore.config import Config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.proxy import sigv4
from sidecar.proxy.sigv4 import (
    EMPTY_SHA256,
    AuthFailure,
    ClientVerifier,
    Credentials,
    DynamoDBRequestSigner,
    amz_date,
    canonical_request,
    derive_signing_key,
    signature,
    string_to_sign,
)

# --- the AWS Signature Version 4 test suite ---------------------------------------------------------
#
# Vectors from AWS's aws-sig-v4-test-suite (2015 edition): credential AKIDEXAMPLE, 20150830T123600Z,
# us-east-1, service "service". The Authorization values are those of the suite as shipped in the AWS
# SDK for JavaScript v3 (packages/signature-v4/src/suite.fixture.ts); the canonical requests and the
# string-to-sign digests are the suite's .creq/.sts files (copies in aws/aws-sdk-ruby
# gems/aws-sigv4/spec/suite and several signer test suites). post-x-www-form-urlencoded is used as in
# its .authz/.sts: its published .creq also lists content-length, which its own .sts and .authz do not.

SUITE_ACCESS_KEY = "AKIDEXAMPLE"
SUITE_SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
SUITE_DATE = "20150830T123600Z"
SUITE_SCOPE = "20150830/us-east-1/service/aws4_request"
SUITE_TOKEN = (
    "AQoDYXdzEPT//////////wEXAMPLEtc764bNrC9SAPBSM22wDOk4x4HIZ8j4FZTwdQWLWsKWHGBuFqwAeMicRXmxfpSPfIeoIYRq"
    "TflfKD8YUuwthAx7mSEI/qkPpKPi/kMcGdQrmGdeehM4IC1NtBmUpp2wUE8phUZampKsburEDy0KPkyQDYwT7WZ0wq5VSXDvp75Y"
    "U9HFvlRd8Tx6q6fE8YQcHNVXAkiY9q6d+xo0rKwT38xVqr7ZD0u0iPPkUL64lIZbqBAz+scqKmlzm8FDrypNC9Yjc8fPOLn9FX9K"
    "SYvKTr4rvx3iSIlTJabIQwj2ICCR/oLxBA=="
)
BASE_HEADERS = [("Host", "example.amazonaws.com"), ("X-Amz-Date", SUITE_DATE)]

# name: (method, canonical path, query, extra headers, body, signed headers, signature)
SUITE: dict[str, tuple[str, str, str, list[tuple[str, str]], bytes, str, str]] = {
    "get-vanilla": (
        "GET", "/", "", [], b"", "host;x-amz-date",
        "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
    ),
    "post-vanilla": (
        "POST", "/", "", [], b"", "host;x-amz-date",
        "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b",
    ),
    "get-vanilla-query-order-key-case": (
        "GET", "/", "Param2=value2&Param1=value1", [], b"", "host;x-amz-date",
        "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500",
    ),
    "get-header-value-trim": (
        "GET", "/", "", [("My-Header1", " value1"), ("My-Header2", ' "a   b   c"')], b"",
        "host;my-header1;my-header2;x-amz-date",
        "acc3ed3afb60bb290fc8d2dd0098b9911fcaa05412b367055dee359757a9c736",
    ),
    "get-header-value-order": (
        "GET", "/", "",
        [("My-Header1", "value4"), ("My-Header1", "value1"), ("My-Header1", "value3"), ("My-Header1", "value2")],
        b"", "host;my-header1;x-amz-date",
        "08c7e5a9acfcfeb3ab6b2185e75ce8b1deb5e634ec47601a50643f830c755c01",
    ),
    "get-utf8": (
        "GET", "/%E1%88%B4", "", [], b"", "host;x-amz-date",
        "8318018e0b0f223aa2bbf98705b62bb787dc9c0e678f255a891fd03141be5d85",
    ),
    "post-header-value-case": (
        "POST", "/", "", [("My-Header1", "VALUE1")], b"", "host;my-header1;x-amz-date",
        "cdbc9802e29d2942e5e10b5bccfdd67c5f22c7c4e8ae67b53629efa58b974b7d",
    ),
    "post-x-www-form-urlencoded": (
        "POST", "/", "", [("Content-Type", "application/x-www-form-urlencoded")], b"Param1=value1",
        "content-type;host;x-amz-date",
        "ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a",
    ),
    "post-sts-header-before": (
        "POST", "/", "", [("X-Amz-Security-Token", SUITE_TOKEN)], b"",
        "host;x-amz-date;x-amz-security-token",
        "85d96828115b5dc0cfc3bd16ad9e210dd772bbebba041836c64533a82be05ead",
    ),
}  # fmt: skip

SUITE_CANONICAL_REQUESTS = {
    "get-vanilla": (
        "GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\n"
        + EMPTY_SHA256
    ),
    "post-vanilla": (
        "POST\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\n"
        + EMPTY_SHA256
    ),
    "get-vanilla-query-order-key-case": (
        "GET\n/\nParam1=value1&Param2=value2\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\n"
        "host;x-amz-date\n" + EMPTY_SHA256
    ),
    "get-header-value-trim": (
        'GET\n/\n\nhost:example.amazonaws.com\nmy-header1:value1\nmy-header2:"a b c"\n'
        "x-amz-date:20150830T123600Z\n\nhost;my-header1;my-header2;x-amz-date\n" + EMPTY_SHA256
    ),
    "get-header-value-order": (
        "GET\n/\n\nhost:example.amazonaws.com\nmy-header1:value4,value1,value3,value2\n"
        "x-amz-date:20150830T123600Z\n\nhost;my-header1;x-amz-date\n" + EMPTY_SHA256
    ),
    "post-x-www-form-urlencoded": (
        "POST\n/\n\ncontent-type:application/x-www-form-urlencoded\nhost:example.amazonaws.com\n"
        "x-amz-date:20150830T123600Z\n\ncontent-type;host;x-amz-date\n"
        "9095672bbd1f56dfc5b65f3e153adc8731a4a654192329106275f4c7b24d0b6e"
    ),
}

# The last line of the published .sts files: the SHA-256 of the canonical request.
SUITE_STS_DIGESTS = {
    "get-vanilla": "bb579772317eb040ac9ed261061d46c1f17a8133879d6129b6e1c25292927e63",
    "post-vanilla": "553f88c9e4d10fc9e109e2aeb65f030801b70c2f6468faca261d401ae622fc87",
    "get-header-value-trim": "a726db9b0df21c14f559d0a978e563112acb1b9e05476f0a6a1c7d68f28605c7",
    "post-x-www-form-urlencoded": "42a5e5bb34198acb3e84da4f085bb7927f2bc277ca766e6d19c73c2154021281",
}


def _suite_canonical(name: str) -> str:
    method, path, query, extra, body, signed, _ = SUITE[name]
    headers = BASE_HEADERS + extra
    return canonical_request(
        method, path, query, headers, signed.split(";"), hashlib.sha256(body).hexdigest()
    )


@pytest.mark.parametrize("name", sorted(SUITE))
def test_aws_suite_authorization(name: str) -> None:
    _, _, _, _, _, signed, expected_signature = SUITE[name]
    sts = string_to_sign(SUITE_DATE, SUITE_SCOPE, _suite_canonical(name))
    key = derive_signing_key(SUITE_SECRET, "20150830", "us-east-1", "service")
    authorization = (
        f"AWS4-HMAC-SHA256 Credential={SUITE_ACCESS_KEY}/{SUITE_SCOPE}, "
        f"SignedHeaders={signed}, Signature={signature(key, sts)}"
    )
    assert authorization == (
        f"AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
        f"SignedHeaders={signed}, Signature={expected_signature}"
    )


@pytest.mark.parametrize("name", sorted(SUITE_CANONICAL_REQUESTS))
def test_aws_suite_canonical_request(name: str) -> None:
    assert _suite_canonical(name) == SUITE_CANONICAL_REQUESTS[name]


@pytest.mark.parametrize("name", sorted(SUITE_STS_DIGESTS))
def test_aws_suite_string_to_sign(name: str) -> None:
    assert string_to_sign(SUITE_DATE, SUITE_SCOPE, _suite_canonical(name)) == (
        f"AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\n{SUITE_STS_DIGESTS[name]}"
    )


def test_aws_documentation_iam_example() -> None:
    """The IAM ListUsers walk-through of the SigV4 documentation: signing key, string to sign, signature."""
    key = derive_signing_key(SUITE_SECRET, "20150830", "us-east-1", "iam")
    assert key.hex() == "c4afb1cc5771d871763a393e44b703571b55cc28424d1a5e86da6ed3c154a4b9"
    creq = canonical_request(
        "GET",
        "/",
        "Action=ListUsers&Version=2010-05-08",
        [
            ("Content-Type", "application/x-www-form-urlencoded; charset=utf-8"),
            ("Host", "iam.amazonaws.com"),
            ("X-Amz-Date", SUITE_DATE),
        ],
        ["content-type", "host", "x-amz-date"],
        EMPTY_SHA256,
    )
    sts = string_to_sign(SUITE_DATE, "20150830/us-east-1/iam/aws4_request", creq)
    assert sts.endswith("\nf536975d06c0309214f805bb90ccff089219ecd68b2577efef23edd43b7e1a59")
    assert signature(key, sts) == "5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7"


def test_canonical_request_rejects_missing_signed_header() -> None:
    with pytest.raises(ValueError, match="my-header"):
        canonical_request("GET", "/", "", BASE_HEADERS, ["host", "my-header", "x-amz-date"], EMPTY_SHA256)


def test_derive_signing_key_is_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = sigv4._derive
    monkeypatch.setattr(sigv4, "_derive", lambda *a: calls.append(a) or real(*a))
    derive_signing_key.cache_clear()
    for _ in range(3):
        derive_signing_key("secret", "20240101", "eu-west-1", "dynamodb")
    derive_signing_key("secret", "20240102", "eu-west-1", "dynamodb")
    assert len(calls) == 2
    assert derive_signing_key.cache_info().maxsize == 64


# --- botocore parity ---------------------------------------------------------------------------------

NOW = 1_717_243_199.25  # 2024-06-01T11:59:59.25Z
TARGET = "DynamoDB_20120810.PutItem"
BODIES = {
    "empty": b"",
    "small": b'{"TableName":"t","Item":{"pk":{"S":"1"}}}',
    "unicode": json.dumps(
        {"TableName": "t", "Item": {"pk": {"S": "é€😀 \u2028"}}}, ensure_ascii=False
    ).encode(),
    "1k": json.dumps({"TableName": "t", "Item": {"pk": {"S": "x" * 990}}}).encode(),
}
CREDS = Credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
TEMP_CREDS = Credentials(
    "ASIAIOSFODNN7EXAMPLE", "je7MtGbClwBF/2Zp9Utk/h3yCo8nvbEXAMPLEKEY", "FwoGZXIvYXdzEBYaDH+/="
)


def _freeze_botocore_clock(monkeypatch: pytest.MonkeyPatch, now: float) -> None:
    """botocore takes the signing time from get_current_datetime() (older: datetime.utcnow())."""
    frozen = datetime.datetime.fromtimestamp(int(now), datetime.UTC).replace(tzinfo=None)
    if hasattr(botocore.auth, "get_current_datetime"):
        monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda *a, **k: frozen)
    else:  # pragma: no cover - botocore < 1.35
        fake = mock.Mock(wraps=datetime.datetime)
        fake.utcnow.return_value = frozen
        monkeypatch.setattr(botocore.auth.datetime, "datetime", fake)


def _botocore_sign(
    creds: Credentials,
    region: str,
    url: str,
    target: str,
    body: bytes,
    extra_headers: dict[str, str] | None = None,
) -> list[tuple[str, str]]:
    """Sign like a botocore client and return the headers as they go on the wire (Host included)."""
    request = AWSRequest(
        method="POST",
        url=url,
        data=body,
        headers={"Content-Type": sigv4.JSON_CONTENT_TYPE, "X-Amz-Target": target, **(extra_headers or {})},
    )
    botocore_creds = botocore.credentials.Credentials(creds.access_key, creds.secret_key, creds.token)
    botocore.auth.SigV4Auth(botocore_creds, "dynamodb", region).add_auth(request)
    headers = [(k, v.decode("latin-1") if isinstance(v, bytes) else v) for k, v in request.headers.items()]
    return [
        ("Host", urlsplit(url).netloc),
        *headers,
        ("Content-Length", str(len(body))),
        ("User-Agent", "test"),
    ]


def _parse_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    assert head.endswith(b"\r\n\r\n")
    lines = head[:-4].decode("ascii").split("\r\n")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(": ")
        assert sep, line
        headers.append((name, value))
    return lines[0], headers


def _header(headers: list[tuple[str, str]], name: str) -> str | None:
    found = [v for k, v in headers if k.lower() == name.lower()]
    assert len(found) <= 1
    return found[0] if found else None


@pytest.mark.parametrize("body_name", sorted(BODIES))
@pytest.mark.parametrize("creds", [CREDS, TEMP_CREDS], ids=["static", "session-token"])
@pytest.mark.parametrize(
    ("region", "host", "url"),
    [
        ("us-east-1", "dynamodb.us-east-1.amazonaws.com", "https://dynamodb.us-east-1.amazonaws.com/"),
        ("eu-west-1", "dynamodb.eu-west-1.amazonaws.com", "https://dynamodb.eu-west-1.amazonaws.com/"),
        ("ap-southeast-2", "127.0.0.1:5001", "http://127.0.0.1:5001/"),
    ],
)
def test_signer_matches_botocore(
    monkeypatch: pytest.MonkeyPatch, region: str, host: str, url: str, creds: Credentials, body_name: str
) -> None:
    body = BODIES[body_name]
    _freeze_botocore_clock(monkeypatch, NOW)
    expected = _botocore_sign(creds, region, url, TARGET, body)

    request_line, headers = _parse_head(
        DynamoDBRequestSigner(region, host).request_head(creds, TARGET, body, NOW)
    )

    assert request_line == "POST / HTTP/1.1"
    for name in ("Host", "X-Amz-Date", "X-Amz-Security-Token", "Authorization", "Content-Length"):
        assert _header(headers, name) == _header(expected, name), name
    assert _header(headers, "Authorization") is not None


def test_request_head_layout() -> None:
    signer = DynamoDBRequestSigner(
        "eu-west-1", "dynamodb.eu-west-1.amazonaws.com", user_agent="ddb-sidecar/1.0"
    )
    body = BODIES["unicode"]
    request_line, headers = _parse_head(signer.request_head(TEMP_CREDS, TARGET, body, NOW))
    assert request_line == "POST / HTTP/1.1"
    assert [name for name, _ in headers] == [
        "Host",
        "Content-Type",
        "X-Amz-Target",
        "X-Amz-Date",
        "X-Amz-Security-Token",
        "Authorization",
        "Content-Length",
        "User-Agent",
    ]
    values = dict(headers)
    assert values["Content-Type"] == "application/x-amz-json-1.0"
    assert values["X-Amz-Target"] == TARGET
    assert values["X-Amz-Date"] == "20240601T115959Z"
    assert values["X-Amz-Security-Token"] == TEMP_CREDS.token
    assert values["Content-Length"] == str(len(body))
    assert values["User-Agent"] == "ddb-sidecar/1.0"
    assert values["Authorization"].startswith(
        "AWS4-HMAC-SHA256 Credential=ASIAIOSFODNN7EXAMPLE/20240601/eu-west-1/dynamodb/aws4_request, "
        "SignedHeaders=content-type;host;x-amz-date;x-amz-security-token;x-amz-target, Signature="
    )
    _, headers = _parse_head(signer.request_head(CREDS, TARGET, b"", NOW))
    assert "X-Amz-Security-Token" not in dict(headers)
    assert "SignedHeaders=content-type;host;x-amz-date;x-amz-target," in dict(headers)["Authorization"]


def test_signer_follows_clock_and_credential_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    derived = []
    real = sigv4._derive
    monkeypatch.setattr(sigv4, "_derive", lambda *a: derived.append(a[1]) or real(*a))
    derive_signing_key.cache_clear()
    signer = DynamoDBRequestSigner("us-east-1", "dynamodb.us-east-1.amazonaws.com")

    def date_and_auth(creds: Credentials, now: float) -> tuple[str, str]:
        values = dict(_parse_head(signer.request_head(creds, TARGET, b"{}", now))[1])
        return values["X-Amz-Date"], values["Authorization"]

    first = date_and_auth(CREDS, NOW)
    assert date_and_auth(CREDS, NOW + 0.5) == first  # same second: same date, same signature
    assert date_and_auth(CREDS, NOW + 0.6)[0] == "20240601T115959Z"
    # Credentials rotated within the same second: a new key, never the cached one.
    rotated = date_and_auth(TEMP_CREDS, NOW + 0.65)
    assert "Credential=ASIAIOSFODNN7EXAMPLE/" in rotated[1]
    assert date_and_auth(Credentials(*CREDS), NOW + 0.7) == first  # equal, not identical: still cached
    date, auth = date_and_auth(CREDS, NOW + 1)
    assert date == "20240601T120000Z"
    assert auth != first[1]
    date, auth = date_and_auth(CREDS, NOW + 86_400)
    assert date == "20240602T115959Z"
    assert "/20240602/us-east-1/dynamodb/aws4_request" in auth
    # One derivation per (secret, day): two secrets on day one, one on day two.
    assert derived == ["20240601", "20240601", "20240602"]


@pytest.mark.parametrize(
    "target",
    [
        "DynamoDB_20120810.PutItem\r\nX-Evil: 1",
        "DynamoDB_20120810.PutItem\nX-Evil: 1",
        "DynamoDB_20120810.PutItem\r",
        "DynamoDB_20120810.Put\x00Item",
        "DynamoDB_20120810.PutItem ",
        "DynamoDB_20120810.PutItém",
        "",
    ],
)
def test_signer_rejects_header_injection_in_target(target: str) -> None:
    signer = DynamoDBRequestSigner("us-east-1", "dynamodb.us-east-1.amazonaws.com")
    for _ in range(2):  # a rejected target must not end up in the cache
        with pytest.raises(ValueError, match="X-Amz-Target"):
            signer.request_head(CREDS, target, b"{}", NOW)


@pytest.mark.parametrize("host", ["evil\r\nX-Evil: 1", "a.example\n", "a\x00b", "a b", ""])
def test_signer_rejects_bad_host(host: str) -> None:
    with pytest.raises(ValueError, match="host"):
        DynamoDBRequestSigner("us-east-1", host)


@pytest.mark.parametrize(
    "creds",
    [
        Credentials("AKID\r\nX-Evil: 1", "s"),
        Credentials("AKID", "s", "token\r\nX-Evil: 1"),
        Credentials("AKID", "s", "tok\x00en"),
    ],
)
def test_signer_rejects_header_injection_in_credentials(creds: Credentials) -> None:
    signer = DynamoDBRequestSigner("us-east-1", "dynamodb.us-east-1.amazonaws.com")
    with pytest.raises(ValueError):
        signer.request_head(creds, TARGET, b"{}", NOW)


def test_credentials_repr_hides_secrets() -> None:
    for text in (repr(TEMP_CREDS), str(TEMP_CREDS), f"{TEMP_CREDS}", "%s" % (TEMP_CREDS,)):  # noqa: UP031
        assert TEMP_CREDS.secret_key not in text
        assert str(TEMP_CREDS.token) not in text
        assert TEMP_CREDS.access_key in text
    assert "token=None" in repr(CREDS)


def test_amz_date() -> None:
    assert amz_date(1440938160.9) == "20150830T123600Z"


# --- ClientVerifier ----------------------------------------------------------------------------------

CLIENT = Credentials("AKIDCLIENTEXAMPLE", "client/secret+EXAMPLEKEY")
CLIENT_KEYS = {CLIENT.access_key: CLIENT.secret_key, "AKIDOTHER": "other-secret"}
CLIENT_URL = "http://127.0.0.1:8000/"
HEX64 = re.compile(r"[0-9a-f]{64}")


def _assert_discreet(failure: AuthFailure | None, body: bytes = b"") -> AuthFailure:
    """A failure that gives away no secret, no signature and no body."""
    assert failure is not None
    assert failure.code in {
        "MissingAuthenticationTokenException",
        "UnrecognizedClientException",
        "InvalidSignatureException",
    }
    for secret in (CLIENT.secret_key, "other-secret"):
        assert secret not in failure.message
    assert not HEX64.search(failure.message)
    if len(body) > 3:
        assert body.decode("utf-8", "replace") not in failure.message
    return failure


@pytest.fixture
def signed_request(monkeypatch: pytest.MonkeyPatch) -> tuple[list[tuple[str, str]], bytes]:
    _freeze_botocore_clock(monkeypatch, NOW)
    body = BODIES["unicode"]
    return _botocore_sign(CLIENT, "eu-central-1", CLIENT_URL, TARGET, body), body


def test_verifier_accepts_botocore_signature(signed_request: tuple[list[tuple[str, str]], bytes]) -> None:
    headers, body = signed_request
    verifier = ClientVerifier(CLIENT_KEYS)
    assert verifier.verify("POST", "/", "", headers, body, NOW) is None
    # Header names in any case, as a proxy may deliver them.
    assert verifier.verify("POST", "/", "", [(k.upper(), v) for k, v in headers], body, NOW) is None
    assert verifier.verify("POST", "/", "", [(k.lower(), v) for k, v in headers], body, NOW) is None


@pytest.mark.parametrize("token", [None, "FwoGZXIvYXdzEBYaDH+/="])
def test_verifier_accepts_boto3_client_request(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any, token: str | None
) -> None:
    """A real boto3 DynamoDB client's request, captured as prepared just before it would be sent."""
    empty = tmp_path / "empty"
    empty.write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    session = boto3.session.Session(
        aws_access_key_id=CLIENT.access_key,
        aws_secret_access_key=CLIENT.secret_key,
        aws_session_token=token,
        region_name="sa-east-1",
    )
    client = session.client(
        "dynamodb",
        endpoint_url="http://127.0.0.1:8000",
        config=Config(retries={"total_max_attempts": 1, "mode": "standard"}),
    )
    captured = []

    class _Raw:
        def stream(self, **_: Any) -> Iterator[bytes]:
            yield b"{}"

    def before_send(request: Any, **_: Any) -> AWSResponse:
        captured.append(request)
        return AWSResponse(request.url, 200, {}, _Raw())

    client.meta.events.register("before-send.dynamodb.PutItem", before_send)
    client.put_item(TableName="t", Item={"pk": {"S": "é😀"}})
    client.close()

    (request,) = captured
    headers = [("Host", urlsplit(request.url).netloc)]
    headers += [(k, v.decode("latin-1") if isinstance(v, bytes) else v) for k, v in request.headers.items()]
    body = request.body
    assert ("X-Amz-Security-Token" in dict(headers)) == (token is not None)
    verifier = ClientVerifier({CLIENT.access_key: CLIENT.secret_key})
    now = datetime.datetime.strptime(dict(headers)["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(
        tzinfo=datetime.UTC
    )
    assert verifier.verify("POST", "/", "", headers, body, now.timestamp() + 2) is None
    _assert_discreet(verifier.verify("POST", "/", "", headers, body + b" ", now.timestamp()), body)


def test_verifier_accepts_sidecar_signature() -> None:
    """The signer's own output verifies: the two halves agree on the algorithm."""
    signer = DynamoDBRequestSigner("us-west-2", "127.0.0.1:5001")
    body = BODIES["1k"]
    _, headers = _parse_head(signer.request_head(TEMP_CREDS, TARGET, body, NOW))
    verifier = ClientVerifier({TEMP_CREDS.access_key: TEMP_CREDS.secret_key})
    assert verifier.verify("POST", "/", "", headers, body, NOW) is None


def test_verifier_rejects_tampered_body(signed_request: tuple[list[tuple[str, str]], bytes]) -> None:
    headers, body = signed_request
    tampered = body.replace(b"t", b"u", 1)
    failure = _assert_discreet(
        ClientVerifier(CLIENT_KEYS).verify("POST", "/", "", headers, tampered, NOW), body
    )
    assert failure.code == "InvalidSignatureException"
    assert "does not match" in failure.message


def test_verifier_rejects_tampered_headers(signed_request: tuple[list[tuple[str, str]], bytes]) -> None:
    headers, body = signed_request
    verifier = ClientVerifier(CLIENT_KEYS)
    swapped = [(k, "DynamoDB_20120810.DeleteTable" if k == "X-Amz-Target" else v) for k, v in headers]
    assert (
        _assert_discreet(verifier.verify("POST", "/", "", swapped, body, NOW)).code
        == "InvalidSignatureException"
    )
    other_host = [(k, "dynamodb.eu-central-1.amazonaws.com" if k == "Host" else v) for k, v in headers]
    assert (
        _assert_discreet(verifier.verify("POST", "/", "", other_host, body, NOW)).code
        == "InvalidSignatureException"
    )
    assert (
        _assert_discreet(verifier.verify("POST", "/x", "", headers, body, NOW)).code
        == "InvalidSignatureException"
    )
    assert (
        _assert_discreet(verifier.verify("GET", "/", "", headers, body, NOW)).code
        == "InvalidSignatureException"
    )
    assert (
        _assert_discreet(verifier.verify("POST", "/", "a=b", headers, body, NOW)).code
        == "InvalidSignatureException"
    )


def test_verifier_rejects_wrong_secret(signed_request: tuple[list[tuple[str, str]], bytes]) -> None:
    headers, body = signed_request
    verifier = ClientVerifier({CLIENT.access_key: "not-the-secret"})
    failure = _assert_discreet(verifier.verify("POST", "/", "", headers, body, NOW), body)
    assert failure.code == "InvalidSignatureException"
    assert "not-the-secret" not in failure.message


def test_verifier_rejects_unknown_key(signed_request: tuple[list[tuple[str, str]], bytes]) -> None:
    headers, body = signed_request
    failure = _assert_discreet(ClientVerifier({"AKIDOTHER": "x"}).verify("POST", "/", "", headers, body, NOW))
    assert failure.code == "UnrecognizedClientException"


def test_verifier_missing_authorization(signed_request: tuple[list[tuple[str, str]], bytes]) -> None:
    headers, body = signed_request
    without = [(k, v) for k, v in headers if k.lower() != "authorization"]
    failure = _assert_discreet(ClientVerifier(CLIENT_KEYS).verify("POST", "/", "", without, body, NOW))
    assert failure.code == "MissingAuthenticationTokenException"


@pytest.mark.parametrize("missing", ["X-Amz-Date", "X-Amz-Target", "Host", "Content-Type"])
def test_verifier_missing_signed_header(
    signed_request: tuple[list[tuple[str, str]], bytes], missing: str
) -> None:
    headers, body = signed_request
    without = [(k, v) for k, v in headers if k != missing]
    failure = _assert_discreet(ClientVerifier(CLIENT_KEYS).verify("POST", "/", "", without, body, NOW))
    assert failure.code == "InvalidSignatureException"


@pytest.mark.parametrize(
    ("skew", "accepted"), [(-299, True), (299, True), (301, False), (-301, False), (86_400, False)]
)
def test_verifier_clock_skew(
    signed_request: tuple[list[tuple[str, str]], bytes], skew: float, accepted: bool
) -> None:
    headers, body = signed_request
    failure = ClientVerifier(CLIENT_KEYS, max_skew=300).verify(
        "POST", "/", "", headers, body, int(NOW) + skew
    )
    if accepted:
        assert failure is None
    else:
        assert "expired" in _assert_discreet(failure).message


def _manual_sign(
    headers: list[tuple[str, str]],
    body: bytes,
    *,
    date: str,
    scope_date: str | None = None,
    signed: list[str] | None = None,
    creds: Credentials = CLIENT,
    region: str = "us-east-1",
) -> list[tuple[str, str]]:
    """Sign with the generic functions, allowing requests no SDK would produce."""
    headers = [*headers, ("X-Amz-Date", date)]
    signed = signed if signed is not None else sorted({k.lower() for k, _ in headers})
    scope = f"{scope_date or date[:8]}/{region}/dynamodb/aws4_request"
    creq = canonical_request("POST", "/", "", headers, signed, hashlib.sha256(body).hexdigest())
    key = derive_signing_key(creds.secret_key, scope[:8], region, "dynamodb")
    sig = signature(key, string_to_sign(date, scope, creq))
    auth = f"AWS4-HMAC-SHA256 Credential={creds.access_key}/{scope}, SignedHeaders={';'.join(signed)}, Signature={sig}"
    return [*headers, ("Authorization", auth)]


BASE_CLIENT_HEADERS = [
    ("Host", "127.0.0.1:8000"),
    ("Content-Type", sigv4.JSON_CONTENT_TYPE),
    ("X-Amz-Target", TARGET),
]


def test_manual_signature_is_accepted() -> None:
    """Control for the tests below: the same construction, done right, verifies."""
    headers = _manual_sign(BASE_CLIENT_HEADERS, b"{}", date=amz_date(NOW))
    assert ClientVerifier(CLIENT_KEYS).verify("POST", "/", "", headers, b"{}", NOW) is None
    # Repeated headers are joined in order, and comma-less Authorization separators are accepted.
    repeated = _manual_sign(
        [*BASE_CLIENT_HEADERS, ("X-Custom", "a"), ("x-custom", " b  c ")], b"", date=amz_date(NOW)
    )
    compact = [(k, v.replace(", ", ",") if k == "Authorization" else v) for k, v in repeated]
    assert ClientVerifier(CLIENT_KEYS).verify("POST", "/", "", compact, b"", NOW) is None


def test_verifier_rejects_scope_date_mismatch() -> None:
    headers = _manual_sign(BASE_CLIENT_HEADERS, b"{}", date=amz_date(NOW), scope_date="20240531")
    failure = _assert_discreet(ClientVerifier(CLIENT_KEYS).verify("POST", "/", "", headers, b"{}", NOW))
    assert "scope date" in failure.message


def test_verifier_requires_host_to_be_signed() -> None:
    headers = _manual_sign(
        BASE_CLIENT_HEADERS, b"{}", date=amz_date(NOW), signed=["content-type", "x-amz-date", "x-amz-target"]
    )
    failure = _assert_discreet(ClientVerifier(CLIENT_KEYS).verify("POST", "/", "", headers, b"{}", NOW))
    assert "host" in failure.message


def test_verifier_rejects_unsorted_signed_headers() -> None:
    headers = _manual_sign(
        BASE_CLIENT_HEADERS,
        b"{}",
        date=amz_date(NOW),
        signed=["x-amz-target", "host", "content-type", "x-amz-date"],
    )
    _assert_discreet(ClientVerifier(CLIENT_KEYS).verify("POST", "/", "", headers, b"{}", NOW))


def test_verifier_accepts_any_region() -> None:
    verifier = ClientVerifier(CLIENT_KEYS)
    for region in ("us-east-1", "eu-west-3", "local"):
        headers = _manual_sign(BASE_CLIENT_HEADERS, b"{}", date=amz_date(NOW), region=region)
        assert verifier.verify("POST", "/", "", headers, b"{}", NOW) is None


def test_verifier_content_sha256_header(monkeypatch: pytest.MonkeyPatch) -> None:
    _freeze_botocore_clock(monkeypatch, NOW)
    body = b'{"TableName":"t"}'
    digest = hashlib.sha256(body).hexdigest()
    verifier = ClientVerifier(CLIENT_KEYS)
    headers = _botocore_sign(CLIENT, "us-east-1", CLIENT_URL, TARGET, body, {"X-Amz-Content-SHA256": digest})
    assert "x-amz-content-sha256" in dict(headers)["Authorization"]
    assert verifier.verify("POST", "/", "", headers, body, NOW) is None
    # A body swapped under a matching signature and an unchanged declared hash is still caught.
    failure = _assert_discreet(verifier.verify("POST", "/", "", headers, b'{"TableName":"u"}', NOW))
    assert "X-Amz-Content-Sha256" in failure.message
    # A declared hash that lies about the body (signed, and not signed) is refused.
    lying = _botocore_sign(
        CLIENT, "us-east-1", CLIENT_URL, TARGET, body, {"X-Amz-Content-SHA256": EMPTY_SHA256}
    )
    _assert_discreet(verifier.verify("POST", "/", "", lying, body, NOW))


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("X-Amz-Target", TARGET + "\r\nX-Evil: 1"),
        ("X-Amz-Target", TARGET + "\n"),
        ("X-Amz-Target", TARGET + "\x00"),
        ("X-Evil\r\nX-More", "1"),
    ],
)
def test_verifier_rejects_header_injection(name: str, value: str) -> None:
    """Even a correctly signed request is refused when a header carries CR, LF or NUL."""
    headers = [(k, v) for k, v in BASE_CLIENT_HEADERS if k != name] + [(name, value)]
    signed = _manual_sign(headers, b"{}", date=amz_date(NOW))
    failure = _assert_discreet(ClientVerifier(CLIENT_KEYS).verify("POST", "/", "", signed, b"{}", NOW))
    assert failure.code == "InvalidSignatureException"


def test_verifier_rejects_injection_in_authorization(
    signed_request: tuple[list[tuple[str, str]], bytes],
) -> None:
    headers, body = signed_request
    evil = [(k, v + "\r\nX-Evil: 1" if k == "Authorization" else v) for k, v in headers]
    _assert_discreet(ClientVerifier(CLIENT_KEYS).verify("POST", "/", "", evil, body, NOW))


def test_verifier_rejects_two_authorization_headers(
    signed_request: tuple[list[tuple[str, str]], bytes],
) -> None:
    headers, body = signed_request
    doubled = [*headers, ("authorization", dict(headers)["Authorization"])]
    _assert_discreet(ClientVerifier(CLIENT_KEYS).verify("POST", "/", "", doubled, body, NOW))


def test_verifier_derives_keys_once(
    monkeypatch: pytest.MonkeyPatch, signed_request: tuple[list[tuple[str, str]], bytes]
) -> None:
    headers, body = signed_request
    calls = []
    real = sigv4._derive
    monkeypatch.setattr(sigv4, "_derive", lambda *a: calls.append(a[1:]) or real(*a))
    verifier = ClientVerifier(CLIENT_KEYS)
    for _ in range(5):
        assert verifier.verify("POST", "/", "", headers, body, NOW) is None
    assert calls == [("20240601", "eu-central-1", "dynamodb")]


@pytest.mark.parametrize(
    "authorization",
    [
        "",
        "AWS4-HMAC-SHA256",
        "AWS4-HMAC-SHA256 ",
        "AWS AKIDCLIENTEXAMPLE:c2lnbmF0dXJl",
        "AWS4-HMAC-SHA1 Credential=AKIDCLIENTEXAMPLE/20240601/us-east-1/dynamodb/aws4_request, "
        "SignedHeaders=host, Signature=" + "0" * 64,
        "AWS4-HMAC-SHA256 Credential=AKIDCLIENTEXAMPLE/20240601/us-east-1/dynamodb/aws4_request, "
        "SignedHeaders=host;x-amz-date, Signature=" + "G" * 64,
        "AWS4-HMAC-SHA256 Credential=AKIDCLIENTEXAMPLE/20240601/us-east-1/dynamodb, "
        "SignedHeaders=host;x-amz-date, Signature=" + "0" * 64,
        "AWS4-HMAC-SHA256 Credential=AKIDCLIENTEXAMPLE/20240601/us-east-1/dynamodb/aws4_request, "
        "Credential=AKIDCLIENTEXAMPLE/20240601/us-east-1/dynamodb/aws4_request, Signature=" + "0" * 64,
        "AWS4-HMAC-SHA256 Credential=AKIDCLIENTEXAMPLE/20240601/us-east-1/dynamodb/aws4_request, "
        "SignedHeaders=host;x-amz-date, Signature=" + "é" * 64,
    ],
)
def test_verifier_malformed_authorization(authorization: str) -> None:
    headers = [*BASE_CLIENT_HEADERS, ("X-Amz-Date", amz_date(NOW)), ("Authorization", authorization)]
    failure = _assert_discreet(ClientVerifier(CLIENT_KEYS).verify("POST", "/", "", headers, b"{}", NOW))
    assert failure.code == "InvalidSignatureException"


_SIGNED_NAMES = st.sampled_from(
    ["host", "x-amz-date", "x-amz-target", "content-type", "Host", "", "x-missing"]
)
_ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=80)  # surrogates included
_AUTHORIZATIONS = st.one_of(
    _ANY_TEXT,
    st.builds(
        lambda key, date, region, signed, sig, sep: (
            f"AWS4-HMAC-SHA256 Credential={key}/{date}/{region}/dynamodb/aws4_request{sep}"
            f"SignedHeaders={';'.join(signed)}{sep}Signature={sig}"
        ),
        st.sampled_from([CLIENT.access_key, "AKIDOTHER", "", "AKID/X"]),
        st.sampled_from(["20240601", "20240531", "", "2024060"]),
        st.one_of(st.just("us-east-1"), _ANY_TEXT),
        st.lists(_SIGNED_NAMES, max_size=5),
        st.one_of(st.text("0123456789abcdef", min_size=64, max_size=64), _ANY_TEXT),
        st.sampled_from([", ", ",", " , ", ";"]),
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    authorization=_AUTHORIZATIONS,
    date=st.one_of(st.just(amz_date(NOW)), _ANY_TEXT),
    extra=st.lists(st.tuples(_ANY_TEXT, _ANY_TEXT), max_size=4),
    method=st.sampled_from(["POST", "GET", "", "pOsT"]),
    path=st.one_of(st.just("/"), _ANY_TEXT),
    query=st.one_of(st.just(""), _ANY_TEXT),
    body=st.binary(max_size=64),
)
def test_verifier_never_raises_on_garbage(
    authorization: str,
    date: str,
    extra: list[tuple[str, str]],
    method: str,
    path: str,
    query: str,
    body: bytes,
) -> None:
    headers = [*BASE_CLIENT_HEADERS, ("X-Amz-Date", date), ("Authorization", authorization), *extra]
    failure = ClientVerifier(CLIENT_KEYS).verify(method, path, query, headers, body, NOW)
    _assert_discreet(failure)


_VALID_BODY = b'{"TableName":"t","Key":{"pk":{"S":"1"}}}'
_VALID_HEADERS = _manual_sign(BASE_CLIENT_HEADERS, _VALID_BODY, date=amz_date(NOW))


def test_empty_date_is_malformed_not_expired() -> None:
    headers = [(k, "" if k == "X-Amz-Date" else v) for k, v in _VALID_HEADERS]
    failure = _assert_discreet(ClientVerifier(CLIENT_KEYS).verify("POST", "/", "", headers, _VALID_BODY, NOW))
    assert "malformed X-Amz-Date" in failure.message


@settings(max_examples=300, deadline=None)
@given(
    index=st.integers(0, len(_VALID_HEADERS) - 1),
    value=st.text(st.characters(exclude_categories=()), max_size=40),
    body=st.one_of(st.just(_VALID_BODY), st.binary(max_size=64)),
)
def test_verifier_rejects_any_change_to_a_signed_request(index: int, value: str, body: bytes) -> None:
    """Change one header value or the body of a correctly signed request: it is refused, never raises."""
    name, old = _VALID_HEADERS[index]
    unchanged = " ".join(value.split()) == " ".join(old.split()) and body == _VALID_BODY
    if name == "Authorization":  # whitespace is not insignificant inside the signature
        unchanged = value.strip() == old.strip() and body == _VALID_BODY
    headers = [(k, value if i == index else v) for i, (k, v) in enumerate(_VALID_HEADERS)]
    failure = ClientVerifier(CLIENT_KEYS).verify("POST", "/", "", headers, body, NOW)
    if unchanged:
        assert failure is None
    else:
        _assert_discreet(failure)


def test_the_apps_user_agent_is_kept_sanitized_and_each_change_is_seen() -> None:
    signer = DynamoDBRequestSigner(
        "us-east-1", "dynamodb.us-east-1.amazonaws.com", user_agent="ddb-sidecar/1"
    )
    creds = Credentials("AKIDEXAMPLE", "secret")

    def ua(app: bytes | None) -> bytes:
        head = signer.request_head(creds, "DynamoDB_20120810.GetItem", b"{}", 1_700_000_000, app)
        return next(line for line in head.split(b"\r\n") if line.startswith(b"User-Agent: "))

    assert ua(None) == b"User-Agent: ddb-sidecar/1"
    assert ua(b"Paws/0.44\x01\x7f") == b"User-Agent: Paws/0.44 ddb-sidecar/1"  # control bytes dropped
    assert ua(b"Paws/0.44\x01\x7f") == b"User-Agent: Paws/0.44 ddb-sidecar/1"  # the cached answer
    assert ua(b"boto3/1.35") == b"User-Agent: boto3/1.35 ddb-sidecar/1"  # another app's, not the cached one
    assert ua(b"\x01\x02") == b"User-Agent: ddb-sidecar/1"


def test_a_known_payload_hash_signs_exactly_as_hashing_the_body() -> None:
    import hashlib

    signer = DynamoDBRequestSigner("us-east-1", "dynamodb.us-east-1.amazonaws.com")
    body = b'{"TableName": "orders"}' * 1000
    known = hashlib.sha256(body).hexdigest()
    assert signer.request_head(CREDS, TARGET, body, NOW, None, known) == signer.request_head(
        CREDS, TARGET, body, NOW
    )
    assert signer.request_head(CREDS, TARGET, body, NOW, None, "0" * 64) != signer.request_head(
        CREDS, TARGET, body, NOW
    )
