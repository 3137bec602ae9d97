"""The fleet's view of each region: a majority vote over the views of its members. Pure.

Every member of a fleet (an HAProxy and a sidecar on each app host) sees the regions through its own network
path. The leader decides on the fleet's view, never on its own: a region is down for the fleet when more
than half of the voting members see it down, up when more than half see it up, unknown otherwise. So one
host that alone loses its path to a region (a transit link, a host firewall) moves nothing; the region
failing for most hosts moves all of them. A fleet of one votes exactly as that member sees.

Only members that serve the same thing may vote: the regions, the tables and the health table they were
configured with (`serves`); a member that differs is refused with the keys that differ, so an operator
can fix a half-rolled-out config.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from sidecar.core.controller import RegionView


@dataclass(frozen=True, slots=True)
class MemberView:
    """One live member: its host name, what it serves, and its own view of each region."""

    host: str
    serves: Mapping[str, str]
    regions: Mapping[str, RegionView]


@dataclass(frozen=True, slots=True)
class Tally:
    up: int
    down: int
    voters: int

    def describe(self) -> str:
        return f"{self.down}/{self.voters} down, {self.up}/{self.voters} up"


@dataclass(frozen=True, slots=True)
class FleetVote:
    views: tuple[RegionView, ...]  # the fleet's view of each region, in the configured order
    tallies: Mapping[str, Tally]
    voters: tuple[str, ...]
    refused: tuple[tuple[str, str], ...] = field(default=())  # (host, which keys differ)


def serves(regions: Sequence[str], tables: Sequence[str], health_table: str) -> dict[str, str]:
    """What a member serves, key by key (compared between members to refuse a mismatched voter)."""
    return {"regions": ",".join(regions), "tables": ",".join(sorted(tables)), "health.table": health_table}


def fingerprint(served: Mapping[str, str]) -> str:
    """A short digest of `serves`, for status and logs."""
    text = "\n".join(f"{k}={served[k]}" for k in sorted(served))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def mismatch(mine: Mapping[str, str], theirs: Mapping[str, str]) -> str | None:
    """Which keys differ between two members' `serves` (None: the same)."""
    keys = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if not keys:
        return None
    return "; ".join(f"{k}: {theirs.get(k)!r} here {mine.get(k)!r}" for k in keys)


def vote(regions: Sequence[str], members: Sequence[MemberView], mine: Mapping[str, str]) -> FleetVote:
    """The fleet's view of `regions` from the views of `members` that serve what this member serves."""
    voters: list[MemberView] = []
    refused: list[tuple[str, str]] = []
    for member in sorted(members, key=lambda m: m.host):
        why = mismatch(mine, member.serves)
        if why is None:
            voters.append(member)
        else:
            refused.append((member.host, why))
    n = len(voters)
    views: list[RegionView] = []
    tallies: dict[str, Tally] = {}
    for name in regions:
        seen = [m.regions.get(name) or RegionView(name) for m in voters]
        down = [v for v in seen if v.health == "down"]
        up = [v for v in seen if v.health == "up"]
        tallies[name] = Tally(len(up), len(down), n)
        views.append(_fleet_view(name, seen, down, up))
    return FleetVote(tuple(views), tallies, tuple(m.host for m in voters), tuple(refused))


def _fleet_view(
    name: str, seen: list[RegionView], down: list[RegionView], up: list[RegionView]
) -> RegionView:
    n = len(seen)
    if n == 1:
        return seen[0]  # a fleet of one: exactly this member's view
    majority = n // 2 + 1
    # When a majority had answered most recently (the k-th latest good answer): a move waits for the target
    # to have answered, for most of the fleet, after the active region began failing for most of it.
    oks = sorted((v.last_ok_at for v in seen if v.last_ok_at is not None), reverse=True)
    last_ok = oks[majority - 1] if len(oks) >= majority else None
    if n and len(down) >= majority:
        starts = sorted(v.failing_since for v in down if v.failing_since is not None)
        since = starts[majority - 1] if len(starts) >= majority else (starts[-1] if starts else None)
        kinds = Counter(v.kind for v in down)
        kind = kinds.most_common(1)[0][0]
        example = next((v.cause for v in down if v.kind == kind and v.cause), None)
        why = f"{len(down)} of {n} members see it down" + (f" ({example})" if example else "")
        return RegionView(name, "down", why, kind, None, since, last_ok)
    if n and len(up) >= majority:
        # Up for the fleet; the cause of the majority (None when clean) so a switchover target is judged
        # as most members see it.
        causes = Counter(v.cause for v in up)
        cause: str | None = causes.most_common(1)[0][0]
        kind = next((v.kind for v in up if v.cause == cause), None)
        if down:
            cause = (cause + "; " if cause else "") + f"{len(down)} of {n} members see it down"
        return RegionView(name, "up", cause, kind, None, None, last_ok)
    detail = f"no majority: {len(down)} of {n} members see it down, {len(up)} up" if n else "no voting member"
    return RegionView(name, "unknown", detail, None, None, None, last_ok)


def with_lag(views: Sequence[RegionView], lag_ms: Mapping[str, float | None]) -> tuple[RegionView, ...]:
    """The fleet's views with the replication lag measured for the fleet (one figure per region)."""
    return tuple(replace(v, lag_ms=lag_ms.get(v.name)) for v in views)


def isolated(local: RegionView, fleet: RegionView) -> bool:
    """This member alone sees `local` down (an outage) while the fleet does not: its own path is cut."""
    return local.outage and fleet.health != "down"
