"""Session fixtures: real Triton servers (PyTriton, CPU), one process per model version."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from backends.local import TritonProcess, VersionSpec, free_port, start_versions, stop_all

SLOW_VERSION_DELAY_MS = 2500.0  # longer than the short backend timeout the 504 tests configure


@dataclass(frozen=True)
class TritonFleet:
    """Triton processes hosting fraud_detector versions 3 and 4, and a slow version 5."""

    v3: TritonProcess
    v4: TritonProcess
    slow: TritonProcess

    def routes(
        self, split: str = "{2.1.3: 90, 2.2.0: 10}", extra_model: str = "", slow_timeout: str = "1s"
    ) -> str:
        return f"""
backends:
  triton-a: {{url: "{self.v3.url}", timeout: 10s}}
  triton-b: {{url: "{self.v4.url}", timeout: 10s}}
  triton-slow: {{url: "{self.slow.url}", timeout: {slow_timeout}}}
models:
  fraud-detector:
    versions:
      2.1.3: {{backend: triton-a, target: fraud_detector/3, metadata: {{git: 4f9c2ab, auc: 0.931}}}}
      2.2.0: {{backend: triton-b, target: fraud_detector/4}}
      2.3.0-slow: {{backend: triton-slow, target: fraud_detector/5}}
    aliases: {{stable: 2.1.3, candidate: 2.2.0}}
    split: {split}
    sticky: header:x-user-id
{extra_model}
keys: {{required: false}}
"""


@pytest.fixture(scope="session")
def triton() -> Iterator[TritonFleet]:
    specs = [
        VersionSpec.one("fraud_detector", 3, free_port()),
        VersionSpec.one("fraud_detector", 4, free_port()),
        VersionSpec.one("fraud_detector", 5, free_port(), delay_ms=SLOW_VERSION_DELAY_MS),
    ]
    processes = start_versions(specs)
    try:
        yield TritonFleet(*processes)
    finally:
        stop_all(processes)
