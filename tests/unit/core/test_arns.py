"""Table ARNs at the gate: other accounts and unserved regions refused, the rest re-targeted per region."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from sidecar.core.arns import ArnUse, parse, partition_of, refusal, restored, retargeted
from sidecar.core.errors import DynamoError
from sidecar.core.gate import Admitted, GatePolicy, admit
from sidecar.core.operations import TARGET_PREFIX

ACCOUNT = "123456789012"
REGIONS = frozenset({"us-east-1", "eu-west-1"})
POLICY = GatePolicy(tables=frozenset({"orders", "users"}), regions=REGIONS, account=ACCOUNT)


def arn(table: str = "orders", region: str = "us-east-1", account: str = ACCOUNT, rest: str = "") -> str:
    return f"arn:aws:dynamodb:{region}:{account}:table/{table}{rest}"


def call(op: str, body: Any, policy: GatePolicy = POLICY) -> Admitted | DynamoError:
    return admit(policy, TARGET_PREFIX + op, orjson.dumps(body))


def sent(result: Admitted | DynamoError, region: str, original: Any) -> Any:
    assert isinstance(result, Admitted), result
    return orjson.loads(result.body_for(region, orjson.dumps(original)))


def test_parse_and_partitions() -> None:
    parsed = parse(arn(rest="/stream/2024"))
    assert parsed is not None
    assert (parsed.partition, parsed.region, parsed.account, parsed.resource) == (
        "aws", "us-east-1", ACCOUNT, "table/orders/stream/2024",
    )  # fmt: skip
    assert parsed.in_region("eu-west-1") == arn(region="eu-west-1", rest="/stream/2024")
    assert parse("arn:aws:kinesis:us-east-1:1:table/x") is None
    assert parse("orders") is None
    assert partition_of("cn-north-1") == "aws-cn"
    assert partition_of("us-gov-west-1") == "aws-us-gov"
    assert partition_of("eu-west-1") == "aws"


def test_names_pay_nothing() -> None:
    result = call("PutItem", {"TableName": "orders", "Item": {}})
    assert isinstance(result, Admitted) and result.retargeted is None


def test_arn_of_the_listener_region_goes_as_sent_and_is_rewritten_for_the_other() -> None:
    body = {"TableName": arn(), "Item": {"pk": {"S": arn()}}}
    result = call("PutItem", body)
    assert isinstance(result, Admitted)
    assert result.retargeted is not None and set(result.retargeted) == {"eu-west-1"}
    assert sent(result, "us-east-1", body) == body
    moved = sent(result, "eu-west-1", body)
    assert moved["TableName"] == arn(region="eu-west-1")
    assert moved["Item"] == {"pk": {"S": arn()}}, "item data that looks like an ARN is data: untouched"


def test_other_account_refused_with_why() -> None:
    result = call("GetItem", {"TableName": arn(account="999999999999"), "Key": {}})
    assert isinstance(result, DynamoError)
    assert (result.status, result.code) == (400, "AccessDeniedException")
    assert "999999999999" in result.message and ACCOUNT in result.message


def test_unserved_region_refused() -> None:
    result = call("GetItem", {"TableName": arn(region="ap-south-1"), "Key": {}})
    assert isinstance(result, DynamoError) and result.code == "AccessDeniedException"
    assert "ap-south-1" in result.message and "eu-west-1, us-east-1" in result.message


def test_wrong_partition_refused() -> None:
    wrong = arn().replace("arn:aws:", "arn:aws-cn:")
    result = call("GetItem", {"TableName": wrong, "Key": {}})
    assert isinstance(result, DynamoError) and "partition" in result.message


def test_account_not_known_yet_is_retryable_and_not_sent() -> None:
    policy = GatePolicy(tables=frozenset({"orders"}), regions=REGIONS)
    result = call("GetItem", {"TableName": arn(), "Key": {}}, policy)
    assert isinstance(result, DynamoError) and result.status == 503 and result.retryable
    assert "NOT sent" in result.message and "account_id" in result.message
    # a wrong region is refused for good even before the account is known
    result = call("GetItem", {"TableName": arn(region="ap-south-1"), "Key": {}}, policy)
    assert isinstance(result, DynamoError) and result.status == 400
    # names still work
    assert isinstance(call("GetItem", {"TableName": "orders", "Key": {}}, policy), Admitted)


def test_one_foreign_arn_among_many_refuses_the_request() -> None:
    body = {
        "TransactItems": [
            {"Put": {"TableName": arn(), "Item": {}}},
            {"Put": {"TableName": arn("users", account="111111111111"), "Item": {}}},
        ]
    }
    assert isinstance(call("TransactWriteItems", body), DynamoError)


@pytest.mark.parametrize(
    ("op", "body", "expect"),
    [
        (
            "TransactWriteItems",
            {"TransactItems": [{"Put": {"TableName": arn(), "Item": {}}}, {"Delete": {"TableName": "users", "Key": {}}}]},
            lambda b: b["TransactItems"][0]["Put"]["TableName"],
        ),
        (
            "BatchWriteItem",
            {"RequestItems": {"users": [], arn(): [{"PutRequest": {"Item": {}}}]}},
            lambda b: list(b["RequestItems"]),
        ),
        (
            "BatchGetItem",
            {"RequestItems": {arn(): {"Keys": [{"pk": {"S": "a"}}]}}},
            lambda b: list(b["RequestItems"]),
        ),
        (
            "ExecuteStatement",
            {"Statement": f"SELECT * FROM \"{arn()}\" WHERE pk = '{arn()}'"},
            lambda b: b["Statement"],
        ),
        (
            "BatchExecuteStatement",
            {"Statements": [{"Statement": 'SELECT * FROM "users"'}, {"Statement": f'DELETE FROM "{arn()}" WHERE pk = 1'}]},
            lambda b: [s["Statement"] for s in b["Statements"]],
        ),
        (
            "ExecuteTransaction",
            {"TransactStatements": [{"Statement": f'UPDATE "{arn()}" SET a = 1 WHERE pk = 2'}]},
            lambda b: b["TransactStatements"][0]["Statement"],
        ),
    ],
)  # fmt: skip
def test_every_field_is_retargeted(op: str, body: Any, expect: Any) -> None:
    result = call(op, body)
    assert sent(result, "us-east-1", body) == body
    moved = sent(result, "eu-west-1", body)
    text = orjson.dumps(expect(moved)).decode()
    # the one table reference by ARN names eu-west-1 now ...
    assert text.count(arn(region="eu-west-1")) == 1
    # ... and only table references moved: a string literal in a statement keeps its value
    assert text.count(arn()) == (1 if op == "ExecuteStatement" else 0)
    assert orjson.dumps(moved).decode().count("eu-west-1") == 1


@pytest.mark.parametrize("field", ["ResourceArn", "TableArn", "BackupArn", "ExportArn"])
def test_control_plane_arn_fields(field: str) -> None:
    op = {"ResourceArn": "ListTagsOfResource", "TableArn": "ExportTableToPointInTime",
          "BackupArn": "DescribeBackup", "ExportArn": "DescribeExport"}[field]  # fmt: skip
    policy = GatePolicy(
        tables=frozenset({"orders"}), allow_control_plane=True, regions=REGIONS, account=ACCOUNT
    )
    value = arn(
        rest={"ResourceArn": "", "TableArn": "", "BackupArn": "/backup/01", "ExportArn": "/export/01"}[field]
    )
    body = {field: value, **({"S3Bucket": "b"} if op == "ExportTableToPointInTime" else {})}
    result = call(op, body, policy)
    assert sent(result, "eu-west-1", body)[field] == value.replace("us-east-1", "eu-west-1")
    foreign = {
        field: value.replace(ACCOUNT, "999999999999"),
        **({"S3Bucket": "b"} if op == "ExportTableToPointInTime" else {}),
    }
    assert isinstance(call(op, foreign, policy), DynamoError)


def test_refusal_and_retargeted_directly() -> None:
    uses = [ArnUse(("TableName",), arn())]
    assert refusal(uses, REGIONS, ACCOUNT) is None
    assert retargeted({"TableName": arn()}, uses, ["us-east-1"]) == {}
    moved = retargeted({"TableName": arn()}, uses, ["eu-west-1"])["eu-west-1"]
    assert orjson.loads(moved.body) == {"TableName": arn(region="eu-west-1")}
    assert moved.renamed == ((arn(region="eu-west-1"), arn()),)


def test_the_answer_names_the_tables_as_the_app_did() -> None:
    body = {"RequestItems": {arn(): {"Keys": [{"pk": {"S": "a"}}]}, "users": {"Keys": [{"pk": {"S": "b"}}]}}}
    result = call("BatchGetItem", body)
    assert isinstance(result, Admitted)
    there = arn(region="eu-west-1")
    answer = {
        "Responses": {there: [{"pk": {"S": there}}], "users": []},
        "UnprocessedKeys": {there: {"Keys": [{"pk": {"S": "c"}}]}},
        "ConsumedCapacity": [{"TableName": there, "CapacityUnits": 1.0}],
    }
    back = orjson.loads(result.answer_from("eu-west-1", orjson.dumps(answer)))
    assert list(back["Responses"]) == [arn(), "users"]
    assert back["Responses"][arn()] == [{"pk": {"S": there}}], "item data is data: untouched"
    assert list(back["UnprocessedKeys"]) == [arn()]
    assert back["ConsumedCapacity"][0]["TableName"] == arn()
    # the region the ARN names answers as is; an answer that is not JSON passes untouched
    assert result.answer_from("us-east-1", b"whatever") == b"whatever"
    assert restored(b"not json", ((there, arn()),)) == b"not json"


def test_a_gate_worker_hashes_each_body_it_may_be_sent_as() -> None:
    import hashlib

    from sidecar.proxy.offload import admit_and_digest

    body = {"TableName": arn(), "Item": {"pk": {"S": "a"}}}
    raw = orjson.dumps(body)
    decision = admit_and_digest(POLICY, TARGET_PREFIX + "PutItem", raw)
    assert isinstance(decision, Admitted)
    for region in ("us-east-1", "eu-west-1"):
        assert decision.digest_for(region) == hashlib.sha256(decision.body_for(region, raw)).hexdigest()
    assert decision.body_for("eu-west-1", raw) != raw
    by_name = admit_and_digest(POLICY, TARGET_PREFIX + "GetItem", b'{"TableName": "orders", "Key": {}}')
    assert (
        isinstance(by_name, Admitted)
        and by_name.digest_for("eu-west-1")
        == hashlib.sha256(b'{"TableName": "orders", "Key": {}}').hexdigest()
    )
    assert isinstance(admit_and_digest(POLICY, TARGET_PREFIX + "GetItem", b"{}"), DynamoError)


def test_one_table_twice_by_arns_of_two_regions_is_refused_not_merged() -> None:
    # re-targeted, both keys would become one and one key's requests would be lost
    body = {"RequestItems": {arn(): [{"PutRequest": {"Item": {}}}], arn(region="eu-west-1"): []}}
    result = call("BatchWriteItem", body)
    assert isinstance(result, DynamoError) and result.code == "AccessDeniedException"
    assert "twice" in result.message
