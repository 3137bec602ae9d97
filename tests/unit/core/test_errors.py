"""DynamoDB-shaped errors: bodies that every SDK parses, messages that say what to change."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from botocore.parsers import create_parser
from hypothesis import given
from hypothesis import strategies as st

from sidecar.core import errors
from sidecar.core.errors import CONTENT_TYPE, DynamoError

CONSTRUCTED: dict[str, Callable[[], DynamoError]] = {
    "table_not_allowed": lambda: errors.table_not_allowed(["secrets"], ["orders", "users"]),
    "control_plane_refused": lambda: errors.control_plane_refused("DeleteTable"),
    "unknown_operation": lambda: errors.unknown_operation("DynamoDB_20120810.Nope"),
    "unknown_operation_missing": lambda: errors.unknown_operation(None),
    "serialization": lambda: errors.serialization("not valid JSON"),
    "validation": lambda: errors.validation("GetItem: TableName is missing"),
    "body_too_large": lambda: errors.body_too_large(20_000_000, 16_777_216),
    "missing_auth": errors.missing_auth,
    "unrecognized_client": errors.unrecognized_client,
    "invalid_signature": lambda: errors.invalid_signature("signature does not match"),
    "region_unreachable": lambda: errors.region_unreachable("eu-west-1", "connection refused"),
    "upstream_timeout": lambda: errors.upstream_timeout("eu-west-1", 2.5),
    "upstream_failed": lambda: errors.upstream_failed("eu-west-1", "connection reset"),
    "not_found": lambda: errors.not_found("/favicon.ico"),
}

EXPECTED = {
    "table_not_allowed": (400, "AccessDeniedException", errors.CORAL),
    "control_plane_refused": (400, "AccessDeniedException", errors.CORAL),
    "unknown_operation": (400, "UnknownOperationException", errors.CORAL),
    "unknown_operation_missing": (400, "UnknownOperationException", errors.CORAL),
    "serialization": (400, "SerializationException", errors.CORAL),
    "validation": (400, "ValidationException", errors.CORAL_VALIDATE),
    "body_too_large": (413, "RequestEntityTooLargeException", errors.CORAL),
    "missing_auth": (400, "MissingAuthenticationTokenException", errors.CORAL),
    "unrecognized_client": (400, "UnrecognizedClientException", errors.CORAL),
    "invalid_signature": (400, "InvalidSignatureException", errors.CORAL),
    "region_unreachable": (503, "ServiceUnavailableException", "com.amazonaws.dynamodb.v20120810"),
    "upstream_timeout": (500, "InternalServerError", "com.amazonaws.dynamodb.v20120810"),
    "upstream_failed": (500, "InternalServerError", "com.amazonaws.dynamodb.v20120810"),
    "not_found": (404, "UnknownOperationException", errors.CORAL),
}


def botocore_error(error: DynamoError) -> dict[str, str]:
    """What botocore's JSON-protocol parser makes of the response (the code SDK retry logic sees)."""
    parser = create_parser("json")
    parsed = parser.parse(
        {"status_code": error.status, "headers": {"content-type": CONTENT_TYPE}, "body": error.body()}, None
    )
    result: dict[str, str] = parsed["Error"]
    return result


@pytest.mark.parametrize("name", sorted(CONSTRUCTED))
def test_constructed_errors(name: str) -> None:
    error = CONSTRUCTED[name]()
    status, code, namespace = EXPECTED[name]
    assert (error.status, error.code, error.namespace) == (status, code, namespace)
    body = json.loads(error.body())
    assert set(body) == {"__type", "message"}
    assert body["__type"] == f"{namespace}#{code}" == error.type
    assert body["__type"].split("#")[-1] == code
    assert body["message"] == error.message
    assert error.message.strip()
    assert botocore_error(error)["Code"] == code
    assert botocore_error(error)["Message"] == error.message
    assert error.retryable is (status >= 500)


def test_body_is_compact_json() -> None:
    assert DynamoError(400, "ValidationException", "x").body() == (
        b'{"__type":"com.amazon.coral.service#ValidationException","message":"x"}'
    )


@given(st.text(), st.text(min_size=1, alphabet=st.characters(categories=["L", "N"])))
def test_any_message_is_escaped_properly(message: str, code: str) -> None:
    error = DynamoError(400, code, message)
    body = json.loads(error.body())
    assert body == {"__type": f"com.amazon.coral.service#{code}", "message": message}


def test_retryable() -> None:
    assert DynamoError(500, "InternalServerError", "m").retryable
    assert DynamoError(503, "ServiceUnavailableException", "m").retryable
    assert DynamoError(400, "ThrottlingException", "m").retryable
    assert DynamoError(400, "ProvisionedThroughputExceededException", "m").retryable
    assert DynamoError(400, "RequestLimitExceeded", "m").retryable
    assert DynamoError(400, "TransactionInProgressException", "m").retryable
    assert not DynamoError(400, "ValidationException", "m").retryable
    assert not DynamoError(400, "ConditionalCheckFailedException", "m").retryable
    assert not DynamoError(413, "RequestEntityTooLargeException", "m").retryable


def test_throttling_codes_match_botocore() -> None:
    from botocore.retries.standard import ThrottledRetryableChecker

    assert set(ThrottledRetryableChecker._THROTTLED_ERROR_CODES) == errors.THROTTLING_CODES


def test_error_is_frozen() -> None:
    error = errors.missing_auth()
    with pytest.raises(AttributeError):
        error.status = 200  # type: ignore[misc]


def test_table_not_allowed_lists_tables_and_the_config_key() -> None:
    message = errors.table_not_allowed({"zeta", "alpha"}, frozenset({"orders"})).message
    assert "alpha, zeta" in message
    assert "orders" in message
    assert "`tables`" in message


def test_table_not_allowed_truncates_long_lists() -> None:
    message = errors.table_not_allowed([f"t{i:03}" for i in range(100)], []).message
    assert "t000" in message
    assert "and 90 more" in message
    assert "t099" not in message
    assert "(none)" in message
    assert len(message) < 600


def test_control_plane_message_names_the_setting() -> None:
    message = errors.control_plane_refused("DeleteTable").message
    assert "DeleteTable" in message
    assert "proxy.allow_control_plane: true" in message


def test_unknown_operation_messages() -> None:
    assert "missing" in errors.unknown_operation(None).message
    message = errors.unknown_operation("DynamoDB_20120810.Nope").message
    assert "DynamoDB_20120810.Nope" in message
    assert "DynamoDB_20120810.GetItem" in message
    assert len(errors.unknown_operation("x" * 10_000).message) < 400


def test_retry_semantics_are_spelled_out() -> None:
    assert "NOT sent" in errors.region_unreachable("eu-west-1", "refused").message
    assert "safe to retry" in errors.region_unreachable("eu-west-1", "refused").message
    timeout = errors.upstream_timeout("eu-west-1", 2.5).message
    assert "may or may not" in timeout
    assert "2.5 s" in timeout
    assert "may or may not" in errors.upstream_failed("eu-west-1", "reset").message


def test_body_too_large_says_sizes() -> None:
    message = errors.body_too_large(20_000_000, 16_777_216).message
    assert "20000000" in message
    assert "16777216" in message


def test_not_found_drops_the_query_string() -> None:
    error = errors.not_found("/x?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=deadbeef")
    assert "AKIAEXAMPLE" not in error.message
    assert "deadbeef" not in error.message
    assert "'/x'" in error.message
    assert "POST /" in error.message
    assert "X-Amz-Target" in error.message


def test_details_are_clipped() -> None:
    for error in (
        errors.serialization("d" * 5000),
        errors.invalid_signature("d" * 5000),
        errors.region_unreachable("r" * 5000, "d" * 5000),
        errors.upstream_failed("r" * 5000, "d" * 5000),
        errors.not_found("/" + "p" * 5000),
        errors.control_plane_refused("o" * 5000),
    ):
        assert len(error.message) < 800
    assert len(errors.validation("v" * 5000).message) <= 1000


def test_upstream_failure_says_whether_a_retry_is_safe() -> None:
    from sidecar.core.errors import for_upstream_failure

    refused = for_upstream_failure(
        "eu-west-1", sent=False, kind="refused", detail="connect refused", timeout=10
    )
    assert (refused.status, refused.code) == (
        503,
        "ServiceUnavailableException",
    ) and "NOT sent" in refused.message
    slow = for_upstream_failure("eu-west-1", sent=True, kind="timeout", detail="x", timeout=2.5)
    assert (slow.status, slow.code) == (500, "InternalServerError") and "2.5 s" in slow.message
    lost = for_upstream_failure("eu-west-1", sent=True, kind="connection", detail="reset", timeout=10)
    assert lost.status == 500 and "reset" in lost.message and "may or may not" in lost.message
    # A connect that timed out was never sent: still the safe-to-retry answer.
    connect = for_upstream_failure(
        "eu-west-1", sent=False, kind="timeout", detail="connect timed out", timeout=10
    )
    assert connect.status == 503
