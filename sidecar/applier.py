"""Who applies a decision on this host.

A decider (the local controller shell today; a fleet member following its leader's decision) says which
region is active. The applier makes this host carry it: HAProxy's weights through the `WeightKeeper` (the
only writer of weights: raise-first, read back, re-asserted after reloads) and, when the active region
changes, the move's effects here (`on_move`: requests stuck in a dead region answered, stray writes pointed
at the new region, haproxy.cfg re-rendered, replication re-sourced). Deciders never touch HAProxy or the
listeners themselves, so two deciders cannot disagree about what this host does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol


class WeightSink(Protocol):
    def set_desired(self, weights: dict[str, int]) -> None: ...


class Applier:
    def __init__(self, keeper: WeightSink, on_move: Callable[[str, str, str], None]) -> None:
        self._keeper = keeper
        self._on_move = on_move
        self.active: str | None = None
        self.weights: dict[str, int] | None = None

    def apply(self, weights: Mapping[str, int], reason: str) -> None:
        """Carry `weights` (exactly one region weighted); a change of active region is a move."""
        wanted = dict(weights)
        active = next((name for name, w in wanted.items() if w > 0), None)
        self._keeper.set_desired(wanted)
        self.weights = wanted
        before, self.active = self.active, active
        if before is not None and active is not None and active != before:
            self._on_move(before, active, reason)
