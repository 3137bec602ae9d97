"""Replication ordering for `replication.mode: streams`: DynamoDB Streams records in, conditional writes out.

Pure: no clients, no clock, no files. The replicator in the sidecar (`sidecar.replication.streams`) and the
Lambda handler (`sidecar.replication.lambda_handler`) both turn stream records into write operations here,
group them here and build their requests here, so both follow the same rule.

The ordering rule. Every record gets a version, a string that sorts lexically in write order:
`<ApproximateCreationDateTime in ms, 13 digits>.<SequenceNumber zero-padded to 40 digits>.<source region>`
(a string: DynamoDB numbers hold 38 digits, sequence numbers up to 40). The version is written with the
item, in the attribute `ddbsc:ts`, and every write is conditional on
`attribute_not_exists(ddbsc:ts) OR ddbsc:ts < :v`: an older image never replaces a newer one, and a
re-delivered record is a no-op (ConditionalCheckFailed, counted as superseded). An item without `ddbsc:ts`
in the target counts as older than any record. Across regions (after a move) the creation time decides:
last writer wins, as with Global Tables. Within one stream the creation time is assumed never to go back
between two writes of one item (DynamoDB stamps them where the item's writes are serialized; equal
stamps, common at its one-second resolution, fall to the sequence number); of the records of an item in
one delivery the latest in the stream is written, whatever the stamps say.

Deletes leave a tombstone: an item `pk = ddbsc-tombstone#TABLE#sha256(key)` in the target's tombstone table
(the sidecar's `health.table`) carrying the delete's version. A put goes ahead only when the item's
tombstone is older, so a delete followed by an older INSERT delivered late never resurrects the item.
Tombstones carry `ddbsc:expires` (epoch seconds) for DynamoDB's TTL; they only need to outlive the
stream's 24 h retention.

Echoes. The writes the replicator makes in a target appear in that region's own stream. When that region
becomes the source (after a move) they must not be replicated back: an INSERT/MODIFY whose `ddbsc:ts`
changed between the old and the new image was written by a replicator (the application's UpdateItem keeps
the attribute as it is, its PutItem drops it) and is skipped; a REMOVE of an item that carried `ddbsc:ts`
is skipped when the source region holds a newer tombstone for it (the replicator wrote both; an
application's delete of a replicated item finds at most an older tombstone).

The old tail. A region that becomes the source again may still hold records from its previous turn that
were never replicated (traffic moved away while it was unreachable). They are older than what the other
regions wrote meanwhile, and the target cannot tell those newer writes (no `ddbsc:ts` where the app wrote
them) from older ones: records created before the move (`not_before_ms`) are skipped, as `stale`.

Batches: one operation per item and per delivery (an item's records coalesce into the latest), so a batch
never holds two writes of one key and batches of one delivery can run concurrently. Two ways to write
them (`replication.write_mode`):
- `single`: plain conditional requests. The puts' tombstones are read first (a consistent BatchGetItem per
  100 items), then each put is a conditional PutItem unless its tombstone is as new. A delete is the
  conditional PutItem of its tombstone, then the conditional DeleteItem (both always: a crash between them
  is repaired by the re-delivery). About one write unit per item and a fraction of a read unit. Safe
  because one replicator handles an item at a time; two replicators on one stream converge, but may
  briefly show an older image.
- `transact`: TransactWriteItems of up to 50 items, each item's write together with its tombstone check
  or put (two of the 100 actions). Atomic, fewer requests; transactional writes cost twice the units and
  the ConditionCheck more on top.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

# Wire-format attribute maps, as the low-level clients send and receive them: {"pk": {"S": "a"}}.
Item = dict[str, Any]
EventName = Literal["INSERT", "MODIFY", "REMOVE"]
WriteMode = Literal["single", "transact"]

BOOKKEEPING_PREFIX = "ddbsc:"
VERSION_ATTR = "ddbsc:ts"
TOMBSTONE_KEY_ATTR = "pk"
TOMBSTONE_PREFIX = "ddbsc-tombstone#"
TOMBSTONE_EXPIRES_ATTR = "ddbsc:expires"
TOMBSTONE_TABLE_ATTR = "ddbsc:table"
TOMBSTONE_TTL_SECONDS = 48 * 3600
# Real DynamoDB: 100 actions and 4 MB per TransactWriteItems; every item takes two actions.
MAX_GROUP_ITEMS = 50
MAX_GROUP_BYTES = 3_500_000
SEQUENCE_DIGITS = 40
REQUIRED_VIEW_TYPE = "NEW_AND_OLD_IMAGES"
CONDITION = "attribute_not_exists(#ts) OR #ts < :ts"

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_OP_OVERHEAD = 200  # bytes per item for the condition, names and the tombstone action


class RecordError(ValueError):
    """A stream record this replicator cannot use; the message says what to change."""


@dataclass(frozen=True, slots=True)
class Change:
    """One stream record, checked and normalized (binary values as bytes)."""

    event: EventName
    keys: Item
    new_image: Item | None
    old_image: Item | None
    sequence_number: str
    created_ms: int
    key_id: str

    def version(self, source_region: str) -> str:
        return make_version(self.created_ms, self.sequence_number, source_region)


@dataclass(frozen=True, slots=True)
class WriteOp:
    """The write one target needs for one item: the newest of the records delivered for it."""

    table: str
    key: Item
    key_id: str
    version: str
    item: Item | None  # None: delete
    created_ms: int
    first_position: int  # index, in the delivery, of the first record this op stands for
    records: int  # records coalesced into this op
    size: int  # estimated bytes in a request

    @property
    def is_delete(self) -> bool:
        return self.item is None

    @property
    def tombstone_id(self) -> str:
        return tombstone_id(self.table, self.key_id)


@dataclass(frozen=True, slots=True)
class Plan:
    """What a delivery of records asks of a target."""

    ops: tuple[WriteOp, ...]  # one per item, distinct keys, in order of first appearance
    records: int
    echoes: int  # the replicator's own writes (and tombstones): not replicated
    stale: int  # created before `not_before_ms`: written before this region became the source again
    last_sequence: str | None  # the highest delivered (the checkpoint once everything is applied)
    oldest_created_ms: int | None
    newest_created_ms: int | None


@dataclass(frozen=True, slots=True)
class Cancellation:
    """A cancelled TransactWriteItems, item by item."""

    superseded: tuple[WriteOp, ...]  # a condition failed: a newer version (or tombstone) is already there
    retry_now: tuple[WriteOp, ...]  # fine, cancelled only because of another item
    retry_later: tuple[WriteOp, ...]  # throttled, conflicting or failed: after a backoff
    detail: str


@dataclass(frozen=True, slots=True)
class Shard:
    shard_id: str
    parent_id: str | None
    closed: bool


# -- versions ----------------------------------------------------------------------------------------------


def make_version(created_ms: int, sequence_number: str, source_region: str) -> str:
    """The sortable version of a record: creation time (ms), sequence number, source region."""
    if not 0 <= created_ms < 10**13:
        raise RecordError(f"ApproximateCreationDateTime {created_ms} ms is out of range")
    if not sequence_number.isdigit() or len(sequence_number) > SEQUENCE_DIGITS:
        raise RecordError(f"SequenceNumber {sequence_number!r} is not a number of at most 40 digits")
    return f"{created_ms:013d}.{sequence_number:0>{SEQUENCE_DIGITS}}.{source_region}"


def creation_ms(value: Any) -> int:
    """ApproximateCreationDateTime as epoch milliseconds: a datetime (boto3) or epoch seconds (Lambda)."""
    if isinstance(value, datetime):
        aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return (aware - _EPOCH) // _MS
    if isinstance(value, int | float) and not isinstance(value, bool):
        return round(value * 1000)
    raise RecordError(f"ApproximateCreationDateTime {value!r} is neither a datetime nor epoch seconds")


def replicated_version(image: Mapping[str, Any] | None) -> str | None:
    """The `ddbsc:ts` an image carries (written by a replicator), if any."""
    if not image:
        return None
    value = image.get(VERSION_ATTR)
    if isinstance(value, Mapping) and isinstance(value.get("S"), str):
        return str(value["S"])
    return None


# -- records -----------------------------------------------------------------------------------------------


def key_id(keys: Mapping[str, Any]) -> str:
    """A canonical text for an item's key (the same for bytes and their base64 text)."""
    parts = []
    for name in sorted(keys):
        value = keys[name]
        if not isinstance(value, Mapping) or len(value) != 1:
            raise RecordError(f"key attribute {name!r} is not a DynamoDB attribute value")
        ((kind, raw),) = value.items()
        if kind == "B":
            raw = base64.b64encode(raw).decode("ascii") if isinstance(raw, bytes | bytearray) else raw
        if kind not in ("S", "N", "B") or not isinstance(raw, str):
            raise RecordError(f"key attribute {name!r} has type {kind}: keys are S, N or B")
        parts.append([name, kind, raw])
    if not parts:
        raise RecordError("the record has no Keys")
    return json.dumps(parts, ensure_ascii=False, separators=(",", ":"))


def tombstone_id(table: str, item_key_id: str) -> str:
    digest = hashlib.sha256(item_key_id.encode("utf-8")).hexdigest()
    return f"{TOMBSTONE_PREFIX}{table}#{digest}"


def decode_binary(value: Any) -> Any:
    """Lambda delivers B and BS values as base64 text; the low-level client wants bytes."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for kind, raw in value.items():
            if kind == "B" and isinstance(raw, str):
                out[kind] = base64.b64decode(raw)
            elif kind == "BS" and isinstance(raw, list):
                out[kind] = [base64.b64decode(v) if isinstance(v, str) else v for v in raw]
            elif kind == "L" and isinstance(raw, list):
                out[kind] = [decode_binary(v) for v in raw]
            elif kind == "M" and isinstance(raw, Mapping):
                out[kind] = {k: decode_binary(v) for k, v in raw.items()}
            else:
                out[kind] = raw
        return out
    return value


def _image(raw: Any, what: str, binary_base64: bool) -> Item | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise RecordError(f"{what} is not an attribute map")
    if binary_base64:
        return {name: decode_binary(value) for name, value in raw.items()}
    return dict(raw)


def parse_record(raw: Mapping[str, Any], *, binary_base64: bool = False) -> Change:
    """Check one record of GetRecords (or of a Lambda event, with `binary_base64`) and normalize it."""
    event = raw.get("eventName")
    if event not in ("INSERT", "MODIFY", "REMOVE"):
        raise RecordError(f"eventName {event!r} is not INSERT, MODIFY or REMOVE")
    body = raw.get("dynamodb")
    if not isinstance(body, Mapping):
        raise RecordError("the record has no `dynamodb` section")
    view = body.get("StreamViewType")
    if view is not None and view != REQUIRED_VIEW_TYPE:
        raise RecordError(
            f"the stream's view type is {view}; replication needs {REQUIRED_VIEW_TYPE} (the old image "
            "tells the replicator's own writes from the application's)"
        )
    keys = _image(body.get("Keys"), "Keys", binary_base64)
    if not keys:
        raise RecordError("the record has no Keys")
    new_image = _image(body.get("NewImage"), "NewImage", binary_base64)
    old_image = _image(body.get("OldImage"), "OldImage", binary_base64)
    if event in ("INSERT", "MODIFY") and new_image is None:
        raise RecordError(f"{event} record without NewImage: the stream must be {REQUIRED_VIEW_TYPE}")
    if event == "MODIFY" and old_image is None:
        raise RecordError(f"MODIFY record without OldImage: the stream must be {REQUIRED_VIEW_TYPE}")
    sequence = body.get("SequenceNumber")
    if not isinstance(sequence, str) or not sequence.isdigit() or len(sequence) > SEQUENCE_DIGITS:
        raise RecordError(f"SequenceNumber {sequence!r} is not a number of at most 40 digits")
    return Change(
        event=event,
        keys=keys,
        new_image=new_image if event != "REMOVE" else None,
        old_image=old_image,
        sequence_number=sequence,
        created_ms=creation_ms(body.get("ApproximateCreationDateTime")),
        key_id=key_id(keys),
    )


# -- echoes ------------------------------------------------------------------------------------------------


def is_write_echo(change: Change) -> bool:
    """An INSERT/MODIFY written by a replicator: its `ddbsc:ts` is new (the app's writes keep or drop it)."""
    if change.event == "REMOVE":
        return False
    new = replicated_version(change.new_image)
    return new is not None and new != replicated_version(change.old_image)


def is_tombstone(change: Change) -> bool:
    """A record of a tombstone item (in the health table): per-region bookkeeping, never replicated (its
    writes and its TTL expiry alike)."""
    key = change.keys.get(TOMBSTONE_KEY_ATTR)
    return (
        len(change.keys) == 1
        and isinstance(key, Mapping)
        and isinstance(key.get("S"), str)
        and str(key["S"]).startswith(TOMBSTONE_PREFIX)
    )


def needs_tombstone_lookup(change: Change) -> bool:
    """A REMOVE of a replicated item: an echo only if the source holds a newer tombstone for it."""
    return (
        change.event == "REMOVE"
        and replicated_version(change.old_image) is not None
        and not is_tombstone(change)
    )


def is_delete_echo(change: Change, source_tombstone: str | None) -> bool:
    old = replicated_version(change.old_image)
    return (
        change.event == "REMOVE"
        and old is not None
        and source_tombstone is not None
        and source_tombstone > old
    )


def strip_bookkeeping(item: Mapping[str, Any]) -> Item:
    """The item as the application wrote it: without the replicator's `ddbsc:` attributes."""
    return {name: value for name, value in item.items() if not name.startswith(BOOKKEEPING_PREFIX)}


# -- planning ----------------------------------------------------------------------------------------------


def _value_size(value: Any) -> int:
    if isinstance(value, Mapping):
        return sum(len(str(k)) + _value_size(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return sum(_value_size(v) for v in value) + 1
    if isinstance(value, bytes | bytearray):
        return len(value)
    if isinstance(value, str):
        return len(value.encode("utf-8"))
    return 1


def _sequence_order(sequence_number: str) -> str:
    return sequence_number.zfill(SEQUENCE_DIGITS)


def plan(
    table: str,
    changes: Sequence[Change],
    source_region: str,
    source_tombstones: Mapping[str, str] | None = None,
    not_before_ms: int | None = None,
) -> Plan:
    """The writes `changes` (a delivery from one stream, in any order, duplicates allowed) ask of a target.

    `source_tombstones` maps tombstone ids (of the REMOVEs `needs_tombstone_lookup` selects) to the version
    the source region's tombstone table holds for them; absent ids have none. Records created before
    `not_before_ms` are skipped (`stale`): the unreplicated tail of an earlier time this region was the
    source. Of an item's records the one latest in the stream (sequence number) is written.
    """
    tombstones = source_tombstones or {}
    newest: dict[str, Change] = {}
    first: dict[str, int] = {}
    counts: dict[str, int] = {}
    echoes = stale = 0
    for position, change in enumerate(changes):
        if (
            is_tombstone(change)
            or is_write_echo(change)
            or (
                needs_tombstone_lookup(change)
                and is_delete_echo(change, tombstones.get(tombstone_id(table, change.key_id)))
            )
        ):
            echoes += 1
            continue
        if not_before_ms is not None and change.created_ms < not_before_ms:
            stale += 1
            continue
        first.setdefault(change.key_id, position)
        counts[change.key_id] = counts.get(change.key_id, 0) + 1
        current = newest.get(change.key_id)
        if current is None or _sequence_order(change.sequence_number) > _sequence_order(
            current.sequence_number
        ):
            newest[change.key_id] = change
    ops = []
    for kid in sorted(newest, key=first.__getitem__):
        change = newest[kid]
        version = change.version(source_region)
        item = None
        if change.new_image is not None:
            item = strip_bookkeeping(change.new_image)
            item[VERSION_ATTR] = {"S": version}
        size = _OP_OVERHEAD + _value_size(item if item is not None else change.keys)
        ops.append(
            WriteOp(
                table=table,
                key=change.keys,
                key_id=kid,
                version=version,
                item=item,
                created_ms=change.created_ms,
                first_position=first[kid],
                records=counts[kid],
                size=size,
            )
        )
    created = [c.created_ms for c in changes]
    return Plan(
        ops=tuple(ops),
        records=len(changes),
        echoes=echoes,
        stale=stale,
        last_sequence=max((c.sequence_number for c in changes), key=_sequence_order) if changes else None,
        oldest_created_ms=min(created) if created else None,
        newest_created_ms=max(created) if created else None,
    )


def group_ops(
    ops: Iterable[WriteOp], max_items: int = MAX_GROUP_ITEMS, max_bytes: int = MAX_GROUP_BYTES
) -> list[tuple[WriteOp, ...]]:
    """Transactions of at most `max_items` items and about `max_bytes`, never two writes of one item."""
    if not 1 <= max_items <= MAX_GROUP_ITEMS:
        raise ValueError(f"max_items must be 1-{MAX_GROUP_ITEMS}")
    groups: list[tuple[WriteOp, ...]] = []
    current: list[WriteOp] = []
    size = 0
    seen: set[tuple[str, str]] = set()
    for op in ops:
        ident = (op.table, op.key_id)
        if ident in seen:
            raise ValueError(f"two writes of one item in a delivery: {op.table} {op.key_id}")
        seen.add(ident)
        if current and (len(current) >= max_items or size + op.size > max_bytes):
            groups.append(tuple(current))
            current, size = [], 0
        current.append(op)
        size += op.size
    if current:
        groups.append(tuple(current))
    return groups


def _conditional(version: str) -> dict[str, Any]:
    return {
        "ConditionExpression": CONDITION,
        "ExpressionAttributeNames": {"#ts": VERSION_ATTR},
        "ExpressionAttributeValues": {":ts": {"S": version}},
    }


def tombstone_item(op: WriteOp, expires_at: int) -> Item:
    return {
        TOMBSTONE_KEY_ATTR: {"S": op.tombstone_id},
        VERSION_ATTR: {"S": op.version},
        TOMBSTONE_TABLE_ATTR: {"S": op.table},
        TOMBSTONE_EXPIRES_ATTR: {"N": str(expires_at)},
    }


def put_request(op: WriteOp) -> dict[str, Any]:
    """PutItem (or a transaction's Put) of the item, unless the target holds its version or a newer one."""
    if op.item is None:
        raise ValueError("put_request of a delete")
    return {"TableName": op.table, "Item": op.item, **_conditional(op.version)}


def delete_request(op: WriteOp) -> dict[str, Any]:
    """DeleteItem of the item, unless the target holds a newer version (absent: a no-op that succeeds)."""
    return {"TableName": op.table, "Key": op.key, **_conditional(op.version)}


def tombstone_put_request(op: WriteOp, tombstone_table: str, expires_at: int) -> dict[str, Any]:
    """The tombstone of a delete, unless a newer one is there. `expires_at`: epoch seconds, for TTL."""
    return {"TableName": tombstone_table, "Item": tombstone_item(op, expires_at), **_conditional(op.version)}


def tombstone_check(op: WriteOp, tombstone_table: str) -> dict[str, Any]:
    """A transaction's ConditionCheck: no tombstone for the item, or an older one."""
    return {
        "TableName": tombstone_table,
        "Key": {TOMBSTONE_KEY_ATTR: {"S": op.tombstone_id}},
        **_conditional(op.version),
    }


def tombstone_allows(op: WriteOp, tombstone_version: str | None) -> bool:
    """A put may go ahead unless a delete at least as new is recorded."""
    return tombstone_version is None or tombstone_version < op.version


def transact_items(group: Sequence[WriteOp], tombstone_table: str, expires_at: int) -> list[dict[str, Any]]:
    """The TransactItems of one group (`write_mode: transact`): per item, the conditional write, then the
    ConditionCheck of its tombstone (a put) or the tombstone itself (a delete)."""
    actions: list[dict[str, Any]] = []
    for op in group:
        if op.item is not None:
            actions.append({"Put": put_request(op)})
            actions.append({"ConditionCheck": tombstone_check(op, tombstone_table)})
        else:
            actions.append({"Delete": delete_request(op)})
            actions.append({"Put": tombstone_put_request(op, tombstone_table, expires_at)})
    return actions


_RETRY_NOW = frozenset({"None", ""})


def classify_cancellation(
    group: Sequence[WriteOp], reasons: Sequence[Mapping[str, Any]] | None
) -> Cancellation:
    """Sort the items of a cancelled transaction by its CancellationReasons (two per item, in order)."""
    if not reasons or len(reasons) != 2 * len(group):
        got = len(reasons) if reasons else 0
        return Cancellation(
            (), (), tuple(group), f"cancelled with {got} reasons for {2 * len(group)} actions"
        )
    superseded, now, later = [], [], []
    details: dict[str, int] = {}
    for index, op in enumerate(group):
        codes = [str(reasons[2 * index + k].get("Code") or "None") for k in (0, 1)]
        if "ConditionalCheckFailed" in codes:
            superseded.append(op)
        elif all(code in _RETRY_NOW for code in codes):
            now.append(op)
        else:
            later.append(op)
            for k in (0, 1):
                reason = reasons[2 * index + k]
                code = str(reason.get("Code") or "None")
                if code not in _RETRY_NOW:
                    text = f"{code}: {reason['Message']}" if reason.get("Message") else code
                    details[text] = details.get(text, 0) + 1
    if now and not superseded and not later:
        # Cancelled for no reason DynamoDB would name: do not spin, back off.
        return Cancellation((), (), tuple(now), "cancelled without a reason")
    detail = "; ".join(f"{text} (x{count})" if count > 1 else text for text, count in details.items())
    return Cancellation(tuple(superseded), tuple(now), tuple(later), detail)


# -- shard lineage -----------------------------------------------------------------------------------------


def shard_from_description(raw: Mapping[str, Any]) -> Shard:
    """A shard of DescribeStream: closed once it has an EndingSequenceNumber."""
    numbers = raw.get("SequenceNumberRange") or {}
    parent = raw.get("ParentShardId")
    return Shard(
        shard_id=str(raw["ShardId"]),
        parent_id=str(parent) if parent else None,
        closed=bool(numbers.get("EndingSequenceNumber")),
    )


def readable_shards(shards: Iterable[Shard], finished: Set[str]) -> list[str]:
    """The shards to read now: not finished, and whose parent is finished (read to its end and applied).

    A parent that DescribeStream no longer lists has aged out of the stream's retention: nothing of it is
    left to read. Order: as listed (DynamoDB lists shards in the order they were created).
    """
    listed = list(shards)
    ids = {s.shard_id for s in listed}
    return [
        s.shard_id
        for s in listed
        if s.shard_id not in finished
        and (s.parent_id is None or s.parent_id in finished or s.parent_id not in ids)
    ]
