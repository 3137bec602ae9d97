"""The admission gate: may this request go upstream? A pure function of the policy, header and body."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson

from sidecar.core import arns, errors
from sidecar.core.errors import DynamoError
from sidecar.core.operations import (
    Operation,
    OpKind,
    RequestShapeError,
    classify,
    keys_provably_unique,
    operation_from_target,
)
from sidecar.core.replicate import BOOKKEEPING_PREFIX
from sidecar.core.shapes import undefined_key


@dataclass(frozen=True, slots=True)
class GatePolicy:
    tables: frozenset[str]
    allow_control_plane: bool = False
    max_body_bytes: int = 16 * 1024 * 1024
    # For tables named by ARN: the configured regions, and our AWS account (None: not known yet).
    regions: frozenset[str] = frozenset()
    account: str | None = None


@dataclass(frozen=True, slots=True)
class Admitted:
    operation: Operation
    kind: OpKind  # effective kind: a PartiQL request of SELECTs only is a READ
    tables: frozenset[str]
    # A request naming tables by ARN: what to send to each region its ARNs do not already name.
    retargeted: dict[str, arns.Retargeted] | None = None
    # SigV4's payload hashes, computed with the decision for large bodies: "" the body as sent, else per
    # region of `retargeted`.
    digests: dict[str, str] | None = None

    def body_for(self, region: str, body: bytes) -> bytes:
        """What to sign and send to `region` (`body`: the request as the app sent it)."""
        if self.retargeted is None or region not in self.retargeted:
            return body
        return self.retargeted[region].body

    def digest_for(self, region: str) -> str | None:
        """The SHA-256 (hex) of `body_for(region)` when a gate worker computed it (large bodies), else None."""
        if self.digests is None:
            return None
        return self.digests.get(region if self.retargeted and region in self.retargeted else "")

    def answer_from(self, region: str, answer: bytes) -> bytes:
        """`region`'s answer as the app expects it: its tables named as the app named them."""
        if self.retargeted is None or region not in self.retargeted:
            return answer
        return arns.restored(answer, self.retargeted[region].renamed)


def admit(policy: GatePolicy, target: str | None, body: bytes) -> Admitted | DynamoError:
    """Admit a request, or say (DynamoDB-shaped) why not. Never raises, whatever the bytes."""
    op = operation_from_target(target)
    if op is None:
        return errors.unknown_operation(target)
    if len(body) > policy.max_body_bytes:
        return errors.body_too_large(len(body), policy.max_body_bytes)
    if (op.kind is OpKind.CONTROL or op.kind is OpKind.ACCOUNT) and not policy.allow_control_plane:
        return errors.control_plane_refused(op.name)
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        # orjson's message names the problem and position, never the content
        return errors.serialization(f"not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})")
    if not isinstance(parsed, dict):
        return errors.serialization("the body is JSON but not an object")
    undefined = undefined_key(op.name, parsed)
    if undefined is not None:
        return errors.validation(undefined)
    try:
        found = classify(op, parsed)
    except RequestShapeError as exc:
        return errors.validation(str(exc))
    if not keys_provably_unique(found, body) and _has_duplicate(body, found.keys_read):
        return errors.serialization(
            "a JSON object in the body repeats a key that names a table or statement; send each key once"
        )
    if not found.tables <= policy.tables:
        return errors.table_not_allowed(found.tables - policy.tables, policy.tables)
    if found.kind is OpKind.WRITE:
        reserved = _reserved_attribute(op.name, parsed)
        if reserved is not None:
            return errors.validation(reserved)
    if found.arns:
        refusal = arns.refusal(found.arns, policy.regions, policy.account)
        if refusal is not None:
            return errors.arn_refused(refusal)
        if policy.account is None:
            return errors.account_unknown()
        retargeted = arns.retargeted(parsed, found.arns, sorted(policy.regions))
        return Admitted(op, found.kind, found.tables, retargeted or None)
    return Admitted(op, found.kind, found.tables)


RESERVED = BOOKKEEPING_PREFIX  # the replicator's bookkeeping attributes (`ddbsc:`)


def _reserved_attribute(operation: str, body: dict[str, Any]) -> str | None:
    """An app write naming an attribute of the replicator's (`ddbsc:...`): refused, not silently dropped
    (an app-written `ddbsc:ts` would freeze the item against every later replicated write)."""
    names: list[object] = []

    def item(value: object) -> None:
        if isinstance(value, dict):
            names.extend(value)

    def update(request: object) -> None:
        if isinstance(request, dict):
            aliases = request.get("ExpressionAttributeNames")
            if isinstance(aliases, dict):
                names.extend(aliases.values())
            item(request.get("AttributeUpdates"))

    if operation == "PutItem":
        item(body.get("Item"))
    elif operation == "UpdateItem":
        update(body)
    elif operation == "BatchWriteItem":
        for requests in (body.get("RequestItems") or {}).values():
            for request in requests if isinstance(requests, list) else ():
                if isinstance(request, dict) and isinstance(request.get("PutRequest"), dict):
                    item(request["PutRequest"].get("Item"))
    elif operation == "TransactWriteItems":
        for entry in body.get("TransactItems") or ():
            if isinstance(entry, dict):
                if isinstance(entry.get("Put"), dict):
                    item(entry["Put"].get("Item"))
                update(entry.get("Update"))
    elif operation in ("ExecuteStatement", "BatchExecuteStatement", "ExecuteTransaction"):
        statements = [body.get("Statement")] + [
            e.get("Statement") for key in ("Statements", "TransactStatements") for e in body.get(key) or ()
            if isinstance(e, dict)
        ]  # fmt: skip
        # An attribute named with a `:` is a double-quoted identifier in PartiQL; a string literal
        # ('ddbsc:...') is data and stays allowed.
        if any(isinstance(st, str) and f'"{RESERVED}' in st for st in statements):
            return (
                f"{operation}: the statement names an attribute in the {RESERVED} namespace, reserved for "
                "ddb-sidecar's replication bookkeeping; rename the attribute"
            )
    for name in names:
        if isinstance(name, str) and name.startswith(RESERVED):
            return (
                f"{operation}: the attribute {name[:64]!r} is in the {RESERVED} namespace, reserved for "
                "ddb-sidecar's replication bookkeeping; rename it"
            )
    return None


class _Duplicate(Exception):
    pass


def _has_duplicate(body: bytes, keys_read: tuple[tuple[bytes, int], ...]) -> bool:
    """Whether any JSON object in the body repeats one of the keys the classifier read.

    The slow, exact check behind keys_provably_unique's fast proof; only keys that matter are checked,
    so a repeated attribute name inside an item is left for DynamoDB to judge. A body that the stdlib
    parser cannot read (orjson could) counts as a duplicate: we refuse what we cannot check.
    """
    watched = frozenset(needle[1:-1].decode() for needle, _ in keys_read)

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: set[str] = set()
        for key, _value in items:
            if key in watched:
                if key in seen:
                    raise _Duplicate
                seen.add(key)
        return {}  # the values are not needed, only the check

    try:
        json.loads(body, object_pairs_hook=pairs)
    except (_Duplicate, ValueError, RecursionError):
        return True
    return False
