"""The replicator as an AWS Lambda function, for teams that prefer the article's Lambda design.

Same rule as the sidecar's replicator (`sidecar.core.replicate`): versioned conditional writes, tombstones
for deletes, the replicator's own writes skipped. Lambda reads the shards (in lineage order, one batch per
shard at a time with ParallelizationFactor 1) and keeps the checkpoint; this handler applies one batch and
reports the first record it could not apply in `batchItemFailures` (the event source mapping needs
`FunctionResponseTypes: [ReportBatchItemFailures]`), so Lambda retries from there: re-delivery is harmless.
A record it cannot parse or plan is reported the same way (never raised); a write the target refuses for
good (ValidationException and kin) is logged as a `dead letter:` line and skipped, so the shard moves on.

Environment:
- `TARGET_REGIONS`: comma-separated regions to write into (required), e.g. `eu-west-1`;
- `TARGET_ENDPOINTS`: optional `region=url,...` (tests, VPC endpoints);
- `SOURCE_REGION`: the stream's region (default: each record's `awsRegion`), `SOURCE_ENDPOINT` optional;
- `TOMBSTONE_TABLE`: the table (partition key `pk`, S) holding tombstones in every region, default
  `ddb-sidecar-health` (the sidecar's health table);
- `WRITE_MODE`: `single` (default: conditional PutItem/DeleteItem per item) or `transact`
  (TransactWriteItems of `BATCH_SIZE` items, 1-50, default 50); `MAX_IN_FLIGHT` concurrent requests
  (default 8); `TOMBSTONE_TTL_SECONDS` (default 172800); `MAX_ROUNDS` (write rounds with backoff inside
  one invocation before reporting a failure, default 5);
- `NOT_BEFORE`: epoch seconds; records created earlier are skipped (counted as stale). After an unplanned
  failover away from this function's region, set it to the moment traffic comes back here (or disable
  the event source mapping until then): the region's unreplicated tail must not overwrite the newer
  writes the other region made meanwhile.

Deployment: `examples/lambda/` (SAM template and the aws CLI commands).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from sidecar.core.replicate import (
    MAX_GROUP_ITEMS,
    TOMBSTONE_TTL_SECONDS,
    Change,
    RecordError,
    WriteMode,
    WriteOp,
    group_ops,
    needs_tombstone_lookup,
    parse_record,
    plan,
    tombstone_id,
)
from sidecar.replication.apply import Applier, describe_error, lookup_tombstones

logger = logging.getLogger(__name__)
logger.setLevel(logging.INFO)

DEFAULT_TOMBSTONE_TABLE = "ddb-sidecar-health"
# Leave this much of the invocation's time for reporting instead of starting another round.
RESERVE_MS = 3000

# (service, region, endpoint or None) -> client
ClientMaker = Callable[[str, str, str | None], Any]


@dataclass(frozen=True)
class Settings:
    targets: tuple[str, ...]
    target_endpoints: Mapping[str, str]
    source_region: str | None
    source_endpoint: str | None
    tombstone_table: str
    tombstone_ttl: float
    write_mode: WriteMode
    batch_size: int
    max_in_flight: int
    max_rounds: int
    not_before_ms: int | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        targets = tuple(
            t.strip() for t in env.get("TARGET_REGIONS", env.get("TARGET_REGION", "")).split(",") if t.strip()
        )
        if not targets:
            raise ValueError("set TARGET_REGIONS to the region(s) to replicate into, e.g. eu-west-1")
        endpoints = {}
        for pair in env.get("TARGET_ENDPOINTS", "").split(","):
            if pair.strip():
                region, sep, url = pair.strip().partition("=")
                if not sep or not url:
                    raise ValueError(f"TARGET_ENDPOINTS: expected region=url, got {pair.strip()!r}")
                endpoints[region] = url
        batch = int(env.get("BATCH_SIZE", MAX_GROUP_ITEMS))
        if not 1 <= batch <= MAX_GROUP_ITEMS:
            raise ValueError(f"BATCH_SIZE must be 1-{MAX_GROUP_ITEMS}")
        mode = env.get("WRITE_MODE", "single")
        if mode not in ("single", "transact"):
            raise ValueError("WRITE_MODE must be single or transact")
        in_flight = int(env.get("MAX_IN_FLIGHT", "8"))
        if not 1 <= in_flight <= 64:
            raise ValueError("MAX_IN_FLIGHT must be 1-64")
        return cls(
            targets=targets,
            target_endpoints=endpoints,
            source_region=env.get("SOURCE_REGION") or None,
            source_endpoint=env.get("SOURCE_ENDPOINT") or None,
            tombstone_table=env.get("TOMBSTONE_TABLE") or DEFAULT_TOMBSTONE_TABLE,
            tombstone_ttl=float(env.get("TOMBSTONE_TTL_SECONDS", TOMBSTONE_TTL_SECONDS)),
            write_mode="transact" if mode == "transact" else "single",
            batch_size=batch,
            max_in_flight=in_flight,
            max_rounds=max(1, int(env.get("MAX_ROUNDS", "5"))),
            not_before_ms=round(float(env["NOT_BEFORE"]) * 1000) if env.get("NOT_BEFORE") else None,
        )


def default_client_maker() -> ClientMaker:
    import boto3
    from botocore.config import Config

    session = boto3.session.Session()
    config = Config(retries={"mode": "standard", "total_max_attempts": 3}, connect_timeout=2, read_timeout=10)

    def make(service: str, region: str, endpoint: str | None) -> Any:
        return session.client(service, region_name=region, endpoint_url=endpoint, config=config)

    return make


def table_from_arn(arn: str) -> str:
    """`arn:aws:dynamodb:REGION:ACCOUNT:table/NAME/stream/LABEL` -> NAME."""
    resource = arn.split(":", 5)[-1]
    parts = resource.split("/")
    if len(parts) < 2 or parts[0] != "table":
        raise RecordError(f"eventSourceARN {arn!r} is not a DynamoDB stream ARN")
    return parts[1]


class LambdaReplicator:
    """Built once per Lambda container (clients are reused across invocations)."""

    def __init__(
        self,
        settings: Settings,
        make_client: ClientMaker | None = None,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self._make = make_client or default_client_maker()
        self._clients: dict[tuple[str, str], Any] = {}
        self._clock = clock
        self._sleep = sleep

    def _client(self, service: str, region: str, endpoint: str | None) -> Any:
        key = (service, region)
        if key not in self._clients:
            self._clients[key] = self._make(service, region, endpoint)
        return self._clients[key]

    def handle(self, event: Mapping[str, Any], context: Any = None) -> dict[str, Any]:
        records: Sequence[Mapping[str, Any]] = event.get("Records") or []
        failed: set[int] = set()  # indexes into records
        summary = {
            "records": len(records),
            "applied": 0,
            "superseded": 0,
            "echoes": 0,
            "stale": 0,
            "failed": 0,
            "dead_letters": 0,
        }
        by_source: dict[tuple[str, str], list[tuple[int, Change]]] = {}
        for index, raw in enumerate(records):
            try:
                table = table_from_arn(str(raw.get("eventSourceARN", "")))
                region = self.settings.source_region or str(raw.get("awsRegion") or "")
                if not region:
                    raise RecordError("the record has no awsRegion and SOURCE_REGION is not set")
                change = parse_record(raw, binary_base64=True)
            except (RecordError, KeyError, TypeError) as exc:
                logger.error("record %d (%s) cannot be replicated: %s", index, _sequence(raw), exc)
                failed.add(index)
                continue
            by_source.setdefault((region, table), []).append((index, change))
        for (region, table), entries in by_source.items():
            failed |= self._replicate(region, table, entries, summary, context)
        summary["failed"] = len(failed)
        logger.info("replication batch: %s", json.dumps(summary))
        if not failed:
            return {"batchItemFailures": []}
        # Lambda goes back to the lowest sequence number reported; everything after it is re-delivered.
        first = min(failed)
        return {"batchItemFailures": [{"itemIdentifier": _sequence(records[first])}]}

    def _replicate(
        self,
        region: str,
        table: str,
        entries: list[tuple[int, Change]],
        summary: dict[str, int],
        context: Any,
    ) -> set[int]:
        s = self.settings
        indexes = [index for index, _ in entries]
        changes = [change for _, change in entries]
        lookups = [tombstone_id(table, c.key_id) for c in changes if needs_tombstone_lookup(c)]
        tombstones: dict[str, str] = {}
        if lookups:
            try:
                source = self._client("dynamodb", region, s.source_endpoint)
                tombstones = lookup_tombstones(source, s.tombstone_table, lookups, sleep=self._sleep)
            except (ClientError, BotoCoreError, RuntimeError) as exc:
                logger.error("reading tombstones in %s failed: %s", region, describe_error(exc))
                return set(indexes)
        try:
            delivery = plan(table, changes, region, tombstones, s.not_before_ms)
        except Exception as exc:  # reported, never raised: a raise would retry the whole batch blindly
            logger.error("records of %s in %s cannot be planned: %r", table, region, exc)
            return set(indexes)
        summary["echoes"] += delivery.echoes
        summary["stale"] += delivery.stale
        failed_ops: list[WriteOp] = []
        for target in s.targets:
            if target == region:
                continue
            client = self._client("dynamodb", target, s.target_endpoints.get(target))
            applier = Applier(
                client, s.tombstone_table, mode=s.write_mode, tombstone_ttl=s.tombstone_ttl, clock=self._clock
            )
            failed_ops += self._apply(applier, target, delivery.ops, summary, context)
        return {indexes[op.first_position] for op in failed_ops}

    def _apply(
        self, applier: Applier, target: str, ops: Sequence[WriteOp], summary: dict[str, int], context: Any
    ) -> list[WriteOp]:
        pending = list(ops)
        for round_ in range(self.settings.max_rounds):
            if not pending:
                break
            if round_:
                remaining_ms = context.get_remaining_time_in_millis() if context is not None else None
                delay = min(0.1 * 2**round_, 5.0)
                if remaining_ms is not None and remaining_ms - delay * 1000 < RESERVE_MS:
                    break
                self._sleep(delay)
            retry: list[WriteOp] = []
            if self.settings.write_mode == "transact":
                size = self.settings.batch_size
            else:
                size = max(1, min(MAX_GROUP_ITEMS, -(-len(pending) // self.settings.max_in_flight)))
            groups = group_ops(pending, size)
            with ThreadPoolExecutor(max_workers=min(len(groups), self.settings.max_in_flight)) as pool:
                results = list(pool.map(applier.send, groups))
            for result in results:
                summary["applied"] += sum(op.records for op in result.applied)
                summary["superseded"] += sum(op.records for op in result.superseded)
                retry += result.pending
                for op, error in result.failed:
                    # refused for good by the target: logged as a dead letter and skipped, so the shard
                    # moves on (`ddb-sidecar reconcile` finds the item that differs)
                    summary["dead_letters"] += op.records
                    logger.error(
                        "dead letter: %s",
                        json.dumps({"table": op.table, "target": target, "key": op.key, "error": error}),
                    )
                if result.error:
                    logger.warning("writing into %s: %s", target, result.error)
            pending = retry
        return pending


def _sequence(raw: Mapping[str, Any]) -> str:
    body = raw.get("dynamodb")
    return str(body.get("SequenceNumber", "")) if isinstance(body, Mapping) else ""


_replicator: LambdaReplicator | None = None


def handler(event: Mapping[str, Any], context: Any) -> dict[str, Any]:
    """The Lambda entry point (`sidecar.replication.lambda_handler.handler`)."""
    global _replicator
    if _replicator is None:  # once per container: clients are reused by later invocations
        _replicator = LambdaReplicator(Settings.from_env(os.environ))
    return _replicator.handle(event, context)
