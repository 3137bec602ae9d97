"""Calling the admin API, as the CLI and `reconcile` do: over TCP or the unix socket, never through a proxy.

`http.client` directly, not urllib: urllib honours `http_proxy`, and an operator's shell during an incident
may well have one set; a `failover` sent to a proxy is a failover that did not happen (or happened
somewhere else). The token (`admin.token_file`) is read at each call, so rotating it needs no restart.
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any

from sidecar.config import Address, Config, UnixAddress, admin_token


class AdminUnavailable(Exception):
    """The admin API did not answer; the message names where it was called."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def admin_where(config: Config) -> str:
    address = config.admin
    return f"unix:{address.path}" if isinstance(address, UnixAddress) else f"http://{address}"


def call(
    config: Config, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 15.0
) -> tuple[int, Any]:
    """(HTTP status, the JSON answer) of one admin API call; AdminUnavailable when nothing answers."""
    try:
        token = admin_token(config)
    except OSError as exc:
        raise AdminUnavailable(
            f"cannot read admin.token_file {config.admin_token_file}: {exc.strerror}"
        ) from None
    return call_at(config.admin, token, method, path, body, timeout)


def call_at(
    address: Address | UnixAddress,
    token: str | None,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    timeout: float = 15.0,
) -> tuple[int, Any]:
    where = f"unix:{address.path}" if isinstance(address, UnixAddress) else f"http://{address}"
    conn: http.client.HTTPConnection
    if isinstance(address, UnixAddress):
        conn = _UnixConnection(str(address.path), timeout)
    else:
        conn = http.client.HTTPConnection(address.host, address.port, timeout=timeout)
    headers = {"Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    except (OSError, http.client.HTTPException) as exc:
        raise AdminUnavailable(f"ddb-sidecar is not answering on {where}{path}: {exc}") from None
    finally:
        conn.close()
    try:
        return resp.status, json.loads(raw)
    except ValueError:
        return resp.status, {"reason": f"HTTP {resp.status} from {where}{path}"}
