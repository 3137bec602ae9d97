"""Table ARNs in requests: whose account and which region they name, and the body re-targeted to a region.

A table named by ARN carries an account and a region, and DynamoDB honours both: an ARN of another account
reaches that account's table (resource policies allow cross-account access), one of another region that
region's table. The gate reads only the table name out of an ARN, so on its own it would sign, with the
sidecar's credentials, a request for another account's `orders`. Here: an ARN must name this sidecar's
account and one of its configured regions, in the partition of that region; and since the app must keep
working after a move whether it names its tables by name or by ARN, the body sent to a region names that
region in every ARN (the app wrote `...:us-east-1:...`, eu-west-1 gets `...:eu-west-1:...`).

Pure. Requests without ARNs never get here (the classifier records ARN uses only on its ARN branch).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson

_SERVICE: Final = "dynamodb"


@dataclass(frozen=True, slots=True)
class TableArn:
    partition: str
    region: str
    account: str
    resource: str  # "table/NAME[/...]"

    def in_region(self, region: str) -> str:
        return f"arn:{self.partition}:{_SERVICE}:{region}:{self.account}:{self.resource}"


def parse(value: str) -> TableArn | None:
    """The parts of ``arn:PARTITION:dynamodb:REGION:ACCOUNT:table/...``; None for anything else."""
    parts = value.split(":", 5)
    if len(parts) != 6 or parts[0] != "arn" or parts[2] != _SERVICE or not parts[5].startswith("table/"):
        return None
    return TableArn(parts[1], parts[3], parts[4], parts[5])


def partition_of(region: str) -> str:
    """The AWS partition a region belongs to (the ARN's second field)."""
    if region.startswith("cn-"):
        return "aws-cn"
    if region.startswith("us-gov-"):
        return "aws-us-gov"
    if region.startswith("us-iso-"):
        return "aws-iso"
    if region.startswith("us-isob-"):
        return "aws-iso-b"
    return "aws"


# A path to a string in the parsed body: keys and list indexes. The last element of a `key` use is the
# dict key itself (BatchGetItem/BatchWriteItem's RequestItems are keyed by table name or ARN).
Path = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class ArnUse:
    """Where a request names a table by ARN: the string at `path`, the whole of it or, in a PartiQL
    statement, the ARN that begins at character `at` of it; `key`: the path ends at a dict key."""

    path: Path
    arn: str
    at: int | None = None
    key: bool = False


def refusal(uses: Iterable[ArnUse], regions: frozenset[str], account: str | None) -> str | None:
    """Why the ARNs may not go out (a message saying what to do), or None. With `account` None (not known
    yet) only the regions are checked: the caller must not send the request before the account is known."""
    for use in uses:
        arn = parse(use.arn)
        if arn is None:  # the classifier only records ARNs it could map; be safe anyway
            return f"{use.arn[:120]!r} is not a DynamoDB table ARN"
        shown = use.arn[:160]
        if arn.region not in regions:
            return (
                f"the table ARN {shown} names region {arn.region[:32]!r}, which this proxy does not serve "
                f"(it serves {', '.join(sorted(regions))}); name the table by its name, or by its ARN in "
                "a configured region"
            )
        if arn.partition != partition_of(arn.region):
            return f"the table ARN {shown} names partition {arn.partition[:32]!r}, not that of {arn.region}"
        if account is not None and arn.account != account:
            return (
                f"the table ARN {shown} names account {arn.account[:32]}; this proxy signs only for its own "
                f"account's tables ({account}). Call DynamoDB directly for another account's tables"
            )
    # Map keys that differ only by region would become one key once re-targeted, and one of them would be
    # lost: refuse them.
    keys: dict[tuple[Path, str], str] = {}
    for use in uses:
        if use.key:
            parsed = parse(use.arn)
            assert parsed is not None  # checked above
            same = keys.setdefault((use.path[:-1], parsed.in_region("*")), use.arn)
            if same != use.arn:
                return (
                    f"RequestItems names the table {parsed.resource[6:][:160]} twice, by ARNs of different "
                    "regions; name each table once"
                )
    return None


@dataclass(frozen=True, slots=True)
class Retargeted:
    """The request for one region, and the ARNs it renamed (as sent, as the app wrote them)."""

    body: bytes
    renamed: tuple[tuple[str, str], ...]


def retargeted(
    body: Mapping[str, Any], uses: Sequence[ArnUse], regions: Iterable[str]
) -> dict[str, Retargeted]:
    """For each region some ARN does not already name, the body with every ARN naming that region.

    `body` is the parsed request (modified in place while rewriting: pass a copy you may spoil). Every use
    must have passed `refusal`.
    """
    arns = [parse(use.arn) for use in uses]
    current = [use.arn for use in uses]
    out: dict[str, Retargeted] = {}
    for region in regions:
        if all(arn is not None and arn.region == region for arn in arns):
            continue
        renamed: dict[str, str] = {}
        for i, (use, arn) in enumerate(zip(uses, arns, strict=True)):
            assert arn is not None
            new = arn.in_region(region)
            _replace(body, use, current[i], new)
            current[i] = new
            if new != use.arn:
                renamed[new] = use.arn
        out[region] = Retargeted(orjson.dumps(body), tuple(renamed.items()))
    return out


# Where an answer names the tables of its request: maps keyed by table (BatchGetItem's Responses, the
# Unprocessed* of both batches, ItemCollectionMetrics), and ConsumedCapacity's TableName.
_KEYED_BY_TABLE: Final = ("Responses", "UnprocessedKeys", "UnprocessedItems", "ItemCollectionMetrics")


def restored(answer: bytes, renamed: Sequence[tuple[str, str]]) -> bytes:
    """The answer to a re-targeted request, with the tables named as the app named them: an app that
    reads `Responses[its ARN]` must find it after a move. Item data is never touched."""
    try:
        doc = orjson.loads(answer)
    except orjson.JSONDecodeError:
        return answer
    if not isinstance(doc, dict):
        return answer
    back = dict(renamed)
    changed = False
    for key in _KEYED_BY_TABLE:
        tables = doc.get(key)
        if isinstance(tables, dict) and any(name in back for name in tables):
            doc[key] = {back.get(name, name): value for name, value in tables.items()}
            changed = True
    consumed = doc.get("ConsumedCapacity")
    for entry in consumed if isinstance(consumed, list) else [consumed]:
        if isinstance(entry, dict) and entry.get("TableName") in back:
            entry["TableName"] = back[entry["TableName"]]
            changed = True
    return orjson.dumps(doc) if changed else answer


def _replace(body: Mapping[str, Any], use: ArnUse, old: str, new: str) -> None:
    *parents, last = use.path
    holder: Any = body
    for step in parents:
        holder = holder[step]
    if use.key:
        # keep the keys' order: rebuild the mapping with the one key renamed
        items = list(holder.items())
        holder.clear()
        holder.update((new if k == old else k, v) for k, v in items)
    elif use.at is not None:
        # a statement names one table: an earlier rewrite cannot have moved this ARN's start
        text: str = holder[last]
        assert text[use.at : use.at + len(old)] == old, "ARN moved in its statement"
        holder[last] = text[: use.at] + new + text[use.at + len(old) :]
    else:
        holder[last] = new
