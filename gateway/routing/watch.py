"""Notice when the content of a watched file changes, so routes.yaml edits apply within a second.

inotify gives notice within milliseconds. A cheap stat poll runs beside it all the time, because inotify
can miss changes (network mounts, some overlay setups, a queue overflow), can fail to start once the
per-user instance limit is reached, and does not exist outside Linux. Only a new digest of the bytes
counts as a change, so touches, chmods and identical rewrites never reach the caller.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import hashlib
import logging
import os
import struct
import sys
from collections.abc import Callable, Sequence

log = logging.getLogger("gateway.routing.watch")

# From <sys/inotify.h>.
IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
# Directory watches, not file watches: a file watch follows the inode, so it goes deaf when an editor
# renames a new file over the old one or when Kubernetes swaps the `..data` symlink of a ConfigMap.
_MASK = IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_ATTRIB | IN_MODIFY
_EVENT_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len; then `len` bytes of NUL-padded name

_Stat = tuple[int, int, int, int, str]  # st_dev, st_ino, st_size, st_mtime_ns, resolved path


def content_digest(path: str | os.PathLike[str]) -> str | None:
    """sha256 hex of the file's bytes (following symlinks), None if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def _stat(path: str) -> _Stat | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, os.path.realpath(path))


def _directories(path: str) -> set[str]:
    """The directory holding `path`, and the one holding its final target when it is a symlink."""
    return {os.path.dirname(os.path.abspath(path)), os.path.dirname(os.path.realpath(path))}


class _Inotify:
    """One inotify instance; closing its fd drops all of its watches at once."""

    def __init__(self) -> None:
        if not sys.platform.startswith("linux"):
            raise OSError(errno.ENOSYS, "inotify exists only on Linux")
        libc = ctypes.CDLL(None, use_errno=True)
        self._add = libc.inotify_add_watch
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._rm = libc.inotify_rm_watch
        self._rm.argtypes = [ctypes.c_int, ctypes.c_int]
        # IN_NONBLOCK and IN_CLOEXEC are defined as O_NONBLOCK and O_CLOEXEC.
        self.fd = self._checked(libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))

    @staticmethod
    def _checked(value: int) -> int:
        if value < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        return value

    def add_watch(self, directory: str) -> int:
        return self._checked(self._add(self.fd, os.fsencode(directory), _MASK | IN_ONLYDIR))

    def rm_watch(self, wd: int) -> None:
        self._rm(self.fd, wd)  # fails only when the kernel dropped the watch already; nothing to do then

    def read_events(self) -> list[tuple[int, int]]:
        """(wd, mask) of every queued event. Names are skipped: any event means "look again"."""
        events: list[tuple[int, int]] = []
        while True:
            try:
                data = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                return events
            if not data:
                return events
            offset = 0
            while offset < len(data):
                wd, mask, _cookie, name_len = _EVENT_HEADER.unpack_from(data, offset)
                events.append((wd, mask))
                offset += _EVENT_HEADER.size + name_len

    def close(self) -> None:
        os.close(self.fd)


class FileWatcher:
    """Calls `on_change(path)` on the event loop when the CONTENT of a watched file changes.

    `path` is passed back as given. A file that goes missing is not a change; it is one when it comes
    back with different bytes. Use from the event loop's thread only.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        on_change: Callable[[str], None],
        *,
        poll_interval: float = 1.0,
        debounce: float = 0.05,
        use_inotify: bool = True,
    ) -> None:
        if poll_interval <= 0 or debounce < 0:
            raise ValueError("poll_interval must be positive and debounce not negative")
        self._paths = list(dict.fromkeys(os.fspath(p) for p in paths))
        self._on_change = on_change
        self._poll_interval = poll_interval
        self._debounce = debounce
        self._use_inotify = use_inotify
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inotify: _Inotify | None = None
        self._watches: dict[str, tuple[int, int, int]] = {}  # directory -> (wd, st_dev, st_ino)
        self._stats: dict[str, _Stat | None] = {}
        self._digests: dict[str, str] = {}  # last content seen; kept while the file is missing
        self._debounce_timer: asyncio.TimerHandle | None = None
        self._poll_timer: asyncio.TimerHandle | None = None

    @property
    def mode(self) -> str:
        return "inotify" if self._inotify is not None else "polling"

    async def start(self) -> None:
        if self._loop is not None:
            raise RuntimeError("FileWatcher is already started")
        self._loop = loop = asyncio.get_running_loop()
        if self._use_inotify:
            try:
                self._inotify = _Inotify()
                loop.add_reader(self._inotify.fd, self._on_readable)
            except (OSError, AttributeError, NotImplementedError) as exc:
                log.warning("inotify unavailable (%s); polling every %ss instead", exc, self._poll_interval)
                self._close_inotify()
        # Watches go in before the first fingerprints, so an edit landing in between still queues an event.
        self._sync_watches()
        for path in self._paths:
            self._refresh(path, force=True)
        self._poll_timer = loop.call_later(self._poll_interval, self._poll)

    def stop(self) -> None:
        for timer in (self._debounce_timer, self._poll_timer):
            if timer is not None:
                timer.cancel()
        self._debounce_timer = self._poll_timer = None
        self._close_inotify()
        self._loop = None

    def _close_inotify(self) -> None:
        if self._inotify is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(self._inotify.fd)
        self._inotify.close()
        self._inotify = None
        self._watches.clear()

    def _sync_watches(self) -> None:
        """Watch the directories the paths need now; a ConfigMap swap moves the target to a new one."""
        if self._inotify is None:
            return
        wanted = {d for path in self._paths for d in _directories(path)}
        for directory in [d for d in self._watches if d not in wanted]:
            self._unwatch(directory)
        for directory in wanted:
            try:
                st = os.stat(directory)
                if self._watches.get(directory, (0, 0, 0))[1:] == (st.st_dev, st.st_ino):
                    continue
                self._unwatch(directory)  # the path now names another directory, renamed into place
                self._watches[directory] = (self._inotify.add_watch(directory), st.st_dev, st.st_ino)
            except OSError as exc:
                # Missing directory or watch limit reached: polling covers it, and every poll retries.
                log.debug("cannot watch %s: %s", directory, exc)

    def _unwatch(self, directory: str) -> None:
        entry = self._watches.pop(directory, None)
        # Two directory paths leading to one inode share a wd; keep it while the other still needs it.
        if entry and self._inotify and all(w != entry[0] for w, _, _ in self._watches.values()):
            self._inotify.rm_watch(entry[0])

    def _on_readable(self) -> None:
        if self._inotify is None or self._loop is None:
            return
        try:
            events = self._inotify.read_events()
        except OSError:
            log.exception("reading inotify events failed; polling only from now on")
            self._close_inotify()
            return
        for wd, mask in events:
            if mask & IN_IGNORED:  # the directory is gone; forget it so a later sync watches it anew
                self._watches = {d: e for d, e in self._watches.items() if e[0] != wd}
        # A burst (an editor's write, rename and chmod) gets one look, `debounce` after its first event.
        if events and self._debounce_timer is None:
            self._debounce_timer = self._loop.call_later(self._debounce, self._after_events)

    def _after_events(self) -> None:
        self._debounce_timer = None
        # Events carry directory names only, and a ConfigMap swap renames `..data`, not the file itself,
        # so every file gets looked at; there are a handful and hashing a small file is cheap.
        self._check_all(force=True)

    def _poll(self) -> None:
        self._check_all(force=False)
        if self._loop is not None:
            self._poll_timer = self._loop.call_later(self._poll_interval, self._poll)

    def _check_all(self, *, force: bool) -> None:
        try:
            for path in self._paths:
                if self._loop is None:  # on_change stopped us
                    return
                if self._refresh(path, force=force):
                    self._notify(path)
            self._sync_watches()
        except Exception:
            log.exception("checking watched files failed")

    def _refresh(self, path: str, *, force: bool) -> bool:
        """Take new fingerprints of `path`; True when its content differs from the last seen."""
        stat = _stat(path)
        if not force and stat == self._stats.get(path):
            return False
        # Stat before reading: if the file changes in between, the stored stat is stale and the next poll
        # reads again. The other order could pair a new stat with old bytes and never look again.
        self._stats[path] = stat
        digest = content_digest(path)
        if digest is None:
            self._stats[path] = None  # unreadable but there (permissions): polls retry until it reads
            return False
        # A file missing at start counts as changed when it first appears; start() ignores this result.
        changed = digest != self._digests.get(path)
        self._digests[path] = digest
        return changed

    def _notify(self, path: str) -> None:
        try:
            self._on_change(path)
        except Exception:
            log.exception("on_change(%r) failed; still watching", path)
