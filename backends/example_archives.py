"""The example versions of `make run` as archives: how each is built, with its lineage and metrics.

routes.yaml names each version's archive digest; building them here again must give those digests
(the archives are byte-reproducible), which tests/test_artifacts.py checks. Only `gateway archive
create` command lines are built here: backends/ runs without the gateway's code.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from backends.local import REPO_ROOT

MODEL = "fraud-detector"
SOURCE = REPO_ROOT / "backends" / "python_repository" / "fraud_detector"
EXTRAS = REPO_ROOT / "backends" / "examples"
CREATED = "2026-01-15T00:00:00Z"  # fixed, so every clone builds the same bytes


@dataclass(frozen=True, slots=True)
class ExampleVersion:
    version: str
    triton_version: int
    git_commit: str
    training_data: str
    auc: float


EXAMPLES = (
    ExampleVersion(
        "2.1.3",
        3,
        "4f9c2ab",
        "sha256:9f2c41d7e0b35a8c6e1f0d4b7a92c35e8d1f6a0b4c7e2d9f8a1b3c5e7d9f0a2b",
        0.931,
    ),
    ExampleVersion(
        "2.2.0",
        4,
        "b71e03d",
        "sha256:1c8e5a2f7b9d04e6c3a1f8b2d7e5c9a04b6f2e8d1a3c5b7e9f0d2a4c6e8b1f3d",
        0.944,
    ),
)


def archive_path(directory: Path, example: ExampleVersion) -> Path:
    return directory / f"{MODEL}-{example.version}.zip"


def create_command(example: ExampleVersion, directory: Path) -> list[str]:
    """The `gateway archive create` command line that builds `example` into `directory`."""
    return [
        sys.executable,
        "-m",
        "gateway",
        "archive",
        "create",
        str(SOURCE),
        "--model",
        MODEL,
        "--version",
        example.version,
        "--triton-version",
        str(example.triton_version),
        "--extra",
        str(EXTRAS / "requirements.txt"),
        "--sample-request",
        str(EXTRAS / "sample_request.json"),
        "--git-commit",
        example.git_commit,
        "--training-data",
        example.training_data,
        "--metadata",
        f"metrics.auc={example.auc}",
        "--author",
        "ml-platform",
        "--created",
        CREATED,
        "--output",
        str(archive_path(directory, example)),
        "--force",
    ]
