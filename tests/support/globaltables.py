"""Global Tables for tests: one-way replication between two moto regions, with a chosen delay, in its own
process.

    python -m tests.support.globaltables --source URL --target URL --tables T1,T2 --delay 0.3

moto has no cross-region replication; this stands in for AWS's, the way the fault proxy stands in for a
network: it reads each table's DynamoDB Stream in the source (moto serves Streams in server mode) and
applies every record to the target `delay` seconds after it saw it, as Global Tables would (unconditional
last-writer-wins puts and deletes, in stream order). The tables need a stream (NEW_IMAGE or more).
Credentials from the environment (the moto IAM user's).
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import sys
import time
from typing import Any

import boto3
from botocore.config import Config as BotoConfig

from .processes import ManagedProcess

POLL = 0.02


def _client(service: str, url: str, region: str) -> Any:
    return boto3.session.Session().client(
        service, endpoint_url=url, region_name=region, config=BotoConfig(retries={"max_attempts": 3})
    )


def run(
    source: str, source_region: str, target: str, target_region: str, tables: list[str], delay: float
) -> None:
    ddb_src = _client("dynamodb", source, source_region)
    streams = _client("dynamodbstreams", source, source_region)
    ddb_dst = _client("dynamodb", target, target_region)
    iterators: dict[tuple[str, str], str] = {}
    for table in tables:
        arn = ddb_src.describe_table(TableName=table)["Table"]["LatestStreamArn"]
        for shard in streams.describe_stream(StreamArn=arn)["StreamDescription"]["Shards"]:
            iterators[(table, shard["ShardId"])] = streams.get_shard_iterator(
                StreamArn=arn, ShardId=shard["ShardId"], ShardIteratorType="LATEST"
            )["ShardIterator"]
    print("ready", flush=True)
    pending: list[tuple[float, int, str, dict[str, Any]]] = []
    order = itertools.count()
    while True:
        for key, iterator in list(iterators.items()):
            answer = streams.get_records(ShardIterator=iterator, Limit=1000)
            iterators[key] = answer["NextShardIterator"]
            due = time.monotonic() + delay
            for record in answer["Records"]:
                heapq.heappush(pending, (due, next(order), key[0], record))
        now = time.monotonic()
        due: list[tuple[str, dict[str, Any]]] = []
        while pending and pending[0][0] <= now:
            _, _, table, record = heapq.heappop(pending)
            due.append((table, record))
        _apply(ddb_dst, due)
        time.sleep(POLL)


def _apply(client: Any, records: list[tuple[str, dict[str, Any]]]) -> None:
    """In stream order, batched 25 at a time; a key seen twice ends the batch first (per-item order)."""
    batch: list[tuple[str, dict[str, Any]]] = []
    keys: set[str] = set()
    for table, record in records:
        key = table + repr(sorted(record["dynamodb"]["Keys"].items()))
        if key in keys or len(batch) == 25:
            _write(client, batch)
            batch, keys = [], set()
        batch.append((table, record))
        keys.add(key)
    if batch:
        _write(client, batch)


def _write(client: Any, batch: list[tuple[str, dict[str, Any]]]) -> None:
    items: dict[str, list[dict[str, Any]]] = {}
    for table, record in batch:
        data = record["dynamodb"]
        if record["eventName"] == "REMOVE":
            items.setdefault(table, []).append({"DeleteRequest": {"Key": data["Keys"]}})
        else:
            items.setdefault(table, []).append({"PutRequest": {"Item": data["NewImage"]}})
    while items:
        items = client.batch_write_item(RequestItems=items).get("UnprocessedItems") or {}


class GlobalTables:
    """The replication process, from a test: `with GlobalTables(src, dst, tables, log_dir, env, delay=0.3):`"""

    def __init__(
        self,
        source: Any,
        target: Any,
        tables: list[str],
        log_dir: Any,
        env: dict[str, str],
        delay: float = 0.0,
    ) -> None:
        argv = [
            sys.executable, "-m", "tests.support.globaltables",
            "--source", source.endpoint, "--source-region", source.name,
            "--target", target.endpoint, "--target-region", target.name,
            "--tables", ",".join(tables), "--delay", str(delay),
        ]  # fmt: skip
        self.process = ManagedProcess(f"globaltables-{source.name}-{target.name}", argv, log_dir, env=env)

    def start(self, timeout: float = 20.0) -> GlobalTables:
        from .wait import wait_until

        self.process.start()
        wait_until(
            lambda: self.process.check_running() or "ready" in self.process.log_path.read_text(),
            timeout,
            message="replication process ready",
        )
        return self

    def stop(self) -> None:
        self.process.stop()

    def __enter__(self) -> GlobalTables:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True)
    parser.add_argument("--source-region", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--target-region", required=True)
    parser.add_argument("--tables", required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    run(args.source, args.source_region, args.target, args.target_region, args.tables.split(","), args.delay)


if __name__ == "__main__":
    main()
