"""State shared by the processes of one gateway on one machine, as files in a state directory.

- `workers/<pid>.json`: each worker's snapshot, rewritten about once a second: its cumulative request
  statistics, the revision it serves, its reload history and what its health checks see.
- `overrides.json`: temporary weight overrides set by operators; every worker watches it.
- `audit.log`: one JSON line per operator action: who, what, when.
- `admin-token`: the admin token generated when none was configured (mode 0600).

Files are replaced atomically (write a temporary file, then rename), so a reader never sees half a
snapshot. A snapshot is still checked field by field as it is read (`gateway.state.records`), and one
that is malformed anyway (a full disk, a hand edit, another release) is skipped with a warning.
Processes on other machines do not see these files; the shared store carries what must cross machines.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
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


def write_json(path: Path, data: Any) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(data, separators=(",", ":")))
    os.replace(temporary, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def prepare(state_dir: Path) -> None:
    (state_dir / WORKERS).mkdir(parents=True, exist_ok=True)


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


def append_audit(state_dir: Path, who: str, action: str, details: dict[str, Any]) -> dict[str, Any]:
    entry = {"time": time.time(), "who": who, "action": action, **details}
    with open(state_dir / AUDIT, "a") as log:
        log.write(json.dumps(entry) + "\n")
    return entry


def read_audit(state_dir: Path, limit: int = 100) -> list[dict[str, Any]]:
    try:
        lines = (state_dir / AUDIT).read_text().splitlines()
    except OSError:
        return []
    entries = []
    for line in lines[-limit:]:
        with contextlib.suppress(ValueError):
            entries.append(json.loads(line))
    return entries
