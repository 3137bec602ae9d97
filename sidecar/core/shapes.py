"""The keys each DynamoDB operation defines: a request with any other key is refused at the gate.

Why: DynamoDB's JSON parser is lenient about key case, so `{"TableName": "orders", "tablename": "secret"}`
or a TransactWriteItems action spelled `put` could name a table the gate never read. Refusing every key
the operation does not define (exact spelling) closes that for good, without guessing DynamoDB's parser.

The definitions are botocore's service model for DynamoDB (the API's own, kept current with botocore,
which the sidecar loads anyway for its credentials), read once at import. Only the structures on the way
to a table-bearing field are checked (the top level, TransactItems and their actions, statement lists,
TableCreationParameters...), never an item's attributes: the cost does not grow with the items.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import botocore.session

# Members that name a table (directly, by ARN, in a PartiQL statement, or as map keys).
_TABLE_BEARING: Final = re.compile(r"(TableName|Arn|Statement|RequestItems)$")


@dataclass
class _Node:
    """A structure: its members, and the members that lead to a table-bearing field (with how: a
    structure, a list of structures, or a map of them)."""

    keys: frozenset[str] = frozenset()
    by_lower: dict[str, str] = field(default_factory=dict)
    children: dict[str, tuple[str, _Node]] = field(default_factory=dict)
    relevant: bool = False


def _build(shape: Any, memo: dict[str, _Node]) -> _Node:
    if shape.name in memo:
        return memo[shape.name]  # recursive shapes (AttributeValue): never table-bearing
    node = memo[shape.name] = _Node()
    members = shape.members
    node.keys = frozenset(members)
    node.by_lower = {name.lower(): name for name in members}
    for name, member in members.items():
        if _TABLE_BEARING.search(name):
            node.relevant = True
        kind, inner = "struct", member
        if member.type_name == "list":
            kind, inner = "list", member.member
        elif member.type_name == "map":
            kind, inner = "map", member.value
            if inner.type_name == "list":
                kind, inner = "map-list", inner.member
        if inner.type_name == "structure":
            child = _build(inner, memo)
            if child.relevant:
                node.children[name] = (kind, child)
                node.relevant = True
    return node


def _load() -> dict[str, _Node]:
    model = botocore.session.get_session().get_service_model("dynamodb")
    memo: dict[str, _Node] = {}
    out = {}
    for name in model.operation_names:
        shape = model.operation_model(name).input_shape
        if shape is not None:
            out[name] = _build(shape, memo)
    return out


_OPERATIONS: Final = _load()


def undefined_key(operation: str, body: Mapping[str, Any]) -> str | None:
    """Why `body` has a key `operation` does not define (None: every key checked is defined)."""
    node = _OPERATIONS.get(operation)
    if node is None:
        return None  # an operation botocore does not know: the gate's own rules still apply
    return _check(operation, node, body, "")


def _check(op: str, node: _Node, value: Mapping[str, Any], path: str) -> str | None:
    for key in value:
        if key not in node.keys:
            shown = _shown(key)
            where = f"{path} has" if path else "the request has"
            spelled = node.by_lower.get(key.lower()) if isinstance(key, str) else None
            hint = (
                f"; keys are case-sensitive: did you mean {spelled!r}?"
                if spelled
                else f"; {path or op} takes {', '.join(sorted(node.keys)) or 'no keys'}"
            )
            return f"{op}: {where} a key {shown} that {op} does not define{hint}"
    for key, (kind, child) in node.children.items():
        sub = value.get(key)
        if sub is None:
            continue
        problem = None
        here = f"{path}.{key}" if path else key
        if kind == "struct" and isinstance(sub, dict):
            problem = _check(op, child, sub, here)
        elif kind == "list" and isinstance(sub, list):
            problem = _first(op, child, sub, here)
        elif kind == "map" and isinstance(sub, dict):
            for name, entry in sub.items():
                if isinstance(entry, dict) and (
                    problem := _check(op, child, entry, f"{here}[{_shown(name)}]")
                ):
                    break
        elif kind == "map-list" and isinstance(sub, dict):
            for name, entries in sub.items():
                if isinstance(entries, list) and (
                    problem := _first(op, child, entries, f"{here}[{_shown(name)}]")
                ):
                    break
        if problem is not None:
            return problem
    return None


def _first(op: str, node: _Node, entries: list[Any], path: str) -> str | None:
    for i, entry in enumerate(entries):
        if isinstance(entry, dict) and (problem := _check(op, node, entry, f"{path}[{i}]")):
            return problem
    return None


def _shown(key: object) -> str:
    """A key for an error message: quoted, control characters escaped, at most 64 characters."""
    text = repr(str(key))
    return text if len(text) <= 66 else text[:62] + "...'"
