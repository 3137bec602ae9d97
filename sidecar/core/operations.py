"""DynamoDB operations: what kind each one is and which tables a request names.

Pure and precomputed at import time: it runs on the proxy's hot path for every request. The table of
operations is written out by hand (botocore is not loaded at runtime); a unit test checks it against
botocore's service model so that a new operation or a new table-bearing field cannot slip through.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

from sidecar.core.arns import ArnUse
from sidecar.core.arns import parse as parse_arn


class OpKind(enum.StrEnum):
    """What an operation does, as far as routing and the gate care."""

    READ = "read"
    WRITE = "write"
    DESCRIBE = "describe"  # read-only metadata about specific tables
    CONTROL = "control"  # mutates tables or account configuration
    ACCOUNT = "account"  # account-level reads that touch no single table


@dataclass(frozen=True, slots=True)
class Operation:
    name: str
    kind: OpKind


class RequestShapeError(ValueError):
    """The request cannot be checked: a table-bearing field is missing, of the wrong type, or unparsable.

    The message says what is wrong and what to change; it never quotes request data other than
    field names.
    """


class Classification(NamedTuple):
    """Everything the gate needs to know about one request, computed in a single pass.

    ``keys_read`` lists, for each JSON key the classifier relied on, the key as it appears on the wire
    (``b'"TableName"'``) and how many times the classifier read it; :func:`keys_provably_unique` uses it
    to prove, without a second parse, that none of those keys was sent twice.
    """

    kind: OpKind
    tables: frozenset[str]
    keys_read: tuple[tuple[bytes, int], ...]
    arns: tuple[ArnUse, ...] = ()  # where tables are named by ARN (empty for almost every request)


TARGET_PREFIX: Final = "DynamoDB_20120810."

_R, _W, _D, _C, _A = OpKind.READ, OpKind.WRITE, OpKind.DESCRIBE, OpKind.CONTROL, OpKind.ACCOUNT

# Every operation of botocore's dynamodb/2012-08-10 model. Keep in sync: tests/unit/core/test_operations.py
# fails when botocore knows an operation that is not here (or the other way round).
_KINDS: Final[tuple[tuple[str, OpKind], ...]] = (
    # data plane
    ("GetItem", _R),
    ("Query", _R),
    ("Scan", _R),
    ("BatchGetItem", _R),
    ("TransactGetItems", _R),
    ("SearchVectors", _R),
    ("PutItem", _W),
    ("UpdateItem", _W),
    ("DeleteItem", _W),
    ("BatchWriteItem", _W),
    ("TransactWriteItems", _W),
    # PartiQL: WRITE unless every statement is a read, see effective_kind()
    ("ExecuteStatement", _W),
    ("BatchExecuteStatement", _W),
    ("ExecuteTransaction", _W),
    # read-only metadata about named tables
    ("DescribeTable", _D),
    ("DescribeTimeToLive", _D),
    ("DescribeContinuousBackups", _D),
    ("DescribeContributorInsights", _D),
    ("DescribeKinesisStreamingDestination", _D),
    ("DescribeTableReplicaAutoScaling", _D),
    ("DescribeGlobalTable", _D),
    ("DescribeGlobalTableSettings", _D),
    ("DescribeBackup", _D),
    ("DescribeExport", _D),
    ("DescribeImport", _D),
    ("DescribeBulkOperation", _D),
    ("ListTagsOfResource", _D),
    ("GetResourcePolicy", _D),
    # anything that mutates tables or account configuration
    ("CreateTable", _C),
    ("DeleteTable", _C),
    ("UpdateTable", _C),
    ("UpdateTimeToLive", _C),
    ("UpdateContinuousBackups", _C),
    ("UpdateContributorInsights", _C),
    ("UpdateTableReplicaAutoScaling", _C),
    ("EnableKinesisStreamingDestination", _C),
    ("DisableKinesisStreamingDestination", _C),
    ("UpdateKinesisStreamingDestination", _C),
    ("CreateBackup", _C),
    ("DeleteBackup", _C),
    ("RestoreTableFromBackup", _C),
    ("RestoreTableToPointInTime", _C),
    ("ExportTableToPointInTime", _C),
    ("ImportTable", _C),
    ("CreateGlobalTable", _C),
    ("UpdateGlobalTable", _C),
    ("UpdateGlobalTableSettings", _C),
    ("TagResource", _C),
    ("UntagResource", _C),
    ("PutResourcePolicy", _C),
    ("DeleteResourcePolicy", _C),
    # asynchronous bulk load from S3 into a table: not an application's request path
    ("StartBulkPutItems", _C),
    ("CancelBulkOperation", _C),
    # account-level reads
    ("ListTables", _A),
    ("DescribeLimits", _A),
    ("DescribeEndpoints", _A),
    ("ListBackups", _A),
    ("ListExports", _A),
    ("ListImports", _A),
    ("ListGlobalTables", _A),
    ("ListContributorInsights", _A),
    ("ListBulkOperations", _A),
)

OPERATIONS: Final[Mapping[str, Operation]] = {name: Operation(name, kind) for name, kind in _KINDS}

_BY_TARGET: Final[dict[str, Operation]] = {TARGET_PREFIX + op.name: op for op in OPERATIONS.values()}


def operation_from_target(target: str | None) -> Operation | None:
    """The operation named by an ``X-Amz-Target`` header value, or None when absent or unknown."""
    if target is None:
        return None
    return _BY_TARGET.get(target)


# --- table names and ARNs ---------------------------------------------------------------------------

_TABLE_NAME_RE: Final = re.compile(r"[A-Za-z0-9_.\-]{3,255}")
_is_table_name: Final = _TABLE_NAME_RE.fullmatch
_NAME_RULE: Final = "3-255 characters of A-Z, a-z, 0-9, '_', '-', '.'"
_ARN_RULE: Final = "arn:aws:dynamodb:REGION:ACCOUNT:table/NAME[/...]"


def _name_from_arn(arn: str) -> str | None:
    """The table name in ``arn:PARTITION:dynamodb:REGION:ACCOUNT:table/NAME[/...]``, else None.

    Covers table, index, stream, backup, export and import ARNs: all of them live under ``table/NAME``.
    """
    parsed = parse_arn(arn)
    if parsed is None:
        return None
    name = parsed.resource[6:].partition("/")[0]
    return name if _TABLE_NAME_RE.fullmatch(name) else None


class _Form(enum.Enum):
    NAME = "a table name"
    ARN = "a table ARN"
    NAME_OR_ARN = "a table name or ARN"


def _table(value: object, op: str, where: str, form: _Form) -> str:
    """The table a name-or-ARN field names; RequestShapeError if it names none."""
    if isinstance(value, str) and form is not _Form.ARN and _is_table_name(value):  # the hot path
        return value
    if not isinstance(value, str):
        raise RequestShapeError(
            f"{op}: {where} must be a string ({form.value}), not {_json_type(value)}; send {form.value} there"
        )
    if form is not _Form.NAME and value.startswith("arn:"):
        name = _name_from_arn(value)
        if name is not None:
            return name
        raise RequestShapeError(
            f"{op}: {where} is an ARN the proxy cannot map to a table; "
            f"use a DynamoDB table ARN ({_ARN_RULE}) so it can check the table"
        )
    if form is _Form.ARN:
        raise RequestShapeError(f"{op}: {where} must be a DynamoDB table ARN ({_ARN_RULE})")
    raise RequestShapeError(f"{op}: {where} is not a valid table name ({_NAME_RULE}) or table ARN")


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _needle(key: str) -> bytes:
    return b'"' + key.encode() + b'"'


_MISSING: Final = object()

# What an extractor returns: the effective kind (None: the operation's own kind), the tables, keys read,
# where ARNs name tables.
_Extracted = tuple[OpKind | None, frozenset[str], tuple[tuple[bytes, int], ...], tuple[ArnUse, ...]]
_Extractor = Callable[[Mapping[str, Any]], _Extracted]

_NOTHING: Final[_Extracted] = (None, frozenset(), (), ())


def _no_tables(body: Mapping[str, Any]) -> _Extracted:
    return _NOTHING


@dataclass(frozen=True, slots=True)
class _Field:
    key: str
    form: _Form
    required: bool = True


def _fields(op: str, *fields: _Field, one_of: tuple[str, ...] = ()) -> _Extractor:
    """Tables from top-level string fields; ``one_of``: at least one of these keys must be present."""
    if len(fields) == 1 and fields[0].required and not one_of:
        # the common case (GetItem, PutItem, Query...): one required field, constant keys_read
        key, form = fields[0].key, fields[0].form
        keys_read = ((_needle(key), 1),)
        plain_name_ok = form is not _Form.ARN

        def single(body: Mapping[str, Any]) -> _Extracted:
            value = body.get(key, _MISSING)
            if plain_name_ok and isinstance(value, str) and _is_table_name(value):  # the hot path
                return None, frozenset((value,)), keys_read, ()
            if value is _MISSING:
                raise RequestShapeError(f"{op}: {key} is missing; send {form.value} in {key}")
            name = _table(value, op, key, form)
            return None, frozenset((name,)), keys_read, (ArnUse((key,), value),) if name != value else ()

        return single

    needles = {f.key: (_needle(f.key), 1) for f in fields}

    def several(body: Mapping[str, Any]) -> _Extracted:
        tables: set[str] = set()
        read: list[tuple[bytes, int]] = []
        arns: list[ArnUse] = []
        for f in fields:
            value = body.get(f.key, _MISSING)
            if value is _MISSING:
                if f.required:
                    raise RequestShapeError(f"{op}: {f.key} is missing; send {f.form.value} in {f.key}")
                continue
            name = _table(value, op, f.key, f.form)
            tables.add(name)
            if name != value:
                arns.append(ArnUse((f.key,), value))
            read.append(needles[f.key])
        if one_of and not any(k in body for k in one_of):
            raise RequestShapeError(f"{op}: send one of {' or '.join(one_of)} to name the source table")
        return None, frozenset(tables), tuple(read), tuple(arns)

    return several


def _import_table(body: Mapping[str, Any]) -> _Extracted:
    params = body.get("TableCreationParameters", _MISSING)
    if not isinstance(params, dict):
        raise RequestShapeError(
            "ImportTable: TableCreationParameters must be an object with the new table's TableName"
        )
    value = params.get("TableName", _MISSING)
    if value is _MISSING:
        raise RequestShapeError("ImportTable: TableCreationParameters.TableName is missing; name the table")
    name = _table(value, "ImportTable", "TableCreationParameters.TableName", _Form.NAME)
    return None, frozenset((name,)), _IMPORT_KEYS, ()


_IMPORT_KEYS: Final = ((_needle("TableCreationParameters"), 1), (_needle("TableName"), 1))


def _request_items(op: str) -> _Extractor:
    keys_read = ((_needle("RequestItems"), 1),)

    def extract(body: Mapping[str, Any]) -> _Extracted:
        items = body.get("RequestItems", _MISSING)
        if not isinstance(items, dict) or not items:
            raise RequestShapeError(
                f"{op}: RequestItems must be a non-empty object keyed by table name or ARN"
            )
        tables: set[str] = set()
        arns: list[ArnUse] = []
        for key in items:
            name = _table(key, op, "a RequestItems key", _Form.NAME_OR_ARN)
            tables.add(name)
            if name != key:
                arns.append(ArnUse(("RequestItems", key), key, key=True))
        return None, frozenset(tables), keys_read, tuple(arns)

    return extract


def _transact_items(op: str, actions: tuple[str, ...]) -> _Extractor:
    listed = ", ".join(actions)
    needles = {a: _needle(a) for a in actions}
    items_key = _needle("TransactItems")
    table_key = _needle("TableName")

    def extract(body: Mapping[str, Any]) -> _Extracted:
        items = body.get("TransactItems", _MISSING)
        if not isinstance(items, list) or not items:
            raise RequestShapeError(f"{op}: TransactItems must be a non-empty array of {listed} items")
        tables: set[str] = set()
        arns: list[ArnUse] = []
        seen = dict.fromkeys(actions, 0)
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise RequestShapeError(f"{op}: TransactItems[{i}] must be an object with one of {listed}")
            found = False
            for action in actions:
                request = item.get(action, _MISSING)
                if request is _MISSING:
                    continue
                found = True
                seen[action] += 1
                if not isinstance(request, dict):
                    raise RequestShapeError(f"{op}: TransactItems[{i}].{action} must be an object")
                value = request.get("TableName", _MISSING)
                if isinstance(value, str) and _is_table_name(value):  # the hot path
                    tables.add(value)
                    continue
                where = f"TransactItems[{i}].{action}.TableName"
                if value is _MISSING:
                    raise RequestShapeError(f"{op}: {where} is missing; name the table of every item")
                name = _table(value, op, where, _Form.NAME_OR_ARN)
                tables.add(name)
                if name != value:
                    arns.append(ArnUse(("TransactItems", i, action, "TableName"), value))
            if not found:
                raise RequestShapeError(f"{op}: TransactItems[{i}] has none of {listed}; give it exactly one")
        total = sum(seen.values())
        read = [(items_key, 1), (table_key, total)]
        read.extend((needles[a], n) for a, n in seen.items() if n)
        return None, frozenset(tables), tuple(read), tuple(arns)

    return extract


# --- PartiQL ------------------------------------------------------------------------------------------
#
# Only the head of a statement is parsed: up to the table reference and the keyword after it. In the head
# we accept nothing whose meaning could depend on lexer details we cannot verify against DynamoDB's
# (comments, string literals, backslashes, Ion `...` literals): the table we check must be the table
# DynamoDB uses, whatever its lexer does with those.

# One token per match, after optional whitespace. Quoted identifiers and strings are consumed whole, so
# 'FROM x' in a literal or "FROM" as an attribute name cannot fool us.
_TOKEN_RE: Final = re.compile(
    r"""
    [ \t\r\n\f\v]*
    (?:
      (?P<quoted>"[^"]*(?:""[^"]*)*")
    | (?P<string>'[^']*(?:''[^']*)*')
    | (?P<word>[A-Za-z_][A-Za-z0-9_$]*)
    | (?P<unterminated>["'])
    | (?P<other>.)
    | (?P<end>\Z)
    )
    """,
    re.VERBOSE | re.DOTALL,
)
_next_token: Final = _TOKEN_RE.match

# The common statement heads in one match. Accepts a subset of what the token parser accepts, with the
# same result (tests/unit/core/test_operations.py checks this with generated statements).
_WS: Final = r"[ \t\r\n\f\v]"
_END_WORD: Final = r"(?![A-Za-z0-9_$])"
_BARE: Final = rf"(?!(?i:from|select){_END_WORD})[A-Za-z_][A-Za-z0-9_$]*"
_QUOTED: Final = r'"[^"\\]*"'
_PATH: Final = rf"(?:{_QUOTED}|{_BARE})(?:\.(?:{_QUOTED}|{_BARE})|\[[0-9]+\])*"


def _table_group(name: str) -> str:
    return (
        rf'(?:"(?P<{name}q>[A-Za-z0-9_.\-]{{3,255}})"|(?P<{name}w>[A-Za-z_][A-Za-z0-9_]{{2,254}}){_END_WORD})'
    )


_FAST_HEAD_RE: Final = re.compile(
    rf"""{_WS}*(?:
      (?i:select){_WS}+(?:\*|{_PATH}(?:{_WS}*,{_WS}*{_PATH})*){_WS}+(?i:from){_WS}+{_table_group("s")}
        (?:{_WS}*\.{_WS}*(?:{_QUOTED}|[A-Za-z_][A-Za-z0-9_$]*))?
        (?:{_WS}+(?i:where|order){_END_WORD}|{_WS}*\Z)
    | (?i:insert){_WS}+(?i:into){_WS}+{_table_group("i")}{_WS}+(?i:value){_END_WORD}
    | (?i:update){_WS}+{_table_group("u")}{_WS}+(?i:set|remove|where|returning){_END_WORD}
    | (?i:delete){_WS}+(?i:from){_WS}+{_table_group("d")}{_WS}+(?i:where|returning){_END_WORD}
    )""",
    re.VERBOSE,
)
_fast_head: Final = _FAST_HEAD_RE.match

# Cheap pre-filter for the part after the head: only tokenize it when a nested query is conceivable.
_NESTED_HINT_RE: Final = re.compile(r"select|from", re.IGNORECASE)

# What may follow the table reference. Anything else (a comma, JOIN, AS, a second table) is refused:
# DynamoDB's PartiQL has none of these, and we only admit statements whose single table we are sure of.
_FOLLOW_SELECT: Final = frozenset({"WHERE", "ORDER"})
_FOLLOW_INSERT: Final = frozenset({"VALUE"})
_FOLLOW_UPDATE: Final = frozenset({"SET", "REMOVE", "WHERE", "RETURNING"})
_FOLLOW_DELETE: Final = frozenset({"WHERE", "RETURNING"})
# Punctuation allowed in a SELECT projection (paths, list indexes, function calls) and digits.
_PROJECTION_CHARS: Final = frozenset("*,.[]()0123456789")
_OPENERS: Final = frozenset("([")
_CLOSERS: Final = frozenset(")]")

_STATEMENT_FORMS: Final = (
    'SELECT ... FROM "table"[."index"] ..., INSERT INTO "table" VALUE {...}, '
    'UPDATE "table" SET ..., DELETE FROM "table" WHERE ...'
)
_HEAD_SYNTAX: Final = (
    "only whitespace, names, double-quoted names and * , . [ ] ( ) may come before the table name "
    "(no comments, string literals or backslashes)"
)

_Token = tuple[str, int, int]  # kind (a group name of _TOKEN_RE), start, end
MAX_STATEMENT_CHARS: Final = 8192  # DynamoDB's limit on a PartiQL statement


def _token(stmt: str, pos: int) -> _Token:
    """The next token at or after pos, whitespace skipped."""
    m = _next_token(stmt, pos)
    if m is None or m.lastgroup is None:  # pragma: no cover - cannot happen: (?P<end>\Z) always matches
        return "end", len(stmt), len(stmt)
    kind = m.lastgroup
    return kind, m.start(kind), m.end()


def _is_word(stmt: str, tok: _Token, upper: str) -> bool:
    return tok[0] == "word" and stmt[tok[1] : tok[2]].upper() == upper


def statement_kind(stmt: str) -> OpKind:
    """READ for a SELECT (or a transaction's ``EXISTS(SELECT ...)`` check), WRITE for anything else."""
    kind, start, end = _token(stmt, 0)
    if kind == "word" and stmt[start:end].upper() in ("SELECT", "EXISTS"):
        return OpKind.READ
    return OpKind.WRITE


# A table named by ARN in a statement: where the ARN starts, and the ARN.
_StatementArn = tuple[int, str] | None


def _table_ref(stmt: str, after: str, pos: int, allow_index: bool) -> tuple[str, _Token, _StatementArn]:
    """The table named at pos, the token following the reference (and its ``.index``, if allowed), and
    the ARN that named it, if one did."""
    kind, start, end = _token(stmt, pos)
    arn: _StatementArn = None
    if kind == "quoted":
        name = stmt[start + 1 : end - 1]
        if name.startswith("arn:"):
            derived = _name_from_arn(name)
            if derived is None:
                raise RequestShapeError(f"expected a table name or DynamoDB table ARN after {after}")
            arn = (start + 1, name)
            name = derived
    elif kind == "word":
        name = stmt[start:end]
    else:
        raise RequestShapeError(f"expected a table name after {after}")
    if not _is_table_name(name):
        raise RequestShapeError(f"the name after {after} is not a valid table name ({_NAME_RULE})")
    follow = _token(stmt, end)
    if allow_index and follow[0] == "other" and stmt[follow[1]] == ".":
        kind, start, end = _token(stmt, follow[2])
        if kind == "word" or (kind == "quoted" and "\\" not in stmt[start:end]):
            follow = _token(stmt, end)
        else:
            raise RequestShapeError('expected an index name after "table".')
    return name, follow, arn


def _parse_head(stmt: str) -> tuple[OpKind, str, int, _StatementArn]:
    """Token-by-token head parser: kind, table, and where the unparsed rest begins."""
    tok = _token(stmt, 0)
    if tok[0] != "word":
        raise RequestShapeError("a statement must start with SELECT, INSERT, UPDATE, DELETE or EXISTS")
    head = stmt[tok[1] : tok[2]].upper()
    in_exists = False
    if head == "EXISTS":
        tok = _token(stmt, tok[2])
        if tok[0] != "other" or stmt[tok[1]] != "(":
            raise RequestShapeError("expected ( after EXISTS")
        tok = _token(stmt, tok[2])
        if not _is_word(stmt, tok, "SELECT"):
            raise RequestShapeError("expected SELECT inside EXISTS(...)")
        head, in_exists = "SELECT", True

    if head == "SELECT":
        depth = 0
        while True:  # the projection, up to FROM at depth 0
            tok = _token(stmt, tok[2])
            kind = tok[0]
            if kind == "word":
                word = stmt[tok[1] : tok[2]].upper()
                if word == "FROM" and depth == 0:
                    break
                if word == "SELECT":
                    raise RequestShapeError("nested SELECT is not supported")
            elif kind == "quoted":
                if "\\" in stmt[tok[1] : tok[2]]:
                    raise RequestShapeError(_HEAD_SYNTAX)
            elif kind == "other" and stmt[tok[1]] in _PROJECTION_CHARS:
                char = stmt[tok[1]]
                if char in _OPENERS:
                    depth += 1
                elif char in _CLOSERS:
                    depth -= 1
            elif kind == "end":
                raise RequestShapeError("SELECT without FROM")
            else:
                raise RequestShapeError(_HEAD_SYNTAX)
        table, follow, arn = _table_ref(stmt, "FROM", tok[2], allow_index=True)
        result, allowed, end_ok = OpKind.READ, _FOLLOW_SELECT, not in_exists
    elif head == "INSERT":
        tok = _token(stmt, tok[2])
        if not _is_word(stmt, tok, "INTO"):
            raise RequestShapeError("expected INTO after INSERT")
        table, follow, arn = _table_ref(stmt, "INSERT INTO", tok[2], allow_index=False)
        result, allowed, end_ok = OpKind.WRITE, _FOLLOW_INSERT, False
    elif head == "UPDATE":
        table, follow, arn = _table_ref(stmt, "UPDATE", tok[2], allow_index=False)
        result, allowed, end_ok = OpKind.WRITE, _FOLLOW_UPDATE, False
    elif head == "DELETE":
        tok = _token(stmt, tok[2])
        if not _is_word(stmt, tok, "FROM"):
            raise RequestShapeError("expected FROM after DELETE")
        table, follow, arn = _table_ref(stmt, "DELETE FROM", tok[2], allow_index=False)
        result, allowed, end_ok = OpKind.WRITE, _FOLLOW_DELETE, False
    else:
        raise RequestShapeError("a statement must start with SELECT, INSERT, UPDATE, DELETE or EXISTS")

    kind, start, end = follow
    if kind == "end":
        if not end_ok:
            raise RequestShapeError("the statement ends right after the table name")
    elif kind == "word":
        if stmt[start:end].upper() not in allowed:
            raise RequestShapeError(
                "unexpected word after the table name (joins and aliases are not supported)"
            )
    elif not (in_exists and kind == "other" and stmt[start] == ")"):
        raise RequestShapeError("unexpected text after the table name (a statement names exactly one table)")
    return result, table, end, arn


def _parse_statement(stmt: str) -> tuple[OpKind, str, _StatementArn]:
    """The kind of a PartiQL statement, the one table it names and the ARN that named it, if one did;
    RequestShapeError when unsure."""
    if "`" in stmt:
        raise RequestShapeError("Ion literals (`...`) are not supported; use '...' strings or parameters")
    m = _fast_head(stmt)
    if m is not None:
        group = m.lastgroup
        if group is None:  # pragma: no cover - every branch ends with its table group or a keyword
            raise RequestShapeError(_HEAD_SYNTAX)
        result = OpKind.READ if group[0] == "s" else OpKind.WRITE
        table: str = m.group(group)
        end = m.end()
        arn: _StatementArn = None  # the fast heads take names only
    else:
        result, table, end, arn = _parse_head(stmt)
    # The rest is not parsed, but a second query hiding in it would name a table we never checked, and a
    # second statement after a `;` too (DynamoDB refuses it today; we do not lean on that).
    if ";" in stmt and _separator_after(stmt, end):
        raise RequestShapeError(
            "a `;` outside quotes (a second statement) is not supported; send one statement"
        )
    if _NESTED_HINT_RE.search(stmt, end) is not None:
        pos = end
        while True:
            kind, start, pos = _token(stmt, pos)
            if kind == "end":
                break
            if kind == "unterminated":
                raise RequestShapeError("unterminated quote")
            if kind == "word" and stmt[start:pos].upper() in ("SELECT", "FROM"):
                raise RequestShapeError(
                    "a nested query (SELECT or FROM after the table name) is not supported"
                )
    return result, table, arn


def _separator_after(stmt: str, pos: int) -> bool:
    while True:
        kind, start, pos = _token(stmt, pos)
        if kind == "end":
            return False
        if kind == "unterminated":
            raise RequestShapeError("unterminated quote")
        if kind == "other" and stmt[start] == ";":
            return True


def _statement(op: str, where: str, value: object) -> tuple[OpKind, str, _StatementArn]:
    if not isinstance(value, str):
        raise RequestShapeError(
            f"{op}: {where} must be a string (a PartiQL statement), not {_json_type(value)}"
        )
    if len(value) > MAX_STATEMENT_CHARS:
        # DynamoDB's own limit, checked before anything reads the statement (its cost grows with it)
        raise RequestShapeError(
            f"1 validation error detected: Value at '{where}' failed to satisfy constraint: Member must have "
            f"length less than or equal to {MAX_STATEMENT_CHARS} (it has {len(value)} characters)"
        )
    try:
        return _parse_statement(value)
    except RequestShapeError as exc:
        raise RequestShapeError(
            f"{op}: {where}: cannot determine the table ({exc}); the proxy only forwards statements of "
            f"the forms {_STATEMENT_FORMS}"
        ) from None


_STATEMENT_KEYS: Final = ((_needle("Statement"), 1),)


def _execute_statement(body: Mapping[str, Any]) -> _Extracted:
    value = body.get("Statement", _MISSING)
    if value is _MISSING:
        raise RequestShapeError("ExecuteStatement: Statement is missing; send one PartiQL statement")
    kind, table, arn = _statement("ExecuteStatement", "Statement", value)
    arns = (ArnUse(("Statement",), arn[1], at=arn[0]),) if arn is not None else ()
    return kind, frozenset((table,)), _STATEMENT_KEYS, arns


def _statement_list(op: str, list_key: str) -> _Extractor:
    list_needle = _needle(list_key)
    statement_needle = _needle("Statement")

    def extract(body: Mapping[str, Any]) -> _Extracted:
        statements = body.get(list_key, _MISSING)
        if not isinstance(statements, list) or not statements:
            raise RequestShapeError(
                f"{op}: {list_key} must be a non-empty array of {{Statement: ...}} objects"
            )
        tables: set[str] = set()
        arns: list[ArnUse] = []
        kind = OpKind.READ
        for i, entry in enumerate(statements):
            if not isinstance(entry, dict) or "Statement" not in entry:
                raise RequestShapeError(f"{op}: {list_key}[{i}] must be an object with a Statement")
            one_kind, table, arn = _statement(op, f"{list_key}[{i}].Statement", entry["Statement"])
            if one_kind is not OpKind.READ:
                kind = OpKind.WRITE
            tables.add(table)
            if arn is not None:
                arns.append(ArnUse((list_key, i, "Statement"), arn[1], at=arn[0]))
        read = ((list_needle, 1), (statement_needle, len(statements)))
        return kind, frozenset(tables), read, tuple(arns)

    return extract


def _build_extractors() -> dict[str, _Extractor]:
    name, arn, either = _Form.NAME, _Form.ARN, _Form.NAME_OR_ARN
    table_name = _Field("TableName", either)
    out: dict[str, _Extractor] = {}
    for op in (
        "GetItem",
        "Query",
        "Scan",
        "SearchVectors",
        "PutItem",
        "UpdateItem",
        "DeleteItem",
        "DescribeTable",
        "DescribeTimeToLive",
        "DescribeContinuousBackups",
        "DescribeContributorInsights",
        "DescribeKinesisStreamingDestination",
        "DescribeTableReplicaAutoScaling",
        "DeleteTable",
        "UpdateTable",
        "UpdateTimeToLive",
        "UpdateContinuousBackups",
        "UpdateContributorInsights",
        "UpdateTableReplicaAutoScaling",
        "EnableKinesisStreamingDestination",
        "DisableKinesisStreamingDestination",
        "UpdateKinesisStreamingDestination",
        "CreateBackup",
        "StartBulkPutItems",
    ):
        out[op] = _fields(op, table_name)
    for op in (
        "DescribeGlobalTable",
        "DescribeGlobalTableSettings",
        "CreateGlobalTable",
        "UpdateGlobalTable",
        "UpdateGlobalTableSettings",
    ):
        out[op] = _fields(op, _Field("GlobalTableName", name))
    for op in (
        "ListTagsOfResource",
        "GetResourcePolicy",
        "TagResource",
        "UntagResource",
        "PutResourcePolicy",
        "DeleteResourcePolicy",
    ):
        out[op] = _fields(op, _Field("ResourceArn", arn))
    for op in ("DescribeBackup", "DeleteBackup"):
        out[op] = _fields(op, _Field("BackupArn", arn))
    out["DescribeExport"] = _fields("DescribeExport", _Field("ExportArn", arn))
    out["DescribeImport"] = _fields("DescribeImport", _Field("ImportArn", arn))
    for op in ("DescribeBulkOperation", "CancelBulkOperation"):
        out[op] = _fields(op, _Field("BulkOperationArn", arn))
    out["CreateTable"] = _fields(
        "CreateTable", table_name, _Field("GlobalTableSourceArn", arn, required=False)
    )
    out["ExportTableToPointInTime"] = _fields("ExportTableToPointInTime", _Field("TableArn", arn))
    out["RestoreTableFromBackup"] = _fields(
        "RestoreTableFromBackup", _Field("TargetTableName", name), _Field("BackupArn", arn)
    )
    out["RestoreTableToPointInTime"] = _fields(
        "RestoreTableToPointInTime",
        _Field("TargetTableName", name),
        _Field("SourceTableArn", arn, required=False),
        _Field("SourceTableName", name, required=False),
        one_of=("SourceTableArn", "SourceTableName"),
    )
    out["ImportTable"] = _import_table
    # Account-level listings: an optional filter names a table; pagination cursors do not count.
    out["ListBackups"] = _fields("ListBackups", _Field("TableName", either, required=False))
    out["ListContributorInsights"] = _fields(
        "ListContributorInsights", _Field("TableName", either, required=False)
    )
    out["ListExports"] = _fields("ListExports", _Field("TableArn", arn, required=False))
    out["ListImports"] = _fields("ListImports", _Field("TableArn", arn, required=False))
    for op in ("ListTables", "DescribeLimits", "DescribeEndpoints", "ListGlobalTables", "ListBulkOperations"):
        out[op] = _no_tables
    out["BatchGetItem"] = _request_items("BatchGetItem")
    out["BatchWriteItem"] = _request_items("BatchWriteItem")
    out["TransactGetItems"] = _transact_items("TransactGetItems", ("Get",))
    out["TransactWriteItems"] = _transact_items(
        "TransactWriteItems", ("Put", "Update", "Delete", "ConditionCheck")
    )
    out["ExecuteStatement"] = _execute_statement
    out["BatchExecuteStatement"] = _statement_list("BatchExecuteStatement", "Statements")
    out["ExecuteTransaction"] = _statement_list("ExecuteTransaction", "TransactStatements")
    missing = OPERATIONS.keys() ^ out.keys()
    if missing:  # pragma: no cover - a programming error caught at import
        raise AssertionError(f"operations without a table extractor (or unknown): {sorted(missing)}")
    return out


_EXTRACTORS: Final[dict[str, _Extractor]] = _build_extractors()


def classify(op: Operation, body: Mapping[str, Any]) -> Classification:
    """Effective kind and tables of one request, in one pass; RequestShapeError when it cannot be checked."""
    kind, tables, keys_read, arns = _EXTRACTORS[op.name](body)
    return Classification(op.kind if kind is None else kind, tables, keys_read, arns)


def tables_touched(op: Operation, body: Mapping[str, Any]) -> frozenset[str]:
    """Every table the request names (ARNs mapped to table names); empty for account-level operations.

    Raises RequestShapeError when a table-bearing field is missing or of the wrong type, or when a
    PartiQL statement's table cannot be determined: what we cannot check, we refuse.
    """
    return _EXTRACTORS[op.name](body)[1]


_STATEMENT_LISTS: Final = {"BatchExecuteStatement": "Statements", "ExecuteTransaction": "TransactStatements"}


def effective_kind(op: Operation, body: Mapping[str, Any]) -> OpKind:
    """The operation's kind, except PartiQL requests whose statements are all reads: READ.

    Never raises: a malformed PartiQL body keeps the conservative WRITE.
    """
    if op.name == "ExecuteStatement":
        statement = body.get("Statement")
        return statement_kind(statement) if isinstance(statement, str) else op.kind
    list_key = _STATEMENT_LISTS.get(op.name)
    if list_key is None:
        return op.kind
    statements = body.get(list_key)
    if not isinstance(statements, list) or not statements:
        return op.kind
    for entry in statements:
        if not isinstance(entry, dict):
            return op.kind
        statement = entry.get("Statement")
        if not isinstance(statement, str) or statement_kind(statement) is not OpKind.READ:
            return op.kind
    return OpKind.READ


# JSON escapes that could spell an ASCII letter (\u0041..\u007F); without them, a key the classifier
# read can only appear in the raw body literally.
_LETTER_ESCAPE_RE: Final = re.compile(rb"\\u00[4-7]")


def keys_provably_unique(classification: Classification, raw: bytes) -> bool:
    """True when the raw body provably sends each key the classifier read only once.

    A JSON object with a duplicate key (``{"TableName": "orders", "TableName": "secret"}``) is read
    differently by different parsers; if DynamoDB kept the one we did not check, the table allowlist
    would be bypassed. Fast and sound, but not complete: False means "not proven", and the caller
    must then look for duplicates with a full parse.
    """
    if not classification.keys_read:
        return True
    if _LETTER_ESCAPE_RE.search(raw) is not None:
        return False
    for needle, times in classification.keys_read:
        if raw.count(needle) != times:
            return False
    return True
