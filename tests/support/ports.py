"""Free TCP ports for listeners started by tests.

Binding to port 0 is not used on purpose: the kernel picks from the ephemeral range (32768-60999 here),
where outgoing connections also take their local ports, so a listener there can collide with a client
socket. We pick at random below that range and check each candidate by binding it.
"""

from __future__ import annotations

import random
import socket
import threading
from collections.abc import Iterable

PORT_MIN = 20000
PORT_MAX = 32000

_lock = threading.Lock()
# Ports handed out by this process: a port is free when we check it but the caller binds it later, so
# never hand the same one out twice in one test session.
_handed_out: set[int] = set()


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True if `host:port` can be bound for TCP right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1", attempts: int = 200) -> int:
    """A random TCP port in [PORT_MIN, PORT_MAX] that binds on `host` and was not handed out before."""
    with _lock:
        for _ in range(attempts):
            port = random.randint(PORT_MIN, PORT_MAX)
            if port in _handed_out:
                continue
            if port_is_free(port, host):
                _handed_out.add(port)
                return port
    raise RuntimeError(f"no free port in {PORT_MIN}-{PORT_MAX} on {host} after {attempts} attempts")


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct free ports."""
    return [free_port(host) for _ in range(count)]


def free_port_block(
    offsets: Iterable[int],
    low: int = PORT_MIN,
    high: int = PORT_MAX,
    host: str = "127.0.0.1",
    attempts: int = 200,
) -> int:
    """A base port B in [low, high] such that every B + offset is free; those ports count as handed out.

    For programs that take one base port and derive the others from it (`ddb-sidecar demo --base-port`).
    """
    wanted = sorted(set(offsets))
    if not wanted or wanted[0] < 0 or high + wanted[-1] > 65535:
        raise ValueError(f"bad offsets {wanted} for bases up to {high}")
    with _lock:
        for _ in range(attempts):
            base = random.randint(low, high)
            ports = [base + offset for offset in wanted]
            if any(port in _handed_out for port in ports):
                continue
            if all(port_is_free(port, host) for port in ports):
                _handed_out.update(ports)
                return base
    raise RuntimeError(f"no base port in {low}-{high} with {wanted} free on {host} after {attempts} attempts")
