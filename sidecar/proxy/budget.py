"""One budget of request bytes held in memory at once, shared by every listener.

Bodies are held from their first byte until their answer: while they arrive, queued behind a pipelined
request, waiting for an upstream connection, held by a switchover's fence. Without a bound, four
connections pipelining sixteen 16 MB requests each held over a gigabyte. Beyond the budget a request is
read and dropped, and answered 503 "not sent, safe to retry".
"""

from __future__ import annotations


class ByteBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.refused = 0  # requests refused for want of budget

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used = max(0, self.used - n)
