"""FileWatcher against real files and a real watchdog observer.

Waits are deadline-bounded polls. "No (further) call" is proven with a sentinel: after the action under
test, another watched file is changed and its call awaited. inotify delivers events in order and the
watcher handles them in order, so a call caused by the action would come before the sentinel's call or be
merged into it; the test then checks the exact list of calls.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sidecar.watch import FileWatcher
from tests.support.wait import async_wait_until

DEBOUNCE = 0.2
DEADLINE = 15.0  # generous: a loaded 2-core machine


@dataclass
class Call:
    paths: frozenset[Path]
    contents: dict[Path, bytes | None]  # what the files held when the callback ran
    at: float  # loop time when the callback started
    thread: int


@dataclass
class Recorder:
    """The on_change callback: records every call; optionally fails or blocks on chosen calls."""

    fail_on: set[int] = field(default_factory=set)  # 1-based call numbers that raise
    block_on: set[int] = field(default_factory=set)  # 1-based call numbers that wait for `release`
    calls: list[Call] = field(default_factory=list)
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    running: int = 0
    max_running: int = 0

    async def __call__(self, paths: frozenset[Path]) -> None:
        contents = {p: (p.read_bytes() if p.exists() else None) for p in paths}
        self.calls.append(Call(paths, contents, asyncio.get_running_loop().time(), threading.get_ident()))
        number = len(self.calls)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            self.entered.set()
            if number in self.block_on:
                await self.release.wait()
            if number in self.fail_on:
                raise RuntimeError(f"callback {number} fails")
        finally:
            self.running -= 1

    @property
    def path_sets(self) -> list[frozenset[Path]]:
        return [call.paths for call in self.calls]

    async def wait_calls(self, count: int) -> None:
        await async_wait_until(
            lambda: len(self.calls) >= count,
            DEADLINE,
            message=lambda: f"{count} call(s); got {self.path_sets}",
        )


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Three watched files with known content: the config, the template and a sentinel."""
    directory = tmp_path / "etc"
    directory.mkdir()
    paths = (directory / "haproxy.cfg", directory / "haproxy.cfg.j2", directory / "sentinel")
    for path in paths:
        path.write_bytes(b"initial " + path.name.encode())
    return paths


@pytest.fixture
async def make_watcher() -> AsyncIterator[Callable[..., FileWatcher]]:
    """Build and start watchers; every one is stopped at teardown."""
    watchers: list[FileWatcher] = []

    def make(paths: list[Path], on_change: Recorder, debounce: float = DEBOUNCE) -> FileWatcher:
        watcher = FileWatcher(paths, on_change, debounce=debounce)
        watchers.append(watcher)
        watcher.start()
        return watcher

    yield make
    for watcher in watchers:
        await watcher.stop()


async def test_one_write_is_one_call_with_that_path(files, make_watcher) -> None:
    config, template, sentinel = files
    recorder = Recorder()
    make_watcher([config, template, sentinel], recorder)

    config.write_bytes(b"backend one")
    await recorder.wait_calls(1)
    assert recorder.path_sets == [frozenset({config})]
    assert recorder.calls[0].contents == {config: b"backend one"}
    assert recorder.calls[0].thread == threading.get_ident()  # on the loop, never on the observer thread

    sentinel.write_bytes(b"sentinel 1")
    await recorder.wait_calls(2)
    assert recorder.path_sets == [frozenset({config}), frozenset({sentinel})]


async def test_a_burst_of_twenty_writes_is_one_call(files, make_watcher) -> None:
    config, _, sentinel = files
    recorder = Recorder()
    make_watcher([config, sentinel], recorder)
    loop = asyncio.get_running_loop()

    last_write = 0.0
    for i in range(20):
        config.write_bytes(f"backend {i}".encode())
        last_write = loop.time()
        await asyncio.sleep(0.01)
    await recorder.wait_calls(1)
    assert recorder.path_sets == [frozenset({config})]
    assert recorder.calls[0].contents == {config: b"backend 19"}
    # The callback runs a debounce after the last event of the burst (which follows the last write).
    assert recorder.calls[0].at - last_write >= DEBOUNCE - 0.01

    sentinel.write_bytes(b"sentinel 1")
    await recorder.wait_calls(2)
    assert recorder.path_sets == [frozenset({config}), frozenset({sentinel})]


async def test_write_temp_and_rename_over_the_file_is_detected(files, make_watcher) -> None:
    config, _, sentinel = files
    recorder = Recorder()
    make_watcher([config, sentinel], recorder)

    for round_ in (1, 2):  # twice: the watch survives the first replace
        temporary = config.with_name(f".haproxy.cfg.tmp{round_}")
        temporary.write_bytes(f"replaced {round_}".encode())
        os.replace(temporary, config)
        await recorder.wait_calls(round_)
        assert recorder.calls[-1].paths == frozenset({config})
        assert recorder.calls[-1].contents == {config: f"replaced {round_}".encode()}

    sentinel.write_bytes(b"sentinel 1")
    await recorder.wait_calls(3)
    assert recorder.path_sets == [frozenset({config})] * 2 + [frozenset({sentinel})]


async def test_delete_then_recreate_is_detected(files, make_watcher) -> None:
    config, _, _ = files
    recorder = Recorder()
    make_watcher([config], recorder)

    config.unlink()
    await recorder.wait_calls(1)
    assert recorder.calls[0].paths == frozenset({config})
    assert recorder.calls[0].contents == {config: None}

    config.write_bytes(b"recreated")
    await recorder.wait_calls(2)
    assert recorder.calls[1].paths == frozenset({config})
    assert recorder.calls[1].contents == {config: b"recreated"}


async def test_recreating_identical_content_right_after_a_change_is_a_change(files, make_watcher) -> None:
    # Recreating the original content after a handled change *is* a change relative to the last callback.
    config, _, _ = files
    original = config.read_bytes()
    recorder = Recorder()
    make_watcher([config], recorder)

    config.unlink()
    await recorder.wait_calls(1)
    config.write_bytes(original)
    await recorder.wait_calls(2)
    assert recorder.calls[1].contents == {config: original}


async def test_touch_or_identical_rewrite_does_not_call(files, make_watcher) -> None:
    config, template, sentinel = files
    recorder = Recorder()
    make_watcher([config, template, sentinel], recorder)

    # First a known-detected change, so the "unchanged" comparison is against a callback's content.
    config.write_bytes(b"backend v2")
    await recorder.wait_calls(1)

    config.touch()  # mtime only
    config.write_bytes(b"backend v2")  # same bytes: modify and close-write events, same sha256
    template.touch()
    template.write_bytes(template.read_bytes())
    replacement = config.with_name(".haproxy.cfg.new")
    replacement.write_bytes(b"backend v2")
    os.replace(replacement, config)  # a new inode with the same bytes

    sentinel.write_bytes(b"sentinel 1")
    await recorder.wait_calls(2)
    assert recorder.path_sets == [frozenset({config}), frozenset({sentinel})]


async def test_an_unrelated_file_in_the_same_directory_does_not_call(files, make_watcher) -> None:
    config, _, _ = files
    recorder = Recorder()
    make_watcher([config], recorder)

    unrelated = config.with_name("unrelated.txt")
    for i in range(5):
        unrelated.write_bytes(f"noise {i}".encode())
    os.replace(unrelated, config.with_name("other.txt"))
    config.with_name("other.txt").unlink()

    config.write_bytes(b"backend v2")
    await recorder.wait_calls(1)
    assert recorder.path_sets == [frozenset({config})]
    config.write_bytes(b"backend v3")
    await recorder.wait_calls(2)
    assert recorder.path_sets == [frozenset({config})] * 2


async def test_a_failing_callback_is_logged_and_the_watcher_keeps_working(
    files, make_watcher, caplog: pytest.LogCaptureFixture
) -> None:
    config, _, _ = files
    recorder = Recorder(fail_on={1})
    make_watcher([config], recorder)

    with caplog.at_level(logging.ERROR, logger="sidecar.watch"):
        config.write_bytes(b"backend broken")
        await recorder.wait_calls(1)
        await async_wait_until(lambda: caplog.records, DEADLINE, message="the failure logged")
    [record] = caplog.records
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None and "callback 1 fails" in str(record.exc_info[1])

    config.write_bytes(b"backend fixed")
    await recorder.wait_calls(2)
    assert recorder.calls[1].paths == frozenset({config})
    assert recorder.calls[1].contents == {config: b"backend fixed"}


async def test_a_touch_retries_a_failed_callback(files, make_watcher) -> None:
    # The hashes of a failed call are not committed, so the same content is offered again.
    config, _, _ = files
    recorder = Recorder(fail_on={1})
    make_watcher([config], recorder)

    config.write_bytes(b"backend v2")
    await recorder.wait_calls(1)
    config.write_bytes(b"backend v2")
    await recorder.wait_calls(2)
    assert recorder.path_sets == [frozenset({config})] * 2


async def test_changes_during_a_slow_callback_cause_exactly_one_more_call(files, make_watcher) -> None:
    config, template, sentinel = files
    recorder = Recorder(block_on={1})
    make_watcher([config, template, sentinel], recorder)

    config.write_bytes(b"backend v2")
    await asyncio.wait_for(recorder.entered.wait(), DEADLINE)
    # Several bursts while the first callback runs, each followed by more than the debounce, so the
    # debounce timer fires repeatedly during the callback.
    for i in range(3):
        config.write_bytes(f"backend v3.{i}".encode())
        template.write_bytes(f"template v3.{i}".encode())
        await asyncio.sleep(DEBOUNCE * 2)
    assert len(recorder.calls) == 1
    recorder.release.set()

    await recorder.wait_calls(2)
    assert recorder.calls[1].paths == frozenset({config, template})
    assert recorder.calls[1].contents == {config: b"backend v3.2", template: b"template v3.2"}

    sentinel.write_bytes(b"sentinel 1")
    await recorder.wait_calls(3)
    assert recorder.path_sets == [
        frozenset({config}),
        frozenset({config, template}),
        frozenset({sentinel}),
    ]
    assert recorder.max_running == 1


async def test_a_symlinked_file_is_watched_through_its_target(tmp_path: Path, make_watcher) -> None:
    real = tmp_path / "real"
    real.mkdir()
    target = real / "haproxy.cfg"
    target.write_bytes(b"v1")
    other = real / "haproxy.cfg.other"
    other.write_bytes(b"other")
    links = tmp_path / "links"
    links.mkdir()
    link = links / "haproxy.cfg"
    link.symlink_to(target)
    recorder = Recorder()
    make_watcher([link], recorder)

    target.write_bytes(b"v2")  # edited in place, in the target's directory
    await recorder.wait_calls(1)
    assert recorder.calls[0].paths == frozenset({link})
    assert recorder.calls[0].contents == {link: b"v2"}

    new_link = links / ".haproxy.cfg.new"
    new_link.symlink_to(other)
    os.replace(new_link, link)  # the link re-pointed atomically
    await recorder.wait_calls(2)
    assert recorder.calls[1].paths == frozenset({link})
    assert recorder.calls[1].contents == {link: b"other"}


async def test_stop_cancels_a_pending_debounce_and_returns_in_time(files) -> None:
    config, _, _ = files
    recorder = Recorder()
    loop = asyncio.get_running_loop()
    async with FileWatcher([config], recorder, debounce=1.0) as watcher:
        config.write_bytes(b"backend v2")
        await async_wait_until(lambda: watcher._timer is not None, DEADLINE, message="debounce armed")
        started = loop.time()
        await watcher.stop(timeout=5.0)
        assert loop.time() - started < 5.0
        assert watcher._timer is None
        assert watcher._observer is None
    await watcher.stop()  # idempotent, also via __aexit__
    # The cancelled debounce never fires: wait past it (a bounded window; there is no event to wait for).
    await asyncio.sleep(1.5)
    assert recorder.calls == []


async def test_stop_bounds_a_hanging_callback(files) -> None:
    config, _, _ = files
    recorder = Recorder(block_on={1})  # never released
    loop = asyncio.get_running_loop()
    watcher = FileWatcher([config], recorder, debounce=DEBOUNCE)
    watcher.start()
    config.write_bytes(b"backend v2")
    await asyncio.wait_for(recorder.entered.wait(), DEADLINE)
    runner = watcher._runner
    assert runner is not None
    started = loop.time()
    await watcher.stop(timeout=1.0)
    assert loop.time() - started < 1.0 + 1.0 + 0.5  # timeout, then at most 1 s for the cancellation
    assert runner.cancelled()
    assert recorder.running == 0


async def test_start_fails_for_a_missing_directory(tmp_path: Path) -> None:
    watcher = FileWatcher([tmp_path / "missing" / "haproxy.cfg"], Recorder())
    with pytest.raises(OSError):
        watcher.start()
    await watcher.stop()


def test_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        FileWatcher([], Recorder())
    with pytest.raises(ValueError):
        FileWatcher([tmp_path / "a"], Recorder(), debounce=-1)
