"""An asyncio client for etcd's v3 API, over etcd's own JSON gateway (`/v3/kv/range`, `/v3/kv/txn`,
`/v3/lease/*`, the streaming `/v3/watch`), with aiohttp.

Why not a library: the asyncio etcd clients on PyPI speak gRPC to one endpoint per client (`aetcd`,
`etcd3aio`, `etcd3-async-client`) and leave failover between the members of a cluster, and bounding every
call, to the caller; that is most of what a fleet member needs from its client. The JSON gateway is served
by every etcd 3.4 and 3.5 member on its client port, needs no gRPC toolchain, and is what Patroni, the
best-known HA sidecar on etcd, uses with its own client. So this module is small and does exactly that:
every call tries the endpoints in turn (the last one that answered first), each attempt bounded by
`timeout`; a watch resumes on another member after the last revision it delivered.
Keys are str (UTF-8), values bytes; nothing here logs a value.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

logger = logging.getLogger(__name__)


class EtcdError(Exception):
    """etcd answered with an error."""


class EtcdUnavailable(EtcdError):
    """No endpoint answered within the timeout."""


class LeaseExpired(EtcdError):
    """A keep-alive for a lease etcd no longer has."""


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


_OPS = {"==": "EQUAL", "!=": "NOT_EQUAL", "<": "LESS", ">": "GREATER"}
_TARGETS = {"create": ("CREATE", "create_revision"), "mod": ("MOD", "mod_revision"),
            "version": ("VERSION", "version"), "value": ("VALUE", "value")}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Compare:
    key: str
    target: str  # create | mod | version | value
    op: str  # == != < >
    value: int | bytes

    @classmethod
    def create_revision(cls, key: str, op: str, value: int) -> Compare:
        return cls(key, "create", op, value)

    @classmethod
    def mod_revision(cls, key: str, op: str, value: int) -> Compare:
        return cls(key, "mod", op, value)

    @classmethod
    def value_is(cls, key: str, value: bytes) -> Compare:
        return cls(key, "value", "==", value)

    def to_json(self) -> dict[str, Any]:
        target, field = _TARGETS[self.target]
        value = _b64(self.value) if isinstance(self.value, bytes) else str(self.value)
        return {"key": _b64(self.key.encode()), "result": _OPS[self.op], "target": target, field: value}


@dataclass(frozen=True, slots=True)
class Op:
    kind: str  # put | delete | get
    key: str
    value: bytes = b""
    lease: int = 0
    prefix: bool = False

    @classmethod
    def put(cls, key: str, value: bytes, lease: int = 0) -> Op:
        return cls("put", key, value, lease)

    @classmethod
    def delete(cls, key: str, prefix: bool = False) -> Op:
        return cls("delete", key, prefix=prefix)

    @classmethod
    def get(cls, key: str, prefix: bool = False) -> Op:
        return cls("get", key, prefix=prefix)

    def to_json(self) -> dict[str, Any]:
        if self.kind == "put":
            body: dict[str, Any] = {"key": _b64(self.key.encode()), "value": _b64(self.value)}
            if self.lease:
                body["lease"] = str(self.lease)
            return {"request_put": body}
        ranged = _range(self.key, self.prefix)
        return {"request_delete_range" if self.kind == "delete" else "request_range": ranged}


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int
    responses: list[list[KeyValue]]


@dataclass(frozen=True, slots=True)
class WatchEvent:
    kind: str  # put | delete
    kv: KeyValue


class EtcdClient:
    def __init__(
        self, endpoints: Sequence[str], *, timeout: float = 2.0, deadline: float | None = None
    ) -> None:
        """`timeout` bounds each attempt at one endpoint; `deadline` (default: one round over the endpoints)
        bounds a call: attempts go round the endpoints until then, so an etcd leader election (a second or
        so after a member dies) is ridden out instead of reported."""
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        self._endpoints = [e.rstrip("/") for e in endpoints]
        self._timeout = timeout
        self._deadline = deadline if deadline is not None else timeout * len(self._endpoints)
        self._current = 0
        self._answered: str | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def endpoint(self) -> str | None:
        """The endpoint that answered last."""
        return self._answered

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # The etcd members are named by their URLs: never through an HTTP proxy from the environment.
            self._session = aiohttp.ClientSession(trust_env=False)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _order(self) -> list[int]:
        n = len(self._endpoints)
        return [(self._current + i) % n for i in range(n)]

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self._deadline
        while True:
            try:
                return await self._round(path, body, min(self._timeout, max(give_up - loop.time(), 0.05)))
            except EtcdUnavailable:
                if loop.time() + 0.1 >= give_up:
                    raise
            await asyncio.sleep(0.1)

    async def _round(self, path: str, body: dict[str, Any], attempt: float) -> dict[str, Any]:
        """One attempt at each endpoint, the last one that answered first."""
        failures = []
        for i in self._order():
            endpoint = self._endpoints[i]
            try:
                async with self._http().post(
                    endpoint + path,
                    data=orjson.dumps(body),
                    headers={"Content-Type": "application/json"},
                    timeout=aiohttp.ClientTimeout(total=attempt),
                ) as resp:
                    raw = await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                failures.append(f"{endpoint}: {type(exc).__name__}")
                logger.debug("etcd %s%s failed: %r", endpoint, path, exc)
                continue
            data = _loads(raw)
            if status >= 500 and _retryable(data):
                # e.g. "etcdserver: no leader" / "request timed out" during an election: another member may
                # already know the new leader
                failures.append(f"{endpoint}: HTTP {status} {_message(data)}")
                continue
            self._current, self._answered = i, endpoint
            if status >= 400 or "error" in data or ("code" in data and "message" in data):
                raise EtcdError(f"etcd {path}: HTTP {status}: {_message(data)}")
            return data
        raise EtcdUnavailable(
            f"no etcd endpoint answered {path} within {self._timeout:g} s: {'; '.join(failures)}"
        )

    # -- keys
    async def get(self, key: str) -> KeyValue | None:
        data = await self._call("/v3/kv/range", _range(key, False))
        kvs = [_kv(x) for x in data.get("kvs", [])]
        return kvs[0] if kvs else None

    async def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        data = await self._call("/v3/kv/range", _range(prefix, True))
        return [_kv(x) for x in data.get("kvs", [])], _revision(data)

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        body: dict[str, Any] = {"key": _b64(key.encode()), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        return _revision(await self._call("/v3/kv/put", body))

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        data = await self._call("/v3/kv/deleterange", _range(key, prefix))
        return int(data.get("deleted", 0))

    async def txn(
        self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        data = await self._call(
            "/v3/kv/txn",
            {
                "compare": [c.to_json() for c in compare],
                "success": [o.to_json() for o in success],
                "failure": [o.to_json() for o in failure],
            },
        )
        responses = []
        for r in data.get("responses", []):
            got = r.get("response_range") if isinstance(r, dict) else None
            responses.append([_kv(x) for x in got.get("kvs", [])] if isinstance(got, dict) else [])
        ops = success if data.get("succeeded") else failure
        while len(responses) < len(ops):  # the gateway omits empty responses
            responses.append([])
        return TxnResult(bool(data.get("succeeded")), _revision(data), responses)

    # -- leases
    async def lease_grant(self, ttl: float) -> int:
        data = await self._call("/v3/lease/grant", {"TTL": str(max(1, math.ceil(ttl)))})
        if not data.get("ID"):
            raise EtcdError(f"etcd granted no lease: {_message(data)}")
        return int(data["ID"])

    async def lease_keepalive(self, lease: int) -> float:
        data = await self._call("/v3/lease/keepalive", {"ID": str(lease)})
        result = data.get("result", data)
        ttl = int(result.get("TTL", 0)) if isinstance(result, dict) else 0
        if ttl <= 0:
            raise LeaseExpired(f"etcd no longer has lease {lease:x}")
        return float(ttl)

    async def lease_revoke(self, lease: int) -> None:
        try:
            await self._call("/v3/lease/revoke", {"ID": str(lease)})
        except EtcdError as exc:
            if "not found" not in str(exc):
                raise

    async def health(self) -> dict[str, bool]:
        out = {}
        for endpoint in self._endpoints:
            try:
                async with self._http().get(
                    endpoint + "/health", timeout=aiohttp.ClientTimeout(total=self._timeout)
                ) as resp:
                    out[endpoint] = _loads(await resp.read()).get("health") == "true"
            except (aiohttp.ClientError, TimeoutError, OSError):
                out[endpoint] = False
        return out

    # -- watch
    async def watch_prefix(
        self, prefix: str, start_revision: int | None = None
    ) -> AsyncIterator[list[WatchEvent]]:
        """Batches of events under `prefix` from `start_revision` on, in order; on a broken stream the watch
        resumes on another member after the last revision delivered. A member that goes silent (stopped,
        partitioned) is noticed by a health check of that member every 2x timeout."""
        next_rev = start_revision
        loop = asyncio.get_running_loop()
        failing_since: float | None = None
        while True:
            failures = []
            for i in self._order():
                endpoint = self._endpoints[i]
                body: dict[str, Any] = {"create_request": {**_range(prefix, True)}}
                if next_rev:
                    body["create_request"]["start_revision"] = str(next_rev)
                try:
                    async for batch in self._stream(endpoint, body):
                        self._current, self._answered = i, endpoint
                        failing_since = None
                        if batch:
                            next_rev = batch[-1].kv.mod_revision + 1
                            yield batch
                except _StreamEnded as exc:
                    failures.append(f"{endpoint}: {exc}")
                    logger.info("etcd watch on %s ended (%s); resuming elsewhere", endpoint, exc)
                    continue
            failing_since = failing_since or loop.time()
            if loop.time() - failing_since >= self._deadline:
                raise EtcdUnavailable(f"no etcd endpoint would keep a watch: {'; '.join(failures)}")
            await asyncio.sleep(0.1)

    async def _stream(self, endpoint: str, body: dict[str, Any]) -> AsyncIterator[list[WatchEvent]]:
        try:
            resp = await self._http().post(
                endpoint + "/v3/watch",
                data=orjson.dumps(body),
                headers={"Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=None, connect=self._timeout, sock_connect=self._timeout),
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _StreamEnded(type(exc).__name__) from exc
        alive = asyncio.get_running_loop().create_task(self._liveness(endpoint, resp))
        try:
            if resp.status != 200:
                raise _StreamEnded(f"HTTP {resp.status}")
            created = False
            while True:
                try:
                    line = await resp.content.readline()
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    raise _StreamEnded(type(exc).__name__) from exc
                if not line:
                    raise _StreamEnded("stream closed")
                data = _loads(line)
                result = data.get("result", {})
                if "error" in data:
                    raise _StreamEnded(_message(data))
                if result.get("compact_revision") and result.get("canceled"):
                    raise EtcdError(
                        f"etcd watch start revision was compacted (now {result['compact_revision']})"
                    )
                if result.get("canceled"):
                    raise _StreamEnded(f"canceled: {result.get('cancel_reason', '')}")
                if not created:
                    created = bool(result.get("created")) or "events" in result
                events = [
                    WatchEvent("delete" if e.get("type") == "DELETE" else "put", _kv(e.get("kv", {})))
                    for e in result.get("events", [])
                ]
                yield events
        finally:
            alive.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await alive
            resp.close()

    async def _liveness(self, endpoint: str, resp: aiohttp.ClientResponse) -> None:
        """Close the watch stream when its member stops answering health checks (a silent member would
        otherwise keep a dead stream open forever)."""
        while True:
            await asyncio.sleep(self._timeout * 2)
            try:
                async with self._http().get(
                    endpoint + "/health", timeout=aiohttp.ClientTimeout(total=self._timeout)
                ) as check:
                    await check.read()
            except (aiohttp.ClientError, TimeoutError, OSError):
                logger.info("etcd %s stopped answering; dropping its watch", endpoint)
                resp.close()
                return


class _StreamEnded(Exception):
    pass


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object) -> bytes:
    return base64.b64decode(text) if isinstance(text, str) and text else b""


def _range(key: str, prefix: bool) -> dict[str, Any]:
    raw = key.encode()
    body: dict[str, Any] = {"key": _b64(raw)}
    if prefix:
        body["range_end"] = _b64(_prefix_end(raw))
    return body


def _prefix_end(prefix: bytes) -> bytes:
    """The first key after every key that starts with `prefix` (etcd's range_end for a prefix)."""
    b = bytearray(prefix)
    for i in range(len(b) - 1, -1, -1):
        if b[i] < 0xFF:
            b[i] += 1
            return bytes(b[: i + 1])
    return b"\0"


def _kv(data: dict[str, Any]) -> KeyValue:
    return KeyValue(
        _unb64(data.get("key")).decode("utf-8", "replace"),
        _unb64(data.get("value")),
        int(data.get("create_revision", 0)),
        int(data.get("mod_revision", 0)),
        int(data.get("version", 0)),
        int(data.get("lease", 0)),
    )


def _revision(data: dict[str, Any]) -> int:
    header = data.get("header")
    return int(header.get("revision", 0)) if isinstance(header, dict) else 0


def _loads(raw: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {"error": raw[:200].decode("utf-8", "replace")}
    return data if isinstance(data, dict) else {"error": "not a JSON object"}


def _message(data: dict[str, Any]) -> str:
    error = data.get("error")
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(data.get("message") or error or "")


def _retryable(data: dict[str, Any]) -> bool:
    text = _message(data)
    return any(s in text for s in ("no leader", "timed out", "leader changed", "unavailable", "not capable"))
