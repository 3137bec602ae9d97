"""Writing planned operations into a target region, and reading the source's tombstones: the I/O that the
sidecar's replicator and the Lambda handler share.

Blocking botocore calls: the replicator runs them in worker threads, the Lambda directly. One call of
`Applier.send` is one round: it never sleeps; what must wait for a backoff comes back as `pending`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from sidecar.core.replicate import (
    TOMBSTONE_KEY_ATTR,
    TOMBSTONE_TTL_SECONDS,
    VERSION_ATTR,
    WriteMode,
    WriteOp,
    classify_cancellation,
    delete_request,
    put_request,
    replicated_version,
    tombstone_allows,
    tombstone_put_request,
    transact_items,
)

BATCH_GET_MAX = 100

# Answers that the same write will get again however often it is retried: the item is refused for what it
# is (too large, an attribute the target's schema or limits reject). Everything else (throttling, 5xx,
# timeouts, credentials, a missing table being created) is retried with backoff.
PERMANENT_ERRORS = frozenset(
    {
        "ValidationException",
        "SerializationException",
        "ItemCollectionSizeLimitExceededException",
    }
)


def is_permanent(exc: BaseException) -> bool:
    return error_code(exc) in PERMANENT_ERRORS


@dataclass
class SendResult:
    """How one group fared: each op is in exactly one of applied, superseded, pending."""

    applied: list[WriteOp] = field(default_factory=list)
    superseded: list[WriteOp] = field(default_factory=list)  # a newer version was there: success
    pending: list[WriteOp] = field(default_factory=list)  # retry after a backoff
    failed: list[tuple[WriteOp, str]] = field(default_factory=list)  # refused for good: dead letters
    error: str | None = None
    requests: int = 0


def describe_error(exc: BaseException) -> str:
    """`Code (HTTP n): message` for an AWS answer, the class and text for a transport failure."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        message = str(error.get("Message") or "").strip()
        head = f"{error.get('Code', 'error')} (HTTP {status})" if status else str(error.get("Code", "error"))
        return f"{head}: {message}" if message else head
    return f"{type(exc).__name__}: {exc}"


def error_code(exc: BaseException) -> str | None:
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code")
        return str(code) if code else None
    return None


class Applier:
    """Conditional, versioned writes into one target region (see `sidecar.core.replicate` for the rule).

    `client` is a botocore/boto3 `dynamodb` client for the target; `tombstone_table` the table with
    partition key `pk` (S) that holds the tombstones there (the sidecar's `health.table`); `mode` how the
    writes go out (`single`: plain conditional requests per item; `transact`: TransactWriteItems).
    """

    def __init__(
        self,
        client: Any,
        tombstone_table: str,
        *,
        mode: WriteMode = "single",
        tombstone_ttl: float = TOMBSTONE_TTL_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if mode not in ("single", "transact"):
            raise ValueError(f"write mode {mode!r}: single or transact")
        self.client = client
        self.tombstone_table = tombstone_table
        self.mode = mode
        self.tombstone_ttl = tombstone_ttl
        self._clock = clock

    def send(self, group: Sequence[WriteOp]) -> SendResult:
        """Write `group` (distinct items): one transaction, or the items one after the other."""
        return self._transact(group) if self.mode == "transact" else self._single(group)

    def _expires_at(self) -> int:
        return int(self._clock() + self.tombstone_ttl)

    def _transact(self, group: Sequence[WriteOp]) -> SendResult:
        """Items cancelled only because another item's condition failed are sent again at once, without
        the superseded ones."""
        result = SendResult()
        remaining = list(group)
        while remaining:
            items = transact_items(remaining, self.tombstone_table, self._expires_at())
            result.requests += 1
            try:
                self.client.transact_write_items(TransactItems=items)
            except ClientError as exc:
                if is_permanent(exc):
                    # One item refused for good makes the whole transaction fail: find it, one by one.
                    single = self._single(remaining)
                    for name in ("applied", "superseded", "pending", "failed"):
                        getattr(result, name).extend(getattr(single, name))
                    result.requests += single.requests
                    result.error = single.error or f"TransactWriteItems: {describe_error(exc)}"
                    break
                if error_code(exc) != "TransactionCanceledException":
                    result.pending += remaining
                    result.error = f"TransactWriteItems: {describe_error(exc)}"
                    break
                cancelled = classify_cancellation(remaining, exc.response.get("CancellationReasons"))
                result.superseded += cancelled.superseded
                result.pending += cancelled.retry_later
                if cancelled.retry_later:
                    result.error = f"TransactWriteItems cancelled: {cancelled.detail}"
                remaining = list(cancelled.retry_now)
            except BotoCoreError as exc:
                result.pending += remaining
                result.error = f"TransactWriteItems: {describe_error(exc)}"
                break
            else:
                result.applied += remaining
                break
        return result

    def _single(self, group: Sequence[WriteOp]) -> SendResult:
        """The puts' tombstones in one BatchGetItem per 100 items, then each item on its own; a failed item
        waits for the backoff, the others go on. Reading the tombstones first is as safe as one GetItem per
        put: the group's items are distinct and only this replicator writes their tombstones."""
        result = SendResult()
        puts = [op.tombstone_id for op in group if op.item is not None]
        tombstones: dict[str, str] = {}
        if puts:
            result.requests += -(-len(puts) // BATCH_GET_MAX)
            try:
                tombstones = lookup_tombstones(self.client, self.tombstone_table, puts)
            except (ClientError, BotoCoreError, RuntimeError) as exc:
                result.error = f"BatchGetItem of tombstones: {describe_error(exc)}"
                result.pending += group
                return result
        for op in group:
            try:
                if op.item is not None:
                    applied = tombstone_allows(op, tombstones.get(op.tombstone_id)) and self._conditional(
                        result, self.client.put_item, put_request(op)
                    )
                else:
                    applied = self._delete(op, result)
            except ClientError as exc:
                result.error = describe_error(exc)
                if is_permanent(exc):
                    result.failed.append((op, result.error))
                else:
                    result.pending.append(op)
                continue
            except BotoCoreError as exc:
                result.pending.append(op)
                result.error = describe_error(exc)
                continue
            (result.applied if applied else result.superseded).append(op)
        return result

    def _delete(self, op: WriteOp, result: SendResult) -> bool:
        # The tombstone first: from then on no older put can land. Both steps always run, so that a
        # re-delivery after a crash between them deletes the item.
        self._conditional(
            result, self.client.put_item, tombstone_put_request(op, self.tombstone_table, self._expires_at())
        )
        return self._conditional(result, self.client.delete_item, delete_request(op))

    @staticmethod
    def _conditional(result: SendResult, call: Callable[..., Any], request: dict[str, Any]) -> bool:
        """True when written, False when the condition failed (a newer version is there)."""
        result.requests += 1
        try:
            call(**request)
        except ClientError as exc:
            if error_code(exc) == "ConditionalCheckFailedException":
                return False
            raise
        return True


def lookup_tombstones(
    client: Any,
    tombstone_table: str,
    ids: Iterable[str],
    *,
    attempts: int = 6,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, str]:
    """The versions of the given tombstones in one region (consistent reads); absent ones are left out.

    Raises ClientError/BotoCoreError as botocore does, and RuntimeError when DynamoDB keeps returning
    UnprocessedKeys after `attempts` rounds.
    """
    wanted = list(dict.fromkeys(ids))
    found: dict[str, str] = {}
    for start in range(0, len(wanted), BATCH_GET_MAX):
        keys: list[dict[str, Any]] = [
            {TOMBSTONE_KEY_ATTR: {"S": i}} for i in wanted[start : start + BATCH_GET_MAX]
        ]
        for attempt in range(attempts):
            response = client.batch_get_item(
                RequestItems={
                    tombstone_table: {
                        "Keys": keys,
                        "ConsistentRead": True,
                        "ProjectionExpression": "#pk, #ts",
                        "ExpressionAttributeNames": {"#pk": TOMBSTONE_KEY_ATTR, "#ts": VERSION_ATTR},
                    }
                }
            )
            for item in response.get("Responses", {}).get(tombstone_table, []):
                version = replicated_version(item)
                if version is not None:
                    found[item[TOMBSTONE_KEY_ATTR]["S"]] = version
            keys = response.get("UnprocessedKeys", {}).get(tombstone_table, {}).get("Keys", [])
            if not keys:
                break
            sleep(min(0.05 * 2**attempt, 1.0))
        else:
            raise RuntimeError(
                f"BatchGetItem on {tombstone_table}: {len(keys)} keys still unprocessed after {attempts} attempts"
            )
    return found
