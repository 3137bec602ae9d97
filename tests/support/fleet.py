"""One host of a fleet for tests and benchmarks: a sidecar with its own fault proxy per region, coordinated
through etcd under a prefix of the fleet's own."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .faultproxy import FaultProxy
from .moto_region import MotoRegion
from .stack import DEFAULT_TEST_HEALTH, SIDECAR, SidecarStack
from .wait import wait_until


def member(
    regions: Sequence[MotoRegion],
    tables: Sequence[str],
    log_dir: Path,
    *,
    etcd_endpoints: Sequence[str],
    prefix: str,
    host: str,
    lease_ttl: float,
    health: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> tuple[SidecarStack, dict[str, FaultProxy]]:
    """Start the fault proxies and the host's sidecar (not yet started: call `start()`)."""
    proxies = {r.name: FaultProxy(r.port, log_dir).start() for r in regions}
    stack = SidecarStack(
        list(regions),
        list(tables),
        log_dir,
        endpoints={name: p.url for name, p in proxies.items()},
        extra={
            **(extra or {}),
            "health": dict(health),
            "coordination": {
                "backend": "etcd",
                "endpoints": list(etcd_endpoints),
                "prefix": prefix,
                "host": host,
                "lease_ttl": f"{lease_ttl:g}s",
            },
        },
    )
    return stack, proxies


def settled(statuses: Sequence[Mapping[str, Any]]) -> bool:
    """Every member connected, seeing all the others, under one leader, having applied a decision, with
    every region up (the `status` documents of the members)."""
    fleets = [d["coordination"] for d in statuses]
    return (
        all(
            f["state"] == "connected"
            and len(f["members"]) == len(statuses)
            and f["leader"] is not None
            and f["applied_epoch"] >= 1
            for f in fleets
        )
        and len({f["leader"] for f in fleets}) == 1
        and all(r["state"] == "up" for d in statuses for r in d["regions"])
    )


HOSTS = ("web-1", "web-2", "web-3")


class Fleet:
    """The hosts of one fleet on loopback: a sidecar each (with its own HAProxy, ports and state_dir) and a
    fault proxy per region of its own, so that one host can be cut off alone. A prefix of its own in etcd."""

    def __init__(
        self,
        moto: Mapping[str, MotoRegion],
        table: str,
        etcd_endpoints: Sequence[str],
        log_dir: Path,
        *,
        hosts: Sequence[str] = HOSTS,
        lease_ttl: float = 3.0,
        health: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.moto, self.table, self.log_dir = dict(moto), table, log_dir
        self.etcd_endpoints = list(etcd_endpoints)
        self.hosts, self.lease_ttl = tuple(hosts), lease_ttl
        self.health = dict(health if health is not None else DEFAULT_TEST_HEALTH)
        self.extra = dict(extra or {})
        self.prefix = f"/ddb-sidecar/fleet-{uuid.uuid4().hex[:10]}"
        self.proxies: dict[str, dict[str, FaultProxy]] = {}
        self.stacks: dict[str, SidecarStack] = {}

    def add(self, host: str, tables: Sequence[str] | None = None) -> SidecarStack:
        stack, self.proxies[host] = member(
            list(self.moto.values()),
            list(tables or [self.table]),
            self.log_dir,
            etcd_endpoints=self.etcd_endpoints,
            prefix=self.prefix,
            host=host,
            lease_ttl=self.lease_ttl,
            health=self.health,
            extra=self.extra,
        )
        self.stacks[host] = stack
        stack.start()
        return stack

    def start(self, timeout: float = 40.0) -> Fleet:
        for host in self.hosts:
            self.add(host)
        wait_until(self.settled, timeout, message="every member connected, one leader, one decision applied")
        return self

    def settled(self) -> bool:
        try:
            return settled([self.status(h) for h in self.hosts])
        except OSError:  # a sidecar still starting
            return False

    def stop(self) -> None:
        for stack in self.stacks.values():
            stack.stop()
        for proxies in self.proxies.values():
            for p in proxies.values():
                p.stop()

    def status(self, host: str) -> dict[str, Any]:
        return self.stacks[host].status()

    def active(self) -> dict[str, str]:
        return {host: str(s.status()["active_region"]) for host, s in self.stacks.items()}

    def leader(self) -> str:
        return str(self.status(self.hosts[0])["coordination"]["leader"])

    def holds(self, region: str, key: str, table: str | None = None) -> bool:
        """Does `region`'s own data hold the item `key`?"""
        got = self.moto[region].client().get_item(TableName=table or self.table, Key={"pk": {"S": key}})
        return "Item" in got

    def lands_in(self, host: str) -> set[str]:
        """Write a new item through `host`'s stable address; the regions whose own data then holds it."""
        key = f"{host}-{uuid.uuid4().hex[:8]}"
        client = self.stacks[host].client(
            read_timeout=3, connect_timeout=3, retries={"total_max_attempts": 1}
        )
        client.put_item(TableName=self.table, Item={"pk": {"S": key}})
        return {name for name in self.moto if self.holds(name, key)}

    def cli(self, host: str, *args: str, timeout: float = 40.0) -> subprocess.CompletedProcess[str]:
        stack = self.stacks[host]
        return subprocess.run(
            [str(SIDECAR), *args, "-c", str(stack.config_path)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **stack.env},
            check=False,
        )
