"""The admission gate: every decision, and no exception for any input."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.core.errors import DynamoError
from sidecar.core.gate import Admitted, GatePolicy, admit
from sidecar.core.operations import OPERATIONS, TARGET_PREFIX, OpKind

from .test_operations import ACCOUNT, EXAMPLES, arn

# One region: a table ARN of it goes out as sent (tests/unit/core/test_arns.py covers re-targeting).
POLICY = GatePolicy(tables=frozenset({"orders", "users"}), regions=frozenset({"us-east-1"}), account=ACCOUNT)
OPEN = GatePolicy(
    tables=frozenset({"orders", "users"}), allow_control_plane=True, regions=POLICY.regions, account=ACCOUNT
)


def served(tables: Any, **settings: Any) -> GatePolicy:
    """A policy serving `tables` in POLICY's region and account (the examples' ARNs name both)."""
    return GatePolicy(frozenset(tables), regions=POLICY.regions, account=ACCOUNT, **settings)


def target(name: str) -> str:
    return TARGET_PREFIX + name


def body(value: Any) -> bytes:
    return orjson.dumps(value)


def refused(result: Admitted | DynamoError, code: str, status: int = 400) -> DynamoError:
    assert isinstance(result, DynamoError), result
    assert (result.status, result.code) == (status, code), result
    return result


def test_policy_defaults() -> None:
    policy = GatePolicy(tables=frozenset({"orders"}))
    assert policy.allow_control_plane is False
    assert policy.max_body_bytes == 16 * 1024 * 1024


def test_admits_a_read() -> None:
    result = admit(POLICY, target("GetItem"), body({"TableName": "orders", "Key": {"pk": {"S": "a"}}}))
    assert result == Admitted(OPERATIONS["GetItem"], OpKind.READ, frozenset({"orders"}))


def test_admits_a_write_by_arn() -> None:
    result = admit(POLICY, target("PutItem"), body({"TableName": arn("table/users"), "Item": {}}))
    assert result == Admitted(OPERATIONS["PutItem"], OpKind.WRITE, frozenset({"users"}))


def test_admits_batches_and_transactions_within_the_policy() -> None:
    batch: dict[str, Any] = {"RequestItems": {"orders": {"Keys": []}, "users": {"Keys": []}}}
    result = admit(POLICY, target("BatchGetItem"), body(batch))
    assert isinstance(result, Admitted)
    assert result.tables == {"orders", "users"}
    transact = {
        "TransactItems": [{"Put": {"TableName": "orders"}}, {"ConditionCheck": {"TableName": "users"}}]
    }
    result = admit(POLICY, target("TransactWriteItems"), body(transact))
    assert isinstance(result, Admitted)
    assert result.kind is OpKind.WRITE


@pytest.mark.parametrize(
    "header", [None, "", "GetItem", "DynamoDB_20120810.Nope", "DynamoDB_20120810.getitem"]
)
def test_unknown_or_missing_target(header: str | None) -> None:
    error = refused(admit(POLICY, header, body({"TableName": "orders"})), "UnknownOperationException")
    assert "X-Amz-Target" in error.message


def test_unknown_target_wins_over_everything_else() -> None:
    refused(admit(GatePolicy(frozenset(), max_body_bytes=1), "x", b"not json"), "UnknownOperationException")


def test_body_size_limit() -> None:
    policy = GatePolicy(frozenset({"orders"}), max_body_bytes=100)
    ok = body({"TableName": "orders", "Key": {"pk": {"S": "x" * (100 - 44)}}})
    assert len(ok) == 100
    assert isinstance(admit(policy, target("GetItem"), ok), Admitted)
    error = refused(admit(policy, target("GetItem"), ok + b" "), "RequestEntityTooLargeException", 413)
    assert "101" in error.message


def test_too_large_is_decided_before_parsing() -> None:
    policy = GatePolicy(frozenset({"orders"}), max_body_bytes=3)
    refused(admit(policy, target("GetItem"), b"{not json at all"), "RequestEntityTooLargeException", 413)


CONTROL_AND_ACCOUNT = sorted(n for n, op in OPERATIONS.items() if op.kind in (OpKind.CONTROL, OpKind.ACCOUNT))


@pytest.mark.parametrize("name", CONTROL_AND_ACCOUNT)
def test_control_and_account_operations_are_refused_by_default(name: str) -> None:
    error = refused(admit(POLICY, target(name), body(EXAMPLES[name][0])), "AccessDeniedException")
    assert name in error.message
    assert "allow_control_plane" in error.message


def test_control_plane_refusal_comes_before_parsing() -> None:
    refused(admit(POLICY, target("DeleteTable"), b"{{{"), "AccessDeniedException")


@pytest.mark.parametrize("name", CONTROL_AND_ACCOUNT)
def test_control_plane_allowed_still_checks_tables(name: str) -> None:
    request, tables = EXAMPLES[name]
    policy = served(tables, allow_control_plane=True)
    result = admit(policy, target(name), body(request))
    assert isinstance(result, Admitted), result
    assert result.tables == tables
    if tables:
        narrower = served({"something-else"}, allow_control_plane=True)
        refused(admit(narrower, target(name), body(request)), "AccessDeniedException")


@pytest.mark.parametrize("name", sorted(n for n, op in OPERATIONS.items() if op.kind is OpKind.DESCRIBE))
def test_describe_operations_need_no_control_plane(name: str) -> None:
    request, tables = EXAMPLES[name]
    result = admit(served(tables), target(name), body(request))
    assert isinstance(result, Admitted), result
    assert result.kind is OpKind.DESCRIBE


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_example_is_admitted_when_its_tables_are_allowed(name: str) -> None:
    request, tables = EXAMPLES[name]
    result = admit(served(tables, allow_control_plane=True), target(name), body(request))
    assert isinstance(result, Admitted), result
    assert result.operation is OPERATIONS[name]
    assert result.tables == tables


@pytest.mark.parametrize(
    ("raw", "detail"),
    [
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b"{'TableName': 'orders'}", "not valid JSON"),
        (b'{"TableName": "orders"} x', "not valid JSON"),
        (b'{"TableName": NaN}', "not valid JSON"),
        (b'\xef\xbb\xbf{"TableName": "orders"}', "not valid JSON"),
        (b'{"TableName": "\xff"}', "not valid JSON"),
        (b'{"TableName": "\\ud800"}', "not valid JSON"),
        (b"[" * 2000 + b"]" * 2000, "not valid JSON"),
        (b"[]", "not an object"),
        (b'"orders"', "not an object"),
        (b"null", "not an object"),
        (b"42", "not an object"),
    ],
)
def test_malformed_bodies(raw: bytes, detail: str) -> None:
    error = refused(admit(POLICY, target("GetItem"), raw), "SerializationException")
    assert detail in error.message


def test_serialization_errors_do_not_quote_the_body() -> None:
    error = refused(
        admit(POLICY, target("GetItem"), b'{"TableName": "s3cr3t-value" oops}'), "SerializationException"
    )
    assert "s3cr3t" not in error.message
    assert "line 1" in error.message


@pytest.mark.parametrize(
    "request_body",
    [
        {},
        {"TableName": None},
        {"TableName": 7},
        {"TableName": ["orders"]},
        {"TableName": "x"},
        {"TableName": "arn:aws:kinesis:us-east-1:1:table/orders"},
    ],
)
def test_shape_errors_become_validation_errors(request_body: dict[str, Any]) -> None:
    error = refused(admit(POLICY, target("GetItem"), body(request_body)), "ValidationException")
    assert error.message.startswith("GetItem: TableName")
    assert error.namespace == "com.amazon.coral.validate"


@pytest.mark.parametrize(
    ("operation", "request_body", "says"),
    [
        (
            "GetItem",
            {"tablename": "orders"},
            "'tablename' that GetItem does not define; keys are case-sensitive",
        ),
        ("GetItem", {"TableName": "orders", "Key": {}, "TABLENAME": "secrets"}, "did you mean 'TableName'"),
        (
            "TransactWriteItems",
            {
                "TransactItems": [
                    {"Put": {"TableName": "orders", "Item": {}}},
                    {"put": {"TableName": "secrets"}},
                ]
            },
            "TransactItems[1] has a key 'put'",
        ),
        (
            "TransactWriteItems",
            {"TransactItems": [{"Update": {"TableName": "orders", "Key": {}, "tableName": "secrets"}}]},
            "TransactItems[0].Update has a key 'tableName'",
        ),
        ("ExecuteTransaction", {"TransactStatements": [{"Statement": "x", "statement": "y"}]}, "'statement'"),
        ("Scan", {"TableName": "orders", "Bogus": 1}, "'Bogus' that Scan does not define; Scan takes"),
    ],
)
def test_keys_the_operation_does_not_define_are_refused(
    operation: str, request_body: dict[str, Any], says: str
) -> None:
    # DynamoDB's parser is lenient about key case: a second spelling could name a table the gate never read
    error = refused(admit(POLICY, target(operation), body(request_body)), "ValidationException")
    assert says in error.message, error.message
    assert "secrets" not in error.message


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE \"orders\" SET a = 1; INSERT INTO \"secrets\" VALUE {'pk': 'x'}",
        "SELECT * FROM orders WHERE pk = 'a';",
        "DELETE FROM \"orders\" WHERE pk = 'a' ; SELECT * FROM secrets",
    ],
)
def test_a_second_statement_after_a_semicolon_is_refused(statement: str) -> None:
    error = refused(
        admit(POLICY, target("ExecuteStatement"), body({"Statement": statement})), "ValidationException"
    )
    assert "`;` outside quotes" in error.message


def test_a_semicolon_inside_quotes_is_data() -> None:
    statement = "UPDATE \"orders\" SET note = 'a;b' WHERE pk = 'x;y'"
    admitted = admit(POLICY, target("ExecuteStatement"), body({"Statement": statement}))
    assert not isinstance(admitted, DynamoError) and admitted.tables == {"orders"}


def test_a_statement_over_dynamodbs_limit_is_refused_before_it_is_read() -> None:
    statement = "SELECT * FROM orders WHERE pk = '" + "x" * 8200 + "'"
    error = refused(
        admit(POLICY, target("ExecuteStatement"), body({"Statement": statement})), "ValidationException"
    )
    assert "less than or equal to 8192" in error.message and "x" * 20 not in error.message
    ok = "SELECT * FROM orders WHERE pk = '" + "x" * (8192 - 34) + "'"
    assert len(ok) == 8192 and not isinstance(
        admit(POLICY, target("ExecuteStatement"), body({"Statement": ok})), DynamoError
    )


def test_unparsable_statement_is_a_validation_error() -> None:
    error = refused(
        admit(POLICY, target("ExecuteStatement"), body({"Statement": 'SELECT * FROM "orders", "secrets"'})),
        "ValidationException",
    )
    assert "cannot determine the table" in error.message
    assert "secrets" not in error.message


def test_tables_outside_the_policy_are_listed() -> None:
    request: dict[str, Any] = {"RequestItems": {"orders": {}, "secrets": {}, "audit": {}}}
    error = refused(admit(POLICY, target("BatchGetItem"), body(request)), "AccessDeniedException")
    assert "audit, secrets" in error.message
    assert "It serves only: orders, users" in error.message
    assert "`tables`" in error.message


def test_empty_policy_refuses_every_table() -> None:
    refused(
        admit(GatePolicy(frozenset()), target("GetItem"), body({"TableName": "orders"})),
        "AccessDeniedException",
    )


def test_table_names_are_case_sensitive() -> None:
    refused(admit(POLICY, target("GetItem"), body({"TableName": "Orders"})), "AccessDeniedException")


@pytest.mark.parametrize(
    ("statement", "kind"),
    [
        ('SELECT * FROM "orders" WHERE pk = ?', OpKind.READ),
        ("INSERT INTO \"orders\" VALUE {'pk': ?}", OpKind.WRITE),
        ('UPDATE "users" SET a = ? WHERE pk = ?', OpKind.WRITE),
    ],
)
def test_partiql_effective_kind(statement: str, kind: OpKind) -> None:
    result = admit(
        POLICY, target("ExecuteStatement"), body({"Statement": statement, "Parameters": [{"S": "a"}]})
    )
    assert isinstance(result, Admitted)
    assert result.operation.kind is OpKind.WRITE
    assert result.kind is kind


def test_partiql_on_a_table_outside_the_policy() -> None:
    request = {
        "TransactStatements": [
            {"Statement": 'SELECT * FROM "orders"'},
            {"Statement": "SELECT * FROM secrets"},
        ]
    }
    error = refused(admit(POLICY, target("ExecuteTransaction"), body(request)), "AccessDeniedException")
    assert "secrets" in error.message


# --- duplicate keys: the table we check must be the one DynamoDB uses ----------------------------------


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("GetItem", b'{"TableName":"orders","TableName":"secrets"}'),
        ("GetItem", b'{"TableName":"secrets","TableName":"orders"}'),
        ("GetItem", b'{"Table\\u004eame":"secrets","TableName":"orders"}'),
        ("GetItem", b'{"TableName":"secrets","Table\\u004Eame":"orders"}'),
        ("GetItem", b'{"TableName":"secrets","Key":{},"\\u0054\\u0061bleName":"orders"}'),
        ("BatchWriteItem", b'{"RequestItems":{"secrets":[]},"RequestItems":{"orders":[]}}'),
        (
            "TransactWriteItems",
            b'{"TransactItems":[{"Put":{"TableName":"secrets"},"Put":{"TableName":"orders"}}]}',
        ),
        ("TransactWriteItems", b'{"TransactItems":[{"Put":{"TableName":"secrets","TableName":"orders"}}]}'),
        (
            "TransactWriteItems",
            b'{"TransactItems":[{"Put":{"TableName":"secrets"}}],"TransactItems":[{"Put":{"TableName":"orders"}}]}',
        ),
        ("ExecuteStatement", b'{"Statement":"SELECT * FROM secrets","Statement":"SELECT * FROM orders"}'),
        (
            "BatchExecuteStatement",
            b'{"Statements":[{"Statement":"SELECT * FROM secrets","Statement":"SELECT * FROM orders"}]}',
        ),
    ],
)
def test_duplicate_table_keys_are_refused(name: str, raw: bytes) -> None:
    error = refused(admit(POLICY, target(name), raw), "SerializationException")
    assert "repeats a key" in error.message
    assert "secrets" not in error.message


def test_the_same_check_on_control_operations() -> None:
    raw = b'{"TargetTableName":"orders","SourceTableName":"secrets","SourceTableName":"users"}'
    refused(admit(OPEN, target("RestoreTableToPointInTime"), raw), "SerializationException")
    raw = b'{"TableCreationParameters":{"TableName":"secrets"},"TableCreationParameters":{"TableName":"orders"}}'
    refused(admit(OPEN, target("ImportTable"), raw), "SerializationException")


@pytest.mark.parametrize(
    "raw",
    [
        # repeated attribute names inside an item are DynamoDB's business, not the gate's
        b'{"TableName":"orders","Item":{"a":{"S":"1"},"a":{"S":"2"}}}',
        b'{"TableName":"orders","Item":{"a":{"S":"caf\\u00e9"},"a":{"S":"2"}}}',
        # escapes are fine when no watched key is repeated
        b'{"TableName":"orders","Item":{"\\u0041":{"S":"x"}}}',
        b'{"\\u0054ableName":"orders","Item":{}}',
        # a watched key name elsewhere (an attribute called TableName) is not a repetition
        b'{"TableName":"orders","Item":{"TableName":{"S":"secrets"}}}',
        b'{"TableName":"orders","Item":{"x":{"S":"\\"TableName\\""}}}',
    ],
)
def test_harmless_repetitions_and_escapes_are_admitted(raw: bytes) -> None:
    result = admit(POLICY, target("PutItem"), raw)
    assert isinstance(result, Admitted), result
    assert result.tables == {"orders"}


def test_deeply_nested_body_with_an_escape_does_not_raise() -> None:
    depth = 1000
    raw = b'{"Table\\u004eame":"orders","Item":{"a":{"L":' + b"[" * depth + b"]" * depth + b"}}}"
    result = admit(POLICY, target("PutItem"), raw)
    assert isinstance(result, Admitted | DynamoError)


# --- never raises ---------------------------------------------------------------------------------------

_targets = st.one_of(
    st.none(),
    st.text(max_size=40),
    st.sampled_from([target(n) for n in sorted(OPERATIONS)]),
)
_policies = st.builds(
    GatePolicy,
    tables=st.frozensets(st.sampled_from(["orders", "users", "secrets", "abc"])),
    allow_control_plane=st.booleans(),
    max_body_bytes=st.sampled_from([0, 10, 1000, 16 * 1024 * 1024]),
)
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)
_table_values = st.one_of(
    _json,
    st.sampled_from(["orders", "users", "secrets", "ab", arn("table/orders"), arn("table/secrets/backup/1")]),
)
_statement_values = st.one_of(
    st.text(max_size=60),
    st.sampled_from(
        ['SELECT * FROM "orders"', "DELETE FROM secrets WHERE a = 1", "EXISTS(SELECT * FROM users)"]
    ),
)
_keys = st.sampled_from(
    [
        "TableName",
        "RequestItems",
        "TransactItems",
        "Statement",
        "Statements",
        "TransactStatements",
        "ResourceArn",
        "BackupArn",
        "TableArn",
        "SourceTableArn",
        "SourceTableName",
        "TargetTableName",
        "GlobalTableName",
        "TableCreationParameters",
        "ExportArn",
        "ImportArn",
        "BulkOperationArn",
        "GlobalTableSourceArn",
        "Key",
    ]
)
_shaped_bodies = st.dictionaries(
    _keys,
    st.one_of(
        _table_values,
        _statement_values,
        st.dictionaries(st.sampled_from(["orders", "users", "secrets", "TableName"]), _json, max_size=3),
        st.lists(
            st.dictionaries(
                st.sampled_from(
                    ["Get", "Put", "Update", "Delete", "ConditionCheck", "Statement", "TableName"]
                ),
                st.one_of(_statement_values, st.fixed_dictionaries({"TableName": _table_values}), _json),
                max_size=3,
            ),
            max_size=3,
        ),
    ),
    max_size=4,
)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(_policies, _targets, st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(policy: GatePolicy, header: str | None, raw: bytes) -> None:
    result = admit(policy, header, raw)
    assert isinstance(result, Admitted | DynamoError)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(_policies, _targets, _json)
def test_arbitrary_json_never_raises(policy: GatePolicy, header: str | None, value: Any) -> None:
    result = admit(policy, header, orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS))
    assert isinstance(result, Admitted | DynamoError)


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=300)
@given(_policies, st.sampled_from(sorted(OPERATIONS)), _shaped_bodies, st.booleans())
def test_request_shaped_json_never_raises_and_admits_only_allowed_tables(
    policy: GatePolicy, name: str, request_body: dict[str, Any], ascii_only: bool
) -> None:
    raw = json.dumps(request_body, ensure_ascii=ascii_only).encode()
    result = admit(policy, target(name), raw)
    assert isinstance(result, Admitted | DynamoError)
    if isinstance(result, Admitted):
        assert result.tables <= policy.tables
        assert result.operation is OPERATIONS[name]
        if result.operation.kind in (OpKind.CONTROL, OpKind.ACCOUNT):
            assert policy.allow_control_plane
    else:
        json.loads(result.body())


@given(st.binary(max_size=200))
def test_arbitrary_bytes_after_a_valid_prefix(tail: bytes) -> None:
    result = admit(OPEN, target("GetItem"), b'{"TableName":"orders"' + tail)
    assert isinstance(result, Admitted | DynamoError)


def test_the_replicators_attribute_namespace_is_refused_in_partiql_identifiers_not_literals() -> None:
    target_ = target("ExecuteStatement")
    named = body({"Statement": 'UPDATE "orders" SET "ddbsc:ts" = 1 WHERE pk = \'a\''})
    assert isinstance(admit(POLICY, target_, named), DynamoError)
    literal = body({"Statement": "UPDATE \"orders\" SET note = 'ddbsc:x' WHERE pk = 'a'"})
    assert not isinstance(admit(POLICY, target_, literal), DynamoError)
