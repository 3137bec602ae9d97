"""What fleet members write to etcd, as JSON: a member's view of a region, an operator's command.

Readers are lenient (a record from another version must not break a member): an unknown field is ignored,
an unreadable value reads as unknown.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from sidecar.core.controller import FailoverIntent, Intent, Pause, RegionView, Resume, Switchover
from sidecar.core.health import Cause


def view_to_json(view: RegionView) -> dict[str, Any]:
    return {
        "health": view.health,
        "cause": view.cause,
        "kind": view.kind.value if view.kind is not None else None,
        "failing_since": view.failing_since,
        "last_ok_at": view.last_ok_at,
    }


def view_from_json(name: str, data: Mapping[str, Any]) -> RegionView:
    health = data.get("health")
    kind = data.get("kind")
    return RegionView(
        name,
        health if health in ("up", "down", "unknown") else "unknown",
        data.get("cause") if isinstance(data.get("cause"), str) else None,
        Cause(kind) if isinstance(kind, str) and kind in Cause._value2member_map_ else None,
        None,
        _num(data.get("failing_since")),
        _num(data.get("last_ok_at")),
    )


def _num(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def intent_to_json(intent: Intent) -> dict[str, Any]:
    if isinstance(intent, FailoverIntent):
        return {"kind": "failover", "to": intent.to}
    if isinstance(intent, Pause):
        return {"kind": "pause"}
    if isinstance(intent, Resume):
        return {"kind": "resume"}
    if isinstance(intent, Switchover):
        return {"kind": "switchover", "to": intent.to, "failback": intent.failback}
    raise ValueError(f"{type(intent).__name__} is not a fleet command")


def intent_from_json(data: Mapping[str, Any]) -> Intent:
    kind = data.get("kind")
    if kind == "failover" and isinstance(data.get("to"), str):
        return FailoverIntent(data["to"])
    if kind == "pause":
        return Pause()
    if kind == "resume":
        return Resume()
    if kind == "switchover" and isinstance(data.get("to"), str):
        return Switchover(data["to"], failback=data.get("failback") is True)
    raise ValueError(f"unknown fleet command {kind!r}")


def read_json(raw: bytes) -> dict[str, Any] | None:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None
