"""Which AWS account the sidecar's tables live in, read from the health table's ARN.

The gate refuses a table ARN of another account (`sidecar.core.arns`), so it must know ours. DynamoDB
answers DescribeTable with the table's ARN, account included; asking for the health table costs one call
per start to an endpoint we already talk to (STS would be one more endpoint, and one more permission).
`account_id` in the config, when set, is used as is and this is skipped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

import orjson

from sidecar.core.arns import parse as parse_arn
from sidecar.proxy.region import RegionRuntime
from sidecar.proxy.upstream import UpstreamError, UpstreamResponse

logger = logging.getLogger(__name__)

DESCRIBE_TARGET = "DynamoDB_20120810.DescribeTable"
RETRY_AFTER = (1.0, 2.0, 5.0, 10.0, 30.0)  # then every 30 s


async def describe_account(runtime: RegionRuntime, table: str) -> str:
    """The account in `table`'s ARN, asked of one region; RuntimeError saying why when it cannot."""
    loop = asyncio.get_running_loop()
    body = orjson.dumps({"TableName": table})
    head = runtime.signer.request_head(runtime.credentials(), DESCRIBE_TARGET, body, time.time())
    answer: asyncio.Future[UpstreamResponse] = loop.create_future()

    def reply(response: UpstreamResponse | None, error: UpstreamError | None) -> None:
        if answer.done():
            return
        if response is None:
            answer.set_exception(RuntimeError(f"{error.kind}: {error.detail}" if error else "no answer"))
        else:
            answer.set_result(response)

    runtime.pool.send(head + body, reply, idempotent=True)
    response = await answer
    try:
        doc = orjson.loads(response.body)
    except orjson.JSONDecodeError:
        doc = {}
    if response.status != 200:
        code = str(doc.get("__type", "")).rpartition("#")[2] if isinstance(doc, dict) else ""
        raise RuntimeError(f"DescribeTable {table}: HTTP {response.status} {code}".rstrip())
    arn = doc.get("Table", {}).get("TableArn") if isinstance(doc, dict) else None
    parsed = parse_arn(arn) if isinstance(arn, str) else None
    if parsed is None or not parsed.account:
        raise RuntimeError(f"DescribeTable {table}: the answer carries no table ARN")
    return parsed.account


async def learn_account(
    regions: Mapping[str, RegionRuntime], table: str, learned: Callable[[str], None]
) -> None:
    """Ask each region in turn until one answers, then call `learned(account)` once."""
    attempt = 0
    warned = False
    while True:
        problems = []
        for name, runtime in regions.items():
            try:
                account = await describe_account(runtime, table)
            except Exception as exc:  # an answer we cannot use: try the next region, then later
                problems.append(f"{name}: {exc}")
                continue
            learned(account)
            return
        if not warned:
            warned = True
            logger.warning(
                "cannot learn the AWS account from the health table's ARN (%s): requests naming a table by "
                "ARN are refused until it is known; set `account_id` in the config, or allow "
                "dynamodb:DescribeTable on the health table",
                "; ".join(problems),
            )
        await asyncio.sleep(RETRY_AFTER[min(attempt, len(RETRY_AFTER) - 1)])
        attempt += 1
