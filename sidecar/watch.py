"""Watch a few files and call a coroutine, debounced, when their content changes.

`FileWatcher` watches the parent *directories* of the given files (non-recursively) with watchdog, because
editors and deploy tools replace a file by writing a temporary file and renaming it over the original: a
watch on the file itself would follow the old inode and be lost. For a symlinked file the directory of
the resolved target is watched too, so both an edit of the target and a re-pointed link are seen.

Events arrive on watchdog's observer thread. The thread only filters them by path and hands the matching
watched paths to the asyncio loop with `loop.call_soon_threadsafe`; everything else (debounce timer,
content hashing, the callback) runs on the loop:

- debounce: the callback runs `debounce` seconds after the *last* event of a burst, once, with the set of
  watched paths whose content changed;
- content: a sha256 per file is kept; paths whose bytes are unchanged since the last successful callback
  (a `touch`, a rewrite with identical content, a delete-and-recreate within one burst) are dropped, and
  when no path is left the callback is not called at all. A missing (deleted) file has content `None`,
  which counts as a change;
- serialized: never two callbacks at once. Events that arrive while a callback runs are debounced as
  usual and cause exactly one more call after it finishes;
- failures: a callback that raises is logged (`logger.exception`) and the watcher keeps working. The
  hashes of a failed call are not committed: its paths are offered again with the next call, which the
  next event on any watched file triggers (so `touch` retries a failed reload).

The directories must exist when `start()` is called; a watched directory that is later removed or
renamed is not followed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from types import TracebackType

from watchdog.events import (
    EVENT_TYPE_CLOSED,
    EVENT_TYPE_CREATED,
    EVENT_TYPE_DELETED,
    EVENT_TYPE_MODIFIED,
    EVENT_TYPE_MOVED,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

logger = logging.getLogger(__name__)

OnChange = Callable[[frozenset[Path]], Awaitable[None]]

# The events that can change a file's content or existence. "closed" is the close after a write
# (IN_CLOSE_WRITE): it ends a write, so the debounce counts from it. Attribute changes, opens and closes
# without a write are ignored. Whatever gets through is still checked against the content hash.
_RELEVANT_EVENTS = frozenset(
    {EVENT_TYPE_CREATED, EVENT_TYPE_MODIFIED, EVENT_TYPE_MOVED, EVENT_TYPE_DELETED, EVENT_TYPE_CLOSED}
)

_Digest = str | None  # sha256 hex of the content; None when the file is missing or unreadable


def _digest(path: Path) -> _Digest:
    """The sha256 of the file's content (following symlinks), or None when it cannot be read."""
    try:
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    except OSError as exc:
        logger.warning("cannot read watched file %s: %s", path, exc)
        return None


class _Handler(FileSystemEventHandler):
    """Runs on the observer thread: maps event paths to watched paths and hands them to the loop."""

    def __init__(self, watcher: FileWatcher) -> None:
        super().__init__()
        self._watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            if event.event_type not in _RELEVANT_EVENTS:
                return
            raw = [event.src_path, event.dest_path] if event.dest_path else [event.src_path]
            matched: set[Path] = set()
            for item in raw:
                matched |= self._watcher._match(os.fsdecode(item))
            if matched:
                self._watcher._post(frozenset(matched))
        except Exception:  # an exception here would kill watchdog's dispatch thread
            logger.exception("file watcher: cannot handle %r", event)


class FileWatcher:
    """Call `on_change(changed_paths)` after watched files change; see the module docstring.

    `paths` are reported back to `on_change` exactly as given (as `Path` objects). `loop` defaults to the
    running loop at `start()`; pass it to start the watcher before the loop runs. `start()` must be called
    on the loop's thread. Use it as `async with FileWatcher(...) as watcher:` or call `start()` and
    `await stop()`.
    """

    def __init__(
        self,
        paths: Iterable[Path],
        on_change: OnChange,
        *,
        debounce: float = 0.5,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if debounce < 0:
            raise ValueError("debounce must be >= 0")
        self._paths: tuple[Path, ...] = tuple(dict.fromkeys(Path(p) for p in paths))
        if not self._paths:
            raise ValueError("FileWatcher needs at least one path")
        self._on_change = on_change
        self._debounce = debounce
        self._loop = loop

        # Event path (as a resolved-directory path, or fully resolved) -> the watched paths it stands for.
        self._keys: dict[str, set[Path]] = {}
        self._directories: set[Path] = set()
        for path in self._paths:
            absolute = Path(os.path.abspath(path))
            link_location = absolute.parent.resolve() / absolute.name  # the name itself, directory resolved
            target = absolute.resolve()  # the final file behind any symlinks
            for key in (link_location, target):
                self._keys.setdefault(str(key), set()).add(path)
                self._directories.add(key.parent)

        self._observer: BaseObserver | None = None
        self._started = False
        self._stopped = False
        self._hashes: dict[Path, _Digest] = {}
        self._pending: set[Path] = set()  # paths with events since the last batch was taken
        self._retry: set[Path] = set()  # changed paths of a failed callback, offered again
        self._timer: asyncio.TimerHandle | None = None
        self._runner: asyncio.Task[None] | None = None
        self._again = False  # the debounce timer fired while a callback was running

    @property
    def paths(self) -> tuple[Path, ...]:
        return self._paths

    @property
    def directories(self) -> frozenset[Path]:
        """The directories actually watched."""
        return frozenset(self._directories)

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Record the current content of the files and start the observer thread."""
        if self._started:
            raise RuntimeError("FileWatcher can only be started once")
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._started = True
        self._hashes = {path: _digest(path) for path in self._paths}
        observer = Observer()
        handler = _Handler(self)
        for directory in sorted(self._directories):
            observer.schedule(handler, str(directory), recursive=False)
        observer.daemon = True
        observer.name = "ddb-sidecar-file-watcher"
        try:
            observer.start()  # sets up the inotify watches synchronously: raises if a directory is missing
        except BaseException:
            self._stopped = True
            observer.stop()  # stops the emitters already started
            raise
        self._observer = observer
        logger.debug("watching %s in %s", [str(p) for p in self._paths], sorted(map(str, self._directories)))

    async def stop(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109 - a bound on joins and the callback
        """Stop watching: cancel a pending debounce, stop and join the observer thread (at most `timeout`
        seconds), and give a callback that is running at most the rest of `timeout` before cancelling it.
        Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pending.clear()
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            await self._join(observer, deadline)
        runner, self._runner = self._runner, None
        if runner is not None and not runner.done():
            done, _ = await asyncio.wait({runner}, timeout=max(deadline - loop.time(), 0.0))
            if not done:
                logger.warning("file watcher: callback still running after %.1fs; cancelling it", timeout)
                runner.cancel()
                await asyncio.wait({runner}, timeout=1.0)

    @staticmethod
    async def _join(observer: BaseObserver, deadline: float) -> None:
        """Join the observer thread without blocking the loop, polling up to `deadline`."""
        loop = asyncio.get_running_loop()
        while True:
            observer.join(timeout=0)
            if not observer.is_alive():
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                logger.warning("file watcher: observer thread did not stop in time")
                return
            await asyncio.sleep(min(0.02, remaining))

    async def __aenter__(self) -> FileWatcher:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- observer thread -------------------------------------------------------------------------------------

    def _match(self, event_path: str) -> set[Path]:
        """The watched paths that an event path names (called on the observer thread)."""
        found = self._keys.get(os.path.abspath(event_path))
        if found is not None:
            return set(found)
        # The event came through a path spelled differently (e.g. a symlinked directory): compare resolved.
        return set(self._keys.get(str(Path(event_path).resolve()), ()))

    def _post(self, paths: frozenset[Path]) -> None:
        """Hand matched paths to the loop (called on the observer thread)."""
        loop = self._loop
        if loop is None or self._stopped:
            return
        try:
            loop.call_soon_threadsafe(self._on_event, paths)
        except RuntimeError:  # the loop is closed: nobody to tell
            pass

    # -- loop ------------------------------------------------------------------------------------------------

    def _on_event(self, paths: frozenset[Path]) -> None:
        if self._stopped:
            return
        self._pending |= paths
        if self._timer is not None:
            self._timer.cancel()
        assert self._loop is not None
        self._timer = self._loop.call_later(self._debounce, self._on_quiet)

    def _on_quiet(self) -> None:
        """The debounce period passed without events: run the callback now, or after the running one."""
        self._timer = None
        if self._stopped:
            return
        if self._runner is not None and not self._runner.done():
            self._again = True
            return
        assert self._loop is not None
        self._runner = self._loop.create_task(self._run(), name="ddb-sidecar-file-watcher")

    async def _run(self) -> None:
        while not self._stopped:
            self._again = False
            await self._handle_batch()
            # Run once more only when the timer fired during the callback and no newer burst has re-armed
            # it (a re-armed timer starts its own run when it fires).
            if not (self._again and self._timer is None):
                self._again = False
                return

    async def _handle_batch(self) -> None:
        batch = self._pending | self._retry
        self._pending = set()
        self._retry = set()
        if not batch:
            return
        ordered = sorted(batch, key=str)
        digests = await asyncio.to_thread(lambda: [_digest(path) for path in ordered])
        current = dict(zip(ordered, digests, strict=True))
        changed = frozenset(path for path, digest in current.items() if digest != self._hashes.get(path))
        if not changed or self._stopped:
            return
        try:
            await self._on_change(changed)
        except asyncio.CancelledError:
            self._retry |= changed
            raise
        except Exception:
            logger.exception("file watcher: callback failed for %s", sorted(map(str, changed)))
            self._retry |= changed
            return
        for path in changed:
            self._hashes[path] = current[path]
