"""File descriptors: raise the soft limit, and size the listeners' connection cap below it.

systemd gives services a soft RLIMIT_NOFILE of 1024 unless the unit says otherwise: 1,100 idle connections
to one listener then made every probe and upstream connect fail (`Too many open files`) and both regions
look down. So: the soft limit is raised to the hard one at start (the unit sets `LimitNOFILE`), and each
region listener accepts at most `proxy.max_client_connections`, lowered if needed so that the reserve
(probe and upstream pools, the admin API, HAProxy's sockets, files) always fits.
"""

from __future__ import annotations

import logging
import resource

logger = logging.getLogger(__name__)

RESERVE_BASE = 128  # the admin API, HAProxy's runtime and master sockets, state files, logs, etcd


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            logger.warning("could not raise the open-files limit from %d to %d: %s", soft, hard, exc)
    return soft


def connection_cap(wanted: int, listeners: int, pools: int, soft_limit: int) -> tuple[int, str | None]:
    """Connections each listener may hold: `wanted`, or less so that `pools` upstream/probe connections and
    the base reserve still fit under `soft_limit`; and, when lowered, why."""
    reserve = RESERVE_BASE + pools
    room = (soft_limit - reserve) // max(1, listeners)
    if room >= wanted:
        return wanted, None
    cap = max(16, room)
    return cap, (
        f"proxy.max_client_connections {wanted} lowered to {cap} per listener: the open-files limit is "
        f"{soft_limit} and {reserve} are kept for upstream and probe connections and the rest; raise "
        "LimitNOFILE in the systemd unit (or ulimit -n)"
    )
