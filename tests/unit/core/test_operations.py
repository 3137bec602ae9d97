"""Operation classification and table extraction, checked against botocore's DynamoDB model."""

from __future__ import annotations

import copy
import functools
import re
from typing import Any

import orjson
import pytest
from botocore.loaders import Loader
from botocore.model import ServiceModel
from botocore.validate import ParamValidator
from hypothesis import example, given
from hypothesis import strategies as st

from sidecar.core import operations as ops
from sidecar.core.operations import (
    OPERATIONS,
    TARGET_PREFIX,
    Classification,
    Operation,
    OpKind,
    RequestShapeError,
    classify,
    effective_kind,
    keys_provably_unique,
    operation_from_target,
    statement_kind,
    tables_touched,
)

ACCOUNT = "123456789012"


def arn(resource: str, region: str = "us-east-1", partition: str = "aws") -> str:
    return f"arn:{partition}:dynamodb:{region}:{ACCOUNT}:{resource}"


@functools.cache
def model() -> dict[str, Any]:
    loaded: dict[str, Any] = Loader().load_service_model("dynamodb", "service-2")
    return loaded


@functools.cache
def service_model() -> ServiceModel:
    return ServiceModel(model(), service_name="dynamodb")


# --- the operation table ------------------------------------------------------------------------------


def test_every_botocore_operation_is_classified_and_nothing_else() -> None:
    botocore_ops = set(model()["operations"])
    assert set(OPERATIONS) == botocore_ops
    assert len(OPERATIONS) == len(botocore_ops) >= 62


def test_operation_records_are_consistent() -> None:
    for name, op in OPERATIONS.items():
        assert op.name == name
        assert isinstance(op.kind, OpKind)


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("GetItem", OpKind.READ),
        ("Query", OpKind.READ),
        ("Scan", OpKind.READ),
        ("BatchGetItem", OpKind.READ),
        ("TransactGetItems", OpKind.READ),
        ("SearchVectors", OpKind.READ),
        ("PutItem", OpKind.WRITE),
        ("UpdateItem", OpKind.WRITE),
        ("DeleteItem", OpKind.WRITE),
        ("BatchWriteItem", OpKind.WRITE),
        ("TransactWriteItems", OpKind.WRITE),
        ("ExecuteStatement", OpKind.WRITE),
        ("BatchExecuteStatement", OpKind.WRITE),
        ("ExecuteTransaction", OpKind.WRITE),
        ("DescribeTable", OpKind.DESCRIBE),
        ("DescribeTimeToLive", OpKind.DESCRIBE),
        ("ListTagsOfResource", OpKind.DESCRIBE),
        ("DescribeContinuousBackups", OpKind.DESCRIBE),
        ("CreateTable", OpKind.CONTROL),
        ("DeleteTable", OpKind.CONTROL),
        ("UpdateTable", OpKind.CONTROL),
        ("UpdateTimeToLive", OpKind.CONTROL),
        ("TagResource", OpKind.CONTROL),
        ("CreateBackup", OpKind.CONTROL),
        ("RestoreTableFromBackup", OpKind.CONTROL),
        ("RestoreTableToPointInTime", OpKind.CONTROL),
        ("ExportTableToPointInTime", OpKind.CONTROL),
        ("ImportTable", OpKind.CONTROL),
        ("PutResourcePolicy", OpKind.CONTROL),
        ("ListTables", OpKind.ACCOUNT),
        ("DescribeLimits", OpKind.ACCOUNT),
        ("DescribeEndpoints", OpKind.ACCOUNT),
        ("ListBackups", OpKind.ACCOUNT),
        ("ListExports", OpKind.ACCOUNT),
        ("ListImports", OpKind.ACCOUNT),
        ("ListGlobalTables", OpKind.ACCOUNT),
    ],
)
def test_kinds_from_the_brief(name: str, kind: OpKind) -> None:
    assert OPERATIONS[name].kind is kind


def test_describe_operations_have_no_side_effects_by_name() -> None:
    for op in OPERATIONS.values():
        if op.kind is OpKind.DESCRIBE:
            assert op.name.startswith(("Describe", "List", "Get")), op.name
        if op.kind is OpKind.ACCOUNT:
            assert op.name.startswith(("Describe", "List")), op.name
        if op.name.startswith(("Create", "Delete", "Update", "Restore", "Tag", "Untag", "Put", "Enable")):
            assert op.kind in (OpKind.CONTROL, OpKind.WRITE), op.name


def test_opkind_is_a_str_enum() -> None:
    assert OpKind.READ.value == "read"
    assert isinstance(OpKind.READ, str)
    assert f"{OpKind.CONTROL}" == "control"
    assert [k.value for k in OpKind] == ["read", "write", "describe", "control", "account"]


def test_operation_is_frozen() -> None:
    op = OPERATIONS["GetItem"]
    with pytest.raises(AttributeError):
        op.name = "PutItem"  # type: ignore[misc]
    assert Operation("GetItem", OpKind.READ) == op


def test_operation_from_target() -> None:
    assert TARGET_PREFIX == "DynamoDB_20120810."
    for name, op in OPERATIONS.items():
        assert operation_from_target(TARGET_PREFIX + name) is op
    for bad in (None, "", "GetItem", "DynamoDB_20120810.", "DynamoDB_20120810.getitem",
                "DynamoDB_20111205.GetItem", "DynamoDB_20120810.GetItem ", " DynamoDB_20120810.GetItem",
                "DynamoDBStreams_20120810.GetRecords", "DynamoDB_20120810.__class__"):  # fmt: skip
        assert operation_from_target(bad) is None


# --- example requests, one per operation ---------------------------------------------------------------

KEY = {"pk": {"S": "a"}}

# operation -> (body, tables). Every body is a valid request per botocore's model (checked below).
EXAMPLES: dict[str, tuple[dict[str, Any], set[str]]] = {
    "GetItem": ({"TableName": "orders", "Key": KEY}, {"orders"}),
    "Query": ({"TableName": "orders", "KeyConditionExpression": "pk = :v"}, {"orders"}),
    "Scan": ({"TableName": "orders", "IndexName": "by-date"}, {"orders"}),
    "SearchVectors": (
        {"TableName": "orders", "IndexName": "vec", "SearchVector": [{"N": "0.1"}, {"N": "0.2"}], "TopK": 3},
        {"orders"},
    ),
    "PutItem": ({"TableName": "orders", "Item": KEY}, {"orders"}),
    "UpdateItem": ({"TableName": "orders", "Key": KEY, "UpdateExpression": "SET a = :a"}, {"orders"}),
    "DeleteItem": ({"TableName": "orders", "Key": KEY}, {"orders"}),
    "BatchGetItem": (
        {"RequestItems": {"orders": {"Keys": [KEY]}, arn("table/users"): {"Keys": [KEY]}}},
        {"orders", "users"},
    ),
    "BatchWriteItem": (
        {
            "RequestItems": {
                "orders": [{"PutRequest": {"Item": KEY}}],
                "audit.log-2": [{"DeleteRequest": {"Key": KEY}}],
            }
        },
        {"orders", "audit.log-2"},
    ),
    "TransactGetItems": (
        {
            "TransactItems": [
                {"Get": {"TableName": "orders", "Key": KEY}},
                {"Get": {"TableName": "users", "Key": KEY}},
            ]
        },
        {"orders", "users"},
    ),
    "TransactWriteItems": (
        {
            "TransactItems": [
                {"Put": {"TableName": "orders", "Item": KEY}},
                {"Update": {"TableName": "users", "Key": KEY, "UpdateExpression": "SET a = :a"}},
                {"Delete": {"TableName": arn("table/carts"), "Key": KEY}},
                {"ConditionCheck": {"TableName": "stock", "Key": KEY, "ConditionExpression": "a > :z"}},
            ]
        },
        {"orders", "users", "carts", "stock"},
    ),
    "ExecuteStatement": ({"Statement": 'SELECT * FROM "orders" WHERE pk = ?'}, {"orders"}),
    "BatchExecuteStatement": (
        {
            "Statements": [
                {"Statement": "SELECT * FROM orders WHERE pk = ?"},
                {"Statement": 'SELECT * FROM "users"."by-email" WHERE email = ?'},
            ]
        },
        {"orders", "users"},
    ),
    "ExecuteTransaction": (
        {
            "TransactStatements": [
                {"Statement": "INSERT INTO \"orders\" VALUE {'pk': ?}"},
                {"Statement": "UPDATE users SET n = n + 1 WHERE pk = ?"},
                {"Statement": 'DELETE FROM "carts" WHERE pk = ?'},
                {"Statement": 'EXISTS(SELECT * FROM "stock" WHERE pk = ?)'},
            ]
        },
        {"orders", "users", "carts", "stock"},
    ),
    "DescribeTable": ({"TableName": "orders"}, {"orders"}),
    "DescribeTimeToLive": ({"TableName": "orders"}, {"orders"}),
    "DescribeContinuousBackups": ({"TableName": "orders"}, {"orders"}),
    "DescribeContributorInsights": ({"TableName": "orders", "IndexName": "gsi"}, {"orders"}),
    "DescribeKinesisStreamingDestination": ({"TableName": "orders"}, {"orders"}),
    "DescribeTableReplicaAutoScaling": ({"TableName": "orders"}, {"orders"}),
    "DescribeGlobalTable": ({"GlobalTableName": "orders"}, {"orders"}),
    "DescribeGlobalTableSettings": ({"GlobalTableName": "orders"}, {"orders"}),
    "DescribeBackup": ({"BackupArn": arn("table/orders/backup/01489173575360-b308cd7d")}, {"orders"}),
    "DescribeExport": ({"ExportArn": arn("table/orders/export/01234567890123-a1b2c3d4")}, {"orders"}),
    "DescribeImport": ({"ImportArn": arn("table/orders/import/01234567890123-a1b2c3d4")}, {"orders"}),
    "DescribeBulkOperation": (
        {"BulkOperationArn": arn("table/orders/bulk-operation/0123456789")},
        {"orders"},
    ),
    "ListTagsOfResource": ({"ResourceArn": arn("table/orders")}, {"orders"}),
    "GetResourcePolicy": ({"ResourceArn": arn("table/orders/stream/2024-01-01T00:00:00.000")}, {"orders"}),
    "CreateTable": (
        {
            "TableName": "orders",
            "AttributeDefinitions": [{"AttributeName": "pk", "AttributeType": "S"}],
            "KeySchema": [{"AttributeName": "pk", "KeyType": "HASH"}],
            "BillingMode": "PAY_PER_REQUEST",
        },
        {"orders"},
    ),
    "DeleteTable": ({"TableName": "orders"}, {"orders"}),
    "UpdateTable": ({"TableName": "orders", "BillingMode": "PAY_PER_REQUEST"}, {"orders"}),
    "UpdateTimeToLive": (
        {"TableName": "orders", "TimeToLiveSpecification": {"Enabled": True, "AttributeName": "ttl"}},
        {"orders"},
    ),
    "UpdateContinuousBackups": (
        {"TableName": "orders", "PointInTimeRecoverySpecification": {"PointInTimeRecoveryEnabled": True}},
        {"orders"},
    ),
    "UpdateContributorInsights": ({"TableName": "orders", "ContributorInsightsAction": "ENABLE"}, {"orders"}),
    "UpdateTableReplicaAutoScaling": ({"TableName": "orders"}, {"orders"}),
    "EnableKinesisStreamingDestination": (
        {"TableName": "orders", "StreamArn": "arn:aws:kinesis:us-east-1:123456789012:stream/orders-changes"},
        {"orders"},
    ),
    "DisableKinesisStreamingDestination": (
        {"TableName": "orders", "StreamArn": "arn:aws:kinesis:us-east-1:123456789012:stream/orders-changes"},
        {"orders"},
    ),
    "UpdateKinesisStreamingDestination": (
        {"TableName": "orders", "StreamArn": "arn:aws:kinesis:us-east-1:123456789012:stream/orders-changes"},
        {"orders"},
    ),
    "CreateBackup": ({"TableName": "orders", "BackupName": "nightly"}, {"orders"}),
    "DeleteBackup": ({"BackupArn": arn("table/orders/backup/01489173575360-b308cd7d")}, {"orders"}),
    "RestoreTableFromBackup": (
        {
            "TargetTableName": "orders-restored",
            "BackupArn": arn("table/orders/backup/01489173575360-b308cd7d"),
        },
        {"orders-restored", "orders"},
    ),
    "RestoreTableToPointInTime": (
        {"TargetTableName": "orders-restored", "SourceTableName": "orders"},
        {"orders-restored", "orders"},
    ),
    "ExportTableToPointInTime": ({"TableArn": arn("table/orders"), "S3Bucket": "exports"}, {"orders"}),
    "ImportTable": (
        {
            "S3BucketSource": {"S3Bucket": "imports"},
            "InputFormat": "CSV",
            "TableCreationParameters": {
                "TableName": "orders-imported",
                "AttributeDefinitions": [{"AttributeName": "pk", "AttributeType": "S"}],
                "KeySchema": [{"AttributeName": "pk", "KeyType": "HASH"}],
                "BillingMode": "PAY_PER_REQUEST",
            },
        },
        {"orders-imported"},
    ),
    "CreateGlobalTable": (
        {"GlobalTableName": "orders", "ReplicationGroup": [{"RegionName": "us-east-1"}]},
        {"orders"},
    ),
    "UpdateGlobalTable": (
        {"GlobalTableName": "orders", "ReplicaUpdates": [{"Create": {"RegionName": "eu-west-1"}}]},
        {"orders"},
    ),
    "UpdateGlobalTableSettings": ({"GlobalTableName": "orders"}, {"orders"}),
    "TagResource": (
        {"ResourceArn": arn("table/orders"), "Tags": [{"Key": "team", "Value": "a"}]},
        {"orders"},
    ),
    "UntagResource": ({"ResourceArn": arn("table/orders"), "TagKeys": ["team"]}, {"orders"}),
    "PutResourcePolicy": ({"ResourceArn": arn("table/orders"), "Policy": "{}"}, {"orders"}),
    "DeleteResourcePolicy": ({"ResourceArn": arn("table/orders")}, {"orders"}),
    "StartBulkPutItems": (
        {
            "TableName": "orders",
            "InputS3Configuration": {"S3Bucket": "in", "InputFormat": "DYNAMODB_JSON"},
            "OutputS3Configuration": {"S3Bucket": "out", "OutputType": ["ERROR"]},
        },
        {"orders"},
    ),
    "CancelBulkOperation": ({"BulkOperationArn": arn("table/orders/bulk-operation/0123456789")}, {"orders"}),
    "ListTables": ({"ExclusiveStartTableName": "not-a-table-we-touch", "Limit": 10}, set()),
    "DescribeLimits": ({}, set()),
    "DescribeEndpoints": ({}, set()),
    "ListBackups": ({"TableName": "orders"}, {"orders"}),
    "ListExports": ({"TableArn": arn("table/orders")}, {"orders"}),
    "ListImports": ({}, set()),
    "ListGlobalTables": ({"ExclusiveStartGlobalTableName": "whatever"}, set()),
    "ListContributorInsights": ({}, set()),
    "ListBulkOperations": ({}, set()),
}


def test_there_is_an_example_for_every_operation() -> None:
    assert set(EXAMPLES) == set(OPERATIONS)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_examples_are_valid_requests_per_botocore(name: str) -> None:
    body, _ = EXAMPLES[name]
    shape = service_model().operation_model(name).input_shape
    report = ParamValidator().validate(body, shape)
    assert not report.has_errors(), report.generate_report()


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_tables_touched_for_every_operation(name: str) -> None:
    body, expected = EXAMPLES[name]
    op = OPERATIONS[name]
    assert tables_touched(op, body) == frozenset(expected)
    found = classify(op, body)
    assert isinstance(found, Classification)
    assert found.tables == frozenset(expected)
    assert found.kind is effective_kind(op, body)


def test_empty_requests_for_account_operations() -> None:
    for op in OPERATIONS.values():
        if op.name in ("ListTables", "DescribeLimits", "DescribeEndpoints", "ListGlobalTables",
                       "ListBulkOperations", "ListBackups", "ListExports", "ListImports",
                       "ListContributorInsights"):  # fmt: skip
            assert tables_touched(op, {}) == frozenset()
        else:
            with pytest.raises(RequestShapeError):
                tables_touched(op, {})


# --- the model's table-bearing fields, all accounted for -----------------------------------------------

TABLE_SHAPES = {
    "TableName",
    "TableArn",
    "BackupArn",
    "ExportArn",
    "ImportArn",
    "BulkOperationArn",
    "ResourceArnString",
    "PartiQLStatement",
}
NOT_TABLES = {"StreamArn", "AutoScalingRoleArn"}  # Kinesis streams, IAM roles
# Pagination cursors name where a listing resumes, not a table the request touches.
IGNORED = {
    ("ListTables", ".ExclusiveStartTableName"),
    ("ListGlobalTables", ".ExclusiveStartGlobalTableName"),
    ("ListBackups", ".ExclusiveStartBackupArn"),
}


def _table_fields() -> dict[tuple[str, str], str]:
    """(operation, path) -> shape for every input field that could name a table."""
    shapes = model()["shapes"]
    found: dict[tuple[str, str], str] = {}

    def walk(op: str, shape_name: str, path: str, seen: frozenset[str]) -> None:
        if shape_name in seen:
            return
        seen = seen | {shape_name}
        shape = shapes[shape_name]
        if shape["type"] == "structure":
            for member, ref in shape["members"].items():
                target = ref["shape"]
                if shapes[target]["type"] == "string" and target not in NOT_TABLES:
                    if target in TABLE_SHAPES or member.endswith(("Arn", "TableName")):
                        found[(op, f"{path}.{member}")] = target
                walk(op, target, f"{path}.{member}", seen)
        elif shape["type"] == "list":
            walk(op, shape["member"]["shape"], path + "[*]", seen)
        elif shape["type"] == "map":
            if shape["key"]["shape"] in TABLE_SHAPES:
                found[(op, path + "{key}")] = shape["key"]["shape"]
            walk(op, shape["value"]["shape"], path + "{*}", seen)

    for name, op in model()["operations"].items():
        if "input" in op:
            walk(name, op["input"]["shape"], "", frozenset())
    return found


def test_table_field_inventory_is_what_the_extractors_know() -> None:
    # When botocore adds a field that can name a table, this fails: teach operations.py about it.
    fields = _table_fields()
    covered = {key for key in fields if key not in IGNORED}
    assert IGNORED <= set(fields)
    assert covered == COVERED


COVERED = {
    ("BatchExecuteStatement", ".Statements[*].Statement"),
    ("BatchGetItem", ".RequestItems{key}"),
    ("BatchWriteItem", ".RequestItems{key}"),
    ("CancelBulkOperation", ".BulkOperationArn"),
    ("CreateBackup", ".TableName"),
    ("CreateGlobalTable", ".GlobalTableName"),
    ("CreateTable", ".TableName"),
    ("CreateTable", ".GlobalTableSourceArn"),
    ("DeleteBackup", ".BackupArn"),
    ("DeleteItem", ".TableName"),
    ("DeleteResourcePolicy", ".ResourceArn"),
    ("DeleteTable", ".TableName"),
    ("DescribeBackup", ".BackupArn"),
    ("DescribeBulkOperation", ".BulkOperationArn"),
    ("DescribeContinuousBackups", ".TableName"),
    ("DescribeContributorInsights", ".TableName"),
    ("DescribeExport", ".ExportArn"),
    ("DescribeGlobalTable", ".GlobalTableName"),
    ("DescribeGlobalTableSettings", ".GlobalTableName"),
    ("DescribeImport", ".ImportArn"),
    ("DescribeKinesisStreamingDestination", ".TableName"),
    ("DescribeTable", ".TableName"),
    ("DescribeTableReplicaAutoScaling", ".TableName"),
    ("DescribeTimeToLive", ".TableName"),
    ("DisableKinesisStreamingDestination", ".TableName"),
    ("EnableKinesisStreamingDestination", ".TableName"),
    ("ExecuteStatement", ".Statement"),
    ("ExecuteTransaction", ".TransactStatements[*].Statement"),
    ("ExportTableToPointInTime", ".TableArn"),
    ("GetItem", ".TableName"),
    ("GetResourcePolicy", ".ResourceArn"),
    ("ImportTable", ".TableCreationParameters.TableName"),
    ("ListBackups", ".TableName"),
    ("ListContributorInsights", ".TableName"),
    ("ListExports", ".TableArn"),
    ("ListImports", ".TableArn"),
    ("ListTagsOfResource", ".ResourceArn"),
    ("PutItem", ".TableName"),
    ("PutResourcePolicy", ".ResourceArn"),
    ("Query", ".TableName"),
    ("RestoreTableFromBackup", ".TargetTableName"),
    ("RestoreTableFromBackup", ".BackupArn"),
    ("RestoreTableToPointInTime", ".SourceTableArn"),
    ("RestoreTableToPointInTime", ".SourceTableName"),
    ("RestoreTableToPointInTime", ".TargetTableName"),
    ("Scan", ".TableName"),
    ("SearchVectors", ".TableName"),
    ("StartBulkPutItems", ".TableName"),
    ("TagResource", ".ResourceArn"),
    ("TransactGetItems", ".TransactItems[*].Get.TableName"),
    ("TransactWriteItems", ".TransactItems[*].ConditionCheck.TableName"),
    ("TransactWriteItems", ".TransactItems[*].Put.TableName"),
    ("TransactWriteItems", ".TransactItems[*].Delete.TableName"),
    ("TransactWriteItems", ".TransactItems[*].Update.TableName"),
    ("UntagResource", ".ResourceArn"),
    ("UpdateContinuousBackups", ".TableName"),
    ("UpdateContributorInsights", ".TableName"),
    ("UpdateGlobalTable", ".GlobalTableName"),
    ("UpdateGlobalTableSettings", ".GlobalTableName"),
    ("UpdateItem", ".TableName"),
    ("UpdateKinesisStreamingDestination", ".TableName"),
    ("UpdateTable", ".TableName"),
    ("UpdateTableReplicaAutoScaling", ".TableName"),
    ("UpdateTimeToLive", ".TableName"),
}

_PATH_TOKEN = re.compile(r"\.([A-Za-z]+)|\[\*\]|\{key\}")


def _set_path(obj: Any, path: str, value: str) -> int:
    """Set every place matching path (``[*]``: each element, ``{key}``: rename each key) to value."""
    tokens = [m.group(0) for m in _PATH_TOKEN.finditer(path)]
    assert "".join(tokens) == path

    def go(node: Any, i: int) -> int:
        token = tokens[i]
        last = i == len(tokens) - 1
        if token == "[*]":
            return sum(go(element, i + 1) for element in node) if isinstance(node, list) else 0
        if token == "{key}":
            assert last and isinstance(node, dict)
            first = next(iter(node))
            node[value] = node.pop(first)
            return 1
        key = token[1:]
        if not isinstance(node, dict):
            return 0
        if last:
            node[key] = value
            return 1
        return go(node[key], i + 1) if key in node else 0

    return go(obj, 0)


def _sentinels(shape: str, member: str) -> list[str]:
    name = "sentinel-t_1.x"
    table_arn = arn(f"table/{name}", region="eu-west-1", partition="aws-cn")
    if shape == "PartiQLStatement":
        return [f'SELECT * FROM "{name}" WHERE pk = ?', f'select a from "{table_arn}"']
    if shape == "TableName":
        return [name]
    if shape == "TableArn" and not member.endswith("Arn"):  # TableName fields take a name or an ARN
        return [name, table_arn, table_arn + "/index/gsi"]
    suffix = {"BackupArn": "/backup/0123", "ExportArn": "/export/0123", "ImportArn": "/import/0123"}
    return [table_arn + suffix.get(member.rsplit(".", 1)[-1], "")]


@pytest.mark.parametrize(("name", "path"), sorted(COVERED))
def test_every_table_field_is_extracted(name: str, path: str) -> None:
    shape = _table_fields()[(name, path)]
    for sentinel in _sentinels(shape, path):
        body = copy.deepcopy(EXAMPLES[name][0])
        if _set_path(body, path, sentinel) == 0:  # optional field absent from the example: add it
            assert "[" not in path and path.count(".") == 1, path
            body[path[1:]] = sentinel
        assert "sentinel-t_1.x" in tables_touched(OPERATIONS[name], body), (name, path, sentinel)


# --- field shapes: missing, wrong type, bad names and ARNs ---------------------------------------------

SECRET = "s3cr3t-value"


@pytest.mark.parametrize("value", [None, 1, 1.5, True, [], {}, ["orders"], {"S": "orders"}])
def test_wrong_type_is_refused(value: Any) -> None:
    for name in ("GetItem", "DescribeTable", "CreateTable", "ListBackups", "RestoreTableToPointInTime"):
        body = copy.deepcopy(EXAMPLES[name][0])
        body["TableName" if "TableName" in body else "TargetTableName"] = value
        with pytest.raises(RequestShapeError, match="must be a string"):
            tables_touched(OPERATIONS[name], body)


@pytest.mark.parametrize(
    "value",
    ["", "ab", "x" * 256, "orders table", "orders/x", "ördérs", "orders\n", "arn:", SECRET + "!"],
)
def test_invalid_table_names_are_refused_without_echoing_them(value: str) -> None:
    with pytest.raises(RequestShapeError) as info:
        tables_touched(OPERATIONS["GetItem"], {"TableName": value, "Key": KEY})
    assert str(info.value).startswith("GetItem: TableName")
    assert SECRET not in str(info.value)


def test_boundary_table_names() -> None:
    for value in ("abc", "x" * 255, "A.b-c_9", "..."):
        assert tables_touched(OPERATIONS["GetItem"], {"TableName": value}) == {value}


@pytest.mark.parametrize(
    ("value", "table"),
    [
        (arn("table/orders"), "orders"),
        (arn("table/orders/index/by-date"), "orders"),
        (arn("table/orders/stream/2024-01-01T00:00:00.000"), "orders"),
        (arn("table/orders", partition="aws-us-gov", region="us-gov-west-1"), "orders"),
        ("arn:aws:dynamodb:::table/orders", "orders"),
    ],
)
def test_table_arns(value: str, table: str) -> None:
    assert tables_touched(OPERATIONS["GetItem"], {"TableName": value}) == {table}
    assert tables_touched(OPERATIONS["TagResource"], {"ResourceArn": value}) == {table}


@pytest.mark.parametrize(
    "value",
    [
        "arn:aws:kinesis:us-east-1:123456789012:table/orders",
        "arn:aws:dynamodb:us-east-1:123456789012:global-table/orders",
        "arn:aws:dynamodb:us-east-1:123456789012:bulk-operation/0123456789abcdef",
        "arn:aws:dynamodb:us-east-1:123456789012:table/",
        "arn:aws:dynamodb:us-east-1:123456789012:table/ab",
        "arn:aws:dynamodb:us-east-1:123456789012:table//orders",
        "arn:aws:dynamodb:us-east-1:123456789012:TABLE/orders",
        "arn:aws:dynamodb:us-east-1:table/orders",
        "arn:aws:backup:us-east-1:123456789012:recovery-point:abc",
        "orders",
        "",
    ],
)
def test_arns_that_name_no_table_are_refused(value: str) -> None:
    with pytest.raises(RequestShapeError):
        tables_touched(OPERATIONS["TagResource"], {"ResourceArn": value})
    with pytest.raises(RequestShapeError):
        tables_touched(OPERATIONS["DescribeBackup"], {"BackupArn": value})


def test_name_fields_do_not_take_arns() -> None:
    with pytest.raises(RequestShapeError):
        tables_touched(OPERATIONS["DescribeGlobalTable"], {"GlobalTableName": arn("table/orders")})


def test_restore_to_point_in_time_needs_a_source() -> None:
    op = OPERATIONS["RestoreTableToPointInTime"]
    with pytest.raises(RequestShapeError, match="SourceTableArn or SourceTableName"):
        tables_touched(op, {"TargetTableName": "orders-restored"})
    both = {"TargetTableName": "t-new", "SourceTableName": "t-a", "SourceTableArn": arn("table/t-b")}
    assert tables_touched(op, both) == {"t-new", "t-a", "t-b"}


def test_create_table_with_global_table_source() -> None:
    body = {"TableName": "orders", "GlobalTableSourceArn": arn("table/orders", region="eu-west-1")}
    assert tables_touched(OPERATIONS["CreateTable"], body) == {"orders"}
    body["GlobalTableSourceArn"] = "orders"
    with pytest.raises(RequestShapeError):
        tables_touched(OPERATIONS["CreateTable"], body)


@pytest.mark.parametrize(
    "params", [None, "orders", [], {}, {"TableName": None}, {"TableName": 3}, {"tablename": "orders"}]
)
def test_import_table_shapes(params: Any) -> None:
    with pytest.raises(RequestShapeError, match="ImportTable: TableCreationParameters"):
        tables_touched(OPERATIONS["ImportTable"], {"TableCreationParameters": params})


@pytest.mark.parametrize("name", ["BatchGetItem", "BatchWriteItem"])
@pytest.mark.parametrize("items", [None, {}, [], "orders", [{"orders": {}}]])
def test_request_items_shapes(name: str, items: Any) -> None:
    with pytest.raises(RequestShapeError, match="RequestItems"):
        tables_touched(OPERATIONS[name], {"RequestItems": items})


def test_request_items_keys_are_checked() -> None:
    with pytest.raises(RequestShapeError, match="RequestItems key"):
        tables_touched(OPERATIONS["BatchGetItem"], {"RequestItems": {"orders": {}, "no": {}}})


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (None, "non-empty array"),
        ([], "non-empty array"),
        ({"Put": {}}, "non-empty array"),
        (["x"], r"TransactItems\[0\] must be an object"),
        ([{}], r"TransactItems\[0\] has none of"),
        ([{"Get": {"TableName": "orders"}}], r"TransactItems\[0\] has none of"),
        ([{"Put": {"TableName": "orders"}}, {"Put": "orders"}], r"TransactItems\[1\].Put must be an object"),
        ([{"Put": {"Item": {}}}], r"TransactItems\[0\].Put.TableName is missing"),
        ([{"Put": {"TableName": 5}}], r"TransactItems\[0\].Put.TableName must be a string"),
        ([{"Delete": {"TableName": "x!"}}], r"TransactItems\[0\].Delete.TableName is not a valid"),
    ],
)
def test_transact_write_shapes(items: Any, message: str) -> None:
    with pytest.raises(RequestShapeError, match=message):
        tables_touched(OPERATIONS["TransactWriteItems"], {"TransactItems": items})


def test_transact_item_with_two_actions_counts_both() -> None:
    body = {"TransactItems": [{"Put": {"TableName": "orders"}, "Delete": {"TableName": "users"}}]}
    assert tables_touched(OPERATIONS["TransactWriteItems"], body) == {"orders", "users"}


def test_transact_get_only_reads_get() -> None:
    op = OPERATIONS["TransactGetItems"]
    assert tables_touched(op, {"TransactItems": [{"Get": {"TableName": "orders"}}]}) == {"orders"}
    with pytest.raises(RequestShapeError, match="has none of Get"):
        tables_touched(op, {"TransactItems": [{"Put": {"TableName": "orders"}}]})


@pytest.mark.parametrize("name", ["BatchExecuteStatement", "ExecuteTransaction"])
@pytest.mark.parametrize(
    "statements",
    [
        None,
        [],
        {},
        "SELECT * FROM t",
        ["SELECT * FROM orders"],
        [{}],
        [{"Statement": None}],
        [{"Statement": 1}],
    ],
)
def test_statement_list_shapes(name: str, statements: Any) -> None:
    key = "Statements" if name == "BatchExecuteStatement" else "TransactStatements"
    with pytest.raises(RequestShapeError, match=name):
        tables_touched(OPERATIONS[name], {key: statements})


@pytest.mark.parametrize("statement", [None, 1, [], {"S": "x"}])
def test_execute_statement_shapes(statement: Any) -> None:
    op = OPERATIONS["ExecuteStatement"]
    with pytest.raises(RequestShapeError, match="ExecuteStatement: Statement"):
        tables_touched(op, {"Statement": statement})
    with pytest.raises(RequestShapeError, match="ExecuteStatement: Statement is missing"):
        tables_touched(op, {})


# --- PartiQL ---------------------------------------------------------------------------------------------


def parse(statement: str) -> tuple[OpKind, str]:
    kind, table, _arn = ops._parse_statement(statement)
    return kind, table


R, W = OpKind.READ, OpKind.WRITE


@pytest.mark.parametrize(
    ("statement", "kind", "table"),
    [
        ('SELECT * FROM "orders"', R, "orders"),
        ("SELECT * FROM orders", R, "orders"),
        ('select * from "orders" where pk = ?', R, "orders"),
        ('SeLeCt * FrOm "orders" WhErE pk = ?', R, "orders"),
        ('  \n\tSELECT * FROM "orders" WHERE pk = ?', R, "orders"),
        ('SELECT * FROM "orders"."by-date" WHERE d > ?', R, "orders"),
        ("SELECT * FROM orders.bydate WHERE d > ?", R, "orders"),
        ('SELECT * FROM "orders" . "by-date"', R, "orders"),
        ('SELECT * FROM "my-table.v2_x" WHERE pk = ?', R, "my-table.v2_x"),
        ('SELECT a, b.c, "d e"[0], f[12].g FROM "orders" WHERE pk = ?', R, "orders"),
        ('SELECT "FROM x", "select" FROM "orders" WHERE pk = ?', R, "orders"),
        ("SELECT * FROM \"orders\" WHERE a = 'FROM secrets'", R, "orders"),
        ("SELECT * FROM \"orders\" WHERE a = 'x''FROM secrets'", R, "orders"),
        ('SELECT * FROM "orders" WHERE "from" = ? AND "select" = ?', R, "orders"),
        ('SELECT * FROM "orders" ORDER BY sk DESC', R, "orders"),
        ('SELECT * FROM "orders"WHERE pk = ?', R, "orders"),
        ('SELECT size(a) FROM "orders" WHERE pk = ?', R, "orders"),
        ('SELECT * FROM "orders" WHERE pk = ?\n', R, "orders"),
        (f'SELECT * FROM "{arn("table/orders")}" WHERE pk = ?', R, "orders"),
        ('EXISTS(SELECT * FROM "orders" WHERE pk = ?)', R, "orders"),
        ('exists ( select * from "orders" where pk = ? )', R, "orders"),
        ("INSERT INTO \"orders\" VALUE {'pk': ?, 'FROM': 'select'}", W, "orders"),
        ("insert into orders value {'pk': 'a'}", W, "orders"),
        ('UPDATE "orders" SET a = ? WHERE pk = ?', W, "orders"),
        ('UPDATE "orders" REMOVE a WHERE pk = ?', W, "orders"),
        ("update orders set a = 'SELECT x FROM y' where pk = ?", W, "orders"),
        ('DELETE FROM "orders" WHERE pk = ?', W, "orders"),
        ('DELETE FROM "orders" WHERE pk = ? RETURNING ALL OLD *', W, "orders"),
        ('delete from orders where "from" = ?', W, "orders"),
    ],
)
def test_statements(statement: str, kind: OpKind, table: str) -> None:
    assert parse(statement) == (kind, table)
    assert ops._parse_head(statement)[:2] == (kind, table)
    assert statement_kind(statement) is kind


@pytest.mark.parametrize(
    "statement",
    [
        "",
        "   ",
        "SELECT",
        "SELECT *",
        "SELECT * FROM",
        'SELECT * FROM ""',
        'SELECT * FROM "ab"',
        'SELECT * FROM "orders',
        "SELECT * FROM 'orders'",
        "SELECT * FROM ?",
        'SELECT * FROM "orders", "secrets"',
        'SELECT * FROM "orders" JOIN "secrets" ON a = b',
        'SELECT * FROM "orders" AS o WHERE pk = ?',
        'SELECT * FROM "orders" o',
        'SELECT * FROM "orders";',
        'SELECT * FROM "orders"."idx"."x"',
        'SELECT * FROM "orders". WHERE pk = ?',
        'SELECT * FROM "orders" WHERE pk IN (SELECT pk FROM "secrets")',
        'SELECT * FROM "orders" WHERE pk = ? UNION SELECT * FROM "secrets"',
        'SELECT (SELECT x FROM "secrets") FROM "orders"',
        'SELECT a.from FROM "orders"',
        "SELECT FROM FROM orders",
        "SELECT 'x' FROM \"orders\"",
        'SELECT \'\\\' FROM "orders" --\' FROM "secrets"',
        'SELECT /* FROM "orders" */ * FROM "secrets"',
        'SELECT * -- FROM "orders"\n FROM "secrets"',
        '/* c */ SELECT * FROM "orders"',
        '-- c\nSELECT * FROM "orders"',
        'SELECT * FROM "orders" -- comment',
        'SELECT "a\\" FROM "orders"',
        'SELECT * FROM "orders"."i\\x"',
        'SELECT `"` FROM "secrets" WHERE "a" = `"` FROM "orders"',
        'SELECT * FROM "orders" WHERE a = `{x: 1}`',
        "SELECT * FROM orders$x",
        'SELECT * FROM "arn:aws:dynamodb:r:1:global-table/orders"',
        'SELECT * FROM "orders" WHERE a = \'unterminated select',
        'SELECT * FROM "orders" WHERE a = "unterminated select',
        "SELECT * FROM orders-v2",
        "SELECT * FROM ordérs",
        "SELECT ) FROM orders",
        "SELECTED * FROM orders",
        'EXISTS SELECT * FROM "orders"',
        'EXISTS(DELETE FROM "orders" WHERE pk = ?)',
        'EXISTS(SELECT * FROM "orders"',
        "INSERT orders VALUE {'pk': 'a'}",
        'INSERT INTO "orders"',
        'INSERT INTO "orders" SELECT * FROM "secrets"',
        "INSERT INTO \"orders\" VALUES {'pk': 'a'}",
        "INSERT INTO \"orders\".\"idx\" VALUE {'pk': 'a'}",
        'INSERT INTO "orders" VALUE {\'pk\': (SELECT a FROM "secrets")}',
        'UPDATE "orders"',
        'UPDATE "orders", "secrets" SET a = 1',
        "UPDATE SET a = 1 WHERE pk = ?",
        'DELETE "orders" WHERE pk = ?',
        'DELETE FROM "orders"',
        'DELETE FROM "orders" USING "secrets" WHERE pk = ?',
        'REPLACE INTO "orders" VALUE {}',
        'UPSERT INTO "orders" VALUE {}',
        'CREATE TABLE "orders"',
        '(SELECT * FROM "orders")',
        "?",
    ],
)
def test_statements_we_refuse(statement: str) -> None:
    with pytest.raises(RequestShapeError):
        parse(statement)
    op = OPERATIONS["ExecuteStatement"]
    with pytest.raises(RequestShapeError) as info:
        tables_touched(op, {"Statement": statement})
    message = str(info.value)
    assert message.startswith("ExecuteStatement: Statement: cannot determine the table")
    assert "secrets" not in message  # never quotes the statement


@pytest.mark.parametrize(
    "statement",
    [
        'SELECT * FROM "orders" WHERE pk = ?',
        'select a, b.c, "d"[3] from orders where pk = ?',
        'SELECT * FROM "orders"."by-date"',
        "INSERT INTO \"orders\" VALUE {'pk': ?}",
        'UPDATE "orders" SET a = ? WHERE pk = ?',
        'DELETE FROM "orders" WHERE pk = ?',
    ],
)
def test_common_statements_take_the_fast_path(statement: str) -> None:
    # keeps the differential test below meaningful: the fast path is really used
    m = ops._fast_head(statement)
    assert m is not None
    assert m.lastgroup is not None
    assert m.group(m.lastgroup) == "orders"


def test_statement_kind() -> None:
    assert statement_kind("SELECT * FROM t") is R
    assert statement_kind("  select * from t") is R
    assert statement_kind("EXISTS(SELECT * FROM t WHERE pk = ?)") is R
    for stmt in ("INSERT INTO t VALUE {}", "UPDATE t SET a = 1", "DELETE FROM t WHERE a = 1", "", "SELECTED",
                 "/* */ SELECT * FROM t", "'SELECT'", '"SELECT"'):  # fmt: skip
        assert statement_kind(stmt) is W


def test_long_statements_are_handled() -> None:
    where = " AND ".join(f'"a{i}" = ?' for i in range(800))
    assert parse(f'SELECT * FROM "orders" WHERE {where}') == (R, "orders")
    value = "x" * 8000
    assert parse(f"UPDATE \"orders\" SET a = '{value}' WHERE pk = ?") == (W, "orders")
    projection = ", ".join(f'"a{i}"' for i in range(1000))
    assert parse(f'SELECT {projection} FROM "orders"') == (R, "orders")


# Differential test: the one-regex fast path must agree with the token parser whenever it matches.
_ws = st.sampled_from(["", " ", "  ", "\t", "\n", "\r\n", "\f", " \v "])
_names = st.sampled_from(
    [
        "orders",
        "Orders",
        "ab",
        "my-table.v2",
        "x" * 255,
        "x" * 256,
        "_t_",
        "t$x",
        "9abc",
        "from",
        "select",
        "where",
        "a b",
        'a""b',
        "a\\b",
        arn("table/orders"),
    ]
)
_piece = st.one_of(
    st.builds(lambda n: f'"{n}"', _names),
    _names,
    st.sampled_from(
        [
            "*",
            ",",
            ".",
            "[0]",
            "[",
            "]",
            "(",
            ")",
            "'FROM x'",
            "'a''b'",
            "--c\n",
            "/*c*/",
            "-",
            "?",
            ";",
            "`x`",
            "SELECT",
            "select",
            "FROM",
            "from",
            "WHERE",
            "where",
            "ORDER",
            "VALUE",
            "SET",
            "REMOVE",
            "RETURNING",
            "INSERT",
            "INTO",
            "UPDATE",
            "DELETE",
            "EXISTS",
            "JOIN",
            "AS",
            "'",
            '"',
            "é",
        ]
    ),
)
_statements = st.lists(st.tuples(_ws, _piece), max_size=12).map(
    lambda parts: "".join(a + b for a, b in parts)
)
_heads = st.sampled_from(
    [
        "SELECT * FROM ",
        "select a, b FROM ",
        'SELECT "x" FROM ',
        "INSERT INTO ",
        "UPDATE ",
        "DELETE FROM ",
        "EXISTS(SELECT * FROM ",
        "SELECT a.b[1] FROM ",
    ]
)


def _keyword(word: str) -> st.SearchStrategy[str]:
    return st.sampled_from([word, word.lower(), word.capitalize()])


_table_refs = st.one_of(_names, st.builds(lambda n: f'"{n}"', _names))
_index = st.one_of(st.just(""), st.builds(lambda w, t: f"{w}.{w}{t}", _ws, _table_refs))
_projection = st.lists(
    st.sampled_from(
        [
            "*",
            "a",
            '"a b"',
            '"FROM x"',
            "a.b",
            "a[0]",
            '"x".y[12]',
            "from",
            "select",
            "a.from",
            '"a\\b"',
            "'s'",
            "size(a)",
            "where",
            "a--b",
            "(a)",
        ]
    ),
    min_size=1,
    max_size=3,
).map(", ".join)
_follow = st.sampled_from(
    [
        "",
        " WHERE pk = ?",
        " where a = 'FROM x'",
        "WHERE a=1",
        " ORDER BY a",
        ", b",
        " JOIN b",
        " AS x",
        " --c",
        ";",
        " WHERE a IN (SELECT b FROM c)",
        " VALUE {'a': 1}",
        " SET a = 1",
        " REMOVE a",
        " RETURNING ALL OLD *",
        ")",
        " WHEREx",
        " where",
    ]
)
_shaped = st.one_of(
    st.builds(
        lambda w, sel, p, f, t, i, fo: f"{w}{sel}{w}{p}{w}{f}{w}{t}{i}{fo}",
        _ws,
        _keyword("SELECT"),
        _projection,
        _keyword("FROM"),
        _table_refs,
        _index,
        _follow,
    ),
    st.builds(
        lambda w, ins, into, t, fo: f"{w}{ins} {into}{w}{t}{fo}",
        _ws,
        _keyword("INSERT"),
        _keyword("INTO"),
        _table_refs,
        _follow,
    ),
    st.builds(lambda w, up, t, fo: f"{up}{w}{t}{fo}", _ws, _keyword("UPDATE"), _table_refs, _follow),
    st.builds(
        lambda w, d, f, t, fo: f"{d}{w}{f} {t}{fo}",
        _ws,
        _keyword("DELETE"),
        _keyword("FROM"),
        _table_refs,
        _follow,
    ),
)


@given(st.one_of(_shaped, _statements, st.builds(lambda h, s: h + s, _heads, _statements)))
@example('SELECT * FROM "orders" WHERE pk = ?')
@example('SELECT a.from FROM "orders"')
@example("SELECT * FROM orders$x WHERE")
def test_fast_path_agrees_with_the_token_parser(statement: str) -> None:
    fast = ops._fast_head(statement)
    try:
        slow: tuple[OpKind, str, int, object] | None = ops._parse_head(statement)
    except RequestShapeError:
        slow = None
    if fast is not None:
        assert fast.lastgroup is not None
        kind = OpKind.READ if fast.lastgroup[0] == "s" else OpKind.WRITE
        assert slow == (kind, fast.group(fast.lastgroup), fast.end(), None)


@given(
    st.one_of(st.text(max_size=200), _shaped, _statements, st.builds(lambda h, s: h + s, _heads, _statements))
)
def test_the_parser_only_raises_request_shape_errors(statement: str) -> None:
    try:
        kind, table = parse(statement)
    except RequestShapeError:
        return
    assert kind in (OpKind.READ, OpKind.WRITE)
    assert re.fullmatch(r"[A-Za-z0-9_.\-]{3,255}", table)
    assert statement_kind(statement) is kind


@given(_names.filter(lambda n: re.fullmatch(r"[A-Za-z0-9_.\-]{3,255}", n) is not None), _ws, _ws)
def test_generated_quoted_tables_are_found(name: str, ws1: str, ws2: str) -> None:
    for statement, kind in (
        (f'SELECT{ws1} *{ws2} FROM "{name}" WHERE pk = ?', R),
        (f"INSERT INTO{ws1} \"{name}\"{ws2} VALUE {{'pk': ?}}", W),
        (f'UPDATE "{name}" SET{ws1} a = ? WHERE pk = ?', W),
        (f'DELETE FROM "{name}" WHERE pk = ?', W),
    ):
        assert parse(statement) == (kind, name)


# --- effective kind -----------------------------------------------------------------------------------


def test_effective_kind_of_partiql() -> None:
    execute = OPERATIONS["ExecuteStatement"]
    assert effective_kind(execute, {"Statement": 'SELECT * FROM "orders"'}) is R
    assert effective_kind(execute, {"Statement": 'DELETE FROM "orders" WHERE pk = ?'}) is W
    batch = OPERATIONS["BatchExecuteStatement"]
    reads = {"Statements": [{"Statement": "SELECT * FROM a1x"}, {"Statement": "select * from b1x"}]}
    assert effective_kind(batch, reads) is R
    assert classify(batch, reads).kind is R
    mixed = {"Statements": [{"Statement": "SELECT * FROM a1x"}, {"Statement": "DELETE FROM b1x WHERE a = 1"}]}
    assert effective_kind(batch, mixed) is W
    assert classify(batch, mixed).kind is W
    transaction = OPERATIONS["ExecuteTransaction"]
    checks = {"TransactStatements": [{"Statement": 'EXISTS(SELECT * FROM "a1x" WHERE pk = ?)'},
                                     {"Statement": 'SELECT * FROM "b1x" WHERE pk = ?'}]}  # fmt: skip
    assert effective_kind(transaction, checks) is R
    assert classify(transaction, checks).kind is R
    writes = EXAMPLES["ExecuteTransaction"][0]
    assert effective_kind(transaction, writes) is W


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"Statement": 1},
        {"Statements": []},
        {"Statements": "SELECT"},
        {"Statements": [1]},
        {"Statements": [{"Statement": None}]},
        {"TransactStatements": [{}]},
    ],
)
def test_effective_kind_is_conservative_on_malformed_bodies(body: dict[str, Any]) -> None:
    for name in ("ExecuteStatement", "BatchExecuteStatement", "ExecuteTransaction"):
        assert effective_kind(OPERATIONS[name], body) is W


def test_effective_kind_of_other_operations_is_their_kind() -> None:
    for name, op in OPERATIONS.items():
        if name not in ("ExecuteStatement", "BatchExecuteStatement", "ExecuteTransaction"):
            assert effective_kind(op, EXAMPLES[name][0]) is op.kind
            assert effective_kind(op, {}) is op.kind


# --- duplicate-key proof ------------------------------------------------------------------------------


def _proof(name: str, raw: bytes) -> bool:
    return keys_provably_unique(classify(OPERATIONS[name], orjson.loads(raw)), raw)


def test_every_example_is_provably_free_of_duplicates() -> None:
    for name, (body, _) in EXAMPLES.items():
        assert _proof(name, orjson.dumps(body)), name


def test_duplicates_are_not_proven_unique() -> None:
    assert not _proof("GetItem", b'{"TableName":"orders","TableName":"secrets"}')
    assert not _proof("GetItem", b'{"TableName":"orders","Table\\u004eame":"secrets"}')
    assert not _proof("GetItem", b'{"Table\\u004eame":"orders"}')  # an escaped key: not provable
    assert not _proof(
        "TransactWriteItems",
        b'{"TransactItems":[{"Put":{"TableName":"secrets"},"Put":{"TableName":"orders"}}]}',
    )
    assert not _proof("BatchGetItem", b'{"RequestItems":{"secrets":{}},"RequestItems":{"orders":{}}}')
    assert not _proof(
        "ExecuteStatement", b'{"Statement":"SELECT * FROM x1x","Statement":"SELECT * FROM y1y"}'
    )


def test_the_proof_tolerates_harmless_escapes() -> None:
    assert _proof("PutItem", b'{"TableName":"orders","Item":{"n":{"S":"caf\\u00e9 \\"x\\" \\\\ \\n"}}}')


def test_the_proof_gives_up_when_a_watched_key_appears_elsewhere() -> None:
    # sound, not complete: an attribute named TableName means "not proven", the gate then parses fully
    assert not _proof("PutItem", b'{"TableName":"orders","Item":{"TableName":{"S":"x"}}}')
    assert not _proof("PutItem", b'{"TableName":"orders","Item":{"a":{"S":"TableName"}}}')


def test_operations_without_tables_need_no_proof() -> None:
    assert keys_provably_unique(classify(OPERATIONS["ListTables"], {}), b'{"\\u0041":1,"\\u0041":2}')
