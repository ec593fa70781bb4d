"""Fault-injection knobs of a local Triton version: extra latency, an error rate, and a hang.

A test changes a running version's behaviour by rewriting its knobs file; the serving process notices the
new file on the next request (it compares the file's stat, which is cheaper than a watcher thread and
needs no timing assumptions).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

LOG = logging.getLogger(__name__)

# Long enough to outlast any client timeout, so a hung version looks exactly like a stuck GPU.
HANG_SECONDS = 3600.0


@dataclass(frozen=True)
class Knobs:
    """How a version misbehaves: `delay_ms` added to every batch, `error_rate` of batches failing, `hang`."""

    delay_ms: float = 0.0
    error_rate: float = 0.0
    hang: bool = False

    def __post_init__(self) -> None:
        if self.delay_ms < 0:
            raise ValueError(f"delay_ms must be >= 0, got {self.delay_ms}")
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"error_rate must be between 0 and 1, got {self.error_rate}")


def parse_knobs(text: str, defaults: Knobs) -> Knobs:
    """Knobs from a JSON object; keys it leaves out keep their value in `defaults`."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("the knobs file must hold a JSON object")
    unknown = set(data) - {"delay_ms", "error_rate", "hang"}
    if unknown:
        raise ValueError(f"unknown knob(s) {sorted(unknown)}; known: delay_ms, error_rate, hang")
    knobs = defaults
    if "delay_ms" in data:
        knobs = replace(knobs, delay_ms=float(data["delay_ms"]))
    if "error_rate" in data:
        knobs = replace(knobs, error_rate=float(data["error_rate"]))
    if "hang" in data:
        if not isinstance(data["hang"], bool):
            raise ValueError(f"hang must be true or false, got {data['hang']!r}")
        knobs = replace(knobs, hang=data["hang"])
    return knobs


def write_knobs(path: str | os.PathLike[str], knobs: Knobs) -> None:
    """Replace the knobs file atomically, so the server never reads a half-written file."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"delay_ms": knobs.delay_ms, "error_rate": knobs.error_rate, "hang": knobs.hang}, f)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class KnobsSource:
    """The current knobs: the command-line values, overridden by the knobs file when there is one."""

    def __init__(self, defaults: Knobs, path: str | os.PathLike[str] | None = None) -> None:
        self._defaults = defaults
        self._path = Path(path) if path is not None else None
        self._stamp: tuple[int, int, int] | None = None
        self._current = defaults

    def current(self) -> Knobs:
        if self._path is None:
            return self._current
        try:
            st = self._path.stat()
        except FileNotFoundError:
            self._stamp, self._current = None, self._defaults
            return self._current
        # The inode is part of the stamp because mtime alone can repeat when a test rewrites the file
        # twice within one clock tick; write_knobs replaces the file, which always changes the inode.
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self._current = parse_knobs(self._path.read_text(), self._defaults)
                LOG.info("knobs from %s: %s", self._path, self._current)
            except (OSError, ValueError) as exc:
                # Keep serving with the last good knobs: a typo should not change a running experiment.
                LOG.warning("ignoring knobs file %s: %s", self._path, exc)
        return self._current
