"""What differs between one table in two regions, and the conditional writes that repair it: pure.

Items are DynamoDB JSON as botocore's client returns them (`{"pk": {"S": "a"}, "n": {"N": "1.5"}}`, binary
values as bytes). The shell scans both regions segment by segment, reduces every item to a summary (its key
and a 16-byte fingerprint of its comparable form), sorts each side of a segment by key (spilling to disk
past a bound) and hands the two sorted streams to `diff_summaries`, which holds one summary of each side at
a time; the items of the keys that differ are read again and compared with `compare`. Nothing here does I/O
or reads a clock.

Rules:
- equality ignores replication bookkeeping (attributes named `ddbsc:...`), the order of set members and
  the spelling of numbers (`1.50` equals `1.5`: DynamoDB normalizes, moto does not);
- which side is newer: `ddbsc:ts` when both items carry it with the same type (N or an ISO-8601 S), else
  "unknown";
- a repair is a conditional write towards the source: a missing item is put only if the key is still absent
  (`attribute_not_exists`), a different item is overwritten and an extra one deleted only if the target item
  is still exactly what was read (every attribute compared, or its `ddbsc:ts` alone when the full condition
  would exceed DynamoDB's 4 KB expression limit; with neither possible the key is skipped, and reported).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

AttributeValue = Mapping[str, Any]
Item = Mapping[str, AttributeValue]
# A key as a sortable, hashable tuple: one (type, canonical value) pair per key attribute, hash key first.
ItemKey = tuple[tuple[str, Any], ...]

BOOKKEEPING_PREFIX = "ddbsc:"
TS_ATTRIBUTE = "ddbsc:ts"
# DynamoDB: "The maximum length of any expression string is 4 KB."
MAX_EXPRESSION_CHARS = 4096

Kind = Literal["missing", "extra", "different"]
Newer = Literal["source", "target", "same", "unknown"]
Action = Literal["put", "delete", "skip"]


@dataclass(frozen=True)
class KeySchema:
    """The table's key attributes and their scalar types (S, N or B), as DescribeTable gives them."""

    hash_key: str
    hash_type: str = "S"
    range_key: str | None = None
    range_type: str | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return (self.hash_key,) if self.range_key is None else (self.hash_key, self.range_key)

    @classmethod
    def from_description(cls, table: Mapping[str, Any]) -> KeySchema:
        """From a DescribeTable `Table` document."""
        types = {a["AttributeName"]: a["AttributeType"] for a in table.get("AttributeDefinitions", [])}
        hash_key = range_key = None
        for element in table["KeySchema"]:
            if element["KeyType"] == "HASH":
                hash_key = element["AttributeName"]
            elif element["KeyType"] == "RANGE":
                range_key = element["AttributeName"]
        if hash_key is None:
            raise ValueError("the table's key schema has no HASH key")
        return cls(
            hash_key,
            types.get(hash_key, "S"),
            range_key,
            types.get(range_key, "S") if range_key is not None else None,
        )


# -- canonical forms -------------------------------------------------------------------------------------


def _number(value: Any) -> str:
    text = str(value)
    if text.isdigit() and (text[0] != "0" or text == "0"):  # the common case: a plain integer
        return text
    try:
        number = Decimal(text)
    except InvalidOperation:
        return text
    if not number.is_finite():
        return text
    if number.is_zero():
        return "0"
    # DynamoDB's own spelling: no exponent, no leading or trailing zeros
    return format(number.normalize(), "f")


def _binary(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):  # wire JSON: base64
        try:
            return base64.b64decode(value, validate=True)
        except ValueError:
            return value.encode()
    return bytes(value)


def canonical(value: AttributeValue) -> str:
    """A deterministic text form of one attribute value in which equal DynamoDB values are equal.

    Strings are quoted with repr (unambiguous), numbers normalized, set members sorted, map keys sorted,
    lists kept in order.
    """
    if len(value) != 1:
        raise ValueError(f"not a DynamoDB attribute value: {sorted(value)!r}")
    ((kind, v),) = value.items()
    if kind == "S":
        return "S" + repr(str(v))
    if kind == "N":
        return "N" + _number(v)
    if kind == "B":
        return "B" + _binary(v).hex()
    if kind == "BOOL":
        return "T" if v else "F"
    if kind == "NULL":
        return "0"
    if kind == "SS":
        return "SS[" + ",".join(sorted(repr(str(x)) for x in v)) + "]"
    if kind == "NS":
        return "NS[" + ",".join(sorted(_number(x) for x in v)) + "]"
    if kind == "BS":
        return "BS[" + ",".join(sorted(_binary(x).hex() for x in v)) + "]"
    if kind == "L":
        return "L[" + ",".join(canonical(x) for x in v) + "]"
    if kind == "M":
        return "M{" + ",".join(repr(k) + ":" + canonical(v[k]) for k in sorted(v)) + "}"
    raise ValueError(f"unknown DynamoDB attribute type {kind!r}")


def is_bookkeeping(name: str) -> bool:
    return name.startswith(BOOKKEEPING_PREFIX)


def comparable(item: Item) -> str:
    """The item as compared across regions: canonical text, bookkeeping attributes left out."""
    return ";".join(
        repr(name) + "=" + canonical(item[name]) for name in sorted(item) if not is_bookkeeping(name)
    )


def same_item(a: Item, b: Item) -> bool:
    return comparable(a) == comparable(b)


def fingerprint(item: Item) -> bytes:
    """16 bytes that stand for `comparable(item)`: what the shell keeps per item while it diffs."""
    return hashlib.blake2b(comparable(item).encode("utf-8", "surrogatepass"), digest_size=16).digest()


def key_of(item: Item, schema: KeySchema) -> ItemKey:
    """The item's key as a sortable tuple; raises KeyError when a key attribute is absent."""
    parts: list[tuple[str, Any]] = []
    for name in schema.names:
        value = item[name]
        ((kind, v),) = value.items()
        if kind == "N":
            parts.append(("N", _number(v)))
        elif kind == "B":
            parts.append(("B", _binary(v)))
        else:
            parts.append((kind, str(v)))
    return tuple(parts)


def key_item(item: Item, schema: KeySchema) -> dict[str, AttributeValue]:
    """The key attributes of an item, as a DynamoDB `Key` parameter."""
    return {name: item[name] for name in schema.names}


def to_wire_json(value: Any) -> Any:
    """An item, key or attribute value made JSON-serializable the way DynamoDB's wire JSON spells it
    (binary values base64-encoded)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, Mapping):
        return {str(k): to_wire_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_wire_json(v) for v in value]
    return value


def key_json(item: Item, schema: KeySchema) -> dict[str, Any]:
    """The item's key as DynamoDB JSON, ready for a report: `{"pk": {"S": "order#1"}}`."""
    result: dict[str, Any] = to_wire_json(key_item(item, schema))
    return result


def newer(source: Item, target: Item, ts_attribute: str = TS_ATTRIBUTE) -> Newer:
    """Which side holds the later write, by `ts_attribute` when both carry it with the same type."""
    a, b = source.get(ts_attribute), target.get(ts_attribute)
    if a is None or b is None or len(a) != 1 or len(b) != 1:
        return "unknown"
    ((kind_a, va),) = a.items()
    ((kind_b, vb),) = b.items()
    if kind_a != kind_b:
        return "unknown"
    if kind_a == "N":
        try:
            x, y = Decimal(str(va)), Decimal(str(vb))
        except InvalidOperation:
            return "unknown"
        return "same" if x == y else "source" if x > y else "target"
    if kind_a == "S":
        sa, sb = str(va), str(vb)
        return "same" if sa == sb else "source" if sa > sb else "target"
    return "unknown"


# -- the diff --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Difference:
    """One key on which the two sides disagree. `source`/`target` are the items as read (None: absent)."""

    kind: Kind
    key: ItemKey
    source: Item | None
    target: Item | None
    newer: Newer | None = None  # only for "different"


def compare(key: ItemKey, source: Item | None, target: Item | None) -> Difference | None:
    """The difference on one key given both sides (None: absent), or None when they are equal."""
    if source is None and target is None:
        return None
    if target is None:
        return Difference("missing", key, source, None)
    if source is None:
        return Difference("extra", key, None, target)
    if same_item(source, target):
        return None
    return Difference("different", key, source, target, newer(source, target))


class UnsortedInput(ValueError):
    """A stream handed to diff_sorted was not strictly ascending by key."""


def _checked(items: Iterable[Item], schema: KeySchema, side: str) -> Iterator[tuple[ItemKey, Item]]:
    previous: ItemKey | None = None
    for item in items:
        key = key_of(item, schema)
        if previous is not None and key <= previous:
            raise UnsortedInput(f"{side} stream not strictly ascending by key: {key!r} after {previous!r}")
        previous = key
        yield key, item


def diff_sorted(source: Iterable[Item], target: Iterable[Item], schema: KeySchema) -> Iterator[Difference]:
    """Merge two streams sorted ascending by `key_of` and yield every difference, in key order.

    Holds one item of each side at a time: memory is whatever the caller needs to produce sorted streams.
    """
    src = _checked(source, schema, "source")
    tgt = _checked(target, schema, "target")
    s = next(src, None)
    t = next(tgt, None)
    while s is not None or t is not None:
        if t is None or (s is not None and s[0] < t[0]):
            assert s is not None
            yield Difference("missing", s[0], s[1], None)
            s = next(src, None)
        elif s is None or t[0] < s[0]:
            yield Difference("extra", t[0], None, t[1])
            t = next(tgt, None)
        else:
            found = compare(s[0], s[1], t[1])
            if found is not None:
                yield found
            s = next(src, None)
            t = next(tgt, None)


# A compact stand-in for an item while diffing: its key, its fingerprint, and the key's numbers as stored
# when they are not spelled canonically (moto keeps `1.50`; DynamoDB normalizes, so this is None there).
Summary = tuple[ItemKey, bytes, tuple[str, ...] | None]


def summarize(item: Item, schema: KeySchema) -> Summary:
    key = key_of(item, schema)
    raw: tuple[str, ...] | None = None
    if any(
        kind == "N" and item[name]["N"] != value
        for name, (kind, value) in zip(schema.names, key, strict=True)
    ):
        raw = tuple(str(next(iter(item[name].values()))) for name in schema.names)
    return key, fingerprint(item), raw


def summary_key(summary: Summary, schema: KeySchema) -> dict[str, AttributeValue]:
    """The DynamoDB `Key` of a summarized item, spelled as stored."""
    key, _, raw = summary
    out: dict[str, AttributeValue] = {}
    for i, (name, (kind, value)) in enumerate(zip(schema.names, key, strict=True)):
        out[name] = {kind: raw[i] if raw is not None and kind == "N" else value}
    return out


def diff_summaries(source: Iterable[Summary], target: Iterable[Summary]) -> Iterator[tuple[Kind, Summary]]:
    """`diff_sorted` on summaries (sorted ascending by key): the kind and a summary (the source's when it
    has one) of every difference, in key order.

    What the shell runs: it keeps ~50 bytes per item instead of the item, and reads the items of the few
    keys that differ again before reporting or repairing them.
    """
    src = iter(source)
    tgt = iter(target)
    s = next(src, None)
    t = next(tgt, None)
    last_s: ItemKey | None = None
    last_t: ItemKey | None = None
    while s is not None or t is not None:
        if s is not None and last_s is not None and s[0] <= last_s:
            raise UnsortedInput(f"source stream not strictly ascending by key: {s[0]!r} after {last_s!r}")
        if t is not None and last_t is not None and t[0] <= last_t:
            raise UnsortedInput(f"target stream not strictly ascending by key: {t[0]!r} after {last_t!r}")
        if t is None or (s is not None and s[0] < t[0]):
            assert s is not None
            yield "missing", s
            last_s, s = s[0], next(src, None)
        elif s is None or t[0] < s[0]:
            yield "extra", t
            last_t, t = t[0], next(tgt, None)
        else:
            if s[1] != t[1]:
                yield "different", s
            last_s, s = s[0], next(src, None)
            last_t, t = t[0], next(tgt, None)


def sort_items(items: Iterable[Item], schema: KeySchema) -> list[Item]:
    return sorted(items, key=lambda item: key_of(item, schema))


def diff_items(source: Iterable[Item], target: Iterable[Item], schema: KeySchema) -> list[Difference]:
    """Whole-collection diff, in memory (tests, small tables): sorts both sides, then `diff_sorted`."""
    return list(diff_sorted(sort_items(source, schema), sort_items(target, schema), schema))


def diff_by_segment(
    source: Iterable[Item],
    target: Iterable[Item],
    schema: KeySchema,
    segment_of: Callable[[ItemKey], int],
    segments: int,
) -> list[Difference]:
    """The diff computed segment by segment, as the shell does with DynamoDB's parallel Scan.

    Correct when `segment_of` puts a key in the same segment on both sides, which is what the shell relies
    on (DynamoDB segments by a hash of the partition key).
    """
    src: list[list[Item]] = [[] for _ in range(segments)]
    tgt: list[list[Item]] = [[] for _ in range(segments)]
    for item in source:
        src[segment_of(key_of(item, schema))].append(item)
    for item in target:
        tgt[segment_of(key_of(item, schema))].append(item)
    out: list[Difference] = []
    for i in range(segments):
        out += diff_items(src[i], tgt[i], schema)
    return out


# -- repairs ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    """A DynamoDB ConditionExpression with its placeholders."""

    expression: str
    names: dict[str, str] = field(default_factory=dict)
    values: dict[str, AttributeValue] = field(default_factory=dict)


@dataclass(frozen=True)
class Repair:
    """The conditional write that makes the target agree with the source on one key.

    `expected` is the target item the condition protects (None: the key must be absent); `condition_on`
    names the attributes the condition compares ("*" for all of them).
    """

    action: Action
    key: ItemKey
    key_item: dict[str, AttributeValue]
    item: Item | None = None
    expected: Item | None = None
    condition: Condition | None = None
    condition_on: str = ""
    reason: str = ""


def absent_condition(schema: KeySchema) -> Condition:
    return Condition("attribute_not_exists(#k0)", {"#k0": schema.hash_key})


def unchanged_condition(
    item: Item,
    *,
    max_chars: int = MAX_EXPRESSION_CHARS,
    version_attribute: str = TS_ATTRIBUTE,
) -> tuple[Condition, str] | None:
    """A condition that holds only while the stored item still has every attribute value of `item`.

    Falls back to `version_attribute` alone when the full condition would be longer than `max_chars`;
    None when neither fits. NULL values are checked with attribute_type (an equality on NULL is not
    portable). An attribute added meanwhile is not seen unless the writer also bumps the version.
    """
    names: dict[str, str] = {}
    values: dict[str, AttributeValue] = {}
    parts: list[str] = []
    for i, (name, value) in enumerate(sorted(item.items())):
        names[f"#a{i}"] = name
        if "NULL" in value:
            values[f":v{i}"] = {"S": "NULL"}
            parts.append(f"attribute_type(#a{i}, :v{i})")
        else:
            values[f":v{i}"] = value
            parts.append(f"#a{i} = :v{i}")
    expression = " AND ".join(parts)
    if expression and len(expression) <= max_chars:
        return Condition(expression, names, values), "*"
    if version_attribute in item:
        return (
            Condition("#ver = :ver", {"#ver": version_attribute}, {":ver": item[version_attribute]}),
            version_attribute,
        )
    return None


def plan_repair(
    difference: Difference,
    schema: KeySchema,
    *,
    max_chars: int = MAX_EXPRESSION_CHARS,
    version_attribute: str = TS_ATTRIBUTE,
) -> Repair:
    """The conditional write (or the reason to skip) that repairs `difference` towards the source."""
    d = difference
    if d.kind == "missing":
        assert d.source is not None
        return Repair(
            "put",
            d.key,
            key_item(d.source, schema),
            item=d.source,
            expected=None,
            condition=absent_condition(schema),
            condition_on="absent",
            reason="missing in target",
        )
    assert d.target is not None
    found = unchanged_condition(d.target, max_chars=max_chars, version_attribute=version_attribute)
    action: Action = "put" if d.kind == "different" else "delete"
    what = "different in target" if d.kind == "different" else "extra in target"
    if found is None:
        return Repair(
            "skip",
            d.key,
            key_item(d.target, schema),
            item=d.source,
            expected=d.target,
            reason=f"{what}: the target item has too many attributes for a {max_chars}-character "
            f"condition and no {version_attribute} attribute; not touched",
        )
    condition, condition_on = found
    return Repair(
        action,
        d.key,
        key_item(d.target, schema),
        item=d.source if action == "put" else None,
        expected=d.target,
        condition=condition,
        condition_on=condition_on,
        reason=what,
    )


def condition_holds(repair: Repair, current: Item | None) -> bool:
    """What the repair's condition means, for fakes and tests: evaluated against the stored item."""
    if repair.action == "skip":
        return False
    if repair.expected is None:
        return current is None
    if current is None:
        return False
    if repair.condition_on == "*":
        return all(
            name in current and canonical(current[name]) == canonical(value)
            for name, value in repair.expected.items()
        )
    name = repair.condition_on
    return name in current and canonical(current[name]) == canonical(repair.expected[name])


def apply_repair(table: dict[ItemKey, Item], repair: Repair) -> bool:
    """Apply a repair to an in-memory table (key -> item) when its condition holds; True if written."""
    current = table.get(repair.key)
    if not condition_holds(repair, current):
        return False
    if repair.action == "put":
        assert repair.item is not None
        table[repair.key] = repair.item
    elif repair.action == "delete":
        del table[repair.key]
    return True


# -- the report ------------------------------------------------------------------------------------------

Outcome = Literal["applied", "conflict", "skipped", "failed"]


@dataclass
class Tally:
    """Counts of every difference and repair outcome, and the first `max_keys` keys of each kind.

    Counts are exact however many differences there are; the key lists are capped so that the report of a
    table that differs everywhere stays bounded too.
    """

    max_keys: int = 1000
    counts: dict[str, int] = field(default_factory=lambda: {"missing": 0, "extra": 0, "different": 0})
    keys: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: {"missing": [], "extra": [], "different": []}
    )
    outcomes: dict[str, int] = field(
        default_factory=lambda: {"applied": 0, "conflict": 0, "skipped": 0, "failed": 0}
    )
    truncated: bool = False

    def add(
        self,
        difference: Difference,
        schema: KeySchema,
        outcome: Outcome | None = None,
        detail: str | None = None,
    ) -> None:
        kind = difference.kind
        self.counts[kind] += 1
        if outcome is not None:
            self.outcomes[outcome] += 1
        entries = self.keys[kind]
        if len(entries) >= self.max_keys:
            self.truncated = True
            return
        item = difference.source if difference.source is not None else difference.target
        assert item is not None
        entry: dict[str, Any] = {"key": key_json(item, schema)}
        if kind == "different":
            entry["newer"] = difference.newer or "unknown"
        if outcome is not None:
            entry["repair"] = outcome
            if detail:
                entry["detail"] = detail
        entries.append(entry)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def unresolved(self) -> int:
        """Differences still standing: all of them without repairs, those not applied with them."""
        return self.total - self.outcomes["applied"]

    def sorted_keys(self) -> dict[str, list[dict[str, Any]]]:
        """The key lists in a stable order (segments finish in any order)."""
        return {
            kind: sorted(entries, key=lambda e: repr(sorted(e["key"].items())))
            for kind, entries in self.keys.items()
        }
