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
