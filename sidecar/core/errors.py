"""DynamoDB-shaped errors that the sidecar itself produces.

Every AWS SDK parses ``{"__type": "namespace#Code", "message": "..."}`` and retries on the code as it
would with AWS, so the proxy answers in exactly that shape. Messages say what to change; they never
contain secrets or request bodies (callers pass only short, non-secret details).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import orjson

CONTENT_TYPE: Final = "application/x-amz-json-1.0"

CORAL: Final = "com.amazon.coral.service"
CORAL_VALIDATE: Final = "com.amazon.coral.validate"
DYNAMODB: Final = "com.amazonaws.dynamodb.v20120810"

# botocore's standard retry mode treats these codes as throttling (botocore/retries/standard.py).
THROTTLING_CODES: Final = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "TransactionInProgressException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "LimitExceededException",
        "RequestThrottled",
        "SlowDown",
        "PriorRequestNotComplete",
        "EC2ThrottledException",
    }
)

_MAX_DETAIL: Final = 200
_MAX_LISTED: Final = 10


@dataclass(frozen=True, slots=True)
class DynamoError:
    """An error response: HTTP status, short code (``ValidationException``), message, namespace."""

    status: int
    code: str
    message: str
    namespace: str = CORAL

    @property
    def type(self) -> str:
        """The ``__type`` value: ``namespace#Code``."""
        return f"{self.namespace}#{self.code}"

    def body(self) -> bytes:
        """The compact JSON body, as DynamoDB sends it."""
        return orjson.dumps({"__type": f"{self.namespace}#{self.code}", "message": self.message})

    @property
    def retryable(self) -> bool:
        """Whether an SDK would retry it: server errors and throttling."""
        return self.status >= 500 or self.code in THROTTLING_CODES


def _clip(text: str, limit: int = _MAX_DETAIL) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _names(names: Iterable[str]) -> str:
    ordered = sorted(names)
    shown = ", ".join(ordered[:_MAX_LISTED])
    if len(ordered) > _MAX_LISTED:
        shown += f" and {len(ordered) - _MAX_LISTED} more"
    return shown or "(none)"


def table_not_allowed(tables: Iterable[str], allowed: Iterable[str]) -> DynamoError:
    """The request names tables this proxy does not serve (``tables``: the offending ones)."""
    return DynamoError(
        400,
        "AccessDeniedException",
        f"This proxy does not serve table(s): {_names(tables)}. It serves only: {_names(allowed)}. "
        "To serve another table, add it to `tables` in the sidecar config and reload.",
    )


def arn_refused(detail: str) -> DynamoError:
    """A table ARN of another account or of a region this proxy does not serve."""
    return DynamoError(400, "AccessDeniedException", _clip(detail, 600))


def account_unknown() -> DynamoError:
    return DynamoError(
        503,
        "ServiceUnavailable",
        "ddb-sidecar cannot check a table ARN yet: it does not know its AWS account (it reads it from the "
        "health table's ARN once a region answers; set `account_id` in the sidecar config, or allow "
        "dynamodb:DescribeTable on the health table). The request was NOT sent, it is safe to retry; "
        "tables named by name are not affected",
    )


def control_plane_refused(op_name: str) -> DynamoError:
    return DynamoError(
        400,
        "AccessDeniedException",
        f"{_clip(op_name)} is a control-plane or account-level operation and this proxy forwards only "
        "data-plane requests. Call DynamoDB directly for it, or set `proxy.allow_control_plane: true` "
        "in the sidecar config.",
    )


def unknown_operation(target: str | None) -> DynamoError:
    if target is None:
        message = (
            "The X-Amz-Target header is missing. Send it as DynamoDB_20120810.<Operation>, "
            "e.g. DynamoDB_20120810.GetItem (any AWS SDK does this)."
        )
    else:
        message = (
            f"Unknown operation {_clip(target)!r}. X-Amz-Target must be DynamoDB_20120810.<Operation> "
            "with an operation of the DynamoDB API, e.g. DynamoDB_20120810.GetItem."
        )
    return DynamoError(400, "UnknownOperationException", message)


def serialization(detail: str) -> DynamoError:
    """Malformed JSON, or a body that is not a JSON object."""
    return DynamoError(
        400,
        "SerializationException",
        f"Cannot read the request body: {_clip(detail)}. Send one JSON object (UTF-8) as the body.",
    )


def validation(detail: str) -> DynamoError:
    return DynamoError(400, "ValidationException", _clip(detail, 1000), CORAL_VALIDATE)


def over_budget() -> DynamoError:
    return DynamoError(
        503,
        "ServiceUnavailable",
        "ddb-sidecar holds its maximum of request bytes in memory (proxy.max_inflight_bytes); the request "
        "was NOT sent, it is safe to retry",
    )


def body_too_large(size: int, limit: int) -> DynamoError:
    return DynamoError(
        413,
        "RequestEntityTooLargeException",
        f"The request body is {size} bytes; this proxy accepts at most {limit} bytes. "
        "Split the request into smaller ones (e.g. fewer items per batch).",
    )


def missing_auth() -> DynamoError:
    return DynamoError(
        400,
        "MissingAuthenticationTokenException",
        "Request is missing Authentication Token. Sign the request with AWS Signature Version 4 "
        "(any AWS SDK does this once credentials are configured).",
    )


def unrecognized_client() -> DynamoError:
    return DynamoError(
        400,
        "UnrecognizedClientException",
        "The security token included in the request is invalid. Sign with an access key id listed "
        "in `clients` in the sidecar config.",
    )


def invalid_signature(detail: str) -> DynamoError:
    """``detail`` must not contain secrets (no keys, no signatures, no canonical request)."""
    return DynamoError(
        400,
        "InvalidSignatureException",
        f"The request signature is not valid: {_clip(detail)}. Sign the exact bytes sent, with the "
        "secret key that belongs to the access key id, and a correct clock.",
    )


def region_unreachable(region: str, detail: str) -> DynamoError:
    return DynamoError(
        503,
        "ServiceUnavailableException",
        f"DynamoDB in {_clip(region, 64)} is unreachable ({_clip(detail)}). The request was NOT sent; "
        "it is safe to retry.",
        DYNAMODB,
    )


def upstream_timeout(region: str, seconds: float) -> DynamoError:
    return DynamoError(
        500,
        "InternalServerError",
        f"DynamoDB in {_clip(region, 64)} did not answer within {seconds:g} s. The request may or may not "
        "have been applied: make writes idempotent (condition expressions, client tokens) before "
        "retrying them.",
        DYNAMODB,
    )


def upstream_failed(region: str, detail: str) -> DynamoError:
    return DynamoError(
        500,
        "InternalServerError",
        f"The connection to DynamoDB in {_clip(region, 64)} was lost after the request was sent "
        f"({_clip(detail)}). The request may or may not have been applied: make writes idempotent "
        "(condition expressions, client tokens) before retrying them.",
        DYNAMODB,
    )


def for_upstream_failure(region: str, *, sent: bool, kind: str, detail: str, timeout: float) -> DynamoError:
    """What the client hears when the region gave no answer: whether a retry is safe depends on `sent`."""
    if not sent:
        return region_unreachable(region, detail)
    if kind == "timeout":
        return upstream_timeout(region, timeout)
    return upstream_failed(region, detail)


def internal(detail: str) -> DynamoError:
    return DynamoError(500, "InternalServerError", _clip(detail), DYNAMODB)


def switchover_in_progress(held: int) -> DynamoError:
    return DynamoError(
        503,
        "ServiceUnavailableException",
        f"A switchover between regions is in progress and {held} writes are already held; this one was "
        "NOT sent. It is safe to retry in a moment.",
        DYNAMODB,
    )


def not_found(path: str) -> DynamoError:
    # Drop the query string: presigned URLs carry credentials there.
    shown = _clip(path.partition("?")[0], 100)
    return DynamoError(
        404,
        "UnknownOperationException",
        f"Nothing is served at {shown!r}. This address serves only the DynamoDB API: POST / with an "
        "X-Amz-Target: DynamoDB_20120810.<Operation> header.",
    )
