"""`moto_server`, with DynamoDB's transactions made atomic against the other requests.

moto's TransactWriteItems snapshots every table it touches (a deep copy), applies the actions one by one,
and on a cancellation puts the snapshot back. moto_server answers requests on several threads, so a write
that lands on the same table between the snapshot and the rollback is wiped by the rollback: an item goes
back to an older version although its newer write was acknowledged. DynamoDB never does that, and our
replicator (conditional TransactWriteItems, several in flight) hit it in CI: the target regressed after
a restart, when re-delivered records make transactions cancel. And readers see a transaction's first
actions before a later one cancels it (a Scan saw an item at v=11, then at v=9 after the rollback):
DynamoDB never shows a write of a transaction that does not commit. One lock held by every DynamoDB item
call, reads included, for its whole duration (re-entrant: a transaction calls put_item itself) gives the
isolation DynamoDB promises; moto is bound by the GIL anyway, so little throughput is lost.

Run as `python -m sidecar.motoserver [moto_server's arguments]`. moto is a development dependency; nothing
in the daemon imports this.
"""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Callable
from typing import Any

# Every DynamoDBBackend method that reads or changes items (BatchWriteItem goes through put_item and
# delete_item, BatchGetItem and TransactGetItems through get_item).
ITEM_CALLS = (
    "get_item",
    "query",
    "scan",
    "put_item",
    "update_item",
    "delete_item",
    "transact_write_items",
    "execute_statement",
    "execute_transaction",
    "batch_execute_statement",
)


def serialize_item_calls() -> None:
    from moto.dynamodb.models import DynamoDBBackend

    lock = threading.RLock()

    def locked(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def call(*args: Any, **kwargs: Any) -> Any:
            with lock:
                return method(*args, **kwargs)

        return call

    for name in ITEM_CALLS:
        setattr(DynamoDBBackend, name, locked(getattr(DynamoDBBackend, name)))


def main() -> int:
    from moto.server import main as moto_main

    serialize_item_calls()
    sys.argv[0] = "moto_server"
    moto_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
