"""haproxy/entrypoint.sh, the HAProxy container's entrypoint: it waits for the sidecar's rendering, then runs
HAProxy in master-worker mode with the master socket where the sidecar expects it; without a rendering it
gives up with a message. Real HAProxy, real shell."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
from pathlib import Path

from sidecar.haproxy.binary import find_haproxy
from tests.support.ports import free_port
from tests.support.wait import wait_until

ENTRYPOINT = Path(__file__).resolve().parents[2] / "haproxy" / "entrypoint.sh"


def env_for(tmp_path: Path, wait: int) -> dict[str, str]:
    path = os.pathsep.join([str(Path(find_haproxy(None)).parent), os.environ.get("PATH", "")])
    return {
        "PATH": path,
        "HAPROXY_CONFIG": str(tmp_path / "haproxy.cfg"),
        "HAPROXY_MASTER_SOCKET": str(tmp_path / "master.sock"),
        "HAPROXY_CONFIG_WAIT": str(wait),
    }


def test_it_waits_for_the_rendering_then_runs_master_worker(tmp_path: Path) -> None:
    port = free_port()
    config = f"defaults\n    mode http\n    timeout client 5s\n    timeout server 5s\n    timeout connect 1s\nfrontend f\n    bind 127.0.0.1:{port}\n    http-request return status 200\n"
    proc = subprocess.Popen(["sh", str(ENTRYPOINT)], env=env_for(tmp_path, 30), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        writer = threading.Timer(1.0, lambda: (tmp_path / "haproxy.cfg").write_text(config))
        writer.start()

        def show_proc() -> bytes:
            with socket.socket(socket.AF_UNIX) as master:
                master.settimeout(5)
                master.connect(str(tmp_path / "master.sock"))  # the file appears just before it listens
                master.sendall(b"show proc\n")
                return master.recv(65536)

        assert b"master" in wait_until(show_proc, 20, message="the master CLI answers", ignore=(OSError,))
        assert oct((tmp_path / "master.sock").stat().st_mode & 0o777) == oct(0o600)
        wait_until(lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close() or True, 10,
                   message="HAProxy serving", ignore=(OSError,))  # fmt: skip
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


def test_without_a_rendering_it_gives_up_and_says_why(tmp_path: Path) -> None:
    done = subprocess.run(["sh", str(ENTRYPOINT)], env=env_for(tmp_path, 1), capture_output=True, text=True,
                          timeout=30, check=False)  # fmt: skip
    assert done.returncode == 1
    assert "is the sidecar container running" in done.stderr
