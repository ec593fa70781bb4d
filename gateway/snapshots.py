"""State shared by the processes of one gateway on one machine, as files in a state directory.

- `workers/<pid>.json`: each worker's snapshot, rewritten about once a second: its cumulative request
  statistics, the revision it serves, its reload history and what its health checks see.
- `overrides.json`: temporary weight overrides set by operators; every worker watches it.
- `audit.log`: one JSON line per operator action: who, what, when.
- `admin-token`: the admin token generated when none was configured (mode 0600).

Files are replaced atomically (write a temporary file, then rename), so a reader never sees half a
snapshot. Processes on other machines do not see these files; the shared store carries what must
cross machines.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

WORKERS = "workers"
OVERRIDES = "overrides.json"
AUDIT = "audit.log"
ADMIN_TOKEN = "admin-token"
STALE_AFTER = 5.0  # seconds without a new snapshot before a worker counts as gone


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


def write_snapshot(state_dir: Path, snapshot: dict[str, Any]) -> None:
    write_json(state_dir / WORKERS / f"{snapshot['pid']}.json", snapshot)


def read_snapshots(state_dir: Path) -> list[dict[str, Any]]:
    """Every worker's latest snapshot, live or not (a dead worker's counts still happened)."""
    snapshots = []
    for path in sorted((state_dir / WORKERS).glob("*.json")):
        data = read_json(path)
        if isinstance(data, dict) and "pid" in data:
            data["alive"] = time.time() - float(data.get("time", 0)) < STALE_AFTER
            snapshots.append(data)
    return snapshots


def forget_worker(state_dir: Path, pid: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        (state_dir / WORKERS / f"{pid}.json").unlink()


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
