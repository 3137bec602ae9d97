"""The reconcile diff: equality rules, the merge of two sorted streams, conditional repairs, the tally.

The property tests build two sides that share some keys, with values mutated, keys only on one side and
bookkeeping attributes (`ddbsc:...`) that differ, then check that applying the repairs (each one only when
its condition holds, as DynamoDB would) makes the target equal to the source and a second diff is empty.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.core.diff import (
    MAX_EXPRESSION_CHARS,
    TS_ATTRIBUTE,
    Difference,
    Item,
    ItemKey,
    KeySchema,
    Tally,
    UnsortedInput,
    apply_repair,
    canonical,
    comparable,
    compare,
    condition_holds,
    diff_by_segment,
    diff_items,
    diff_sorted,
    diff_summaries,
    key_json,
    key_of,
    newer,
    plan_repair,
    same_item,
    sort_items,
    summarize,
    summary_key,
    to_wire_json,
    unchanged_condition,
)

HASH_ONLY = KeySchema("pk", "S")
WITH_RANGE = KeySchema("pk", "S", "sk", "N")

# -- strategies ------------------------------------------------------------------------------------------

numbers = st.integers(-1000, 1000).flatmap(
    # the same number spelled several ways: DynamoDB normalizes, moto keeps the spelling
    lambda n: st.sampled_from([str(n), f"{n}.0", f"{n}.00", f"{n}e0"])
)
scalars = st.one_of(
    st.text(max_size=6).map(lambda s: {"S": s}),
    numbers.map(lambda n: {"N": n}),
    st.binary(max_size=4).map(lambda b: {"B": b}),
    st.booleans().map(lambda b: {"BOOL": b}),
    st.just({"NULL": True}),
    st.lists(st.text(max_size=3), min_size=1, max_size=3, unique=True).map(lambda v: {"SS": v}),
    st.lists(st.integers(0, 50).map(str), min_size=1, max_size=3, unique=True).map(lambda v: {"NS": v}),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(lambda v: {"L": v}),
        st.dictionaries(st.sampled_from("xyz"), inner, max_size=3).map(lambda v: {"M": v}),
    ),
    max_leaves=6,
)
attr_names = st.sampled_from(["a", "b", "c", "status", "total"])
bookkeeping = st.dictionaries(
    st.sampled_from([TS_ATTRIBUTE, "ddbsc:origin", "ddbsc:seq"]), numbers.map(lambda n: {"N": n}), max_size=2
)


def make_item(schema: KeySchema, key: tuple[str, int], attrs: dict[str, Any]) -> dict[str, Any]:
    item: dict[str, Any] = dict(attrs)
    item[schema.hash_key] = {"S": key[0]}
    if schema.range_key is not None:
        item[schema.range_key] = {"N": str(key[1])}
    return item


keys = st.tuples(st.sampled_from([f"k{i}" for i in range(12)]), st.integers(0, 3))


@st.composite
def two_sides(draw: st.DrawFn, schema: KeySchema) -> tuple[list[Item], list[Item]]:
    """A source and a target with shared keys (equal, mutated or bookkeeping-only different) and keys
    present on one side only."""
    all_keys = draw(st.lists(keys, unique=True, max_size=25))
    if schema.range_key is None:  # one item per partition key
        all_keys = list({k[0]: (k[0], 0) for k in all_keys}.values())
    source: list[Item] = []
    target: list[Item] = []
    for key in all_keys:
        attrs = draw(st.dictionaries(attr_names, values, max_size=3))
        fate = draw(st.sampled_from(["same", "mutated", "bookkeeping", "source-only", "target-only"]))
        item = make_item(schema, key, {**attrs, **draw(bookkeeping)})
        if fate in ("same", "mutated", "bookkeeping", "source-only"):
            source.append(item)
        if fate == "same":
            target.append(item)
        elif fate == "bookkeeping":
            target.append(make_item(schema, key, {**attrs, **draw(bookkeeping)}))
        elif fate == "mutated":
            other = draw(st.dictionaries(attr_names, values, max_size=3))
            target.append(make_item(schema, key, {**other, **draw(bookkeeping)}))
        elif fate == "target-only":
            target.append(item)
    return source, target


def as_table(items: list[Item], schema: KeySchema) -> dict[ItemKey, Item]:
    return {key_of(item, schema): item for item in items}


def repair_all(
    source: list[Item],
    target: list[Item],
    schema: KeySchema,
    meanwhile: Callable[[dict[ItemKey, Item], Difference], None] | None = None,
) -> tuple[dict[ItemKey, Item], list[bool]]:
    table = as_table(target, schema)
    written = []
    for difference in diff_items(source, target, schema):
        repair = plan_repair(difference, schema)
        if meanwhile is not None:
            meanwhile(table, difference)
        written.append(apply_repair(table, repair))
    return table, written


# -- properties ------------------------------------------------------------------------------------------


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([HASH_ONLY, WITH_RANGE]).flatmap(lambda s: st.tuples(st.just(s), two_sides(s))))
def test_applying_the_repairs_makes_the_target_equal_and_a_second_diff_is_empty(
    case: tuple[KeySchema, tuple[list[Item], list[Item]]],
) -> None:
    schema, (source, target) = case
    repaired, written = repair_all(source, target, schema)
    assert all(written)  # nothing changed underneath: every condition holds
    assert diff_items(source, list(repaired.values()), schema) == []
    src = as_table(source, schema)
    assert repaired.keys() == src.keys()
    assert all(same_item(src[k], repaired[k]) for k in src)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([HASH_ONLY, WITH_RANGE]).flatmap(lambda s: st.tuples(st.just(s), two_sides(s))))
def test_the_diff_reports_exactly_the_keys_that_differ(
    case: tuple[KeySchema, tuple[list[Item], list[Item]]],
) -> None:
    schema, (source, target) = case
    src, tgt = as_table(source, schema), as_table(target, schema)
    expected = {("missing", k) for k in src.keys() - tgt.keys()}
    expected |= {("extra", k) for k in tgt.keys() - src.keys()}
    expected |= {
        ("different", k) for k in src.keys() & tgt.keys() if comparable(src[k]) != comparable(tgt[k])
    }
    found = diff_items(source, target, schema)
    assert {(d.kind, d.key) for d in found} == expected
    assert [d.key for d in found] == sorted(d.key for d in found)  # in key order, each key once


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([HASH_ONLY, WITH_RANGE]).flatmap(lambda s: st.tuples(st.just(s), two_sides(s))),
    st.integers(1, 7),
)
def test_segment_by_segment_equals_the_whole_table_diff(
    case: tuple[KeySchema, tuple[list[Item], list[Item]]], segments: int
) -> None:
    schema, (source, target) = case

    def segment_of(key: ItemKey) -> int:
        # like DynamoDB and moto: by a hash of the partition key only
        return hashlib.md5(repr(key[0]).encode()).digest()[0] % segments

    whole = diff_items(source, target, schema)
    by_segment = diff_by_segment(source, target, schema, segment_of, segments)
    assert sorted(by_segment, key=lambda d: d.key) == whole


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([HASH_ONLY, WITH_RANGE]).flatmap(lambda s: st.tuples(st.just(s), two_sides(s))))
def test_the_summary_diff_finds_what_the_item_diff_finds(
    case: tuple[KeySchema, tuple[list[Item], list[Item]]],
) -> None:
    """What the shell runs (key + fingerprint per item, items re-read for the keys that differ) equals the
    diff of the items themselves."""
    schema, (source, target) = case
    src = sorted((summarize(i, schema) for i in source), key=lambda x: x[0])
    tgt = sorted((summarize(i, schema) for i in target), key=lambda x: x[0])
    by_summary = [(kind, summary[0]) for kind, summary in diff_summaries(src, tgt)]
    assert by_summary == [(d.kind, d.key) for d in diff_items(source, target, schema)]
    # the keys the shell reads again find the items, and `compare` on them gives the same difference
    s_table, t_table = as_table(source, schema), as_table(target, schema)
    for _, summary in diff_summaries(src, tgt):
        key = key_of(summary_key(summary, schema), schema)
        assert key == summary[0]
        assert compare(key, s_table.get(key), t_table.get(key)) is not None


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([HASH_ONLY, WITH_RANGE]).flatmap(lambda s: st.tuples(st.just(s), two_sides(s))),
    bookkeeping,
)
def test_bookkeeping_attributes_are_ignored(
    case: tuple[KeySchema, tuple[list[Item], list[Item]]], extra: dict[str, Any]
) -> None:
    schema, (source, _) = case
    target = [{**item, **extra} for item in source]
    target = [{k: v for k, v in item.items() if k != "ddbsc:seq"} for item in target]
    assert diff_items(source, target, schema) == []


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([HASH_ONLY, WITH_RANGE]).flatmap(lambda s: st.tuples(st.just(s), two_sides(s))))
def test_an_item_changed_between_the_diff_and_the_repair_is_never_clobbered(
    case: tuple[KeySchema, tuple[list[Item], list[Item]]],
) -> None:
    schema, (source, target) = case
    concurrent: dict[ItemKey, Item] = {}
    deleted: set[ItemKey] = set()

    def meanwhile(table: dict[ItemKey, Item], d: Difference) -> None:
        # A writer acts on the key just before the repair: creates the missing item, rewrites an attribute
        # of the target item, or deletes it.
        if d.target is None:
            assert d.source is not None
            table[d.key] = concurrent[d.key] = {**d.source, "by": {"S": "someone else"}}
            return
        names = [n for n in d.target if n not in schema.names]
        if names:
            table[d.key] = concurrent[d.key] = {**d.target, names[0]: {"S": "rewritten meanwhile"}}
        else:
            del table[d.key]
            deleted.add(d.key)

    repaired, written = repair_all(source, target, schema, meanwhile)
    assert not any(written)
    for key, item in concurrent.items():
        assert repaired[key] == item
    assert not deleted & repaired.keys()


def test_an_attribute_added_meanwhile_is_seen_only_through_the_version() -> None:
    # The documented limit of the all-attributes condition: it compares the attributes that were read.
    target = {"pk": {"S": "a"}, "v": {"S": "x"}}
    repair = plan_repair(Difference("extra", key_of(target, HASH_ONLY), None, target), HASH_ONLY)
    assert condition_holds(repair, {**target, "added": {"S": "meanwhile"}})
    versioned = {**target, TS_ATTRIBUTE: {"N": "1"}}
    repair = plan_repair(Difference("extra", key_of(versioned, HASH_ONLY), None, versioned), HASH_ONLY)
    assert not condition_holds(repair, {**versioned, "added": {"S": "x"}, TS_ATTRIBUTE: {"N": "2"}})


# -- equality and newer ----------------------------------------------------------------------------------


def test_equality_ignores_number_spelling_set_order_and_map_order() -> None:
    a = {
        "pk": {"S": "a"},
        "n": {"N": "1.50"},
        "ss": {"SS": ["x", "y"]},
        "ns": {"NS": ["1", "2.0"]},
        "m": {"M": {"p": {"N": "0"}, "q": {"L": [{"S": "z"}]}}},
    }
    b = {
        "m": {"M": {"q": {"L": [{"S": "z"}]}, "p": {"N": "-0.0"}}},
        "ns": {"NS": ["2", "1.000"]},
        "ss": {"SS": ["y", "x"]},
        "n": {"N": "1.5"},
        "pk": {"S": "a"},
    }
    assert same_item(a, b)
    assert not same_item(a, {**b, "n": {"N": "1.51"}})
    assert not same_item(a, {**b, "m": {"M": {"q": {"L": [{"S": "z"}, {"S": "z"}]}, "p": {"N": "0"}}}})
    # lists keep their order; a string is not a number
    assert canonical({"L": [{"S": "1"}, {"S": "2"}]}) != canonical({"L": [{"S": "2"}, {"S": "1"}]})
    assert canonical({"S": "1"}) != canonical({"N": "1"})


def test_binary_values_compare_as_bytes_whether_raw_or_base64() -> None:
    assert canonical({"B": b"\x00\x01"}) == canonical({"B": "AAE="})
    assert to_wire_json({"B": b"\x00\x01"}) == {"B": "AAE="}
    assert key_json({"pk": {"B": b"\xff"}, "v": {"S": "x"}}, KeySchema("pk", "B")) == {"pk": {"B": "/w=="}}


def test_canonical_rejects_what_is_not_an_attribute_value() -> None:
    with pytest.raises(ValueError, match="unknown DynamoDB attribute type"):
        canonical({"X": 1})
    with pytest.raises(ValueError, match="not a DynamoDB attribute value"):
        canonical({"S": "a", "N": "1"})


@pytest.mark.parametrize(
    ("source_ts", "target_ts", "expected"),
    [
        ({"N": "20"}, {"N": "10"}, "source"),
        ({"N": "10"}, {"N": "10.0"}, "same"),
        ({"N": "9"}, {"N": "10"}, "target"),
        ({"S": "2026-11-26T10:00:00Z"}, {"S": "2026-11-26T09:59:59Z"}, "source"),
        ({"S": "2026-11-26T10:00:00Z"}, {"N": "1"}, "unknown"),
        (None, {"N": "1"}, "unknown"),
        ({"BOOL": True}, {"BOOL": False}, "unknown"),
    ],
)
def test_newer_by_the_bookkeeping_timestamp(
    source_ts: dict[str, str] | None, target_ts: dict[str, str], expected: str
) -> None:
    source = {"pk": {"S": "a"}} | ({TS_ATTRIBUTE: source_ts} if source_ts else {})
    target = {"pk": {"S": "a"}, TS_ATTRIBUTE: target_ts}
    assert newer(source, target) == expected


def test_a_different_item_carries_which_side_is_newer() -> None:
    source = [{"pk": {"S": "a"}, "v": {"S": "new"}, TS_ATTRIBUTE: {"N": "2"}}]
    target = [{"pk": {"S": "a"}, "v": {"S": "old"}, TS_ATTRIBUTE: {"N": "1"}}]
    (d,) = diff_items(source, target, HASH_ONLY)
    assert (d.kind, d.newer) == ("different", "source")
    (d,) = diff_items(target, source, HASH_ONLY)
    assert d.newer == "target"


# -- the merge -------------------------------------------------------------------------------------------


def test_diff_sorted_refuses_unsorted_or_duplicate_input() -> None:
    a, b = {"pk": {"S": "a"}}, {"pk": {"S": "b"}}
    with pytest.raises(UnsortedInput, match="source"):
        list(diff_sorted([b, a], [], HASH_ONLY))
    with pytest.raises(UnsortedInput, match="target"):
        list(diff_sorted([], [a, a], HASH_ONLY))
    sa, sb = summarize(a, HASH_ONLY), summarize(b, HASH_ONLY)
    with pytest.raises(UnsortedInput, match="source"):
        list(diff_summaries([sb, sa], []))
    with pytest.raises(UnsortedInput, match="target"):
        list(diff_summaries([sa], [sa, sa]))


@pytest.mark.parametrize(
    ("spelled", "canonical_form"),
    [("100", "100"), ("100.0", "100"), ("1E+2", "100"), ("-0.0", "0"), ("1.50", "1.5"), ("-12.340", "-12.34"),
     ("0.000010", "0.00001"), ("007", "7")],
)  # fmt: skip
def test_numbers_are_compared_in_dynamodbs_own_spelling(spelled: str, canonical_form: str) -> None:
    assert canonical({"N": spelled}) == "N" + canonical_form


def test_a_key_spelled_unlike_dynamodb_is_read_back_as_stored() -> None:
    schema = KeySchema("pk", "N", "sk", "S")
    moto_style = {"pk": {"N": "1.50"}, "sk": {"S": "x"}, "v": {"S": "y"}}
    summary = summarize(moto_style, schema)
    assert summary[0] == (("N", "1.5"), ("S", "x"))
    assert summary_key(summary, schema) == {"pk": {"N": "1.50"}, "sk": {"S": "x"}}
    plain = summarize({"pk": {"N": "15"}, "sk": {"S": "x"}}, schema)
    assert plain[2] is None and summary_key(plain, schema) == {"pk": {"N": "15"}, "sk": {"S": "x"}}
    # the fingerprint stands for the comparable form: bookkeeping ignored, values not
    assert summarize({**moto_style, "ddbsc:ts": {"N": "1"}}, schema)[1] == summary[1]
    assert summarize({**moto_style, "v": {"S": "z"}}, schema)[1] != summary[1]


def test_diff_sorted_is_lazy_one_item_per_side_at_a_time() -> None:
    pulled: list[str] = []

    def stream(side: str, n: int) -> Any:
        for i in range(n):
            pulled.append(side)
            yield {"pk": {"S": f"k{i:04d}"}, "side": {"S": side}}

    differences = diff_sorted(stream("s", 1000), stream("t", 1000), HASH_ONLY)
    first = next(differences)
    assert first.kind == "different"
    assert len(pulled) == 2


def test_numeric_and_binary_keys_sort_consistently() -> None:
    schema = KeySchema("pk", "N", "sk", "B")
    items = [
        {"pk": {"N": n}, "sk": {"B": b}} for n, b in [("10", b"\x01"), ("2", b"\x00"), ("10.0", b"\x00")]
    ]
    ordered = sort_items(items, schema)
    assert [key_of(i, schema) for i in ordered] == sorted(key_of(i, schema) for i in items)
    # 10 and 10.0 are the same key
    assert key_of(items[0], schema)[0] == key_of(items[2], schema)[0]


def test_key_schema_from_describe_table() -> None:
    table = {
        "KeySchema": [
            {"AttributeName": "id", "KeyType": "HASH"},
            {"AttributeName": "at", "KeyType": "RANGE"},
        ],
        "AttributeDefinitions": [
            {"AttributeName": "at", "AttributeType": "N"},
            {"AttributeName": "id", "AttributeType": "S"},
        ],
    }
    assert KeySchema.from_description(table) == KeySchema("id", "S", "at", "N")
    with pytest.raises(ValueError, match="no HASH key"):
        KeySchema.from_description({"KeySchema": []})


# -- repairs ---------------------------------------------------------------------------------------------


def test_repairs_use_the_real_key_names_and_conditions() -> None:
    schema = KeySchema("id", "S", "at", "N")
    src = {"id": {"S": "a"}, "at": {"N": "1"}, "v": {"S": "new"}}
    tgt = {"id": {"S": "a"}, "at": {"N": "1"}, "v": {"S": "old"}, "gone": {"NULL": True}}

    missing = plan_repair(Difference("missing", key_of(src, schema), src, None), schema)
    assert missing.action == "put" and missing.item == src
    assert missing.key_item == {"id": {"S": "a"}, "at": {"N": "1"}}
    assert missing.condition is not None
    assert missing.condition.expression == "attribute_not_exists(#k0)"
    assert missing.condition.names == {"#k0": "id"}

    different = plan_repair(Difference("different", key_of(src, schema), src, tgt), schema)
    assert different.action == "put" and different.item == src and different.expected == tgt
    assert different.condition is not None
    assert different.condition.expression == (
        "#a0 = :v0 AND attribute_type(#a1, :v1) AND #a2 = :v2 AND #a3 = :v3"
    )
    assert different.condition.names == {"#a0": "at", "#a1": "gone", "#a2": "id", "#a3": "v"}
    assert different.condition.values[":v1"] == {"S": "NULL"}

    extra = plan_repair(Difference("extra", key_of(tgt, schema), None, tgt), schema)
    assert extra.action == "delete" and extra.item is None and extra.key_item == missing.key_item
    assert extra.condition == different.condition


def test_a_big_item_is_conditioned_on_its_version_or_skipped() -> None:
    wide = {"pk": {"S": "a"}} | {f"attribute_{i:03d}": {"N": str(i)} for i in range(400)}
    assert unchanged_condition(wide) is None
    skipped = plan_repair(Difference("extra", key_of(wide, HASH_ONLY), None, wide), HASH_ONLY)
    assert skipped.action == "skip" and "too many attributes" in skipped.reason
    assert not condition_holds(skipped, wide)

    versioned = {**wide, TS_ATTRIBUTE: {"N": "17"}}
    found = unchanged_condition(versioned)
    assert found is not None
    condition, on = found
    assert on == TS_ATTRIBUTE and condition.expression == "#ver = :ver"
    assert condition.values == {":ver": {"N": "17"}}
    repair = plan_repair(Difference("extra", key_of(versioned, HASH_ONLY), None, versioned), HASH_ONLY)
    assert repair.action == "delete"
    assert condition_holds(repair, {**versioned, "other": {"S": "x"}})  # only the version is compared
    assert not condition_holds(repair, {**versioned, TS_ATTRIBUTE: {"N": "18"}})

    small = {"pk": {"S": "a"}, "v": {"S": "x"}}
    found = unchanged_condition(small, max_chars=MAX_EXPRESSION_CHARS)
    assert found is not None and found[1] == "*"


# -- the tally -------------------------------------------------------------------------------------------


def test_the_tally_counts_everything_and_lists_up_to_max_keys() -> None:
    tally = Tally(max_keys=2)
    items = [{"pk": {"S": f"k{i}"}} for i in range(5)]
    for item in items:
        tally.add(Difference("missing", key_of(item, HASH_ONLY), item, None), HASH_ONLY, "applied")
    tally.add(
        Difference("different", ("S", "x"), items[0], items[1], "target"), HASH_ONLY, "conflict", "changed"
    )
    assert tally.counts == {"missing": 5, "extra": 0, "different": 1}
    assert tally.outcomes["applied"] == 5 and tally.outcomes["conflict"] == 1
    assert tally.unresolved == 1 and tally.truncated
    assert tally.keys["missing"] == [
        {"key": {"pk": {"S": "k0"}}, "repair": "applied"},
        {"key": {"pk": {"S": "k1"}}, "repair": "applied"},
    ]
    assert tally.keys["different"] == [
        {"key": {"pk": {"S": "k0"}}, "newer": "target", "repair": "conflict", "detail": "changed"}
    ]
