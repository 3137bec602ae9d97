"""The Lambda handler against moto's in-process DynamoDB (two regions): the events are real stream records
from the source table, reshaped as Lambda delivers them (binary as base64 text, epoch-second times)."""

from __future__ import annotations

import base64
import copy
import random
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto import mock_aws

from sidecar.core.replicate import strip_bookkeeping
from sidecar.replication import lambda_handler
from sidecar.replication.lambda_handler import LambdaReplicator, Settings, table_from_arn

SOURCE, TARGET = "us-east-1", "eu-west-1"
TABLE, HEALTH = "orders", "ddb-sidecar-health"

# moto loses acknowledged writes when a concurrent transaction on the same table is cancelled (it rolls
# back by restoring a copy of the whole table): transactions one at a time against moto.
MODES = [{"WRITE_MODE": "single"}, {"WRITE_MODE": "transact", "BATCH_SIZE": "7", "MAX_IN_FLIGHT": "1"}]


class Context:
    def __init__(self, remaining_ms: int = 60_000) -> None:
        self.remaining_ms = remaining_ms

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": SOURCE,
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    }.items():
        monkeypatch.setenv(name, value)
    with mock_aws():
        for region in (SOURCE, TARGET):
            ddb = boto3.client("dynamodb", region_name=region)
            for table, stream in ((TABLE, region == SOURCE), (HEALTH, False)):
                kwargs: dict[str, Any] = {}
                if stream:
                    kwargs["StreamSpecification"] = {
                        "StreamEnabled": True,
                        "StreamViewType": "NEW_AND_OLD_IMAGES",
                    }
                ddb.create_table(
                    TableName=table,
                    AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
                    KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
                    BillingMode="PAY_PER_REQUEST",
                    **kwargs,
                )
        yield


def client(region: str) -> Any:
    return boto3.client("dynamodb", region_name=region)


def make_client(service: str, region: str, endpoint: str | None) -> Any:
    return boto3.client(service, region_name=region, endpoint_url=endpoint)


def replicator(**env: str) -> LambdaReplicator:
    return LambdaReplicator(
        Settings.from_env({"TARGET_REGIONS": TARGET, **env}), make_client, sleep=lambda s: None
    )


def _lambda_value(value: Any) -> Any:
    """Binary values as Lambda's JSON carries them: base64 text."""
    if isinstance(value, dict):
        return {k: _lambda_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_lambda_value(v) for v in value]
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return value


def stream_event() -> list[dict[str, Any]]:
    """Every record of the source table's stream, as Lambda would put it in an event.

    Read from moto's backend: in-process moto routes dynamodbstreams calls to its DynamoDB handler.
    """
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.dynamodb.models import dynamodb_backends

    table = dynamodb_backends[DEFAULT_ACCOUNT_ID][SOURCE].get_table(TABLE)
    arn = client(SOURCE).describe_table(TableName=TABLE)["Table"]["LatestStreamArn"]
    assert table.stream_shard is not None
    out = []
    for stored in table.stream_shard.items:
        record = copy.deepcopy(stored.to_json())
        body = record["dynamodb"]
        body["ApproximateCreationDateTime"] = body["ApproximateCreationDateTime"].timestamp()
        out.append({**_lambda_value(record), "eventSourceARN": arn, "awsRegion": SOURCE})
    return out


def app_writes() -> None:
    ddb = client(SOURCE)
    for i in range(30):
        ddb.put_item(
            TableName=TABLE, Item={"pk": {"S": f"k{i}"}, "v": {"N": "1"}, "blob": {"B": bytes([i, 255])}}
        )
    for i in range(0, 30, 3):
        ddb.update_item(
            TableName=TABLE,
            Key={"pk": {"S": f"k{i}"}},
            UpdateExpression="SET v = :v",
            ExpressionAttributeValues={":v": {"N": "2"}},
        )
    for i in range(0, 30, 5):
        ddb.delete_item(TableName=TABLE, Key={"pk": {"S": f"k{i}"}})
    ddb.put_item(TableName=TABLE, Item={"pk": {"S": "k0"}, "v": {"N": "3"}})  # re-created after its delete


def items(region: str) -> dict[str, dict[str, Any]]:
    scanned = client(region).scan(TableName=TABLE, ConsistentRead=True)["Items"]
    return {item["pk"]["S"]: strip_bookkeeping(item) for item in scanned}


@pytest.mark.parametrize("env", MODES, ids=["single", "transact"])
def test_a_batch_is_applied(aws: None, env: dict[str, str]) -> None:
    app_writes()
    event = {"Records": stream_event()}
    assert isinstance(event["Records"][0]["dynamodb"]["NewImage"]["blob"]["B"], str)  # base64, as Lambda
    assert replicator(**env).handle(event, Context()) == {"batchItemFailures": []}
    assert items(TARGET) == items(SOURCE)
    assert items(TARGET)["k1"]["blob"] == {"B": bytes([1, 255])}  # base64 in the event, bytes in the table
    # The same batch again (Lambda retried it): nothing changes.
    assert replicator(**env).handle(event, Context()) == {"batchItemFailures": []}
    assert items(TARGET) == items(SOURCE)


@pytest.mark.parametrize("env", MODES, ids=["single", "transact"])
def test_duplicated_and_shuffled_batches_end_equal_to_the_source(aws: None, env: dict[str, str]) -> None:
    app_writes()
    records = stream_event()
    rng = random.Random(7)
    deliveries = records + rng.sample(records, len(records) // 2)
    rng.shuffle(deliveries)
    handler = replicator(**env)
    for start in range(0, len(deliveries), 9):
        assert handler.handle({"Records": deliveries[start : start + 9]}, Context()) == {
            "batchItemFailures": []
        }
    assert items(TARGET) == items(SOURCE)


def test_a_failed_write_is_reported_from_its_first_record(aws: None) -> None:
    app_writes()
    records = stream_event()
    client(TARGET).delete_table(TableName=TABLE)  # every write into the target now fails
    result = replicator(MAX_ROUNDS="2").handle({"Records": records}, Context())
    assert result == {"batchItemFailures": [{"itemIdentifier": records[0]["dynamodb"]["SequenceNumber"]}]}


def test_a_write_the_target_refuses_for_good_is_a_dead_letter_not_a_retry(
    aws: None, caplog: pytest.LogCaptureFixture
) -> None:
    # just under moto's item size limit in the source; the replicator's own ddbsc:ts pushes it over
    ddb = client(SOURCE)
    ddb.put_item(TableName=TABLE, Item={"pk": {"S": "big"}, "v": {"S": "x" * (404996 - 2)}})
    ddb.put_item(TableName=TABLE, Item={"pk": {"S": "small"}, "v": {"S": "y"}})
    with caplog.at_level("ERROR"):
        result = replicator().handle({"Records": stream_event()}, Context())
    assert result == {"batchItemFailures": []}  # the shard moves on
    assert set(items(TARGET)) == {"small"}
    assert "dead letter:" in caplog.text and '"big"' in caplog.text


def test_a_malformed_record_is_reported_and_the_rest_applied(aws: None) -> None:
    app_writes()
    records = stream_event()
    bad = dict(records[5])
    bad["eventName"] = "UPSERT"
    result = replicator().handle({"Records": [*records[:5], bad, *records[6:]]}, Context())
    assert result == {"batchItemFailures": [{"itemIdentifier": bad["dynamodb"]["SequenceNumber"]}]}
    target = items(TARGET)
    assert "k5" not in target  # its only record was the malformed one
    assert {k: v for k, v in items(SOURCE).items() if k != "k5"} == target


def test_no_time_left_reports_instead_of_retrying(aws: None) -> None:
    app_writes()
    records = stream_event()
    client(TARGET).delete_table(TableName=TABLE)
    result = replicator(MAX_ROUNDS="50").handle({"Records": records}, Context(remaining_ms=1000))
    assert result["batchItemFailures"] == [{"itemIdentifier": records[0]["dynamodb"]["SequenceNumber"]}]


def test_module_handler_reads_its_settings_from_the_environment(
    aws: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    app_writes()
    monkeypatch.setenv("TARGET_REGIONS", TARGET)
    monkeypatch.setenv("TOMBSTONE_TABLE", HEALTH)
    monkeypatch.setattr(lambda_handler, "_replicator", None)
    assert lambda_handler.handler({"Records": stream_event()}, Context()) == {"batchItemFailures": []}
    assert items(TARGET) == items(SOURCE)


def test_records_before_not_before_are_skipped(aws: None) -> None:
    app_writes()
    records = stream_event()
    cut = records[10]["dynamodb"]["ApproximateCreationDateTime"]
    handler = replicator(NOT_BEFORE=str(cut))
    assert handler.handle({"Records": records}, Context()) == {"batchItemFailures": []}
    newest: dict[str, float] = {}
    for r in records:
        key = r["dynamodb"]["Keys"]["pk"]["S"]
        newest[key] = max(newest.get(key, 0.0), r["dynamodb"]["ApproximateCreationDateTime"])
    only_stale = {k for k, created in newest.items() if round(created * 1000) < round(cut * 1000)}
    assert only_stale  # items whose every record predates NOT_BEFORE
    target, source = items(TARGET), items(SOURCE)
    assert not only_stale & set(target)
    assert {k: v for k, v in source.items() if k not in only_stale} == target


def test_settings_errors() -> None:
    with pytest.raises(ValueError, match="TARGET_REGIONS"):
        Settings.from_env({})
    with pytest.raises(ValueError, match="BATCH_SIZE"):
        Settings.from_env({"TARGET_REGIONS": TARGET, "BATCH_SIZE": "60"})
    with pytest.raises(ValueError, match="WRITE_MODE"):
        Settings.from_env({"TARGET_REGIONS": TARGET, "WRITE_MODE": "batch"})
    with pytest.raises(ValueError, match="TARGET_ENDPOINTS"):
        Settings.from_env({"TARGET_REGIONS": TARGET, "TARGET_ENDPOINTS": "eu-west-1"})
    s = Settings.from_env(
        {"TARGET_REGIONS": " eu-west-1, ap-south-1 ", "TARGET_ENDPOINTS": "eu-west-1=http://x:1"}
    )
    assert s.targets == ("eu-west-1", "ap-south-1") and s.target_endpoints == {"eu-west-1": "http://x:1"}
    assert s.tombstone_table == HEALTH
    assert (
        table_from_arn("arn:aws:dynamodb:us-east-1:1:table/orders/stream/2024-01-01T00:00:00.000") == "orders"
    )
