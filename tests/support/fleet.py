"""One host of a fleet for tests and benchmarks: a sidecar with its own fault proxy per region, coordinated
through etcd under a prefix of the fleet's own."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .faultproxy import FaultProxy
from .moto_region import MotoRegion
from .stack import SidecarStack


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
) -> tuple[SidecarStack, dict[str, FaultProxy]]:
    """Start the fault proxies and the host's sidecar (not yet started: call `start()`)."""
    proxies = {r.name: FaultProxy(r.port, log_dir).start() for r in regions}
    stack = SidecarStack(
        list(regions),
        list(tables),
        log_dir,
        endpoints={name: p.url for name, p in proxies.items()},
        extra={
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
