"""FileWatcher: the ways routes.yaml gets edited in practice, under inotify and under polling alone.

Inotify runs use a 5 s poll interval, so a change noticed within 0.9 s can only have come from inotify.
Checks that something does NOT happen use a barrier instead of a sleep: a sentinel file in the same
directory gets new content, and once its call arrives the watcher has looked at every file again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gateway.routing import watch
from gateway.routing.watch import FileWatcher, content_digest

INOTIFY_MAX_LATENCY = 0.9  # well under the 5 s poll interval, well over the 0.05 s debounce


@dataclass
class Call:
    path: str
    content: bytes | None  # what on_change could read when it was called
    at: float


@dataclass
class Calls:
    calls: list[Call] = field(default_factory=list)

    def __call__(self, path: str) -> None:
        try:
            content: bytes | None = Path(path).read_bytes()
        except OSError:
            content = None
        self.calls.append(Call(path, content, time.monotonic()))

    def of(self, path: Path) -> list[Call]:
        return [c for c in self.calls if c.path == str(path)]


async def wait_for(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.005)


def make_file(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    # Backdated so a later same-size write still changes the mtime that polling compares.
    past = time.time_ns() - 10_000_000_000
    os.utime(path, ns=(past, past), follow_symlinks=False)
    return path


def inotify_fds() -> int:
    fds = os.listdir("/proc/self/fd")
    return sum(1 for fd in fds if _readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify")


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


@contextlib.asynccontextmanager
async def watching(
    paths: list[Path], mode: str, on_change: Callable[[str], None] | None = None, **kwargs: float
) -> AsyncIterator[tuple[FileWatcher, Calls]]:
    calls = Calls()
    inotify = mode == "inotify"
    watcher = FileWatcher(
        paths,
        on_change or calls,
        poll_interval=kwargs.pop("poll_interval", 5.0 if inotify else 0.1),
        use_inotify=inotify,
        **kwargs,
    )
    await watcher.start()
    try:
        assert watcher.mode == mode
        yield watcher, calls
    finally:
        watcher.stop()


class Scenario:
    """A watched file plus a sentinel beside it, and the ways to wait on them."""

    def __init__(self, target: Path, sentinel: Path, calls: Calls, mode: str) -> None:
        self.target, self.sentinel, self.calls, self.mode = target, sentinel, calls, mode
        self._sentinel_version = 0

    async def expect_change(self, action: Callable[[], object], content: bytes) -> float:
        """Run `action`; wait for a call that reads `content`; return the latency."""
        before, started = len(self.calls.of(self.target)), time.monotonic()
        action()
        await wait_for(lambda: any(c.content == content for c in self.calls.of(self.target)[before:]))
        latency = next(c.at for c in self.calls.of(self.target)[before:] if c.content == content) - started
        if self.mode == "inotify":
            assert latency < INOTIFY_MAX_LATENCY
        return latency

    async def barrier(self) -> None:
        """Return once the watcher has looked at every file after everything done so far."""
        self._sentinel_version += 1
        content = b"sentinel %d\n" % self._sentinel_version
        before = len(self.calls.of(self.sentinel))
        self.sentinel.write_bytes(content)
        await wait_for(lambda: any(c.content == content for c in self.calls.of(self.sentinel)[before:]))

    async def expect_no_change(self, action: Callable[[], object]) -> None:
        before = len(self.calls.of(self.target))
        action()
        await self.barrier()
        assert self.calls.of(self.target)[before:] == []


@pytest.fixture(params=["inotify", "polling"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def scenario(tmp_path: Path, mode: str) -> AsyncIterator[Scenario]:
    target = make_file(tmp_path / "routes.yaml", b"version: 1\n")
    sentinel = make_file(tmp_path / "sentinel", b"sentinel 0\n")
    async with watching([target, sentinel], mode) as (_, calls):
        yield Scenario(target, sentinel, calls, mode)


async def test_in_place_write(scenario: Scenario) -> None:
    await scenario.expect_change(lambda: scenario.target.write_bytes(b"version: 2\n"), b"version: 2\n")
    # Appending through an open file, as `echo >>` does.
    with scenario.target.open("ab") as f:

        def append() -> None:
            f.write(b"more\n")
            f.flush()

        await scenario.expect_change(append, b"version: 2\nmore\n")
    assert len(scenario.calls.of(scenario.target)) == 2


async def test_write_temp_then_rename(scenario: Scenario) -> None:
    def editor_save() -> None:
        tmp = scenario.target.with_name(".routes.yaml.swp")
        tmp.write_bytes(b"version: 2 # saved by an editor\n")
        os.replace(tmp, scenario.target)

    await scenario.expect_change(editor_save, b"version: 2 # saved by an editor\n")
    # The new inode gets noticed too, not only the first one.
    await scenario.expect_change(lambda: scenario.target.write_bytes(b"version: 3\n"), b"version: 3\n")


async def test_delete_then_recreate(scenario: Scenario) -> None:
    await scenario.expect_no_change(scenario.target.unlink)
    await scenario.expect_no_change(lambda: make_file(scenario.target, b"version: 1\n"))  # same bytes back
    await scenario.expect_no_change(scenario.target.unlink)
    await scenario.expect_change(lambda: scenario.target.write_bytes(b"version: 22\n"), b"version: 22\n")


async def test_touch_and_chmod_do_not_call(scenario: Scenario) -> None:
    await scenario.expect_no_change(lambda: os.utime(scenario.target))
    await scenario.expect_no_change(lambda: scenario.target.chmod(0o600))


async def test_identical_rewrite_does_not_call(scenario: Scenario) -> None:
    await scenario.expect_no_change(lambda: scenario.target.write_bytes(b"version: 1\n"))

    def rename_identical() -> None:
        tmp = scenario.target.with_name("routes.yaml.tmp")
        tmp.write_bytes(b"version: 1\n")
        os.replace(tmp, scenario.target)

    await scenario.expect_no_change(rename_identical)


async def test_file_missing_at_start_calls_when_it_appears(tmp_path: Path, mode: str) -> None:
    target, sentinel = tmp_path / "routes.yaml", make_file(tmp_path / "sentinel", b"sentinel 0\n")
    async with watching([target, sentinel], mode) as (_, calls):
        await Scenario(target, sentinel, calls, mode).expect_change(lambda: target.write_bytes(b"x"), b"x")


async def test_kubernetes_configmap_symlink_swap(tmp_path: Path, mode: str) -> None:
    # kubelet's layout: routes.yaml -> ..data/routes.yaml, ..data -> ..<timestamp>, swapped atomically.
    def publish(stamp: str, content: bytes, first: bool = False) -> None:
        data_dir = tmp_path / f"..2026_11_21_{stamp}"
        data_dir.mkdir()
        (data_dir / "routes.yaml").write_bytes(content)
        if first:
            (tmp_path / "..data").symlink_to(data_dir.name)
            (tmp_path / "routes.yaml").symlink_to("..data/routes.yaml")
            return
        old = os.readlink(tmp_path / "..data")
        (tmp_path / "..data_tmp").symlink_to(data_dir.name)
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
        for leftover in (tmp_path / old).iterdir():
            leftover.unlink()
        (tmp_path / old).rmdir()

    publish("10_00_00.1", b"version: 1\n", first=True)
    target, sentinel = tmp_path / "routes.yaml", make_file(tmp_path / "sentinel", b"sentinel 0\n")
    async with watching([target, sentinel], mode) as (_, calls):
        s = Scenario(target, sentinel, calls, mode)
        await s.expect_change(lambda: publish("10_01_00.2", b"version: 2\n"), b"version: 2\n")
        await s.expect_change(lambda: publish("10_02_00.3", b"version: 333\n"), b"version: 333\n")
        await s.expect_no_change(lambda: publish("10_03_00.4", b"version: 333\n"))
        assert [c.path for c in calls.of(target)] == [str(target)] * 2


async def test_symlink_into_another_directory(tmp_path: Path, mode: str) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    real = make_file(elsewhere / "routes.yaml", b"version: 1\n")
    here = tmp_path / "here"
    here.mkdir()
    target, sentinel = here / "routes.yaml", make_file(here / "sentinel", b"sentinel 0\n")
    target.symlink_to(real)
    async with watching([target, sentinel], mode) as (_, calls):
        s = Scenario(target, sentinel, calls, mode)
        # Only the watch on `elsewhere` sees this edit: nothing changes in the link's directory.
        await s.expect_change(lambda: real.write_bytes(b"version: 2\n"), b"version: 2\n")
        other = make_file(elsewhere / "routes-b.yaml", b"version: b\n")

        def retarget() -> None:
            (here / "link.tmp").symlink_to(other)
            os.replace(here / "link.tmp", target)

        await s.expect_change(retarget, b"version: b\n")


async def test_quick_writes_are_debounced(tmp_path: Path) -> None:
    target = make_file(tmp_path / "routes.yaml", b"version: 0\n")
    sentinel = make_file(tmp_path / "sentinel", b"sentinel 0\n")
    async with watching([target, sentinel], "inotify", debounce=0.2) as (_, calls):
        s = Scenario(target, sentinel, calls, "inotify")
        # A burst with no loop iteration in between: every event is queued before the first look.
        for i in range(1, 21):
            target.write_bytes(b"version: %d\n" % i)
        await s.barrier()
        assert [c.content for c in calls.of(target)] == [b"version: 20\n"]

        # Spread over several loop iterations: at most one look per debounce window, plus the last.
        started = time.monotonic()
        for i in range(21, 31):
            target.write_bytes(b"version: %d\n" % i)
            await asyncio.sleep(0.01)
        elapsed = time.monotonic() - started
        await s.barrier()
        burst = calls.of(target)[1:]
        assert 1 <= len(burst) <= int(elapsed / 0.2) + 2
        assert burst[-1].content == b"version: 30\n"


async def test_inotify_notices_edit_that_leaves_stat_unchanged(tmp_path: Path) -> None:
    # Two same-size writes within one kernel timestamp tick look identical to stat; inotify must hash.
    target = make_file(tmp_path / "routes.yaml", b"version: 1\n")
    sentinel = make_file(tmp_path / "sentinel", b"sentinel 0\n")
    before = os.stat(target)

    def same_tick_write() -> None:
        target.write_bytes(b"version: 2\n")
        os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))

    async with watching([target, sentinel], "inotify") as (_, calls):
        await Scenario(target, sentinel, calls, "inotify").expect_change(same_tick_write, b"version: 2\n")


async def test_polling_notices_same_size_edit(tmp_path: Path) -> None:
    target = make_file(tmp_path / "routes.yaml", b"version: 1\n")
    async with watching([target], "polling", poll_interval=0.2) as (_, calls):
        started = time.monotonic()
        target.write_bytes(b"version: 2\n")
        await wait_for(lambda: len(calls.calls) == 1)
        # Within about one interval; the generous bound only guards against a wildly late poll.
        assert calls.calls[0].at - started < 2.0
        assert calls.calls[0].content == b"version: 2\n"


async def test_falls_back_to_polling_when_inotify_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class NoInotify:
        def __init__(self) -> None:
            raise OSError(24, "Too many open files")

    monkeypatch.setattr(watch, "_Inotify", NoInotify)
    target = make_file(tmp_path / "routes.yaml", b"version: 1\n")
    calls = Calls()
    watcher = FileWatcher([target], calls, poll_interval=0.1)
    with caplog.at_level(logging.WARNING, logger="gateway.routing.watch"):
        await watcher.start()
    try:
        assert watcher.mode == "polling"
        assert "inotify unavailable" in caplog.text
        target.write_bytes(b"version: 22\n")
        await wait_for(lambda: len(calls.calls) == 1)
    finally:
        watcher.stop()


async def test_on_change_exception_is_logged_and_watching_continues(
    tmp_path: Path, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    target = make_file(tmp_path / "routes.yaml", b"version: 1\n")
    seen: list[bytes] = []

    def on_change(path: str) -> None:
        seen.append(Path(path).read_bytes())
        if len(seen) == 1:
            raise ValueError("bad routes")

    async with watching([target], mode, on_change=on_change):
        target.write_bytes(b"version: 2\n")
        await wait_for(lambda: len(seen) == 1)
        target.write_bytes(b"version: 33\n")
        await wait_for(lambda: len(seen) == 2)
    assert seen == [b"version: 2\n", b"version: 33\n"]
    assert "bad routes" in caplog.text


async def test_stop_releases_the_fd_and_ends_calls(tmp_path: Path) -> None:
    target = make_file(tmp_path / "routes.yaml", b"version: 1\n")
    calls = Calls()
    fds_before = inotify_fds()
    watcher = FileWatcher([target], calls, poll_interval=0.05, debounce=0.01)
    await watcher.start()
    assert watcher.mode == "inotify"
    assert inotify_fds() == fds_before + 1
    target.write_bytes(b"version: 2\n")
    await wait_for(lambda: len(calls.calls) == 1)

    watcher.stop()
    watcher.stop()
    assert inotify_fds() == fds_before
    target.write_bytes(b"version: 33\n")
    await asyncio.sleep(0.3)  # several poll intervals and debounce windows: nothing may arrive
    assert len(calls.calls) == 1


def test_content_digest(tmp_path: Path) -> None:
    real = make_file(tmp_path / "a.yaml", b"hello\n")
    link = tmp_path / "link.yaml"
    link.symlink_to(real)
    assert content_digest(real) == hashlib.sha256(b"hello\n").hexdigest()
    assert content_digest(str(link)) == content_digest(real)
    assert content_digest(tmp_path / "missing") is None
    assert content_digest(tmp_path) is None  # a directory cannot be read as bytes
