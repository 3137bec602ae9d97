"""`ddb-sidecar reconcile` against the session's real moto regions, and the failback scenario end to end.

The CLI runs as a subprocess with the moto IAM user's key in its environment (the standard AWS chain, like
the daemon). Items are written to each region directly, so every test knows exactly what differs. The
shell's small parts (token bucket, progress line, the spilling sorter) are tested at the end without moto.
"""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from botocore.exceptions import BotoCoreError, ClientError

from sidecar.config import Config, config_from_data
from sidecar.core.diff import KeySchema, key_of, same_item, summarize
from sidecar.reconcile import (
    CHANGED_MEANWHILE,
    Pair,
    Progress,
    Reconciler,
    RegionUnreachable,
    Repair,
    SetupError,
    SortedSpool,
    TokenBucket,
    choose_segments,
)
from tests.support.faultproxy import FaultProxy
from tests.support.moto_region import MotoRegion
from tests.support.ports import free_port
from tests.support.stack import SidecarStack, base_env, isolated_aws_env, new_app_table
from tests.support.wait import wait_until

SIDECAR = Path(sys.executable).parent / "ddb-sidecar"
HOME, OTHER = "us-east-1", "eu-west-1"


# -- helpers ---------------------------------------------------------------------------------------------


def write(region: MotoRegion, table: str, items: Iterable[dict[str, Any]]) -> None:
    """BatchWriteItem in 25s (unprocessed items sent again)."""
    client = region.client()
    batch = [{"PutRequest": {"Item": item}} for item in items]
    for start in range(0, len(batch), 25):
        request = {table: batch[start : start + 25]}
        while request:
            request = client.batch_write_item(RequestItems=request).get("UnprocessedItems") or {}


def scan_all(region: MotoRegion, table: str) -> list[dict[str, Any]]:
    client = region.client()
    items: list[dict[str, Any]] = []
    kwargs: dict[str, Any] = {"TableName": table, "ConsistentRead": True}
    while True:
        page = client.scan(**kwargs)
        items += page["Items"]
        if "LastEvaluatedKey" not in page:
            return items
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def assert_same_contents(a: list[dict[str, Any]], b: list[dict[str, Any]], schema: KeySchema) -> None:
    left = {key_of(i, schema): i for i in a}
    right = {key_of(i, schema): i for i in b}
    assert left.keys() == right.keys()
    assert all(same_item(left[k], right[k]) for k in left)


def reconcile_config(
    regions: Mapping[str, MotoRegion], table: str, folder: Path, admin_port: int | None = None
) -> Path:
    """A sidecar.yaml pointing at the moto regions; its admin address has no daemon behind it."""
    config = {
        "listen": f"127.0.0.1:{free_port()}",
        "regions": [
            {"name": name, "endpoint": regions[name].endpoint, "proxy": f"127.0.0.1:{free_port()}"}
            for name in (HOME, OTHER)
        ],
        "tables": [table],
        "haproxy": {"stats": f"127.0.0.1:{free_port()}"},
        "admin": f"127.0.0.1:{admin_port or free_port()}",
    }
    path = folder / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def aws_env(region: MotoRegion) -> dict[str, str]:
    return {**base_env(), **isolated_aws_env(*region.credentials)}


def run_cli(config: Path, env: Mapping[str, str], *args: str, timeout: float = 90) -> tuple[int, Any, str]:
    """`ddb-sidecar reconcile -c CONFIG ARGS`; returns (exit code, the JSON report or stdout, stderr)."""
    proc = subprocess.run(
        [str(SIDECAR), "reconcile", "-c", str(config), *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    out: Any = proc.stdout
    if "--json" in args and proc.stdout.strip():
        out = json.loads(proc.stdout)
    return proc.returncode, out, proc.stderr


def listed(comparison: dict[str, Any], kind: str) -> set[str]:
    return {entry["key"]["pk"]["S"] for entry in comparison[kind]["keys"]}


def item(pk: str, **attrs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"pk": {"S": pk}}
    for name, value in attrs.items():
        name = name.replace("ddbsc_", "ddbsc:")
        out[name] = {"N": str(value)} if isinstance(value, int) else {"S": str(value)}
    return out


def session_for(region: MotoRegion) -> Any:
    key = region.credentials
    return boto3.session.Session(
        aws_access_key_id=key.access_key_id, aws_secret_access_key=key.secret_access_key
    )


def loaded(path: Path) -> Config:
    return config_from_data(yaml.safe_load(path.read_text()), base_dir=path.parent, check_environment=False)


# -- the report and --apply, through the CLI -------------------------------------------------------------


def test_reconcile_lists_exactly_the_differences_and_apply_makes_the_regions_equal(
    moto_regions: dict[str, MotoRegion], table_name: str, tmp_path: Path
) -> None:
    home, other = moto_regions[HOME], moto_regions[OTHER]
    for region in (home, other):
        region.create_table(table_name)
    common = [item(f"same-{i:03d}", v=i, note="x" * (i % 7)) for i in range(300)]
    missing = [item(f"missing-{i}", v=i) for i in range(7)]
    extra = [item(f"extra-{i}", v=i) for i in range(5)]
    # different: newer known on each side, and unknown (no timestamp on one side)
    diff_src = [
        item("diff-src-newer", v=2, ddbsc_ts=200),
        item("diff-tgt-newer", v=1, ddbsc_ts=100),
        item("diff-unknown", v=1),
        item("diff-removed-attr", v=1, more="x"),
    ]
    diff_tgt = [
        item("diff-src-newer", v=1, ddbsc_ts=100),
        item("diff-tgt-newer", v=2, ddbsc_ts=300),
        item("diff-unknown", v=2, ddbsc_ts=5),
        item("diff-removed-attr", v=1),
    ]
    # equal once bookkeeping is ignored and numbers are compared as numbers
    equal_src = [item("bk-1", v=1, ddbsc_ts=1, ddbsc_origin="us"), {"pk": {"S": "num-1"}, "n": {"N": "1.50"}}]
    equal_tgt = [item("bk-1", v=1, ddbsc_ts=9, ddbsc_origin="eu"), {"pk": {"S": "num-1"}, "n": {"N": "1.5"}}]
    write(home, table_name, common + missing + diff_src + equal_src)
    write(other, table_name, common + extra + diff_tgt + equal_tgt)

    config = reconcile_config(moto_regions, table_name, tmp_path)
    env = aws_env(home)
    code, doc, err = run_cli(config, env, "--json", "--segments", "4")
    assert code == 1, err
    # no daemon: the home region is the source
    assert doc["source"].startswith(f"{HOME} (the config's home region")
    (c,) = doc["comparisons"]
    assert (c["table"], c["from"], c["to"], c["mode"], c["equal"]) == (
        table_name,
        HOME,
        OTHER,
        "report",
        False,
    )
    assert listed(c, "missing") == {i["pk"]["S"] for i in missing}
    assert listed(c, "extra") == {i["pk"]["S"] for i in extra}
    assert {e["key"]["pk"]["S"]: e["newer"] for e in c["different"]["keys"]} == {
        "diff-src-newer": "source",
        "diff-tgt-newer": "target",
        "diff-unknown": "unknown",
        "diff-removed-attr": "unknown",
    }
    assert (c["missing"]["count"], c["extra"]["count"], c["different"]["count"]) == (7, 5, 4)
    assert c["items"] == {"source": 313, "target": 311, "compared": 318}
    assert c["segments"] == 4 and "repairs" not in c

    # the human summary says the same
    code, text, _ = run_cli(config, env, "--segments", "2")
    assert code == 1
    assert f"missing in {OTHER}: 7   extra in {OTHER}: 5   different: 4" in text
    assert 'different {"pk": {"S": "diff-src-newer"}} (newer: source)' in text
    assert text.rstrip().endswith("differences remain")

    backup = tmp_path / "before.jsonl"
    code, doc, err = run_cli(config, env, "--json", "--apply", "--backup", str(backup))
    assert code == 0, err
    (c,) = doc["comparisons"]
    assert c["mode"] == "apply" and c["equal"] is True
    assert c["repairs"] == {"applied": 16, "conflict": 0, "skipped": 0, "failed": 0}
    assert all(
        e["repair"] == "applied" for kind in ("missing", "extra", "different") for e in c[kind]["keys"]
    )
    # every overwritten or deleted target item was saved first
    saved = [json.loads(line) for line in backup.read_text().splitlines()]
    assert backup.stat().st_mode & 0o777 == 0o600  # the items' data: the operator's eyes only
    assert {s["item"]["pk"]["S"] for s in saved} == {i["pk"]["S"] for i in extra + diff_tgt}
    assert {s["action"] for s in saved} == {"put", "delete"}

    code, doc, err = run_cli(config, env, "--json")
    assert code == 0, err
    (c,) = doc["comparisons"]
    assert c["equal"] and c["differences"] == 0
    assert_same_contents(scan_all(home, table_name), scan_all(other, table_name), KeySchema("pk"))


def test_a_table_with_a_sort_key_and_other_key_names(
    moto_regions: dict[str, MotoRegion], table_name: str, tmp_path: Path
) -> None:
    home, other = moto_regions[HOME], moto_regions[OTHER]
    for region in (home, other):
        region.create_table(table_name, pk="customer", sk="order")

    def order(c: str, o: str, total: int) -> dict[str, Any]:
        return {"customer": {"S": c}, "order": {"S": o}, "total": {"N": str(total)}}

    # several items per partition key: they share a segment
    base = [order(f"c{c}", f"o{o}", c * o) for c in range(20) for o in range(5)]
    write(home, table_name, [*base, order("c1", "new", 1)])
    write(other, table_name, [*base[:-1], order("c2", "o1", 999)])
    config = reconcile_config(moto_regions, table_name, tmp_path)
    code, doc, _ = run_cli(config, aws_env(home), "--json", "--segments", "3", "--apply")
    assert code == 0
    (c,) = doc["comparisons"]
    keys = {kind: [e["key"] for e in c[kind]["keys"]] for kind in ("missing", "extra", "different")}
    assert keys == {
        "missing": [
            {"customer": {"S": "c1"}, "order": {"S": "new"}},
            {"customer": {"S": "c19"}, "order": {"S": "o4"}},
        ],
        "extra": [],
        "different": [{"customer": {"S": "c2"}, "order": {"S": "o1"}}],
    }
    schema = KeySchema("customer", "S", "order", "S")
    assert_same_contents(scan_all(home, table_name), scan_all(other, table_name), schema)


def test_usage_and_config_problems_exit_2_and_an_unreachable_region_exits_3(
    moto_regions: dict[str, MotoRegion], table_name: str, tmp_path: Path
) -> None:
    home = moto_regions[HOME]
    home.create_table(table_name)
    config = reconcile_config(moto_regions, table_name, tmp_path)
    env = aws_env(home)
    for args, message in [
        (["--from", "ap-south-1"], "--from: ap-south-1 is not a configured region"),
        (["--to", HOME], "--to: us-east-1 is also the source region"),
        (["--table", "not-configured"], "--table: not-configured is not in the config's tables"),
        (["--backup", "x.jsonl"], "--backup only makes sense with --apply"),
        ([], f"{OTHER}: "),  # the table does not exist in eu-west-1
    ]:
        code, _, err = run_cli(config, env, *args)
        assert code == 2, (args, err)
        assert message in err, (args, err)
    code, _, err = run_cli(config, {**env, "AWS_SECRET_ACCESS_KEY": "wrong"})
    assert code == 2 and "credentials were refused" in err

    data = yaml.safe_load(config.read_text())
    data["regions"][1]["endpoint"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    config.write_text(yaml.safe_dump(data))
    code, _, err = run_cli(config, env, "--json")
    assert code == 3, err
    assert f"reconcile: {OTHER}: " in err


# -- the shell in process: conflicts, the memory bound, throttling ---------------------------------------


def test_an_item_changed_between_the_scan_and_the_repair_is_reported_and_not_clobbered(
    moto_regions: dict[str, MotoRegion], table_name: str, tmp_path: Path
) -> None:
    home, other = moto_regions[HOME], moto_regions[OTHER]
    for region in (home, other):
        region.create_table(table_name)
    write(home, table_name, [item("missing", v=1), item("different", v=1), item("untouched", v=1)])
    write(other, table_name, [item("extra", v=1), item("different", v=2), item("untouched", v=2)])
    config = loaded(reconcile_config(moto_regions, table_name, tmp_path))
    concurrent = {
        "missing": item("missing", v=7, by="app"),
        "different": item("different", v=7, by="app"),
        "extra": item("extra", v=7, by="app"),
    }

    def meanwhile(pair: Pair, repair: Repair) -> None:
        # the application writes the key in the target just before the repair reaches it
        pk = repair.key_item["pk"]["S"]
        if pk in concurrent:
            other.client().put_item(TableName=pair.table, Item=concurrent[pk])

    with Reconciler(
        config.regions, apply=True, segments=2, session=session_for(home), before_repair=meanwhile
    ) as reconciler:
        result = reconciler.run(Pair(table_name, config.region(HOME), config.region(OTHER)))
    doc = result.to_json()
    assert doc["repairs"] == {"applied": 1, "conflict": 3, "skipped": 0, "failed": 0}
    outcomes = {
        e["key"]["pk"]["S"]: (e["repair"], e.get("detail"))
        for kind in ("missing", "extra", "different")
        for e in doc[kind]["keys"]
    }
    assert outcomes == {
        "missing": ("conflict", CHANGED_MEANWHILE),
        "different": ("conflict", CHANGED_MEANWHILE),
        "extra": ("conflict", CHANGED_MEANWHILE),
        "untouched": ("applied", "put if unchanged"),
    }
    assert not result.equal
    target = {i["pk"]["S"]: i for i in scan_all(other, table_name)}
    for pk, written in concurrent.items():
        assert target[pk] == written  # the concurrent write survived
    assert target["untouched"]["v"] == {"N": "1"}


def test_segments_larger_than_the_memory_bound_spill_to_disk(
    moto_regions: dict[str, MotoRegion], table_name: str, tmp_path: Path
) -> None:
    home, other = moto_regions[HOME], moto_regions[OTHER]
    for region in (home, other):
        region.create_table(table_name)
    rng = random.Random(7)
    items = [item(f"k{i:04d}", v=i) for i in range(400)]
    target = [i for i in items if rng.random() > 0.05]
    target = [item(i["pk"]["S"], v=-1) if rng.random() < 0.05 else i for i in target]
    target += [item(f"x{i}", v=i) for i in range(9)]
    write(home, table_name, items)
    write(other, table_name, target)
    config = loaded(reconcile_config(moto_regions, table_name, tmp_path))
    pair = Pair(table_name, config.region(HOME), config.region(OTHER))
    results = {}
    for label, spill in (("in memory", 50_000), ("spilled", 17)):
        with Reconciler(
            config.regions, segments=3, spill_entries=spill, session=session_for(home), rate=0, workers=2
        ) as reconciler:
            results[label] = reconciler.run(pair).to_json()
    assert results["in memory"]["spilled_segments"] == 0
    assert results["spilled"]["spilled_segments"] == 3
    for kind in ("missing", "extra", "different"):
        assert results["spilled"][kind] == results["in memory"][kind]
    assert results["spilled"]["extra"]["count"] == 9
    assert results["spilled"]["items"] == results["in memory"]["items"]


def test_throttling_is_retried_with_backoff_and_counted(
    moto_regions: dict[str, MotoRegion], table_name: str, tmp_path: Path
) -> None:
    home, other = moto_regions[HOME], moto_regions[OTHER]
    for region in (home, other):
        region.create_table(table_name)
    write(home, table_name, [item(f"k{i}", v=i) for i in range(30)])
    write(other, table_name, [item(f"k{i}", v=i) for i in range(29)])
    with FaultProxy(other.port, tmp_path) as proxy:
        path = reconcile_config(moto_regions, table_name, tmp_path)
        data = yaml.safe_load(path.read_text())
        data["regions"][1]["endpoint"] = proxy.url
        path.write_text(yaml.safe_dump(data))
        # botocore's own retries (3 attempts) give up on the first 3; reconcile backs off and tries again
        proxy.set_mode("throttle", match="Scan", times=4)
        code, doc, err = run_cli(path, aws_env(home), "--json")
        assert proxy.requests("throttle") == 4
    assert code == 1, err
    (c,) = doc["comparisons"]
    assert c["throttled"] >= 1
    assert listed(c, "missing") == {"k29"}


# -- the failback scenario -------------------------------------------------------------------------------


def test_outage_failover_and_return_reconcile_lists_the_unreplicated_writes_and_apply_heals(
    moto_regions: dict[str, MotoRegion], tmp_path: Path
) -> None:
    """Writes through the stable address with a replication stand-in (the test copies acknowledged writes
    to the other region, as global tables would, with a lag), an outage of the home region, failover, the
    home region's return. The writes still in the replication backlog at the cut, and those made in
    eu-west-1 while us-east-1 was away, are exactly what reconcile lists; --apply heals us-east-1."""
    home, other = moto_regions[HOME], moto_regions[OTHER]
    table = new_app_table([home, other], "failback")
    clock = iter(range(1, 1_000_000))

    def order(pk: str, state: str) -> dict[str, Any]:
        return item(pk, state=state)

    with (
        FaultProxy(home.port, tmp_path) as home_proxy,
        FaultProxy(other.port, tmp_path) as other_proxy,
        SidecarStack(
            [home, other], [table], tmp_path, endpoints={HOME: home_proxy.url, OTHER: other_proxy.url}
        ) as stack,
    ):
        stack.wait_regions_up()
        app = stack.client(connect_timeout=2, read_timeout=2)

        def put(it: dict[str, Any], deadline: float = 20.0) -> None:
            """Write through the stable address until acknowledged (refused writes were never sent), then
            stamp the item's version (`ddbsc:ts`) in the region that took it, as a replicator's bookkeeping
            would: the app itself may not write `ddbsc:` attributes (the gate refuses them)."""
            stop = time.monotonic() + deadline
            while True:
                try:
                    app.put_item(TableName=table, Item=it)
                    break
                except (ClientError, BotoCoreError):
                    if time.monotonic() > stop:
                        raise
                    time.sleep(0.1)
            took = home if stack.status()["active_region"] == HOME else other
            took.client().update_item(
                TableName=table,
                Key={"pk": it["pk"]},
                UpdateExpression="SET #ts = :ts",
                ExpressionAttributeNames={"#ts": "ddbsc:ts"},
                ExpressionAttributeValues={":ts": {"N": str(next(clock))}},
            )

        def replicate(pks: Iterable[str]) -> None:
            src = home.client()
            for pk in pks:
                got = src.get_item(TableName=table, Key={"pk": {"S": pk}}, ConsistentRead=True)["Item"]
                other.client().put_item(TableName=table, Item=got)

        # before the outage: us-east-1 serves; replication runs behind by the last ten writes
        before = [f"before-{i:02d}" for i in range(30)]
        for pk in [*before, "shared-a", "shared-b"]:
            put(order(pk, "created"))
        replicate([*before[:20], "shared-a", "shared-b"])
        put(order("shared-a", "paid in us-east-1"))  # never replicated
        assert stack.status()["active_region"] == HOME

        # the outage: us-east-1 refuses connections; the sidecar moves traffic; the app carries on
        home_proxy.set_mode("refuse")
        wait_until(lambda: stack.status()["active_region"] == OTHER, 15, message="failover to eu-west-1")
        during = [f"during-{i:02d}" for i in range(15)]
        for pk in during:
            put(order(pk, "created"))
        put(order("shared-b", "shipped in eu-west-1"))
        for pk in during[:3]:
            got = other.client().get_item(TableName=table, Key={"pk": {"S": pk}})
            assert "Item" in got and "Item" not in home.client().get_item(
                TableName=table, Key={"pk": {"S": pk}}
            )

        # the old region returns (failback is manual: eu-west-1 stays active)
        home_proxy.set_mode("pass")
        stack.wait_regions_up(20)
        assert stack.status()["active_region"] == OTHER

        env = {**stack.env}
        code, doc, err = run_cli(stack.config_path, env, "--json")
        assert code == 1, err
        assert doc["source"].startswith(f"{OTHER} (the daemon's active region")
        (c,) = doc["comparisons"]
        assert (c["from"], c["to"]) == (OTHER, HOME)
        assert listed(c, "missing") == set(during)  # written in eu-west-1 while us-east-1 was away
        assert listed(c, "extra") == set(before[20:])  # acknowledged by us-east-1, never replicated
        assert {e["key"]["pk"]["S"]: e["newer"] for e in c["different"]["keys"]} == {
            "shared-a": "target",  # us-east-1's later write was lost to the outage
            "shared-b": "source",
        }

        code, doc, err = run_cli(stack.config_path, env, "--json", "--apply")
        assert code == 0, err
        assert doc["comparisons"][0]["repairs"]["applied"] == 27
        code, doc, err = run_cli(stack.config_path, env, "--json")
        assert code == 0 and doc["comparisons"][0]["equal"], err
    assert_same_contents(scan_all(home, table), scan_all(other, table), KeySchema("pk"))


# -- the shell's parts, without moto ---------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_the_token_bucket_holds_the_long_run_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(100, clock=clock, sleep=clock.sleep)
    assert bucket.take(100) == 0  # the first second's burst
    for _ in range(10):
        bucket.take(50)  # pages arriving faster than the rate
    assert clock.now == pytest.approx(5.0)
    assert TokenBucket(0, clock=clock, sleep=clock.sleep).take(10**9) == 0  # unlimited


def test_the_token_bucket_paces_threads_together() -> None:
    bucket = TokenBucket(2000, burst=1)
    started = time.monotonic()
    threads = [threading.Thread(target=lambda: [bucket.take(50) for _ in range(4)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert time.monotonic() - started >= 0.35  # 800 tokens at 2000/s, less the burst


def test_the_progress_line_is_redrawn_at_most_five_times_a_second() -> None:
    clock = FakeClock()
    out = io.StringIO()
    progress = Progress(out, enabled=True, clock=clock)
    progress.start("orders us-east-1 -> eu-west-1", 1000)
    for _ in range(100):
        clock.now += 0.01
        progress.advance(5)
    progress.advance(differences=3)
    progress.finish()
    frames = out.getvalue().split("\r")[1:]
    assert 5 <= len(frames) <= 8  # start, ~1 s of updates at 0.2 s, finish
    assert (
        frames[-1].strip()
        == "orders us-east-1 -> eu-west-1: 500/~1,000 items read  50%, 500/s, 3 differences"
    )
    silent = io.StringIO()
    quiet = Progress(silent, enabled=False)
    quiet.start("x", 1)
    quiet.advance(1)
    quiet.finish()
    assert silent.getvalue() == ""


@pytest.mark.parametrize("max_entries", [10**6, 7, 1])
def test_the_spool_sorts_within_its_bound_and_drops_duplicate_keys(tmp_path: Path, max_entries: int) -> None:
    schema = KeySchema("pk", "S", "sk", "N")
    rng = random.Random(max_entries)
    items = [
        {"pk": {"S": f"p{rng.randrange(20)}"}, "sk": {"N": str(rng.randrange(5))}, "n": {"N": str(n)}}
        for n in range(120)
    ]
    last = {key_of(i, schema): summarize(i, schema) for i in items}
    spool = SortedSpool(max_entries, tmp_path)
    for i in items:
        spool.add(summarize(i, schema))
    out = list(spool.sorted())
    assert out == [last[k] for k in sorted(last)]  # sorted by key; the last version of a duplicate wins
    assert spool.unique == len(last) and spool.count == 120
    assert (spool.spilled_runs > 0) == (max_entries < 120)
    spool.close()


def test_segments_follow_the_table_size() -> None:
    assert choose_segments(0) == 1
    assert choose_segments(500, workers=4) == 1  # too small to share
    assert choose_segments(5_000, workers=4) == 4
    assert choose_segments(100_000) == 10
    assert choose_segments(100_000, segment_items=1000) == 100
    assert choose_segments(10**12) == 1_000_000


def test_errors_carry_the_cli_exit_codes() -> None:
    assert SetupError("x").exit_code == 2
    assert RegionUnreachable("x").exit_code == 3
