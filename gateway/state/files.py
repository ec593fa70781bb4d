"""State shared by the processes of one gateway on one machine, as files in a state directory.

- `workers/<pid>.json`: each worker's snapshot, rewritten about once a second: its cumulative request
  statistics, the revision it serves, its reload history and what its health checks see.
- `overrides.json`: temporary weight overrides set by operators; every worker watches it.
- `audit.log`: one JSON line per operator action: who, what, when.
- `admin-token`: the admin token generated when none was configured (mode 0600).

The directory holds the admin token and decides what every worker routes by, so it must be this
user's alone: `prepare` creates it 0700 and refuses one that is a symlink, belongs to another user or
is writable by others. Files are written through `O_NOFOLLOW` under a temporary name nobody can
predict, then renamed into place (a rename replaces a planted symlink rather than following it), so a
reader never sees half a snapshot. A snapshot is still checked field by field as it is read
(`gateway.state.records`), and one that is malformed anyway (a full disk, a hand edit, another release)
is skipped with a warning.
Processes on other machines do not see these files; the shared store carries what must cross machines.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import stat
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from gateway.state.records import WorkerSnapshot
from gateway.typed_json import RecordError, WarnOnce, parse_json

log = logging.getLogger("gateway.state")

WORKERS = "workers"
OVERRIDES = "overrides.json"
AUDIT = "audit.log"
ADMIN_TOKEN = "admin-token"
STALE_AFTER = 5.0  # seconds without a new snapshot before a worker counts as gone

_warned = WarnOnce()  # snapshot paths already reported unreadable, with the mtime reported


class UnsafeStateDir(Exception):
    """The state directory cannot be trusted (or made); the gateway refuses to start, saying why."""


def default_state_dir(port: int) -> Path:
    """Where a gateway on `port` keeps its state when --state-dir is not given: the user's runtime
    directory if it has a private one, else ~/.local/state (never a name under /tmp, which another
    user could create first)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime and os.path.isabs(runtime):
        with contextlib.suppress(OSError):
            info = os.stat(runtime)
            if stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid() and not info.st_mode & 0o077:
                return Path(runtime) / "model-gateway" / str(port)
    base = os.environ.get("XDG_STATE_HOME", "")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".local" / "state"
    return root / "model-gateway" / str(port)


def private_dir(path: Path) -> None:
    """Make `path` (and missing parents) or check it: a real directory of this user, 0700."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
        # Opened, not stat'ed by name: what is checked and tightened is what a later swap cannot replace.
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        if os.path.islink(path):
            raise UnsafeStateDir(f"state directory {path} is a symlink; give a real directory") from None
        raise UnsafeStateDir(f"cannot create the state directory {path}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if info.st_uid != os.geteuid():
            raise UnsafeStateDir(
                f"state directory {path} belongs to uid {info.st_uid}, not to this user ({os.geteuid()}); "
                "another user may have created it: remove it or choose another --state-dir"
            )
        if info.st_mode & 0o022:
            raise UnsafeStateDir(
                f"state directory {path} is writable by other users (mode {stat.S_IMODE(info.st_mode):o}); "
                "chmod 700 it or choose another --state-dir"
            )
        if info.st_mode & 0o077:
            os.fchmod(fd, 0o700)  # only readable by others: this user's own, so tighten it
    finally:
        os.close(fd)


def _open_new(path: Path, flags: int) -> int:
    # O_NOFOLLOW: a symlink planted at the name fails the open instead of redirecting the write.
    return os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def write_json(path: Path, data: Any) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp")
    fd = _open_new(temporary, os.O_WRONLY | os.O_EXCL)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(data, separators=(",", ":")))
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def prepare(state_dir: Path) -> None:
    """Create or check the state directory and its workers/ (UnsafeStateDir if it cannot be trusted)."""
    private_dir(state_dir)
    private_dir(state_dir / WORKERS)


def has_snapshot(state_dir: Path, pid: int) -> bool:
    """Whether the worker `pid` has published (so it got as far as serving)."""
    return (state_dir / WORKERS / f"{pid}.json").exists()


def write_snapshot(state_dir: Path, snapshot: WorkerSnapshot) -> None:
    write_json(state_dir / WORKERS / f"{snapshot.pid}.json", snapshot.to_json())


def read_snapshots(state_dir: Path) -> list[WorkerSnapshot]:
    """Every worker's latest snapshot, live or not (a dead worker's counts still happened).

    A file that is not a valid snapshot is skipped with a warning, once per version of the file: one
    bad file must not take down every view that reads the others.
    """
    snapshots = []
    now = time.time()
    for path in sorted((state_dir / WORKERS).glob("*.json")):
        mtime: int | None = None
        try:
            mtime = path.stat().st_mtime_ns
            snapshot = WorkerSnapshot.from_json(parse_json(path.read_bytes()))
        except FileNotFoundError:
            continue  # the supervisor cleared it since the listing
        except (OSError, RecordError) as exc:
            if _warned.first(path, mtime):
                log.warning("skipping worker snapshot %s: %s", path, exc)
            continue
        _warned.forget(path)
        snapshots.append(replace(snapshot, alive=now - snapshot.time < STALE_AFTER))
    return snapshots


@dataclass(frozen=True)
class Override:
    """An operator's temporary weights for a model, valid while the file leaves that model unchanged."""

    model: str
    weights: tuple[tuple[str, int], ...]
    model_digest: str  # of the model's spec when the override was set
    set_by: str
    set_at: float
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["weights"] = dict(self.weights)
        return data

    @staticmethod
    def from_json(data: dict[str, Any]) -> Override:
        weights = tuple((str(v), int(w)) for v, w in dict(data["weights"]).items())
        return Override(
            str(data["model"]),
            weights,
            str(data["model_digest"]),
            str(data.get("set_by", "")),
            float(data.get("set_at", 0)),
            str(data.get("reason", "")),
        )


def read_overrides(state_dir: Path) -> dict[str, Override]:
    data = read_json(state_dir / OVERRIDES)
    if not isinstance(data, dict):
        return {}
    overrides = {}
    for model, entry in data.items():
        with contextlib.suppress(KeyError, TypeError, ValueError):
            overrides[model] = Override.from_json(entry)
    return overrides


def write_overrides(state_dir: Path, overrides: dict[str, Override]) -> None:
    write_json(state_dir / OVERRIDES, {model: o.to_json() for model, o in overrides.items()})


class AuditLog:
    """`audit.log`: one JSON line per operator or controller action.

    Best-effort: the action has happened by the time it is recorded (a key created, a reload done), so
    a write that fails (full disk, a directory in the way, a bad permission) is logged and counted in
    `failures` for the metrics, and never fails the action or loses its answer.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / AUDIT
        self.failures = 0

    def append(self, who: str, action: str, details: dict[str, Any]) -> dict[str, Any] | None:
        """The entry written, or None if it could not be."""
        entry = {"time": time.time(), "who": who, "action": action, **details}
        try:
            line = (json.dumps(entry) + "\n").encode()
            fd = _open_new(self.path, os.O_WRONLY | os.O_APPEND)
            try:
                # One write to an O_APPEND file: lines of several processes never interleave.
                if os.write(fd, line) != len(line):
                    raise OSError("short write (disk full?)")
            finally:
                os.close(fd)
        except (OSError, TypeError, ValueError) as exc:
            self.failures += 1
            log.error("audit log %s: %s; not recorded: %s by %s", self.path, exc, action, who)
            return None
        return entry

    def read(self, limit: int = 100) -> list[dict[str, Any]]:
        try:
            lines = self.path.read_text().splitlines()
        except (OSError, UnicodeDecodeError):
            return []
        entries = []
        for line in lines[-limit:]:
            with contextlib.suppress(ValueError):
                entries.append(json.loads(line))
        return entries
