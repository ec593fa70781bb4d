"""docs/routes.md documents every key the routes.yaml loader accepts, each as a row with its default.

The keys come from the loader itself (gateway/routing/config.py), so a new setting without a line in
the reference fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

from gateway.routing import config

DOC = (Path(__file__).resolve().parent.parent / "docs" / "routes.md").read_text()
ROW = re.compile(r"^\| `([^`]+)` \|(.+)\|(.+)\|$", re.MULTILINE)


def documented() -> dict[str, str]:
    """Each table row's key -> its default column."""
    return {key: default.strip() for key, _, default in ROW.findall(DOC)}


def accepted() -> list[str]:
    keys = [*config.TOP_KEYS]
    keys += [f"backends.*.{k}" for k in config.BACKEND_KEYS]
    keys += [f"models.*.{k}" for k in config.MODEL_KEYS]
    keys += [f"versions.*.{k}" for k in config.VERSION_KEYS]
    keys += [f"mirror.{k}" for k in config.MIRROR_KEYS]
    keys += [f"rollout.{k}" for k in config.ROLLOUT_KEYS]
    keys += [f"limit.{k}" for k in config.LIMIT_KEYS]
    keys += [f"keys.{k}" for k in config.KEYS_KEYS]
    keys += [f"store.{k}" for k in config.STORE_KEYS]
    keys += [f"server.{k}" for k in config.SERVER_KEYS]
    return keys


def test_every_accepted_key_has_a_row_with_a_default() -> None:
    rows = documented()
    missing = [key for key in accepted() if key not in rows]
    assert missing == [], f"docs/routes.md has no row for: {missing}"
    for key in accepted():
        assert rows[key], f"{key} has an empty default column"


def test_no_row_documents_a_key_the_loader_refuses() -> None:
    assert set(documented()) - set(accepted()) == set()


def test_nothing_that_exists_is_described_as_coming_later() -> None:
    assert not re.search(r"\b(later|not yet|coming soon|TODO)\b", DOC, re.IGNORECASE)
