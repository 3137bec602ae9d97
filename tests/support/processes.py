"""Subprocesses for tests: output to a log file, stopped for sure (SIGTERM, then SIGKILL after a deadline).

Every process started here is recorded in a registry until it is stopped, so that a failing test can show
the tail of each live process's log (see `log_tails`) and so that nothing outlives the test session
(`stop_all` runs at exit as a last resort).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

_registry_lock = threading.Lock()
_registry: list[ManagedProcess] = []


class ProcessDied(AssertionError):
    """A process that should be running has exited."""


class ManagedProcess:
    """One subprocess with stdout and stderr appended to `log_dir/<name>.log`.

    It runs in its own session (process group), so a signal reaches its children too, and Ctrl-C in the
    terminal does not hit it before the test's teardown does.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str | os.PathLike[str]],
        log_dir: str | os.PathLike[str],
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        self.name = name
        self.argv = [os.fspath(a) for a in argv]
        self.log_path = Path(log_dir) / f"{name}.log"
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self._popen: subprocess.Popen[bytes] | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> ManagedProcess:
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} starting: {shlex.join(self.argv)}\n".encode())
            log.flush()
            # The child keeps its own copy of the descriptor; ours is closed when the block ends.
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        with _registry_lock:
            _registry.append(self)
        logger.info("started %s pid %s, log %s", self.name, self._popen.pid, self.log_path)
        return self

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM (and SIGCONT, in case it is stopped); SIGKILL if still alive after `timeout` s.

        Returns the exit code, or None if it was never started. Safe to call more than once.
        """
        popen = self._popen
        if popen is None:
            return None
        try:
            if popen.poll() is None:
                self._signal_group(signal.SIGTERM)
                # A SIGSTOPped process keeps SIGTERM pending until it is continued.
                self._signal_group(signal.SIGCONT)
                try:
                    popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    logger.warning("%s ignored SIGTERM for %.1fs: SIGKILL", self.name, timeout)
                    self._signal_group(signal.SIGKILL)
                    popen.wait(timeout)
            else:
                # Already exited: still reap anything left in its group (e.g. forked workers).
                self._signal_group(signal.SIGKILL)
        finally:
            self._unregister()
        return popen.returncode

    def kill(self, timeout: float = 5.0) -> int | None:
        """SIGKILL the process group at once (a crash, as seen from outside) and reap it."""
        popen = self._popen
        if popen is None:
            return None
        try:
            self._signal_group(signal.SIGKILL)
            popen.wait(timeout)
        finally:
            self._unregister()
        return popen.returncode

    def sigstop(self) -> None:
        """Freeze the process: it keeps its sockets, so connections are accepted but never answered."""
        self._signal_group(signal.SIGSTOP)

    def sigcont(self) -> None:
        self._signal_group(signal.SIGCONT)

    def _signal_group(self, sig: signal.Signals) -> None:
        if self._popen is None:
            raise RuntimeError(f"{self.name} was never started")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._popen.pid, sig)

    def _unregister(self) -> None:
        with _registry_lock, contextlib.suppress(ValueError):
            _registry.remove(self)

    def __enter__(self) -> ManagedProcess:
        return self if self.running else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- state -------------------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    @property
    def returncode(self) -> int | None:
        return self._popen.poll() if self._popen is not None else None

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def check_running(self) -> None:
        """Raise ProcessDied, with the log tail, if the process has exited. For use inside wait predicates."""
        if self._popen is None:
            raise ProcessDied(f"{self.name} was never started")
        code = self._popen.poll()
        if code is not None:
            raise ProcessDied(f"{self.name} exited with code {code}; log tail:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40, max_bytes: int = 64 * 1024) -> str:
        """The last `lines` lines of the log (read from at most the last `max_bytes` bytes)."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(0, os.SEEK_END)
                size = log.tell()
                log.seek(max(size - max_bytes, 0))
                data = log.read()
        except FileNotFoundError:
            return "(no log file)"
        return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])

    def __repr__(self) -> str:
        state = "running" if self.running else f"exited {self.returncode}"
        return f"<ManagedProcess {self.name} pid={self.pid} {state}>"


def start_process(
    name: str,
    argv: Sequence[str | os.PathLike[str]],
    log_dir: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> ManagedProcess:
    """Start `argv` with its output in `log_dir/<name>.log`."""
    return ManagedProcess(name, argv, log_dir, env=env, cwd=cwd).start()


def live_processes() -> list[ManagedProcess]:
    """Processes started and not yet stopped (in start order)."""
    with _registry_lock:
        return list(_registry)


def log_tails(lines: int = 30) -> list[tuple[str, str]]:
    """(section title, log tail) for every live process: what conftest attaches to a failed test."""
    return [(f"{p.name} log tail ({p.log_path})", p.log_tail(lines)) for p in live_processes()]


def stop_all(timeout: float = 5.0) -> None:
    """Stop every live process, newest first."""
    for proc in reversed(live_processes()):
        try:
            proc.stop(timeout)
        except Exception:  # a last resort must not stop at the first failure
            logger.exception("could not stop %s", proc.name)


atexit.register(stop_all)
