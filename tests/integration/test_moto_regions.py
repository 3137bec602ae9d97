"""The moto region fixture itself: two separate, signature-checking DynamoDB regions.

Also pins down the moto behaviours the sidecar's tests rely on (see FIELD-NOTES, "moto as a DynamoDB
region"): which region a request is served from, and what a bad or missing signature gets.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotoCredentials
from botocore.exceptions import ClientError

from tests.support.moto_region import MotoRegion

A, B = "us-east-1", "eu-west-1"


def raw_call(
    region: MotoRegion, operation: str, body: bytes, host: str | None, sign_for: str | None
) -> tuple[int, bytes]:
    """POST to `region`'s endpoint with the given Host header, signed for `sign_for` (None: unsigned)."""
    host = host or f"127.0.0.1:{region.port}"
    headers = {"Content-Type": "application/x-amz-json-1.0", "X-Amz-Target": f"DynamoDB_20120810.{operation}"}
    if sign_for is not None:
        request = AWSRequest(method="POST", url=f"http://{host}/", data=body, headers=headers)
        SigV4Auth(BotoCredentials(*region.credentials), "dynamodb", sign_for).add_auth(request)
        headers = dict(request.headers.items())
    conn = http.client.HTTPConnection("127.0.0.1", region.port, timeout=10)
    try:
        conn.request("POST", "/", body=body, headers={**headers, "Host": host})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.fixture
def table_in_both(moto_regions: dict[str, MotoRegion], table_name: str) -> Iterator[str]:
    """The same table name in both regions, each holding one item saying where it lives."""
    for name, region in moto_regions.items():
        region.create_table(table_name)
        region.client().put_item(TableName=table_name, Item={"pk": {"S": "k"}, "where": {"S": name}})
    yield table_name
    for region in moto_regions.values():
        region.client().delete_table(TableName=table_name)


def test_both_regions_up_with_one_global_key(moto_regions: dict[str, MotoRegion]) -> None:
    assert set(moto_regions) == {A, B}
    assert moto_regions[A].endpoint != moto_regions[B].endpoint
    assert moto_regions[A].credentials == moto_regions[B].credentials  # seeded IAM: like global IAM
    for region in moto_regions.values():
        assert region.running
        assert region.client().list_tables()["ResponseMetadata"]["HTTPStatusCode"] == 200


def test_regions_hold_separate_data(moto_regions: dict[str, MotoRegion], table_name: str) -> None:
    a, b = moto_regions[A], moto_regions[B]
    a.create_table(table_name)
    try:
        a.client().put_item(TableName=table_name, Item={"pk": {"S": "only-in-a"}})
        assert a.client().get_item(TableName=table_name, Key={"pk": {"S": "only-in-a"}})["Item"]
        assert table_name not in b.client().list_tables()["TableNames"]

        b.create_table(table_name)
        try:
            assert "Item" not in b.client().get_item(TableName=table_name, Key={"pk": {"S": "only-in-a"}})
        finally:
            b.client().delete_table(TableName=table_name)
    finally:
        a.client().delete_table(TableName=table_name)


@pytest.mark.parametrize("name", [A, B])
@pytest.mark.parametrize(
    ("credentials", "code"),
    [
        (None, "SignatureDoesNotMatch"),  # the real key id with a wrong secret
        (("AKIAUNKNOWNKEY000000", "whatever"), "InvalidClientTokenId"),
    ],
)
def test_bad_signature_gets_403_xml(
    moto_regions: dict[str, MotoRegion], name: str, credentials: tuple[str, str] | None, code: str
) -> None:
    region = moto_regions[name]
    bad = credentials or (region.credentials.access_key_id, "not-the-secret")
    with pytest.raises(ClientError) as caught:
        region.client(credentials=bad).list_tables()
    response: Any = caught.value.response
    # moto answers 403 with an XML body; real DynamoDB answers 400 with JSON. botocore expects JSON here,
    # so the error code it reports is just "403" and the XML ends up in the message.
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert f"<Code>{code}</Code>" in response["Error"]["Message"]


def test_unsigned_request_gets_500(moto_regions: dict[str, MotoRegion]) -> None:
    status, _ = raw_call(moto_regions[A], "ListTables", b"{}", host=None, sign_for=None)
    assert status == 500  # a moto quirk: no Authorization header is a server error, not a 4xx


def test_signed_for_a_but_sent_to_b_is_served_by_b(
    moto_regions: dict[str, MotoRegion], table_in_both: str
) -> None:
    """Accepted, but served from B's process: from its store for region A, which is empty."""
    b = moto_regions[B]
    misdirected = b.client(region=A)  # credential scope says us-east-1, endpoint is eu-west-1's process
    assert table_in_both not in misdirected.list_tables()["TableNames"]
    with pytest.raises(ClientError) as caught:
        misdirected.get_item(TableName=table_in_both, Key={"pk": {"S": "k"}})
    assert caught.value.response["Error"]["Code"] == "ResourceNotFoundException"
    # Never A's data: a 200 status alone proves nothing about which region answered.


def test_host_header_wins_over_credential_scope(
    moto_regions: dict[str, MotoRegion], table_in_both: str
) -> None:
    """Signed for A, but with B's AWS host name, sent to B's process: served from B's tables."""
    b = moto_regions[B]
    body = f'{{"TableName": "{table_in_both}", "Key": {{"pk": {{"S": "k"}}}}}}'.encode()
    status, data = raw_call(b, "GetItem", body, host=f"dynamodb.{B}.amazonaws.com", sign_for=A)
    assert status == 200, data
    assert b'"where": {"S": "eu-west-1"}' in data

    # The sidecar's way: signed for the region and its host name, Host sent as signed.
    status, data = raw_call(b, "GetItem", body, host=f"dynamodb.{B}.amazonaws.com", sign_for=B)
    assert status == 200, data
    assert b'"where": {"S": "eu-west-1"}' in data


def test_a_cancelled_transaction_never_undoes_another_write(
    moto_regions: dict[str, MotoRegion], table_name: str
) -> None:
    """moto rolls a cancelled TransactWriteItems back by restoring a copy of the table taken before it
    began; our launcher (sidecar.motoserver) makes that copy-and-restore atomic against the other writes,
    as DynamoDB's isolation is. Without it a put acknowledged meanwhile goes back (seen in CI as a target
    item regressing under the replicator's transactions)."""
    region = moto_regions[A]
    region.create_table(table_name)
    client = region.client()
    client.put_item(TableName=table_name, Item={"pk": {"S": "blocker"}, "v": {"N": "1"}})
    # A table of some size: moto's copy of it then takes long enough for other requests to run meanwhile.
    for start in range(0, 1000, 25):
        client.batch_write_item(
            RequestItems={
                table_name: [
                    {"PutRequest": {"Item": {"pk": {"S": f"filler-{n}"}, "data": {"S": "x" * 200}}}}
                    for n in range(start, start + 25)
                ]
            }
        )
    stop = threading.Event()
    cancelled = [0]

    def cancel_transactions() -> None:
        own = region.client()
        while not stop.is_set():
            try:
                own.transact_write_items(
                    TransactItems=[
                        {
                            "Put": {
                                "TableName": table_name,
                                "Item": {"pk": {"S": "blocker"}, "v": {"N": "1"}},
                                "ConditionExpression": "attribute_not_exists(pk)",
                            }
                        }
                    ]
                )
            except ClientError as exc:
                assert exc.response["Error"]["Code"] == "TransactionCanceledException"
                cancelled[0] += 1

    threads = [threading.Thread(target=cancel_transactions, daemon=True) for _ in range(3)]
    for thread in threads:
        thread.start()
    regressions = []
    deadline = time.monotonic() + 20
    try:
        version = 0
        while version < 300 and time.monotonic() < deadline:
            version += 1
            client.put_item(TableName=table_name, Item={"pk": {"S": "counter"}, "v": {"N": str(version)}})
            got = client.get_item(TableName=table_name, Key={"pk": {"S": "counter"}}, ConsistentRead=True)
            seen = int(got.get("Item", {}).get("v", {}).get("N", "0"))
            if seen < version:
                regressions.append((version, seen))
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
    assert cancelled[0] > 50, "the transactions must have raced the puts"
    assert version >= 100, "too few puts within the deadline to say anything"
    assert regressions == []


def test_no_reader_sees_a_write_of_a_transaction_that_is_cancelled(
    moto_regions: dict[str, MotoRegion], table_name: str
) -> None:
    """moto applies a transaction's actions one by one and rolls them back on a cancellation; a reader must
    not see the first actions meanwhile (DynamoDB shows only committed transactions). Seen in CI as a Scan
    of the replicator's target finding an item at v=11, then at v=9."""
    region = moto_regions[A]
    region.create_table(table_name)
    client = region.client()
    client.put_item(TableName=table_name, Item={"pk": {"S": "dirty"}, "v": {"N": "1"}})
    client.put_item(TableName=table_name, Item={"pk": {"S": "blocker"}, "v": {"N": "1"}})
    actions = [{"Put": {"TableName": table_name, "Item": {"pk": {"S": "dirty"}, "v": {"N": "2"}}}}]
    # many actions after the first one: a wide window between its write and the rollback
    actions += [
        {"Put": {"TableName": table_name, "Item": {"pk": {"S": f"filler-{n}"}, "data": {"S": "x" * 200}}}}
        for n in range(97)
    ]
    actions.append(
        {
            "Put": {
                "TableName": table_name,
                "Item": {"pk": {"S": "blocker"}, "v": {"N": "2"}},
                "ConditionExpression": "attribute_not_exists(pk)",
            }
        }
    )
    stop = threading.Event()
    cancelled = [0]

    def cancel_transactions() -> None:
        own = region.client()
        while not stop.is_set():
            with pytest.raises(ClientError) as refused:
                own.transact_write_items(TransactItems=actions)
            assert refused.value.response["Error"]["Code"] == "TransactionCanceledException"
            cancelled[0] += 1

    thread = threading.Thread(target=cancel_transactions, daemon=True)
    thread.start()
    dirty, reads = 0, 0
    deadline = time.monotonic() + 10
    try:
        while time.monotonic() < deadline and reads < 2000:
            got = client.get_item(TableName=table_name, Key={"pk": {"S": "dirty"}}, ConsistentRead=True)
            reads += 1
            dirty += got["Item"]["v"]["N"] != "1"
    finally:
        stop.set()
        thread.join(timeout=10)
    assert cancelled[0] > 20 and reads > 200, "the reads must have raced the transactions"
    assert dirty == 0, f"{dirty} of {reads} reads saw a write of a cancelled transaction"
