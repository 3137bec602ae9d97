"""The stream replicator against two real moto_server regions (signature checking on).

- continuous writes replicated, resumed from the checkpoint after a clean stop;
- the replicator as a process, SIGKILLed twice mid-stream under continuous writes: nothing missing, and a
  reader of the target never sees an item go back to an older version;
- the source's real records delivered twice and out of order through the shared apply code;
- after a move, replication runs from the new region and the replicator's own writes do not come back;
- after a failback, the old source's unreplicated tail does not overwrite the newer writes made meanwhile;
- a table without a stream: the error names the command that enables it.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.config import Config, config_from_data
from sidecar.core.replicate import VERSION_ATTR, group_ops, parse_record, plan, strip_bookkeeping
from sidecar.proxy.sigv4 import Credentials
from sidecar.replication.apply import Applier
from sidecar.replication.checkpoint import CheckpointState, CheckpointStore, ShardCheckpoint, checkpoint_path
from sidecar.replication.streams import MOVE_MARGIN_MS, StreamReplicator
from tests.support.faultproxy import FaultProxy
from tests.support.moto_region import MotoRegion
from tests.support.processes import ManagedProcess
from tests.support.stack import isolated_aws_env
from tests.support.wait import async_wait_until, wait_until

A, B = "us-east-1", "eu-west-1"


@pytest.fixture
def tables(moto_regions: dict[str, MotoRegion], table_name: str) -> Iterator[tuple[str, str]]:
    """The app table and the health table (tombstones, heartbeats; replicated too), with NEW_AND_OLD_IMAGES
    streams, in both regions."""
    health = f"{table_name}-h"
    for region in moto_regions.values():
        region.create_table(table_name, stream=True)
        region.create_table(health, stream=True)
    yield table_name, health
    for region in moto_regions.values():
        for name in (table_name, health):
            region.client().delete_table(TableName=name)


# moto rolls a cancelled transaction back by restoring a copy of the whole table, losing the writes that
# concurrent transactions made meanwhile (seen here: 76 of 200 acknowledged writes): one at a time.
WRITE_MODES = {
    "single": {"write_mode": "single", "max_in_flight": 8},
    "transact": {"write_mode": "transact", "batch_size": 25, "max_in_flight": 1},
}


def config_data(
    moto_regions: dict[str, MotoRegion], table: str, health: str, mode: str = "single"
) -> dict[str, Any]:
    return {
        "regions": [
            {"name": name, "endpoint": region.endpoint, "proxy": f"127.0.0.1:{8101 + i}"}
            for i, (name, region) in enumerate(moto_regions.items())
        ],
        "tables": [table],
        "health": {"table": health},
        "state_dir": "state",
        "replication": {"mode": "streams", "poll_interval": "100ms", **WRITE_MODES[mode]},
    }


def make_config(
    moto_regions: dict[str, MotoRegion], table: str, health: str, base: Path, mode: str = "single"
) -> Config:
    return config_from_data(config_data(moto_regions, table, health, mode), base_dir=base)


def replicator(config: Config, region: MotoRegion, source: str = A) -> StreamReplicator:
    key = region.credentials
    return StreamReplicator(
        lambda: config,
        lambda: Credentials(key.access_key_id, key.secret_access_key),
        config.state_dir,
        source_region=source,
    )


def contents(region: MotoRegion, table: str) -> dict[str, dict[str, Any]]:
    """Every item by partition key, without the replicator's bookkeeping attributes."""
    ddb = region.client()
    out: dict[str, dict[str, Any]] = {}
    kwargs: dict[str, Any] = {"TableName": table, "ConsistentRead": True}
    while True:
        page = ddb.scan(**kwargs)
        out.update({item["pk"]["S"]: strip_bookkeeping(item) for item in page["Items"]})
        if "LastEvaluatedKey" not in page:
            return out
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def equal(regions: dict[str, MotoRegion], table: str) -> bool:
    return contents(regions[A], table) == contents(regions[B], table)


def differences(regions: dict[str, MotoRegion], table: str) -> str:
    """What differs between the regions, for a failed wait's message."""
    a, b = contents(regions[A], table), contents(regions[B], table)
    diff = {
        k: (a.get(k, {}).get("v"), b.get(k, {}).get("v"))
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    }
    return f"target equal to source; {len(diff)} items differ (key: source v, target v): {dict(list(diff.items())[:10])}"


class Writer:
    """Continuous application writes to one region: new items, updates, deletes, re-creations.

    Every item carries `v`, which grows with every write of that item (re-creations included), so a
    reader can tell an older version from a newer one.
    """

    def __init__(self, region: MotoRegion, table: str, prefix: str, rate: float, seed: int = 1) -> None:
        self.ddb = region.client()
        self.table = table
        self.prefix = prefix
        self.rate = rate
        self.rng = random.Random(seed)
        self.version: dict[str, int] = {}
        self.live: set[str] = set()
        self.counts = {"put": 0, "update": 0, "delete": 0, "recreate": 0}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def step(self) -> None:
        roll = self.rng.random()
        if roll < 0.45 or len(self.live) < 5:
            dead = sorted(set(self.version) - self.live)
            if dead and self.rng.random() < 0.2:
                key, kind = self.rng.choice(dead), "recreate"
            else:
                key, kind = f"{self.prefix}-{len(self.version):05d}", "put"
            self.version[key] = self.version.get(key, 0) + 1
            item = {
                "pk": {"S": key},
                "v": {"N": str(self.version[key])},
                "data": {"S": "x" * self.rng.randint(0, 200)},
            }
            self.ddb.put_item(TableName=self.table, Item=item)
            self.live.add(key)
        elif roll < 0.85:
            key, kind = self.rng.choice(sorted(self.live)), "update"
            self.version[key] += 1
            self.ddb.update_item(
                TableName=self.table,
                Key={"pk": {"S": key}},
                UpdateExpression="SET v = :v, touched = :t",
                ExpressionAttributeValues={":v": {"N": str(self.version[key])}, ":t": {"BOOL": True}},
            )
        else:
            key, kind = self.rng.choice(sorted(self.live)), "delete"
            self.version[key] += 1
            self.ddb.delete_item(TableName=self.table, Key={"pk": {"S": key}})
            self.live.discard(key)
        self.counts[kind] += 1

    def run(self, count: int) -> None:
        for _ in range(count):
            self.step()

    def start(self) -> Writer:
        def loop() -> None:
            started = time.monotonic()
            n = 0
            try:
                while not self._stop.is_set():
                    self.step()
                    n += 1
                    delay = started + n / self.rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
            except BaseException as exc:
                self.error = exc

        self._thread = threading.Thread(target=loop, name="writer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self.error is not None:
            raise self.error

    @property
    def writes(self) -> int:
        return sum(self.counts.values())


class RegressionWatch:
    """Scans the target again and again; records every item seen with a lower `v` than seen before."""

    def __init__(self, region: MotoRegion, table: str) -> None:
        self.region = region
        self.table = table
        self.highest: dict[str, int] = {}
        self.regressions: list[tuple[str, int, int]] = []
        self.scans = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="regression-watch", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for key, item in contents(self.region, self.table).items():
                    v = int(item["v"]["N"])
                    if v < self.highest.get(key, 0):
                        self.regressions.append((key, self.highest[key], v))
                    self.highest[key] = max(v, self.highest.get(key, 0))
                self.scans += 1
                self._stop.wait(0.1)
        except BaseException as exc:
            self.error = exc

    def start(self) -> RegressionWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        if self.error is not None:
            raise self.error


# -- in process --------------------------------------------------------------------------------------------


async def test_replicates_and_resumes_from_its_checkpoint(
    moto_regions: dict[str, MotoRegion], tables: tuple[str, str], tmp_path: Path
) -> None:
    table, health = tables
    config = make_config(moto_regions, table, health, tmp_path)
    source = moto_regions[A]
    writer = Writer(source, table, "item", rate=0)
    writer.run(120)
    source.client().put_item(
        TableName=table,
        Item={
            "pk": {"S": "types"},
            "b": {"B": b"\x00\xff"},
            "bs": {"BS": [b"\x01", b"\x02"]},
            "ns": {"NS": ["1", "2.5"]},
            "m": {"M": {"l": {"L": [{"S": "a"}, {"NULL": True}, {"BOOL": False}]}}},
        },
    )
    rep = replicator(config, source)
    await rep.start()
    try:
        await async_wait_until(lambda: equal(moto_regions, table), 20, interval=0.2, message="target equal")
        status = await async_wait_until(
            lambda: (s := rep.status())["lag_ms"] == 0 and s["iterator_age_s"] == 0 and s,
            5,
            message="caught up",
        )
    finally:
        await rep.stop()
    assert status["errors"] == 0 and status["last_error"] is None
    assert status["records_read"] == writer.writes + 1
    assert status["records_applied"] + status["records_superseded"] == writer.writes + 1
    assert status["records_echo"] == 0
    assert status["targets"] == {
        B: {"lag_ms": 0.0, "last_apply_lag_ms": status["targets"][B]["last_apply_lag_ms"]}
    }
    target_item = moto_regions[B].client().get_item(TableName=table, Key={"pk": {"S": "types"}})["Item"]
    assert target_item[VERSION_ATTR]["S"].endswith(f".{A}")
    saved = json.loads(checkpoint_path(config.state_dir, A, B, table).read_text())
    assert saved["source"] == A and saved["target"] == B and len(saved["shards"]) == 1

    # Stopped: more writes; a new replicator reads only what came after the checkpoint.
    writer.run(40)
    again = replicator(config, source)
    await again.start()
    try:
        await async_wait_until(
            lambda: equal(moto_regions, table), 20, interval=0.2, message="target equal again"
        )
        await async_wait_until(lambda: again.status()["lag_ms"] == 0, 5, message="caught up again")
    finally:
        await again.stop()
    assert again.status()["records_read"] == 40


async def test_a_silent_source_is_never_reported_caught_up(
    moto_regions: dict[str, MotoRegion], tables: tuple[str, str], tmp_path: Path
) -> None:
    """A source region that stops answering (frozen, blackholed) leaves a GetRecords hanging: nothing is
    pending, yet the target is not known to be caught up. The lag grows with the silence (found by the DR
    drill: the failover event said `lag 0 ms` while acknowledged writes were stranded in the frozen region)."""
    table, health = tables
    with FaultProxy(moto_regions[A].port, tmp_path) as proxy:
        data = config_data(moto_regions, table, health)
        data["regions"][0]["endpoint"] = proxy.url
        config = config_from_data(data, base_dir=tmp_path)
        rep = replicator(config, moto_regions[A])
        await rep.start()
        try:
            await async_wait_until(lambda: rep.status()["lag_ms"] == 0, 10, message="caught up")
            proxy.set_mode("blackhole")
            silent = await async_wait_until(
                lambda: (lag := rep.status()["lag_ms"]) is not None and lag > 1000 and lag,
                10,
                message="the lag grows while the source is silent",
            )
            assert silent > 1000
            proxy.set_mode("pass")
            await async_wait_until(
                lambda: rep.status()["lag_ms"] == 0, 60, interval=0.2, message="caught up again"
            )
        finally:
            await rep.stop()


async def test_after_a_move_replication_runs_from_the_new_region(
    moto_regions: dict[str, MotoRegion], tables: tuple[str, str], tmp_path: Path
) -> None:
    table, health = tables
    config = make_config(moto_regions, table, health, tmp_path)
    a, b = moto_regions[A], moto_regions[B]
    Writer(a, table, "before", rate=0, seed=2).run(80)
    rep = replicator(config, a)
    await rep.start()
    try:
        await async_wait_until(
            lambda: equal(moto_regions, table), 20, interval=0.2, message="A copied into B"
        )
        await rep.set_source(B)
        assert rep.source_region == B and rep.running
        # The app now writes to B: updates and deletes of replicated items, new items.
        after = Writer(b, table, "after", rate=0, seed=3)
        after.version = {k: int(v["v"]["N"]) for k, v in contents(b, table).items()}
        after.live = set(after.version)
        after.run(60)
        await async_wait_until(
            lambda: equal(moto_regions, table), 20, interval=0.2, message="B copied into A"
        )
        await async_wait_until(lambda: rep.status()["lag_ms"] == 0, 5, message="caught up")
        status = rep.status()
    finally:
        await rep.stop()
    # Everything A -> B wrote into B came back in B's stream, and none of it was written into A again.
    assert status["records_echo"] > 0
    b_records = status["records_read"] - 80  # all 80 of A's records were read before the move
    assert b_records == status["records_echo"] + after.writes
    assert status["errors"] == 0
    saved = checkpoint_path(config.state_dir, B, A, table)
    assert saved.exists() and checkpoint_path(config.state_dir, A, B, table).exists()


async def test_an_unreplicated_tail_does_not_overwrite_newer_writes_after_failback(
    moto_regions: dict[str, MotoRegion], tables: tuple[str, str], tmp_path: Path
) -> None:
    """A's last writes never reached B (the replicator was down when traffic moved to B); B then wrote
    newer versions of some of those items. When A is the source again, its old tail is not replicated:
    B keeps its newer writes (the tail's items differ until reconciled, and say so in the log)."""
    table, health = tables
    config = make_config(moto_regions, table, health, tmp_path)
    a, b = moto_regions[A], moto_regions[B]

    def put(region: MotoRegion, key: str, v: int) -> None:
        region.client().put_item(TableName=table, Item={"pk": {"S": key}, "v": {"N": str(v)}})

    for i in range(30):
        put(a, f"k{i:02d}", 1)
    rep = replicator(config, a)
    await rep.start()
    await async_wait_until(lambda: equal(moto_regions, table), 20, interval=0.2, message="A copied into B")
    await rep.stop()
    for i in range(10):  # A's tail: acknowledged, never replicated
        put(a, f"k{i:02d}", 2)
    await asyncio.sleep(MOVE_MARGIN_MS / 1000 + 0.3)  # the tail is older than the move (beyond the margin)
    await rep.set_source(B)  # traffic moved to B while the replicator was down
    await rep.start()
    try:
        for i in range(5):
            put(b, f"k{i:02d}", 3)  # B's newer writes of tail items
        await async_wait_until(
            lambda: all(contents(a, table)[f"k{i:02d}"]["v"] == {"N": "3"} for i in range(5)),
            20,
            message="B to A",
        )
        await asyncio.sleep(MOVE_MARGIN_MS / 1000 + 0.3)
        await rep.set_source(A)  # failback: A's old tail must not overwrite B's newer writes
        put(a, "k20", 4)
        await async_wait_until(
            lambda: contents(b, table)["k20"]["v"] == {"N": "4"}, 20, message="A's new write"
        )
        await async_wait_until(lambda: rep.status()["lag_ms"] == 0, 5, message="caught up")
        status = rep.status()
    finally:
        await rep.stop()
    in_b = contents(b, table)
    assert [in_b[f"k{i:02d}"]["v"]["N"] for i in range(10)] == ["3"] * 5 + ["1"] * 5
    assert status["records_stale"] == 10
    assert status["errors"] == 0
    saved = json.loads(checkpoint_path(config.state_dir, A, B, table).read_text())
    assert saved["not_before_ms"] is not None


async def test_a_table_without_a_stream_is_reported_with_the_command(
    moto_regions: dict[str, MotoRegion], table_name: str, tmp_path: Path
) -> None:
    health = f"{table_name}-h"
    for region in moto_regions.values():
        region.create_table(table_name)  # no stream
        region.create_table(health)
    config = make_config(moto_regions, table_name, health, tmp_path)
    rep = replicator(config, moto_regions[A])
    await rep.start()

    def app_table_error() -> str | None:
        return next((p["last_error"] for p in rep.status()["pipelines"] if p["table"] == table_name), None)

    try:
        error = await async_wait_until(app_table_error, 10, message="an error for the app table")
    finally:
        await rep.stop()
    assert f"table {table_name} in {A} has no stream" in error
    assert (
        f"aws dynamodb update-table --region {A} --table-name {table_name} "
        "--stream-specification StreamEnabled=true,StreamViewType=NEW_AND_OLD_IMAGES"
    ) in error
    assert rep.errors >= 1 and rep.status()["lag_ms"] is None


# -- the shared apply code, fed duplicated and shuffled records ------------------------------------------------


@pytest.mark.parametrize("mode", list(WRITE_MODES))
def test_records_delivered_twice_and_out_of_order(
    moto_regions: dict[str, MotoRegion], tables: tuple[str, str], mode: str
) -> None:
    table, health = tables
    a, b = moto_regions[A], moto_regions[B]
    writer = Writer(a, table, "shuffled", rate=0, seed=4)
    writer.run(300)
    streams = a.client("dynamodbstreams")
    arn = a.client().describe_table(TableName=table)["Table"]["LatestStreamArn"]
    shard = streams.describe_stream(StreamArn=arn)["StreamDescription"]["Shards"][0]["ShardId"]
    iterator = streams.get_shard_iterator(StreamArn=arn, ShardId=shard, ShardIteratorType="TRIM_HORIZON")[
        "ShardIterator"
    ]
    records = streams.get_records(ShardIterator=iterator, Limit=1000)["Records"]
    assert len(records) == writer.writes

    rng = random.Random(5)
    # The newest half first, then everything again in random order with a third of it twice more.
    deliveries = (
        records[len(records) // 2 :]
        + rng.sample(records, len(records))
        + rng.sample(records, len(records) // 3)
    )
    rng.shuffle(deliveries[len(records) - len(records) // 2 :])
    applier = Applier(b.client(), health, mode="single" if mode == "single" else "transact")
    totals = {"applied": 0, "superseded": 0}
    for start in range(0, len(deliveries), 37):
        changes = [parse_record(r) for r in deliveries[start : start + 37]]
        pending = list(plan(table, changes, A).ops)
        for _ in range(5):
            retry = []
            for group in group_ops(pending, 10):
                result = applier.send(group)
                totals["applied"] += len(result.applied)
                totals["superseded"] += len(result.superseded)
                retry += result.pending
            pending = retry
            if not pending:
                break
        assert not pending
    assert contents(b, table) == contents(a, table)
    assert totals["superseded"] > 0
    deleted = set(writer.version) - writer.live
    assert deleted and not deleted & set(contents(b, table))


# -- the replicator process, killed mid-stream -----------------------------------------------------------------


@pytest.mark.parametrize("mode", list(WRITE_MODES))
def test_killed_and_restarted_mid_stream_loses_nothing_and_never_regresses(
    moto_regions: dict[str, MotoRegion], tables: tuple[str, str], tmp_path: Path, mode: str
) -> None:
    table, health = tables
    a, b = moto_regions[A], moto_regions[B]
    config_file = tmp_path / "sidecar.yaml"
    config_file.write_text(yaml.safe_dump(config_data(moto_regions, table, health, mode)))
    key = a.credentials
    process = ManagedProcess(
        "replicator",
        [
            sys.executable,
            "-m",
            "sidecar.replication",
            "-c",
            config_file,
            "--source",
            A,
            "--status-every",
            "1",
        ],
        tmp_path,
        env={**isolated_aws_env(key.access_key_id, key.secret_access_key)},
    )
    checkpoint = checkpoint_path(tmp_path / "state", A, B, table)

    def applied() -> int:
        return len(contents(b, table))

    writer = Writer(a, table, "live", rate=80, seed=6).start()
    watch = RegressionWatch(b, table).start()
    kills = 0
    try:
        process.start()
        for _ in range(2):
            # Let it replicate for a while, then kill it while writes keep coming.
            seen = applied()
            wait_until(lambda seen=seen: applied() > seen + 20, 20, interval=0.1, message="replicating")
            time.sleep(random.uniform(0.3, 1.0))
            process.kill()
            kills += 1
            assert checkpoint.exists()
            # Writes go on while it is down. transact: moto finishes the killed process's transaction on
            # its own; one from the next process at the same time would meet moto's rollback race.
            time.sleep(0.5 if mode == "single" else 3.0)
            process.start()
        time.sleep(1.5)
        writer.stop()
        wait_until(
            lambda: equal(moto_regions, table),
            30,
            interval=0.3,
            message=lambda: differences(moto_regions, table),
        )
        assert process.stop() == 0  # SIGTERM: a clean stop
    finally:
        writer.stop()
        watch.stop()
        process.stop()
    assert kills == 2
    assert watch.regressions == []
    assert watch.scans > 10
    source_items = contents(a, table)
    assert source_items == contents(b, table)
    assert writer.counts["delete"] > 0 and writer.counts["update"] > 0
    print(
        f"\nkill test ({mode}): {writer.writes} writes ({writer.counts}), {len(writer.version)} keys, "
        f"{len(source_items)} live at the end, 2 kills, {watch.scans} scans of the target, 0 regressions"
    )


def test_checkpoints_are_written_whole_and_a_broken_one_is_moved_aside(tmp_path: Path) -> None:
    store = CheckpointStore(checkpoint_path(tmp_path, A, B, "orders"))
    assert store.load() == CheckpointState()
    state = CheckpointState("arn:stream", {"s1": ShardCheckpoint("123", finished=True)}, not_before_ms=5)
    store.save(state.to_json(source=A))
    assert store.load() == state
    assert [p.name for p in store.path.parent.iterdir()] == [store.path.name]  # no temporary file left
    store.path.write_text('{"format": 1, "shards": {"s1": {"sequence": "12x"}}}')
    assert store.load() == CheckpointState()  # replicate again from the oldest record: slower, not wrong
    assert [p.name.split(".corrupt-")[0] for p in store.path.parent.iterdir()] == [store.path.name]
