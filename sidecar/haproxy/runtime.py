"""asyncio clients of HAProxy's runtime API (the worker's stats socket) and of the master CLI.

One command per connection: connect, send `cmd\\n`, half-close, read to EOF. Stateless and robust: a
reload or restart of HAProxy never leaves a half-used session behind. The half-close matters: the master
CLI (2.6 and 2.8) keeps the connection open after answering until the client shuts its side down.

HAProxy reports most errors as text on a "successful" exchange (`No such server.`), so replies are parsed;
an unreachable socket raises RuntimeUnavailable and the caller decides when to retry (nothing retries
here).
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

MAX_WEIGHT = 256
_NAME = re.compile(r"^[A-Za-z0-9_.:-]+$")

# srv_op_state values (HAProxy's enum srv_state).
OP_STATES = {0: "stopped", 1: "starting", 2: "running", 3: "stopping"}
# srv_admin_state flags (enum srv_admin). 0x40 is not a state (the FQDN was changed at runtime).
ADMIN_FMAINT = 0x01  # forced into maintenance (`set server ... state maint`)
ADMIN_IMAINT = 0x02  # inherited from a tracked server
ADMIN_CMAINT = 0x04  # `disabled` in the configuration
ADMIN_FDRAIN = 0x08  # forced into drain (`set server ... state drain`)
ADMIN_IDRAIN = 0x10
ADMIN_RMAINT = 0x20  # address resolution failed
_MAINT = ADMIN_FMAINT | ADMIN_IMAINT | ADMIN_CMAINT | ADMIN_RMAINT
_DRAIN = ADMIN_FDRAIN | ADMIN_IDRAIN


class RuntimeUnavailable(ConnectionError):
    """The socket is missing, refuses connections or did not answer in time (HAProxy down or reloading)."""


class RuntimeAPIError(RuntimeError):
    """HAProxy answered, with an error (the text is HAProxy's)."""


@dataclass(frozen=True)
class ServerState:
    """One row of `show servers state` (version-1 format)."""

    backend: str
    name: str
    address: str
    port: int | None
    op_state: int  # srv_op_state: 0 stopped, 1 starting, 2 running, 3 stopping
    admin_state: int  # srv_admin_state flags
    weight: int  # srv_uweight: the current (user) weight
    initial_weight: int  # srv_iweight: the weight in the configuration
    raw: Mapping[str, str] = field(repr=False, compare=False, default_factory=dict)

    @property
    def operational(self) -> str:
        return OP_STATES.get(self.op_state, f"unknown({self.op_state})")

    @property
    def up(self) -> bool:
        return self.op_state == 2

    @property
    def in_maintenance(self) -> bool:
        return bool(self.admin_state & _MAINT)

    @property
    def draining(self) -> bool:
        return bool(self.admin_state & _DRAIN)


@dataclass(frozen=True)
class Proc:
    """One process line of the master CLI's `show proc`."""

    pid: int
    type: str  # master | worker | program name
    reloads: int
    uptime: str
    version: str
    failed_reloads: int | None = None  # master only: "[failed: N]", reset to 0 by a successful reload


@dataclass(frozen=True)
class ProcTable:
    master: Proc
    workers: tuple[Proc, ...]
    old_workers: tuple[Proc, ...]

    @property
    def worker_pids(self) -> frozenset[int]:
        return frozenset(p.pid for p in self.workers)


@dataclass(frozen=True)
class ReloadResult:
    success: bool
    reason: str  # one line for logs and events
    output: str  # HAProxy's startup log (2.8); empty on 2.6, which answers nothing
    old_workers: frozenset[int]
    new_workers: frozenset[int]
    elapsed: float


def _check_name(kind: str, value: str) -> str:
    if not _NAME.match(value):
        raise ValueError(f"invalid {kind} name {value!r}")
    return value


async def _exchange(path: Path, cmd: str, time_limit: float) -> str:
    if "\n" in cmd or "\r" in cmd:
        raise ValueError(f"a runtime API command is one line: {cmd!r}")
    try:
        async with asyncio.timeout(time_limit):
            reader, writer = await asyncio.open_unix_connection(str(path))
            try:
                writer.write(cmd.encode() + b"\n")
                await writer.drain()
                writer.write_eof()
                data = await reader.read()
            finally:
                writer.close()
                try:
                    await writer.wait_closed()
                except (ConnectionError, OSError):
                    pass
    except TimeoutError:
        raise RuntimeUnavailable(f"{path}: no answer to {cmd!r} within {time_limit:g}s") from None
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise RuntimeUnavailable(
            f"{path}: {exc.strerror or exc} (HAProxy not running or reloading)"
        ) from None
    except ConnectionResetError:
        raise RuntimeUnavailable(f"{path}: connection reset during {cmd!r}") from None
    except OSError as exc:
        raise RuntimeUnavailable(f"{path}: {exc.strerror or exc}") from None
    return data.decode("utf-8", "replace")


class RuntimeClient:
    """HAProxy's runtime API on the worker's stats socket (`stats socket ... level admin`)."""

    def __init__(self, path: Path | str, timeout: float = 2.0) -> None:
        self.path = Path(path)
        self.timeout = timeout

    async def command(self, cmd: str) -> str:
        """Send one command and return HAProxy's whole answer."""
        return await _exchange(self.path, cmd, self.timeout)

    async def commands(self, cmds: Sequence[str]) -> list[str]:
        """Send several commands on one line (`a; b; c`), over one connection; one answer per command.

        HAProxy (2.6 and 2.8) runs them in order, each one whether or not the one before failed, and ends
        each command's answer with an empty line (see `split_replies`). The commands themselves must not
        contain `;` (HAProxy would split them) and their answers must not contain empty lines.
        """
        if not cmds:
            return []
        for cmd in cmds:
            if ";" in cmd or not cmd.strip():
                raise ValueError(f"not a single runtime API command: {cmd!r}")
        return split_replies(await self.command("; ".join(cmds)), len(cmds))

    async def _expect_empty(self, cmd: str) -> None:
        reply = (await self.command(cmd)).strip()
        if reply:
            raise RuntimeAPIError(f"{cmd}: {reply}")

    async def set_weight(self, backend: str, server: str, weight: int) -> None:
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= MAX_WEIGHT:
            raise ValueError(f"weight must be an integer 0-{MAX_WEIGHT}, got {weight!r}")
        be, srv = _check_name("backend", backend), _check_name("server", server)
        await self._expect_empty(f"set server {be}/{srv} weight {weight}")

    async def set_state(self, backend: str, server: str, state: Literal["ready", "drain", "maint"]) -> None:
        if state not in ("ready", "drain", "maint"):
            raise ValueError(f"state must be ready, drain or maint, got {state!r}")
        be, srv = _check_name("backend", backend), _check_name("server", server)
        await self._expect_empty(f"set server {be}/{srv} state {state}")

    async def servers_state(self, backend: str) -> dict[str, ServerState]:
        """`show servers state BACKEND`, parsed by the column names of its header line."""
        be = _check_name("backend", backend)
        return parse_servers_state(await self.command(f"show servers state {be}"))

    async def show_stat(self) -> list[dict[str, str]]:
        """`show stat` as one dict per CSV row (frontends, backends and servers)."""
        return parse_show_stat(await self.command("show stat"))

    async def show_info(self) -> dict[str, str]:
        text = await self.command("show info")
        out: dict[str, str] = {}
        for line in text.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                out[key.strip()] = value.strip()
        return out


def weight_command(backend: str, server: str, weight: int) -> str:
    """`set server BACKEND/SERVER weight N`, with the names and the weight checked."""
    if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= MAX_WEIGHT:
        raise ValueError(f"weight must be an integer 0-{MAX_WEIGHT}, got {weight!r}")
    for kind, name in (("backend", backend), ("server", server)):
        if not isinstance(name, str) or not _NAME.fullmatch(name):  # `$` alone lets a final "\n" through
            raise ValueError(f"invalid {kind} name {name!r}")
    return f"set server {backend}/{server} weight {weight}"


def split_replies(text: str, count: int) -> list[str]:
    """Split HAProxy's answer to `count` commands sent on one line into one answer per command.

    Each command's answer is its output followed by an empty line; a command that succeeds silently
    (`set server ... weight N`) answers just the empty line, i.e. "" here. The last answer may lack its
    empty line. A different number of answers than commands raises RuntimeAPIError.
    """
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    answers: list[str] = []
    current: list[str] = []
    for line in lines:
        if line.strip():
            current.append(line)
        else:
            answers.append("\n".join(current))
            current = []
    if current:
        answers.append("\n".join(current))
    if len(answers) != count:
        raise RuntimeAPIError(
            f"expected {count} answers to {count} commands, got {len(answers)}: {text.strip()[:300]!r}"
        )
    return answers


def parse_show_info(text: str) -> dict[str, str]:
    """`show info` (`Name: value` lines) as a dict."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def parse_servers_state(text: str) -> dict[str, ServerState]:
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or lines[0].strip() != "1":
        # Errors (`Can't find backend.`) come back instead of the version line.
        raise RuntimeAPIError(f"show servers state: {text.strip() or 'empty answer'}")
    header: list[str] | None = None
    out: dict[str, ServerState] = {}
    for line in lines[1:]:
        if line.startswith("#"):
            header = line.lstrip("#").split()
            continue
        if header is None:
            raise RuntimeAPIError(f"show servers state: no header line before {line!r}")
        row = dict(zip(header, line.split(), strict=False))
        try:
            port_text = row.get("srv_port", "-")
            state = ServerState(
                backend=row["be_name"],
                name=row["srv_name"],
                address=row["srv_addr"],
                port=int(port_text) if port_text.isdigit() else None,
                op_state=int(row["srv_op_state"]),
                admin_state=int(row["srv_admin_state"]),
                weight=int(row["srv_uweight"]),
                initial_weight=int(row["srv_iweight"]),
                raw=row,
            )
        except (KeyError, ValueError) as exc:
            raise RuntimeAPIError(f"show servers state: cannot parse {line!r}: {exc}") from None
        out[state.name] = state
    return out


def parse_show_stat(text: str) -> list[dict[str, str]]:
    text = text.strip()
    if not text.startswith("# "):
        raise RuntimeAPIError(f"show stat: {text or 'empty answer'}")
    reader = csv.DictReader(io.StringIO(text[2:]))
    # Each line ends with a comma: drop the empty-named last column.
    return [{k: v for k, v in row.items() if k} for row in reader]


_PROC = re.compile(
    r"^(?P<pid>\d+)\s+(?P<type>\S+)\s+(?P<reloads>\d+)(?:\s+\[failed:\s*(?P<failed>\d+)\])?"
    r"(?:\s+\[[^\]]*\])*\s+(?P<uptime>\S+)\s+(?P<version>\S+)"
)


def parse_show_proc(text: str) -> ProcTable:
    master: Proc | None = None
    workers: list[Proc] = []
    old: list[Proc] = []
    section = "master"
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            title = stripped.lstrip("#").strip().lower()
            if title.startswith("old workers"):
                section = "old"
            elif title.startswith("workers"):
                section = "workers"
            elif title.startswith("programs"):
                section = "programs"
            continue
        match = _PROC.match(stripped)
        if not match:
            continue
        failed = match.group("failed")
        proc = Proc(
            pid=int(match.group("pid")),
            type=match.group("type"),
            reloads=int(match.group("reloads")),
            uptime=match.group("uptime"),
            version=match.group("version"),
            failed_reloads=int(failed) if failed is not None else None,
        )
        if proc.type == "master":
            master = proc
        elif section == "workers":
            workers.append(proc)
        elif section == "old":
            old.append(proc)
    if master is None:
        raise RuntimeAPIError(f"show proc: no master line in {text.strip()[:200]!r}")
    return ProcTable(master=master, workers=tuple(workers), old_workers=tuple(old))


class MasterClient:
    """The master CLI (`haproxy -W -S PATH`): process list and reloads."""

    def __init__(self, path: Path | str, timeout: float = 2.0) -> None:
        self.path = Path(path)
        self.timeout = timeout

    async def command(self, cmd: str, time_limit: float | None = None) -> str:
        """Send one command; `time_limit` overrides the client's timeout for this one."""
        return await _exchange(self.path, cmd, self.timeout if time_limit is None else time_limit)

    async def show_proc(self) -> ProcTable:
        return parse_show_proc(await self.command("show proc"))

    async def reload(self, deadline: float = 15.0, poll: float = 0.05) -> ReloadResult:
        """Reload HAProxy (re-read the config file) and say whether the new worker took over.

        2.8 answers `Success=1`/`Success=0` and the startup log synchronously. 2.6 closes the connection
        without a word while the master re-executes itself: poll `show proc` until the master's reload
        count moves, then a new worker PID means success and a non-zero failure count means the new
        config did not load (the old worker keeps serving). Never raises for a failed reload: the
        result says so.
        """
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        end = loop.time() + deadline
        before = await self.show_proc()
        old = before.worker_pids
        try:
            reply = await self.command("reload", time_limit=deadline)
        except RuntimeUnavailable as exc:
            # 2.6 may drop the connection as it re-executes; what happened is read from `show proc`.
            logger.debug("reload: %s; polling show proc", exc)
            reply = ""
        if reply.startswith("Success="):
            success = reply.startswith("Success=1")
            _, _, output = reply.partition("--\n")
            output = output.strip()
            new: frozenset[int] = frozenset()
            try:
                new = (await self.show_proc()).worker_pids - old
            except (RuntimeUnavailable, RuntimeAPIError):
                pass
            reason = "reloaded" if success else "reload failed: the new configuration did not load"
            alerts = [line.split(" : ", 1)[-1] for line in output.splitlines() if "[ALERT]" in line]
            if alerts:
                reason += ": " + "; ".join(alerts[:3])
            return ReloadResult(success, reason, output, old, new, time.monotonic() - started)

        last_error = ""
        while loop.time() < end:
            try:
                table = await self.show_proc()
            except (RuntimeUnavailable, RuntimeAPIError) as exc:
                last_error = str(exc)
            else:
                if table.master.reloads > before.master.reloads:
                    new = table.worker_pids - old
                    if new:
                        return ReloadResult(True, "reloaded", "", old, new, time.monotonic() - started)
                    if (table.master.failed_reloads or 0) > 0:
                        return ReloadResult(
                            False,
                            "reload failed: the new configuration did not load; the old worker keeps serving",
                            "",
                            old,
                            frozenset(),
                            time.monotonic() - started,
                        )
            await asyncio.sleep(poll)
        reason = f"reload not confirmed within {deadline:g}s"
        if last_error:
            reason += f" ({last_error})"
        return ReloadResult(False, reason, "", old, frozenset(), time.monotonic() - started)
