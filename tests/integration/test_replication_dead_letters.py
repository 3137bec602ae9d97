"""Replication never wedges on an item the replica refuses (issue 12, item 4): a real sidecar in streams
mode between the moto regions; an item the source accepts but the target refuses (just under moto's item
size limit, pushed over it by the replicator's own `ddbsc:ts`) is recorded as a dead letter, alerted,
listed by `reconcile`, and replication goes on. App attributes in the `ddbsc:` namespace are refused.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from tests.support.moto_region import MotoRegion
from tests.support.stack import SIDECAR, SidecarStack, stream_tables
from tests.support.wait import wait_until

HOME, OTHER = "us-east-1", "eu-west-1"
# moto's item size limit, measured: an item {pk: "k", v: <S of N chars>} is accepted up to N = 404996
# (attribute names and values counted); one more attribute is over it.
MOTO_MAX_V_FOR_ONE_CHAR_KEY = 404996


def test_a_write_the_replica_refuses_is_a_dead_letter_and_replication_goes_on(
    moto_regions: dict[str, MotoRegion], tmp_path: Path
) -> None:
    app, health = stream_tables(moto_regions.values(), "dl")
    stack = SidecarStack(
        [moto_regions[HOME], moto_regions[OTHER]],
        [app],
        tmp_path,
        extra={"health": {"table": health}, "replication": {"mode": "streams", "poll_interval": "100ms"}},
    )
    with stack:
        stack.wait_regions_up()
        client = stack.client()
        big_key = f"big-{app[-8:]}"
        size = MOTO_MAX_V_FOR_ONE_CHAR_KEY - (len(big_key) - 1)
        client.put_item(
            TableName=app, Item={"pk": {"S": big_key}, "v": {"S": "x" * size}}
        )  # the source takes it
        after = f"after-{app[-8:]}"
        client.put_item(TableName=app, Item={"pk": {"S": after}, "v": {"S": "small"}})

        def replicated() -> bool:
            got = moto_regions[OTHER].client().get_item(TableName=app, Key={"pk": {"S": after}})
            return "Item" in got

        wait_until(replicated, 30, message="the write after the refused one replicated (no wedge)")
        wait_until(
            lambda: stack.status()["replication"]["replicator"]["dead_letters"] == 1,
            10,
            message="a dead letter",
        )
        status = stack.status()
        replicator = status["replication"]["replicator"]
        assert "Item" not in moto_regions[OTHER].client().get_item(TableName=app, Key={"pk": {"S": big_key}})
        alerts = [e for e in status["events"] if e.get("alert") == "replication-dead-letter"]
        assert alerts and "ValidationException" in alerts[0]["reason"]
        assert "ddb_sidecar_replication_dead_letters_total 1.0" in stack.metrics()
        file = Path(replicator["dead_letter_file"])
        assert file.stat().st_mode & 0o777 == 0o600
        entry = json.loads(file.read_text().splitlines()[0])
        assert entry["key"] == {"pk": {"S": big_key}} and entry["target"] == OTHER
        assert len(entry["write"]["put"]["v"]["S"]) == size  # the write itself is kept
        wait_until(lambda: stack.status()["replication"]["lag_ms"] is not None, 20, message="lag measured")

        done = subprocess.run(
            [str(SIDECAR), "reconcile", "--json", "--table", app, "-c", str(stack.config_path)],
            capture_output=True, text=True, timeout=120, env=stack.env, check=False,
        )  # fmt: skip
        doc = json.loads(done.stdout)
        assert doc["dead_letters"]["count"] == 1
        assert doc["dead_letters"]["entries"][0]["key"] == {"pk": {"S": big_key}}


@pytest.mark.parametrize(
    "request_kwargs",
    [
        {"Item": {"pk": {"S": "r1"}, "ddbsc:ts": {"S": "9999"}}},
    ],
)
def test_app_attributes_in_the_replicators_namespace_are_refused(
    moto_regions: dict[str, MotoRegion], tmp_path: Path, request_kwargs: dict[str, object]
) -> None:
    app = f"dl-ns-{uuid.uuid4().hex[:8]}"
    for region in moto_regions.values():
        region.create_table(app)
    with SidecarStack([moto_regions[HOME], moto_regions[OTHER]], [app], tmp_path) as stack:
        client = stack.client()
        with pytest.raises(ClientError) as err:
            client.put_item(TableName=app, **request_kwargs)
        assert err.value.response["Error"]["Code"] == "ValidationException"
        assert "reserved" in err.value.response["Error"]["Message"]
        with pytest.raises(ClientError) as err:
            client.update_item(
                TableName=app,
                Key={"pk": {"S": "r2"}},
                UpdateExpression="SET #t = :v",
                ExpressionAttributeNames={"#t": "ddbsc:ts"},
                ExpressionAttributeValues={":v": {"S": "9999"}},
            )
        assert err.value.response["Error"]["Code"] == "ValidationException"
        assert not moto_regions[HOME].client().scan(TableName=app)["Items"]
