"""Replication ordering: records to versioned writes, echoes, batches, cancellations, shard lineage.

The property tests run a model: a source table whose writes produce stream records exactly as DynamoDB
Streams does (NEW_AND_OLD_IMAGES), deliveries of those records with duplicates, in any order and any
chunking, and a fake target that evaluates the TransactWriteItems requests the core builds (conditions,
all-or-nothing, CancellationReasons). The target must end equal to the source, and no write may ever
replace a newer version of an item with an older one (a delete included).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.core.replicate import (
    CONDITION,
    MAX_GROUP_ITEMS,
    TOMBSTONE_EXPIRES_ATTR,
    TOMBSTONE_KEY_ATTR,
    VERSION_ATTR,
    Change,
    RecordError,
    Shard,
    WriteMode,
    WriteOp,
    classify_cancellation,
    creation_ms,
    delete_request,
    group_ops,
    is_write_echo,
    key_id,
    make_version,
    needs_tombstone_lookup,
    parse_record,
    plan,
    put_request,
    readable_shards,
    shard_from_description,
    strip_bookkeeping,
    tombstone_allows,
    tombstone_id,
    tombstone_put_request,
    transact_items,
)

TABLE = "orders"
TOMBSTONES = "ddb-sidecar-health"
SOURCE = "us-east-1"
TARGET = "eu-west-1"
EXPIRES = 2_000_000_000

Item = dict[str, Any]


# -- the model -----------------------------------------------------------------------------------------------


class Cancelled(Exception):
    def __init__(self, reasons: list[dict[str, str]]) -> None:
        super().__init__("TransactionCanceledException")
        self.reasons = reasons


class ConditionFailed(Exception):
    pass


class Crash(Exception):
    """The replicator died between two requests."""


class Budget:
    """Requests allowed before a crash (None: no crash)."""

    def __init__(self, requests: int | None = None) -> None:
        self.left = requests

    def spend(self) -> None:
        if self.left is not None:
            if self.left <= 0:
                raise Crash
            self.left -= 1


class FakeRegion:
    """A region's tables as DynamoDB keeps them, with TransactWriteItems and a stream per table.

    Conditions are evaluated from the request (only the one expression the core uses is understood); a
    transaction applies entirely or not at all. Every write to an app table is appended to its stream as
    DynamoDB would (INSERT/MODIFY/REMOVE, images, increasing sequence numbers).
    """

    def __init__(self, name: str, key_attrs: Mapping[str, str]) -> None:
        self.name = name
        self.key_attrs = dict(key_attrs)  # table -> partition key attribute
        self.tables: dict[str, dict[str, Item]] = {t: {} for t in key_attrs}
        self.stream: list[dict[str, Any]] = []
        self.sequence = 10**20
        self.clock_ms = 1_700_000_000_000
        self.max_version: dict[str, str] = {}  # tombstone id -> the newest version the item reached
        self.transactions = 0

    def _kid(self, table: str, item_or_key: Mapping[str, Any]) -> str:
        attr = self.key_attrs[table]
        return key_id({attr: item_or_key[attr]})

    # the application's own writes (these produce stream records; no condition)
    def app_put(self, table: str, item: Item) -> None:
        self._write(table, self._kid(table, item), dict(item))

    def app_update(self, table: str, key: Item, attrs: Item) -> None:
        kid = self._kid(table, key)
        current = self.tables[table].get(kid)
        self._write(table, kid, {**(current or key), **attrs})

    def app_delete(self, table: str, key: Item) -> None:
        self._write(table, self._kid(table, key), None)

    def _write(self, table: str, kid: str, new: Item | None) -> None:
        old = self.tables[table].get(kid)
        if new is None:
            self.tables[table].pop(kid, None)
        else:
            self.tables[table][kid] = new
        if table not in (TABLE,) or (old is None and new is None):
            return
        self.sequence += 1
        event = "INSERT" if old is None else ("REMOVE" if new is None else "MODIFY")
        attr = self.key_attrs[table]
        body: dict[str, Any] = {
            "Keys": {attr: (new or old or {})[attr]},
            "SequenceNumber": str(self.sequence),
            "ApproximateCreationDateTime": datetime.fromtimestamp(self.clock_ms / 1000, UTC),
            "StreamViewType": "NEW_AND_OLD_IMAGES",
        }
        if new is not None:
            body["NewImage"] = dict(new)
        if old is not None:
            body["OldImage"] = dict(old)
        self.stream.append({"eventName": event, "dynamodb": body})

    def tick(self, ms: int) -> None:
        self.clock_ms += ms

    # the replicator's writes
    def _holds(self, kind: str, body: Mapping[str, Any]) -> bool:
        """Whether the request's condition holds (only the one expression the core uses is understood)."""
        table = body["TableName"]
        kid = self._kid(table, body["Item"] if kind == "Put" else body["Key"])
        assert body["ConditionExpression"] == CONDITION
        name = body["ExpressionAttributeNames"]["#ts"]
        value = body["ExpressionAttributeValues"][":ts"]["S"]
        current = self.tables[table].get(kid)
        stored = None if current is None or name not in current else current[name]["S"]
        return stored is None or stored < value

    def _apply(self, kind: str, body: Mapping[str, Any]) -> None:
        table = body["TableName"]
        kid = self._kid(table, body["Item"] if kind == "Put" else body["Key"])
        version = body["ExpressionAttributeValues"][":ts"]["S"]
        # The newest version each item has reached, by tombstone id: written images, deletes and tombstones.
        if table == TABLE and (
            kind == "Put" or kid in self.tables[table]
        ):  # deleting nothing changes nothing
            tid = tombstone_id(TABLE, kid)
            previous = self.max_version.get(tid)
            assert previous is None or version >= previous, "an older version replaced a newer one"
            self.max_version[tid] = version
        elif table == TOMBSTONES:
            tid = body["Item"][TOMBSTONE_KEY_ATTR]["S"]
            self.max_version[tid] = max(version, self.max_version.get(tid, version))
        self._write(table, kid, dict(body["Item"]) if kind == "Put" else None)

    def transact(self, actions: Sequence[Mapping[str, Any]]) -> None:
        self.transactions += 1
        assert len(actions) <= 2 * MAX_GROUP_ITEMS
        reasons = []
        touched = set()
        for action in actions:
            ((kind, body),) = action.items()
            table = body["TableName"]
            kid = self._kid(table, body["Item"] if kind == "Put" else body["Key"])
            assert (table, kid) not in touched, "two actions on one item in a transaction"
            touched.add((table, kid))
            ok = self._holds(kind, body)
            reasons.append({"Code": "None"} if ok else {"Code": "ConditionalCheckFailed", "Message": "x"})
        if any(r["Code"] != "None" for r in reasons):
            raise Cancelled(reasons)
        for action in actions:
            ((kind, body),) = action.items()
            if kind != "ConditionCheck":
                self._apply(kind, body)

    def conditional(self, kind: str, body: Mapping[str, Any]) -> None:
        """PutItem ("Put") or DeleteItem ("Delete") with its condition."""
        if not self._holds(kind, body):
            raise ConditionFailed
        self._apply(kind, body)

    def app_items(self) -> dict[str, Item]:
        return {kid: strip_bookkeeping(item) for kid, item in self.tables[TABLE].items()}

    def tombstone_versions(self) -> dict[str, str]:
        return {
            item[TOMBSTONE_KEY_ATTR]["S"]: item[VERSION_ATTR]["S"]
            for item in self.tables[TOMBSTONES].values()
        }


def new_region(name: str) -> FakeRegion:
    return FakeRegion(name, {TABLE: "pk", TOMBSTONES: TOMBSTONE_KEY_ATTR})


def deliver(
    target: FakeRegion,
    raw: Sequence[Mapping[str, Any]],
    source: str = SOURCE,
    source_tombstones: Mapping[str, str] | None = None,
    batch_size: int = MAX_GROUP_ITEMS,
    mode: WriteMode = "transact",
    budget: Budget | None = None,
) -> dict[str, int]:
    """What the shells do with one delivery: parse, plan, group, write (transactions and their
    cancellations, or the single-item requests in the order `Applier` sends them)."""
    budget = budget or Budget()
    counts = {"applied": 0, "superseded": 0, "echoes": 0}
    delivery = plan(TABLE, [parse_record(r) for r in raw], source, source_tombstones)
    counts["echoes"] = delivery.echoes
    for group in group_ops(delivery.ops, batch_size):
        if mode == "single":
            # The puts' tombstones in one read, then the items one by one (as Applier does).
            budget.spend()
            tombstones = target.tombstone_versions()
            for op in group:
                counts["applied" if write_single(target, op, tombstones, budget) else "superseded"] += 1
            continue
        remaining: Sequence[WriteOp] = group
        while remaining:
            budget.spend()
            try:
                target.transact(transact_items(remaining, TOMBSTONES, EXPIRES))
            except Cancelled as exc:
                outcome = classify_cancellation(remaining, exc.reasons)
                assert not outcome.retry_later
                counts["superseded"] += len(outcome.superseded)
                remaining = outcome.retry_now
            else:
                counts["applied"] += len(remaining)
                remaining = ()
    return counts


def write_single(target: FakeRegion, op: WriteOp, tombstones: Mapping[str, str], budget: Budget) -> bool:
    """`write_mode: single`, request by request as `Applier` sends them; a crash may fall between any two."""

    def conditional(kind: str, body: Mapping[str, Any]) -> bool:
        budget.spend()
        try:
            target.conditional(kind, body)
        except ConditionFailed:
            return False
        return True

    if op.item is not None:
        if not tombstone_allows(op, tombstones.get(op.tombstone_id)):
            return False
        return conditional("Put", put_request(op))
    conditional("Put", tombstone_put_request(op, TOMBSTONES, EXPIRES))
    return conditional("Delete", delete_request(op))


# Source histories: writes over a few keys (so they collide), sometimes in the same millisecond.
KEYS = [f"k{i}" for i in range(4)]
operation = st.tuples(
    st.sampled_from(["put", "update", "delete", "delete", "tick"]),
    st.sampled_from(KEYS),
    st.integers(0, 9),
)


def run_history(source: FakeRegion, ops: Sequence[tuple[str, str, int]]) -> None:
    for kind, key, value in ops:
        pk = {"pk": {"S": key}}
        if kind == "put":
            source.app_put(TABLE, {**pk, "v": {"N": str(value)}, "w": {"S": "x" * value}})
        elif kind == "update":
            source.app_update(TABLE, pk, {"v": {"N": str(value)}})
        elif kind == "delete":
            source.app_delete(TABLE, pk)
        else:
            source.tick(value)  # writes between ticks share a millisecond: the sequence number decides


@st.composite
def deliveries(draw: st.DrawFn, count: int) -> list[list[int]]:
    """Every record at least once, some again, in any order, in chunks of any size."""
    if count == 0:
        return []
    extra = draw(st.lists(st.integers(0, count - 1), max_size=count))
    order = draw(st.permutations(list(range(count)) + extra))
    chunks = []
    start = 0
    while start < len(order):
        size = draw(st.integers(1, max(1, len(order) - start)))
        chunks.append(order[start : start + size])
        start += size
    return chunks


MODES: list[WriteMode] = ["single", "transact"]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    history=st.lists(operation, max_size=40),
    batch_size=st.integers(1, 5),
    mode=st.sampled_from(MODES),
)
def test_any_redelivery_and_order_ends_equal_to_the_source(
    data: st.DataObject, history: list[tuple[str, str, int]], batch_size: int, mode: WriteMode
) -> None:
    source, target = new_region(SOURCE), new_region(TARGET)
    run_history(source, history)
    records = source.stream
    for chunk in data.draw(deliveries(len(records))):
        deliver(target, [records[i] for i in chunk], batch_size=batch_size, mode=mode)
    # FakeRegion asserted on every write that no older version replaced a newer one (deletes included).
    assert target.app_items() == source.app_items()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    history=st.lists(operation, max_size=30),
    chunk=st.integers(1, 6),
    mode=st.sampled_from(MODES),
)
def test_crashes_between_any_two_requests_never_regress(
    data: st.DataObject, history: list[tuple[str, str, int]], chunk: int, mode: WriteMode
) -> None:
    """The sidecar's loop: deliveries in stream order, a checkpoint after each; crashes between any two
    requests, each followed by a restart from the last checkpoint. The target only moves forward and ends
    equal to the source."""
    source, target = new_region(SOURCE), new_region(TARGET)
    run_history(source, history)
    records = source.stream
    checkpoint = 0
    crashes = 0
    while checkpoint < len(records):
        budget = Budget(data.draw(st.one_of(st.none(), st.integers(0, 8))) if crashes < 5 else None)
        try:
            while checkpoint < len(records):
                deliver(target, records[checkpoint : checkpoint + chunk], mode=mode, budget=budget)
                checkpoint += chunk
        except Crash:
            crashes += 1
    assert target.app_items() == source.app_items()
    again = deliver(target, records, mode=mode)  # everything once more: nothing left to write
    assert again["applied"] == 0 or mode == "single"  # single: deleting an absent item again succeeds
    assert target.app_items() == source.app_items()


@pytest.mark.parametrize("mode", MODES)
def test_late_older_insert_does_not_resurrect_a_deleted_item(mode: WriteMode) -> None:
    source, target = new_region(SOURCE), new_region(TARGET)
    source.app_put(TABLE, {"pk": {"S": "a"}, "v": {"N": "1"}})
    source.app_delete(TABLE, {"pk": {"S": "a"}})
    insert, remove = source.stream
    assert deliver(target, [remove], mode=mode)["applied"] == 1
    assert deliver(target, [insert], mode=mode) == {"applied": 0, "superseded": 1, "echoes": 0}
    assert target.app_items() == {}
    assert len(target.tables[TOMBSTONES]) == 1


def test_consecutive_writes_of_an_item_coalesce_into_the_newest() -> None:
    source, target = new_region(SOURCE), new_region(TARGET)
    for v in range(5):
        source.app_put(TABLE, {"pk": {"S": "a"}, "v": {"N": str(v)}})
    source.app_put(TABLE, {"pk": {"S": "b"}, "v": {"N": "1"}})
    delivery = plan(TABLE, [parse_record(r) for r in source.stream], SOURCE)
    assert [(op.key["pk"]["S"], op.records, op.first_position) for op in delivery.ops] == [
        ("a", 5, 0),
        ("b", 1, 5),
    ]
    assert delivery.ops[0].item is not None and delivery.ops[0].item["v"] == {"N": "4"}
    assert delivery.last_sequence == source.stream[-1]["dynamodb"]["SequenceNumber"]
    deliver(target, source.stream)
    assert target.transactions == 1


# -- echoes: the replicator's own writes, read back from the target's stream after a move --------------------


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    history=st.lists(operation, max_size=30),
    after=st.lists(operation, max_size=15),
    mode=st.sampled_from(MODES),
)
def test_after_a_move_only_the_applications_writes_travel_back(
    history: list[tuple[str, str, int]], after: list[tuple[str, str, int]], mode: WriteMode
) -> None:
    a, b = new_region(SOURCE), new_region(TARGET)
    run_history(a, history)
    for record in a.stream:
        deliver(b, [record], mode=mode)
    echoes = list(b.stream)
    # Move: b is the source now. Everything in its stream so far was written by the replicator.
    echo_plan = plan(TABLE, [parse_record(r) for r in echoes], TARGET, b.tombstone_versions())
    assert echo_plan.ops == () and echo_plan.echoes == len(echoes)
    b.tick(1000)
    run_history(b, after)
    app_records = b.stream[len(echoes) :]
    counts = deliver(a, b.stream, source=TARGET, source_tombstones=b.tombstone_versions(), mode=mode)
    assert counts["echoes"] == len(echoes)
    assert counts["applied"] + counts["superseded"] == len(
        {key_id(r["dynamodb"]["Keys"]) for r in app_records}
    )
    assert a.app_items() == b.app_items()


def test_tombstones_are_never_replicated() -> None:
    tomb = {"pk": {"S": "ddbsc-tombstone#orders#abc"}, VERSION_ATTR: {"S": "1"}}
    expired = parse_record(
        {
            "eventName": "REMOVE",  # DynamoDB's TTL removing it
            "dynamodb": {
                "Keys": {"pk": tomb["pk"]},
                "OldImage": tomb,
                "SequenceNumber": "5",
                "ApproximateCreationDateTime": 1,
            },
        }
    )
    assert not needs_tombstone_lookup(expired)
    assert plan(TOMBSTONES, [expired], SOURCE).ops == ()
    assert plan(TOMBSTONES, [expired], SOURCE).echoes == 1


def test_write_echo_rule() -> None:
    def change(event: str, new: Item | None, old: Item | None) -> Change:
        body: dict[str, Any] = {
            "Keys": {"pk": {"S": "a"}},
            "SequenceNumber": "1",
            "ApproximateCreationDateTime": 1,
        }
        if new is not None:
            body["NewImage"] = new
        if old is not None:
            body["OldImage"] = old
        return parse_record({"eventName": event, "dynamodb": body})

    plain = {"pk": {"S": "a"}}
    v1 = {**plain, VERSION_ATTR: {"S": "1"}}
    v2 = {**plain, VERSION_ATTR: {"S": "2"}}
    assert is_write_echo(change("INSERT", v1, None))  # the replicator created it
    assert is_write_echo(change("MODIFY", v2, v1))  # the replicator replaced it
    assert is_write_echo(change("MODIFY", v1, plain))
    assert not is_write_echo(change("MODIFY", v1, v1))  # the app's UpdateItem keeps the attribute
    assert not is_write_echo(change("MODIFY", plain, v1))  # the app's PutItem drops it
    assert not is_write_echo(change("INSERT", plain, None))
    assert needs_tombstone_lookup(change("REMOVE", None, v1))
    assert not needs_tombstone_lookup(change("REMOVE", None, plain))


# -- records ---------------------------------------------------------------------------------------------------


def boto3_record() -> dict[str, Any]:
    return {
        "eventName": "MODIFY",
        "awsRegion": SOURCE,
        "dynamodb": {
            "ApproximateCreationDateTime": datetime(2024, 5, 1, 12, 0, 0, 123000, tzinfo=UTC),
            "Keys": {"pk": {"S": "a"}, "sk": {"B": b"\x00\xff"}},
            "NewImage": {
                "pk": {"S": "a"},
                "sk": {"B": b"\x00\xff"},
                "bs": {"BS": [b"\x01"]},
                "m": {"M": {"b": {"B": b"\x02"}}},
            },
            "OldImage": {"pk": {"S": "a"}, "sk": {"B": b"\x00\xff"}},
            "SequenceNumber": "1100000000017454423009",
            "StreamViewType": "NEW_AND_OLD_IMAGES",
        },
    }


def lambda_record() -> dict[str, Any]:
    """The same record as Lambda delivers it: binary as base64 text, the time as epoch seconds."""

    def b64(b: bytes) -> str:
        return base64.b64encode(b).decode()

    return {
        "eventName": "MODIFY",
        "awsRegion": SOURCE,
        "eventSourceARN": "arn:aws:dynamodb:us-east-1:123456789012:table/orders/stream/2024-05-01T00:00:00.000",
        "dynamodb": {
            "ApproximateCreationDateTime": 1714564800.123,
            "Keys": {"pk": {"S": "a"}, "sk": {"B": b64(b"\x00\xff")}},
            "NewImage": {
                "pk": {"S": "a"},
                "sk": {"B": b64(b"\x00\xff")},
                "bs": {"BS": [b64(b"\x01")]},
                "m": {"M": {"b": {"B": b64(b"\x02")}}},
            },
            "OldImage": {"pk": {"S": "a"}, "sk": {"B": b64(b"\x00\xff")}},
            "SequenceNumber": "1100000000017454423009",
            "StreamViewType": "NEW_AND_OLD_IMAGES",
        },
    }


def test_boto3_and_lambda_shapes_parse_to_the_same_change() -> None:
    from_boto3 = parse_record(boto3_record())
    from_lambda = parse_record(lambda_record(), binary_base64=True)
    assert from_boto3 == from_lambda
    assert from_boto3.created_ms == 1714564800123
    assert from_boto3.version(SOURCE) == "1714564800123.0000000000000000001100000000017454423009.us-east-1"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.update(eventName="UPSERT"), "eventName"),
        (lambda r: r["dynamodb"].update(StreamViewType="NEW_IMAGE"), "NEW_AND_OLD_IMAGES"),
        (lambda r: r["dynamodb"].pop("NewImage"), "without NewImage"),
        (lambda r: r["dynamodb"].pop("OldImage"), "without OldImage"),
        (lambda r: r["dynamodb"].update(SequenceNumber="1" * 41), "SequenceNumber"),
        (lambda r: r["dynamodb"].update(SequenceNumber="12a"), "SequenceNumber"),
        (
            lambda r: r["dynamodb"].update(ApproximateCreationDateTime="yesterday"),
            "ApproximateCreationDateTime",
        ),
        (lambda r: r["dynamodb"].update(Keys={}), "no Keys"),
        (lambda r: r["dynamodb"].update(Keys={"pk": {"BOOL": True}}), "keys are S, N or B"),
    ],
)
def test_unusable_records_say_why(mutate: Any, message: str) -> None:
    record = boto3_record()
    mutate(record)
    with pytest.raises(RecordError, match=message):
        parse_record(record)


@given(
    a=st.tuples(st.integers(0, 10**13 - 1), st.integers(0, 10**40 - 1)),
    b=st.tuples(st.integers(0, 10**13 - 1), st.integers(0, 10**40 - 1)),
)
def test_versions_sort_as_time_then_sequence_number(a: tuple[int, int], b: tuple[int, int]) -> None:
    va, vb = make_version(a[0], str(a[1]), SOURCE), make_version(b[0], str(b[1]), SOURCE)
    assert (va < vb) == (a < b)
    assert (va == vb) == (a == b)


def test_creation_time_units() -> None:
    assert creation_ms(datetime(1970, 1, 1, 0, 0, 1, 500000)) == 1500  # naive: UTC
    assert creation_ms(1.5) == 1500
    assert creation_ms(1714564800) == 1714564800000
    with pytest.raises(RecordError):
        creation_ms(True)


def test_key_ids_are_canonical() -> None:
    assert key_id({"b": {"N": "1"}, "a": {"S": "x"}}) == key_id({"a": {"S": "x"}, "b": {"N": "1"}})
    assert key_id({"a": {"B": b"\x01"}}) == key_id({"a": {"B": "AQ=="}})
    assert key_id({"a": {"S": "1"}}) != key_id({"a": {"N": "1"}})
    assert tombstone_id(TABLE, key_id({"a": {"S": "x"}})).startswith("ddbsc-tombstone#orders#")


# -- batches and requests ------------------------------------------------------------------------------------


def op(key: str, *, size: int = 300, delete: bool = False, version: str = "v") -> WriteOp:
    keys = {"pk": {"S": key}}
    return WriteOp(
        table=TABLE,
        key=keys,
        key_id=key_id(keys),
        version=version,
        item=None if delete else {**keys, VERSION_ATTR: {"S": version}},
        created_ms=0,
        first_position=0,
        records=1,
        size=size,
    )


def test_groups_respect_item_and_byte_limits() -> None:
    ops = [op(f"k{i}") for i in range(120)]
    assert [len(g) for g in group_ops(ops)] == [50, 50, 20]
    assert [len(g) for g in group_ops(ops, max_items=7)][:2] == [7, 7]
    big = [op(f"b{i}", size=1_500_000) for i in range(5)]
    assert [len(g) for g in group_ops(big)] == [2, 2, 1]
    assert [len(g) for g in group_ops([op("huge", size=5_000_000), op("x")])] == [1, 1]
    with pytest.raises(ValueError, match="two writes of one item"):
        group_ops([op("a"), op("a")])
    with pytest.raises(ValueError, match="max_items"):
        group_ops(ops, max_items=51)


def test_transaction_request_shape() -> None:
    items = transact_items([op("a", version="v2"), op("b", delete=True, version="v3")], TOMBSTONES, EXPIRES)
    assert [next(iter(a)) for a in items] == ["Put", "ConditionCheck", "Delete", "Put"]
    put, check, delete, tomb = (next(iter(a.values())) for a in items)
    assert put["TableName"] == TABLE and put["Item"][VERSION_ATTR] == {"S": "v2"}
    for action in (put, check, delete, tomb):
        assert action["ConditionExpression"] == "attribute_not_exists(#ts) OR #ts < :ts"
        assert action["ExpressionAttributeNames"] == {"#ts": "ddbsc:ts"}
    assert check["TableName"] == TOMBSTONES and check["ExpressionAttributeValues"][":ts"] == {"S": "v2"}
    assert delete["Key"] == {"pk": {"S": "b"}}
    assert tomb["TableName"] == TOMBSTONES
    assert tomb["Item"][TOMBSTONE_EXPIRES_ATTR] == {"N": str(EXPIRES)}
    assert tomb["Item"][TOMBSTONE_KEY_ATTR]["S"] == tombstone_id(TABLE, key_id({"pk": {"S": "b"}}))


def test_cancellation_reasons_sort_items() -> None:
    group = [op("a"), op("b"), op("c"), op("d")]
    # a: fine; b: its tombstone is newer; c: the item is newer; d: a conflict.
    reasons = [
        {"Code": "None"},
        {"Code": "None"},
        {"Code": "None"},
        {"Code": "ConditionalCheckFailed"},
        {"Code": "ConditionalCheckFailed"},
        {"Code": "None"},
        {"Code": "TransactionConflict", "Message": "busy"},
        {"Code": "None"},
    ]
    outcome = classify_cancellation(group, reasons)
    assert [o.key["pk"]["S"] for o in outcome.superseded] == ["b", "c"]
    assert [o.key["pk"]["S"] for o in outcome.retry_now] == ["a"]
    assert [o.key["pk"]["S"] for o in outcome.retry_later] == ["d"]
    assert outcome.detail == "TransactionConflict: busy"
    # Reasons that do not line up with the request, or none at all: back off with everything.
    assert classify_cancellation(group, reasons[:3]).retry_later == tuple(group)
    assert classify_cancellation(group, None).retry_later == tuple(group)
    # Cancelled with no named reason: back off rather than spin.
    assert classify_cancellation(group, [{"Code": "None"}] * 8).retry_later == tuple(group)


# -- shard lineage -------------------------------------------------------------------------------------------


@st.composite
def shard_trees(draw: st.DrawFn) -> list[Shard]:
    """DynamoDB shard families: each shard has at most one parent, listed before it, and at most two
    children; some of the oldest may have aged out of the listing."""
    count = draw(st.integers(1, 12))
    shards: list[Shard] = []
    children: dict[str, int] = {}
    for i in range(count):
        candidates = [s.shard_id for s in shards if children.get(s.shard_id, 0) < 2]
        parent = draw(st.one_of(st.none(), st.sampled_from(candidates))) if candidates else None
        if parent is not None:
            children[parent] = children.get(parent, 0) + 1
        shards.append(Shard(f"shard-{i:02d}", parent, closed=False))
    shards = [Shard(s.shard_id, s.parent_id, closed=s.shard_id in children) for s in shards]
    aged_out = draw(st.integers(0, len(shards) - 1))
    return shards[aged_out:]


@settings(max_examples=300)
@given(shards=shard_trees(), data=st.data())
def test_parents_are_finished_before_children_are_read(shards: list[Shard], data: st.DataObject) -> None:
    listed = {s.shard_id: s for s in shards}
    finished: set[str] = set()
    while len(finished) < len(shards):
        ready = readable_shards(shards, finished)
        assert ready, "a shard can never be read"
        shard = listed[data.draw(st.sampled_from(ready))]
        if shard.parent_id in listed:
            assert shard.parent_id in finished
        finished.add(shard.shard_id)
    assert readable_shards(shards, finished) == []


def test_shard_descriptions() -> None:
    closed = shard_from_description(
        {
            "ShardId": "s2",
            "ParentShardId": "s1",
            "SequenceNumberRange": {"StartingSequenceNumber": "1", "EndingSequenceNumber": "9"},
        }
    )
    assert closed == Shard("s2", "s1", closed=True)
    assert shard_from_description(
        {"ShardId": "s1", "SequenceNumberRange": {"StartingSequenceNumber": "1"}}
    ) == Shard("s1", None, closed=False)
    shards = [
        Shard("s1", None, True),
        Shard("s2", "s1", False),
        Shard("s3", "s1", False),
        Shard("s4", "gone", False),
    ]
    assert readable_shards(shards, set()) == ["s1", "s4"]
    assert readable_shards(shards, {"s1"}) == ["s2", "s3", "s4"]


# -- a delivery's choices ------------------------------------------------------------------------------------


def record(seq: int, ms: int, v: int, event: str = "MODIFY") -> dict[str, Any]:
    body: dict[str, Any] = {
        "Keys": {"pk": {"S": "a"}},
        "SequenceNumber": str(seq),
        "ApproximateCreationDateTime": ms / 1000,
        "OldImage": {"pk": {"S": "a"}, "v": {"N": "0"}},
    }
    if event != "REMOVE":
        body["NewImage"] = {"pk": {"S": "a"}, "v": {"N": str(v)}}
    return {"eventName": event, "dynamodb": body}


def test_a_delivery_keeps_the_latest_record_in_stream_order() -> None:
    """Within one stream the sequence number is the order, even where a creation time looks older."""
    shuffled = [record(10**21 + 2, 5_000, 2), record(10**21 + 1, 6_000, 1), record(10**21 + 3, 5_000, 3)]
    delivery = plan(TABLE, [parse_record(r) for r in shuffled], SOURCE)
    (op,) = delivery.ops
    assert op.item is not None and op.item["v"] == {"N": "3"} and op.records == 3
    assert delivery.last_sequence == str(10**21 + 3)


def test_records_older_than_the_move_are_stale() -> None:
    changes = [parse_record(record(10**21 + i, 1_000 * i, i)) for i in range(1, 6)]
    delivery = plan(TABLE, changes, SOURCE, not_before_ms=3_000)
    assert delivery.stale == 2
    assert [op.item["v"] for op in delivery.ops if op.item] == [{"N": "5"}]
    assert delivery.last_sequence == str(10**21 + 5)  # the checkpoint moves past the stale records too


def test_single_requests_carry_the_condition() -> None:
    put = put_request(op("a", version="v2"))
    assert put["Item"][VERSION_ATTR] == {"S": "v2"} and put["ConditionExpression"] == CONDITION
    assert delete_request(op("a", delete=True, version="v3"))["Key"] == {"pk": {"S": "a"}}
    tomb = tombstone_put_request(op("a", delete=True, version="v3"), TOMBSTONES, EXPIRES)
    assert tomb["TableName"] == TOMBSTONES and tomb["Item"][VERSION_ATTR] == {"S": "v3"}
    with pytest.raises(ValueError):
        put_request(op("a", delete=True))
    assert tombstone_allows(op("a", version="v2"), None)
    assert tombstone_allows(op("a", version="v2"), "v1")
    assert not tombstone_allows(op("a", version="v2"), "v2")
