"""Tables named by ARN, end to end (the app -> HAProxy -> the sidecar -> two moto regions, auth on).

An ARN names an account and a region, and DynamoDB honours both: the sidecar must refuse another account's
tables and regions it does not serve, and send an ARN of a configured region to the region that serves the
request, so that an app naming its tables by ARN keeps working after a move.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.support.moto_region import MotoRegion
from tests.support.stack import SidecarStack, new_app_table
from tests.support.wait import wait_until

HOME, OTHER = "us-east-1", "eu-west-1"
MOTO_ACCOUNT = "123456789012"  # the account moto_server's IAM user lives in


def arn(table: str, region: str = HOME, account: str = MOTO_ACCOUNT) -> str:
    return f"arn:aws:dynamodb:{region}:{account}:table/{table}"


@pytest.fixture(scope="module")
def orders(moto_regions: dict[str, MotoRegion]) -> str:
    return new_app_table(moto_regions.values(), "arns")


@pytest.fixture(scope="module")
def stack(
    moto_regions: dict[str, MotoRegion], orders: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarStack]:
    regions = [moto_regions[HOME], moto_regions[OTHER]]
    with SidecarStack(regions, [orders], tmp_path_factory.mktemp("arns")) as s:
        s.wait_regions_up()
        # the sidecar reads its account from the health table's ARN once a region answers
        wait_until(lambda: s.status().get("account_id") == MOTO_ACCOUNT, timeout=15, interval=0.2)
        yield s


def item(pk: str) -> dict[str, Any]:
    return {"pk": {"S": pk}, "n": {"N": "1"}}


def present(region: MotoRegion, table: str, pk: str) -> bool:
    got = region.client().get_item(TableName=table, Key={"pk": {"S": pk}}, ConsistentRead=True)
    return "Item" in got


def error(exc: pytest.ExceptionInfo[ClientError]) -> tuple[int, str, str]:
    response = exc.value.response
    return (
        response["ResponseMetadata"]["HTTPStatusCode"],
        response["Error"]["Code"],
        response["Error"].get("Message", ""),
    )


def test_an_arn_of_a_configured_region_goes_to_the_region_that_serves_the_request(
    stack: SidecarStack, orders: str, moto_regions: dict[str, MotoRegion]
) -> None:
    home, other = moto_regions[HOME], moto_regions[OTHER]
    by_home_arn = arn(orders)
    # Reads are served by the listener's own region: an item only eu-west-1 holds is found through the
    # eu-west-1 listener by the us-east-1 ARN (moto finds a table by ARN only in the ARN's own region).
    only_there = f"only-{OTHER}-{uuid.uuid4().hex[:6]}"
    other.client().put_item(TableName=orders, Item=item(only_there))
    reader = stack.client(url=stack.region_url(OTHER))
    got = reader.get_item(TableName=by_home_arn, Key={"pk": {"S": only_there}}, ConsistentRead=True)
    assert got.get("Item", {}).get("pk") == {"S": only_there}
    batch = reader.batch_get_item(RequestItems={by_home_arn: {"Keys": [{"pk": {"S": only_there}}]}})
    # the answer names the table as the app did
    assert [i["pk"] for i in batch["Responses"][by_home_arn]] == [{"S": only_there}]
    # Writes go to the active region whichever listener takes them, by ARN as by name.
    for listener in (HOME, OTHER):
        app = stack.client(url=stack.region_url(listener))
        single, batched, transacted = (f"{listener}-{kind}-{uuid.uuid4().hex[:6]}" for kind in "sbt")
        app.put_item(TableName=by_home_arn, Item=item(single))
        app.batch_write_item(RequestItems={by_home_arn: [{"PutRequest": {"Item": item(batched)}}]})
        app.transact_write_items(
            TransactItems=[{"Put": {"TableName": by_home_arn, "Item": item(transacted)}}]
        )
        for pk in (single, batched, transacted):
            assert present(home, orders, pk), (listener, pk)
            assert not present(other, orders, pk), (listener, pk)


def test_an_app_naming_its_table_by_arn_keeps_working_after_a_move(
    stack: SidecarStack, orders: str, moto_regions: dict[str, MotoRegion]
) -> None:
    app = stack.client()  # the stable address
    before, after = f"before-{uuid.uuid4().hex[:6]}", f"after-{uuid.uuid4().hex[:6]}"
    app.put_item(TableName=arn(orders), Item=item(before))
    assert present(moto_regions[HOME], orders, before)
    assert stack.cli("failover", "--to", OTHER).returncode == 0
    try:
        app.put_item(TableName=arn(orders), Item=item(after))
        # over 64 KiB: judged, re-targeted and hashed for SigV4 in a gate worker (moto checks the signature)
        large = f"large-{uuid.uuid4().hex[:6]}"
        app.put_item(TableName=arn(orders), Item={**item(large), "blob": {"S": "x" * 100_000}})
        for pk in (after, large):
            assert present(moto_regions[OTHER], orders, pk)
            assert not present(moto_regions[HOME], orders, pk)
    finally:
        assert stack.cli("failover", "--to", HOME).returncode == 0


@pytest.mark.parametrize(
    ("table_arn", "says"),
    [
        (lambda t: arn(t, account="999999999999"), "names account 999999999999"),
        (lambda t: arn(t, region="ap-south-1"), "names region 'ap-south-1'"),
    ],
)
def test_another_account_or_an_unserved_region_is_refused_with_why(
    stack: SidecarStack, orders: str, table_arn: Any, says: str
) -> None:
    app = stack.client()
    with pytest.raises(ClientError) as refused:
        app.put_item(TableName=table_arn(orders), Item=item("never"))
    status, code, message = error(refused)
    assert (status, code) == (400, "AccessDeniedException")
    assert says in message
    with pytest.raises(ClientError) as in_batch:
        app.batch_get_item(
            RequestItems={
                orders: {"Keys": [{"pk": {"S": "x"}}]},
                table_arn(orders): {"Keys": [{"pk": {"S": "x"}}]},
            }
        )
    assert error(in_batch)[1] == "AccessDeniedException"
    assert stack.process.running, "the daemon is still up"
