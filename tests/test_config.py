"""routes.yaml parsing and validation: what a platform engineer sees when a file is right and when it is not.

Positions are written into the test documents with a » marker in front of the node an error must point at;
`marked` removes it and returns its 1-based line and column, so every position assertion is exact.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.routing import config, units
from gateway.routing.config import ConfigError, ConfigIssue, load_table, parse_table
from gateway.routing.table import Limit, Mirror, Rollout, RouteTable, ServerSettings

ROOT = Path(__file__).resolve().parent.parent
MARK = "»"

BASE = """\
backends:
  triton-a: {url: http://127.0.0.1:8000}
  triton-b: {url: http://127.0.0.1:8100, timeout: 10s}
models:
  fraud-detector:
    versions:
      2.1.3: {backend: triton-a, target: fraud_detector/3}
      2.2.0: {backend: triton-b, target: fraud_detector/4}
    aliases: {stable: 2.1.3, candidate: 2.2.0}
    split: {2.1.3: 95, 2.2.0: 5}
"""

# The full shape from the design document, every section filled in.
FULL = """\
backends:
  triton-a: {url: http://127.0.0.1:8000, timeout: 10s, connect_timeout: 2s, max_connections: 256}
  triton-b: {url: http://10.0.0.7, timeout: 1.5s, connect_timeout: 500ms, max_connections: 8}
models:
  fraud-detector:
    versions:
      2.1.3: {backend: triton-a, target: fraud_detector/3, metadata: {git: abc123f, dataset: "sha256:9f2c", auc: 0.931}}
      2.2.0: {backend: triton-b, target: fraud_detector/4}
    aliases: {stable: 2.1.3, candidate: 2.2.0}
    split: {2.1.3: 95, 2.2.0: 5}
    sticky: header:X-User-Id
    mirror: {to: candidate, percent: 10}
    rollout: {baseline: stable, canary: 2.2.0, steps: [5, 25, 50, 100], max_error_rate_increase: 0.005, max_latency_increase: 20%, false_rollback_rate: 0.01}
    limit: {rate: 1000/s, burst: 2000}
keys: {required: true, default_limit: {rate: 50/s, burst: 100}}
store: {url: "${REDIS_URL:-memory://}", on_error: fail_closed}
server: {max_body_size: 64MiB, max_header_size: 16KiB, max_headers: 100, header_timeout: 10s, body_timeout: 60s, keepalive_timeout: 75s}
"""  # noqa: E501 - flow mappings as a person would write them


def marked(text: str) -> tuple[str, int, int]:
    """The document without its » marker, and the 1-based line and column the marker was at."""
    assert text.count(MARK) == 1, "a test document needs exactly one marker"
    index = text.index(MARK)
    line = text.count("\n", 0, index) + 1
    column = index - (text.rfind("\n", 0, index) + 1) + 1
    return text.replace(MARK, ""), line, column


def edit(old: str, new: str, base: str = BASE) -> str:
    assert old in base, f"{old!r} is not in the base document"
    return base.replace(old, new, 1)


def issues_of(text: str, env: dict[str, str] | None = None) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as caught:
        parse_table(text, "routes.yaml", env=env or {})
    return caught.value.issues


def parse(text: str, env: dict[str, str] | None = None) -> RouteTable:
    return parse_table(text, "routes.yaml", env=env or {})


# (document with a » marker at the node the single error must point at, a phrase of its message)
RULES: list[Any] = [
    # top level
    pytest.param(
        BASE + "»route: {}\n",
        "unknown key 'route' in the top level of the file; "
        "expected one of: backends, models, keys, store, server",
        id="unknown-top-level-key",
    ),
    pytest.param(
        "»[backends, models]\n", "the top level of the file must be a mapping", id="top-not-mapping"
    ),
    # backends
    pytest.param(
        edit("{url: http://127.0.0.1:8000}", "{url: »https://127.0.0.1:8000}"),
        "url of backend triton-a uses https, which is not supported yet; use an http:// URL",
        id="https-backend",
    ),
    pytest.param(
        edit("{url: http://127.0.0.1:8000}", "{url: »grpc://127.0.0.1:8001}"),
        "must be an http:// URL like http://127.0.0.1:8000",
        id="non-http-backend",
    ),
    pytest.param(
        edit("{url: http://127.0.0.1:8000}", "{url: »http://127.0.0.1:8000/v2/models}"),
        "the gateway adds the KServe v2 paths itself",
        id="backend-url-with-path",
    ),
    pytest.param(
        edit("{url: http://127.0.0.1:8000}", "{url: »http://127.0.0.1:99999}"),
        "url of backend triton-a has an invalid port",
        id="backend-port-out-of-range",
    ),
    pytest.param(
        edit("{url: http://127.0.0.1:8000}", "{url: »http://:8000}"),
        "url of backend triton-a has no host",
        id="backend-without-host",
    ),
    pytest.param(
        edit("  triton-a: {url: http://127.0.0.1:8000}", "  »triton-a: {timeout: 10s}"),
        "backend triton-a has no url; add url: http://HOST:PORT",
        id="backend-without-url",
    ),
    pytest.param(
        edit("triton-a: {url: http://127.0.0.1:8000}", "triton-a: {url: http://127.0.0.1:8000, »timout: 5s}"),
        "unknown key 'timout' in backend triton-a; "
        "expected one of: url, timeout, connect_timeout, max_connections",
        id="unknown-backend-key",
    ),
    pytest.param(
        edit("{url: http://127.0.0.1:8000}", "{url: http://127.0.0.1:8000, timeout: »10 sec}"),
        "timeout of backend triton-a must be a duration like 10s, 500ms, 2m or 1.5s",
        id="bad-duration",
    ),
    pytest.param(
        edit("{url: http://127.0.0.1:8000}", "{url: http://127.0.0.1:8000, connect_timeout: »0ms}"),
        "connect_timeout of backend triton-a must be longer than zero, not '0ms'",
        id="zero-duration",
    ),
    pytest.param(
        edit("{url: http://127.0.0.1:8000}", "{url: http://127.0.0.1:8000, max_connections: »0}"),
        "max_connections of backend triton-a must be at least 1, not 0",
        id="max-connections-zero",
    ),
    pytest.param(
        edit("  triton-b: {url", "  »triton c: {url: http://127.0.0.1:9000}\n  triton-b: {url"),
        "backend name 'triton c' may only use letters, digits, '_', '.' and '-', "
        "because it appears in URL paths",
        id="backend-name",
    ),
    # models and versions
    pytest.param(
        BASE + "  »fraud detector: {versions: {'1': {backend: triton-a, target: m}}}\n",
        "model name 'fraud detector' may only use letters, digits",
        id="model-name",
    ),
    pytest.param(
        BASE + "  »../admin: {versions: {'1': {backend: triton-a, target: m}}}\n",
        "because it appears in URL paths",
        id="model-name-with-slash",
    ),
    pytest.param(
        BASE + "  »scorer: {sticky: header:x-user-id}\n",
        "model scorer has no versions; add versions: with at least one version",
        id="model-without-versions",
    ),
    pytest.param(
        BASE + "    »splt: {2.1.3: 95}\n",
        "unknown key 'splt' in model fraud-detector; "
        "expected one of: versions, aliases, split, sticky, mirror, rollout, limit",
        id="unknown-model-key",
    ),
    pytest.param(
        edit("{backend: triton-b, target", "{backend: »triton-c, target"),
        "version 2.2.0 of fraud-detector uses backend triton-c, "
        "which is not defined under backends (defined: triton-a, triton-b)",
        id="undefined-backend",
    ),
    pytest.param(
        edit("target: fraud_detector/4}", "target: »''}"),
        "target of version 2.2.0 of fraud-detector must be a Triton model name",
        id="version-empty-target",
    ),
    pytest.param(
        edit("{url: http://127.0.0.1:8000}", "{url: »~}"),
        "url of backend triton-a is empty",
        id="backend-empty-url",
    ),
    pytest.param(
        edit("      2.2.0: {backend: triton-b, ", "      »2.2.0: {"),
        "version 2.2.0 of fraud-detector has no backend",
        id="version-without-backend",
    ),
    pytest.param(
        edit(
            "      2.2.0: {backend: triton-b, target: fraud_detector/4}", "      »2.2.0: {backend: triton-b}"
        ),
        "version 2.2.0 of fraud-detector has no target",
        id="version-without-target",
    ),
    pytest.param(
        edit("target: fraud_detector/4", "target: »fraud_detector/v4"),
        "target of version 2.2.0 of fraud-detector must be a Triton model name, "
        "optionally followed by /VERSION",
        id="bad-target",
    ),
    pytest.param(
        edit("target: fraud_detector/4", "target: fraud_detector/4, metadata: »[auc, 0.9]"),
        "metadata of version 2.2.0 of fraud-detector must be a mapping",
        id="metadata-not-mapping",
    ),
    pytest.param(
        edit("      2.2.0: {backend", "      2.2.0: {backend: triton-a, target: m}\n      »2.2.0: {backend"),
        "duplicate key '2.2.0' in versions of fraud-detector (first written on line 8)",
        id="duplicate-version",
    ),
    pytest.param(
        BASE + "  scorer:\n    versions:\n      »v1 beta: {backend: triton-a, target: scorer}\n",
        "version name 'v1 beta' may only use letters, digits",
        id="version-id-with-space",
    ),
    # aliases
    pytest.param(
        edit("candidate: 2.2.0}", "candidate: »2.3.0}"),
        "alias candidate of fraud-detector points to 2.3.0, which is not a version (versions: 2.1.3, 2.2.0)",
        id="alias-to-missing-version",
    ),
    pytest.param(
        edit("{stable: 2.1.3,", "{»2.1.3: 2.2.0, stable: 2.1.3,"),
        "alias 2.1.3 of fraud-detector has the same name as a version; "
        "a request for 2.1.3 would be ambiguous",
        id="alias-equals-version",
    ),
    pytest.param(
        edit("candidate: 2.2.0}", "candidate: 2.2.0, current: »stable}"),
        "alias current of fraud-detector points to stable, which is another alias; "
        "an alias must name a version",
        id="alias-to-alias",
    ),
    # split
    pytest.param(
        edit("    split: {2.1.3: 95, 2.2.0: 5}", "    »split: {2.1.3: 100, 2.2.0: 5}"),
        "split for fraud-detector adds up to 105, not 100",
        id="split-sum",
    ),
    pytest.param(
        edit("{2.1.3: 95, 2.2.0: 5}", "{2.1.3: »101, 2.2.0: 0}"),
        "weight of 2.1.3 in split for fraud-detector must be between 0 and 100, not 101",
        id="split-weight-range",
    ),
    pytest.param(
        edit("{2.1.3: 95, 2.2.0: 5}", "{2.1.3: »94.5, 2.2.0: 5.5}").replace("5.5", "5"),
        "must be a whole number, not '94.5'",
        id="split-weight-fraction",
    ),
    pytest.param(
        edit("{2.1.3: 95, 2.2.0: 5}", "{2.1.3: 95, »2.3.0: 5}"),
        "split for fraud-detector names 2.3.0, which is neither a version nor an alias of fraud-detector "
        "(versions: 2.1.3, 2.2.0; aliases: stable, candidate)",
        id="split-unknown-version",
    ),
    pytest.param(
        edit("{2.1.3: 95, 2.2.0: 5}", "{2.1.3: 50, »stable: 50}"),
        "split for fraud-detector names version 2.1.3 as 2.1.3 and stable; give each version one weight",
        id="split-same-version-twice",
    ),
    pytest.param(
        edit("  fraud-detector:", "  »fraud-detector:").replace("    split: {2.1.3: 95, 2.2.0: 5}\n", ""),
        "fraud-detector has 2 versions but no split; "
        "add split: to say which versions get requests that name no version",
        id="split-missing",
    ),
    pytest.param(
        edit("split: {2.1.3: 95, 2.2.0: 5}", "split: »[2.1.3, 2.2.0]"),
        "split for fraud-detector must be a mapping",
        id="split-not-mapping",
    ),
    # sticky
    pytest.param(
        BASE + "    sticky: »cookie:session\n",
        "sticky for fraud-detector must be header:NAME, for example header:x-user-id",
        id="sticky-not-header",
    ),
    pytest.param(
        BASE + '    sticky: »"header:x user"\n',
        "must name a valid HTTP header after 'header:'; 'x user' is not one",
        id="sticky-bad-header-name",
    ),
    # mirror
    pytest.param(
        BASE + "    mirror: {to: »2.9.9, percent: 10}\n",
        "mirror for fraud-detector names 2.9.9, which is neither a version nor an alias",
        id="mirror-unknown-version",
    ),
    pytest.param(
        BASE + "    mirror: {to: 2.2.0, percent: »0}\n",
        "percent of mirror for fraud-detector must be more than 0 and at most 100, not 0",
        id="mirror-zero-percent",
    ),
    pytest.param(
        BASE + "    mirror: {to: 2.2.0, percent: »150}\n",
        "must be more than 0 and at most 100, not 150",
        id="mirror-over-100",
    ),
    pytest.param(
        BASE + "    »mirror: {percent: 10}\n",
        "mirror for fraud-detector has no to",
        id="mirror-without-to",
    ),
    # rollout
    pytest.param(
        BASE + "    rollout: {baseline: stable, canary: »2.1.3}\n",
        "rollout for fraud-detector uses version 2.1.3 as both baseline and canary; they must differ",
        id="rollout-same-version",
    ),
    pytest.param(
        BASE + "    »rollout: {canary: 2.2.0}\n",
        "rollout for fraud-detector has no baseline",
        id="rollout-without-baseline",
    ),
    pytest.param(
        BASE + "    rollout: {baseline: 2.1.3, canary: »3.0.0}\n",
        "canary of rollout for fraud-detector names 3.0.0, which is neither a version nor an alias",
        id="rollout-unknown-canary",
    ),
    pytest.param(
        BASE + "    rollout: {baseline: 2.1.3, canary: 2.2.0, steps: [5, 50, »25]}\n",
        "steps of rollout for fraud-detector must increase step by step, but 25 comes after 50",
        id="rollout-steps-decrease",
    ),
    pytest.param(
        BASE + "    rollout: {baseline: 2.1.3, canary: 2.2.0, steps: [»0, 50]}\n",
        "steps of rollout for fraud-detector must be between 1 and 100, not 0",
        id="rollout-step-range",
    ),
    pytest.param(
        BASE + "    rollout: {baseline: 2.1.3, canary: 2.2.0, steps: »50}\n",
        "steps of rollout for fraud-detector must be a list of traffic percentages",
        id="rollout-steps-not-list",
    ),
    pytest.param(
        BASE + "    rollout: {baseline: 2.1.3, canary: 2.2.0, max_error_rate_increase: »5}\n",
        "max_error_rate_increase of rollout for fraud-detector must be a fraction between 0 and 1",
        id="rollout-error-rate",
    ),
    pytest.param(
        BASE + "    rollout: {baseline: 2.1.3, canary: 2.2.0, max_latency_increase: »20}\n",
        "must be a percentage like 20% or a fraction like 0.2, not 20 (write 20% if so)",
        id="rollout-latency-ambiguous",
    ),
    pytest.param(
        BASE + "    rollout: {baseline: 2.1.3, canary: 2.2.0, false_rollback_rate: »0.5}\n",
        "false_rollback_rate of rollout for fraud-detector must be more than 0 and less than 0.5",
        id="rollout-alpha",
    ),
    pytest.param(
        BASE + "    rollout: {baseline: 2.1.3, canary: 2.2.0, steps: »[100]}\n",
        "steps of rollout for fraud-detector needs a step below 100, like [5, 25, 50, 100]",
        id="rollout-steps-only-100",
    ),
    pytest.param(
        BASE + "    rollout: {baseline: 2.1.3, canary: 2.2.0, max_latency_increase: »1%}\n",
        "is finer than the latency buckets, which are 5% apart",
        id="rollout-latency-margin-finer-than-buckets",
    ),
    pytest.param(
        BASE + "    rollout: {baseline: 2.1.3, canary: 2.2.0, false_promotion_rate: »0.6}\n",
        "false_promotion_rate of rollout for fraud-detector must be more than 0 and less than 0.5",
        id="rollout-beta",
    ),
    pytest.param(
        BASE + "    rollout: {baseline: 2.1.3, canary: 2.2.0, max_error_odds_ratio: »0.5}\n",
        "max_error_odds_ratio of rollout for fraud-detector must be at least 1",
        id="rollout-odds-ratio",
    ),
    pytest.param(
        BASE + "    rollout: {baseline: 2.1.3, canary: 2.2.0, on_max_step_duration: »wait}\n",
        "must be hold (pause the rollout and alert) or rollback, not 'wait'",
        id="rollout-on-max-step-duration",
    ),
    pytest.param(
        BASE + "    rollout: {baseline: 2.1.3, canary: 2.2.0, min_step_duration: 5m,\n"
        "              max_step_duration: »1m}\n",
        "max_step_duration of rollout for fraud-detector (60 s) is shorter than its min_step_duration",
        id="rollout-max-step-shorter-than-min",
    ),
    # limits
    pytest.param(
        BASE + "    limit: {rate: »1000}\n",
        "rate in the limit for fraud-detector must be a rate like 1000/s, 600/m or 3600/h, not '1000'",
        id="limit-rate-without-unit",
    ),
    pytest.param(
        BASE + "    limit: {rate: »0/s}\n",
        "must be more than zero requests, not '0/s'",
        id="limit-rate-zero",
    ),
    pytest.param(
        BASE + "    limit: {rate: 10/s, burst: »0}\n",
        "burst in the limit for fraud-detector must be at least 1, not 0",
        id="limit-burst-zero",
    ),
    pytest.param(
        BASE + "    »limit: {burst: 5}\n",
        "the limit for fraud-detector has no rate",
        id="limit-without-rate",
    ),
    # keys, store, server
    pytest.param(
        BASE + "keys: {required: »maybe}\n",
        "required in keys must be true or false, not 'maybe'",
        id="keys-required-not-bool",
    ),
    pytest.param(
        BASE + "keys: {»require: true}\n",
        "unknown key 'require' in keys; expected one of: required, default_limit",
        id="keys-unknown-key",
    ),
    pytest.param(
        BASE + "keys: {default_limit: {rate: »fast}}\n",
        "rate in keys: default_limit must be a rate like 1000/s",
        id="keys-default-limit",
    ),
    pytest.param(
        BASE + "store: {url: »http://cache:6379}\n",
        "url of store must start with one of memory://, redis://, rediss://, redis+sentinel://, redis+cluster://",
        id="store-scheme",
    ),
    pytest.param(
        BASE + "store: {on_error: »fail_soft}\n",
        "on_error of store must be fail_closed (answer 503) or fail_open (serve with local limits), "
        "not 'fail_soft'",
        id="store-on-error",
    ),
    pytest.param(
        BASE + "server: {max_body_size: »64 MiBs}\n",
        "max_body_size of server must be a size like 64MiB, 16KiB, 1MB or a number of bytes",
        id="server-size",
    ),
    pytest.param(
        BASE + "server: {max_header_size: »0.5KiB1}\n",
        "max_header_size of server must be a size like",
        id="server-size-garbage",
    ),
    pytest.param(
        BASE + "server: {max_body_size: »1.5B}\n",
        "max_body_size of server must be a whole number of bytes",
        id="server-fractional-bytes",
    ),
    pytest.param(
        BASE + "server: {max_headers: »0}\n",
        "max_headers of server must be at least 1, not 0",
        id="server-max-headers",
    ),
    pytest.param(
        BASE + "server: {header_timeout: »-1s}\n",
        "header_timeout of server must be a duration",
        id="server-negative-timeout",
    ),
    # environment references
    pytest.param(
        edit("target: fraud_detector/4", 'target: »"fraud_detector/${TRITON_VERSION}"'),
        "target of version 2.2.0 of fraud-detector uses ${TRITON_VERSION}, but TRITON_VERSION is not set; "
        "set it or write ${TRITON_VERSION:-default}",
        id="env-missing",
    ),
    pytest.param(
        BASE + 'store: {url: »"${REDIS_URL"}\n',
        "url of store has a malformed ${...} reference; write ${NAME} or ${NAME:-default}",
        id="env-malformed",
    ),
]


@pytest.mark.parametrize(("document", "phrase"), RULES)
def test_each_rule_reports_one_error_at_the_offending_node(document: str, phrase: str) -> None:
    text, line, column = marked(document)
    issues = issues_of(text)
    assert [(issue.line, issue.column) for issue in issues] == [(line, column)], issues
    assert phrase in issues[0].message
    assert issues[0].file == "routes.yaml"


def test_example_routes_yaml_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    path = ROOT / "routes.yaml"
    table = load_table(path)
    assert table.source == str(path)
    assert table.revision == hashlib.sha256(path.read_bytes()).hexdigest()
    assert {name: (b.host, b.port, b.timeout) for name, b in table.backends.items()} == {
        "triton-a": ("127.0.0.1", 8010, 10.0),
        "triton-b": ("127.0.0.1", 8020, 10.0),
    }
    model = table.models["fraud-detector"]
    assert model.split == (("2.1.3", 100), ("2.2.0", 0))  # where the rollout starts
    assert dict(model.aliases) == {"stable": "2.1.3", "candidate": "2.2.0"}
    assert model.sticky_header == "x-user-id"
    assert model.mirror == Mirror(to="2.2.0", percent=20.0)
    assert model.rollout is not None
    assert (model.rollout.baseline, model.rollout.canary) == ("2.1.3", "2.2.0")
    stable = model.resolve("stable")
    assert stable is not None
    assert (stable.backend, stable.triton_model, stable.triton_version) == ("triton-a", "fraud_detector", "3")
    assert stable.metadata["dataset"].startswith("sha256:")
    assert isinstance(stable.metadata["auc"], float)
    assert table.keys.required is False
    assert table.store.url == "memory://"


def test_example_routes_yaml_follows_redis_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://cache:6379/0")
    assert load_table(ROOT / "routes.yaml").store.url == "redis://cache:6379/0"


def test_full_shape_from_the_design_parses_into_every_field() -> None:
    table = parse(FULL)
    a, b = table.backends["triton-a"], table.backends["triton-b"]
    assert (a.host, a.port, a.timeout, a.connect_timeout, a.max_connections) == (
        "127.0.0.1",
        8000,
        10,
        2,
        256,
    )
    assert (b.host, b.port, b.timeout, b.connect_timeout, b.max_connections) == ("10.0.0.7", 80, 1.5, 0.5, 8)
    model = table.models["fraud-detector"]
    assert model.split == (("2.1.3", 95), ("2.2.0", 5))
    assert model.sticky_header == "x-user-id"
    assert model.mirror == Mirror(to="2.2.0", percent=10.0)
    assert model.rollout == Rollout(
        baseline="2.1.3",
        canary="2.2.0",
        steps=(5, 25, 50, 100),
        max_error_rate_increase=0.005,
        max_latency_increase=0.2,
        false_rollback_rate=0.01,
    )
    assert model.limit == Limit(rate=1000.0, burst=2000)
    assert dict(model.versions["2.1.3"].metadata) == {
        "git": "abc123f",
        "dataset": "sha256:9f2c",
        "auc": 0.931,
    }
    assert table.keys.required is True
    assert table.keys.default_limit == Limit(rate=50.0, burst=100)
    assert (table.store.url, table.store.on_error) == ("memory://", "fail_closed")
    server = table.server
    assert (server.max_body_size, server.max_header_size, server.max_headers) == (64 * 2**20, 16 * 2**10, 100)
    assert (server.header_timeout, server.body_timeout, server.keepalive_timeout) == (10, 60, 75)


def test_defaults_fill_what_a_small_file_leaves_out() -> None:
    table = parse(
        "backends: {t: {url: 'http://triton'}}\nmodels: {m: {versions: {v1: {backend: t, target: m}}}}\n"
    )
    backend = table.backends["t"]
    assert (backend.port, backend.timeout, backend.connect_timeout, backend.max_connections) == (
        80,
        30,
        2,
        256,
    )
    model = table.models["m"]
    assert model.split == (("v1", 100),)  # a single version takes all unpinned traffic
    assert model.versions["v1"].triton_version == ""  # Triton picks its own version
    assert (model.sticky_header, model.mirror, model.rollout, model.limit) == (None, None, None, None)
    assert table.keys.required is True and table.keys.default_limit is None
    assert (table.store.url, table.store.on_error) == ("memory://", "fail_closed")
    assert table.server.max_body_size == 64 * 2**20


def test_the_defaults_the_reference_states_are_the_ones_a_file_gets() -> None:
    text = (ROOT / "docs" / "routes.md").read_text()
    stated = {
        row[0].strip("`"): row[2].strip("`")
        for line in text.splitlines()
        if len(row := [cell.strip() for cell in line.strip().strip("|").split("|")]) == 3
    }
    table = parse(BASE + "    rollout: {baseline: stable, canary: candidate}\n")
    backend, rollout = table.backends["triton-a"], table.models["fraud-detector"].rollout
    assert rollout is not None
    expected: dict[str, tuple[Any, Any]] = {
        "backends.*.timeout": (units.duration, backend.timeout),
        "backends.*.connect_timeout": (units.duration, backend.connect_timeout),
        "backends.*.max_connections": (int, backend.max_connections),
        "backends.*.queue_timeout": (units.duration, backend.queue_timeout),
        "backends.*.max_queue": (int, backend.max_queue),
        "rollout.steps": (lambda t: tuple(json.loads(t)), rollout.steps),
        "rollout.max_error_rate_increase": (units.number, rollout.max_error_rate_increase),
        "rollout.max_latency_increase": (units.fraction_or_percent, rollout.max_latency_increase),
        "rollout.false_rollback_rate": (units.number, rollout.false_rollback_rate),
        "rollout.false_promotion_rate": (units.number, rollout.false_promotion_rate),
        "rollout.max_error_odds_ratio": (units.number, rollout.max_error_odds_ratio),
        "rollout.min_step_duration": (units.duration, rollout.min_step_duration),
        "rollout.min_step_requests": (int, rollout.min_step_requests),
        "rollout.max_step_duration": (units.duration, rollout.max_step_duration),
        "keys.required": (units.boolean, table.keys.required),
        "store.url": (str, table.store.url),
        "store.on_error": (str, table.store.on_error),
        "store.timeout": (units.duration, table.store.timeout),
    }
    for key, (read, value) in expected.items():
        assert read(stated[key]) == pytest.approx(value), key
    assert stated["rollout.on_max_step_duration"] == rollout.on_max_step_duration
    for key, read_server in config.SERVER_SETTINGS.items():
        assert read_server(stated[f"server.{key}"]) == getattr(ServerSettings(), key), key
    # The example at the top shows the same defaults.
    shown = re.search(r"^server: \{[^}]*\}", text, re.MULTILINE)
    assert shown is not None
    assert parse(BASE + shown[0] + "\n").server == ServerSettings() == parse(BASE).server


def test_rollout_defaults_and_percent_forms() -> None:
    table = parse(BASE + "    rollout: {baseline: stable, canary: candidate, max_latency_increase: 0.35}\n")
    rollout = table.models["fraud-detector"].rollout
    assert rollout == Rollout("2.1.3", "2.2.0", (5, 25, 50, 100), 0.005, 0.35, 0.01)
    table = parse(BASE + "    rollout: {baseline: 2.1.3, canary: 2.2.0, max_latency_increase: 150%}\n")
    assert table.models["fraud-detector"].rollout is not None
    assert table.models["fraud-detector"].rollout.max_latency_increase == 1.5


@pytest.mark.parametrize(
    ("limit", "rate", "burst"),
    [
        ("{rate: 600/m}", 10.0, 10),
        ("{rate: 90/h}", 0.025, 1),
        ("{rate: 2.5/s}", 2.5, 3),
        ("{rate: 3600/h, burst: 7}", 1.0, 7),
    ],
)
def test_limit_rates_are_per_second_and_burst_defaults_to_one_second(
    limit: str, rate: float, burst: int
) -> None:
    table = parse(BASE + f"    limit: {limit}\n")
    limit_ = table.models["fraud-detector"].limit
    assert limit_ is not None
    assert limit_.rate == pytest.approx(rate)
    assert limit_.burst == burst


@pytest.mark.parametrize(
    ("written", "size"),
    [
        ("64MiB", 64 * 2**20),
        ("16KiB", 16384),
        ("1MB", 1_000_000),
        ("1024", 1024),
        ("1.5KiB", 1536),
        ("2GB", 2e9),
    ],
)
def test_sizes_binary_and_decimal(written: str, size: int) -> None:
    assert parse(BASE + f"server: {{max_body_size: {written}}}\n").server.max_body_size == size


@pytest.mark.parametrize(
    ("written", "seconds"), [("10s", 10), ("500ms", 0.5), ("2m", 120), ("1.5s", 1.5), ("3", 3)]
)
def test_durations(written: str, seconds: float) -> None:
    assert parse(BASE + f"server: {{body_timeout: {written}}}\n").server.body_timeout == seconds


@pytest.mark.parametrize(
    ("written", "required"), [("true", True), ("yes", True), ("false", False), ("no", False)]
)
def test_keys_required_accepts_true_false_yes_no(written: str, required: bool) -> None:
    assert parse(BASE + f"keys: {{required: {written}}}\n").keys.required is required


@pytest.mark.parametrize(
    "url",
    [
        "memory://",
        "redis://cache:6379/0",
        "rediss://cache:6380",
        "redis+sentinel://s1:26379/main",
        "redis+cluster://c1",
    ],
)
def test_store_schemes_accepted(url: str) -> None:
    assert parse(BASE + f"store: {{url: '{url}', on_error: fail_open}}\n").store.url == url


def test_store_url_error_does_not_echo_a_password() -> None:
    issues = issues_of(
        BASE + "store: {url: '${REDIS_URL}'}\n", env={"REDIS_URL": "http://:hunter2@cache:6379"}
    )
    assert len(issues) == 1
    assert "its scheme is 'http'" in issues[0].message
    assert "hunter2" not in issues[0].message


def test_version_ids_stay_exactly_as_written() -> None:
    table = parse(
        """\
backends: {t: {url: http://triton:8000}}
models:
  m:
    versions:
      2.2: {backend: t, target: m/1}
      2.20: {backend: t, target: m/2}
      2026-11-05: {backend: t, target: m/3}
      1e3: {backend: t, target: m/4}
      abc123f: {backend: t, target: m/5}
      007: {backend: t, target: m/6}
    aliases: {stable: 2.2, nightly: 2026-11-05}
    split: {2.2: 40, 2.20: 0, nightly: 30, 1e3: 10, abc123f: 10, 007: 10}
    mirror: {to: 1e3, percent: 1}
"""
    )
    model = table.models["m"]
    # As floats, 2.2 and 2.20 would be one version; as a date, 2026-11-05 would not match a URL.
    assert list(model.versions) == ["2.2", "2.20", "2026-11-05", "1e3", "abc123f", "007"]
    assert [v.id for v in model.versions.values()] == list(model.versions)
    assert dict(model.aliases) == {"stable": "2.2", "nightly": "2026-11-05"}
    assert model.split == (
        ("2.2", 40),
        ("2.20", 0),
        ("2026-11-05", 30),
        ("1e3", 10),
        ("abc123f", 10),
        ("007", 10),
    )
    assert model.mirror == Mirror("1e3", 1.0)
    assert model.resolve("nightly") is model.versions["2026-11-05"]


def test_metadata_keeps_numbers_as_numbers_and_everything_else_as_written() -> None:
    table = parse(
        edit(
            "target: fraud_detector/3}",
            "target: fraud_detector/3, metadata: {git: 0a1b2c3, commit: 0123456, auc: 0.931,"
            " rows: 120000, trained: 2026-11-05, good: true, note: no, tags: [prod, {owner: risk}],"
            " ratio: '0.5', none: ~}}",
        )
    )
    metadata = table.models["fraud-detector"].versions["2.1.3"].metadata
    assert dict(metadata) == {
        "git": "0a1b2c3",
        "commit": "0123456",
        "auc": 0.931,
        "rows": 120000,
        "trained": "2026-11-05",
        "good": True,
        "note": "no",
        "tags": ["prod", {"owner": "risk"}],
        "ratio": "0.5",
        "none": None,
    }
    with pytest.raises(TypeError):
        metadata["auc"] = 1.0  # type: ignore[index]


def test_table_cannot_be_changed_after_loading() -> None:
    table = parse(BASE)
    with pytest.raises(TypeError):
        table.models["other"] = table.models["fraud-detector"]  # type: ignore[index]
    with pytest.raises(TypeError):
        table.models["fraud-detector"].versions["9"] = table.models["fraud-detector"].versions["2.1.3"]  # type: ignore[index]


def test_split_keeps_file_order_and_resolves_aliases() -> None:
    table = parse(edit("split: {2.1.3: 95, 2.2.0: 5}", "split: {candidate: 30, stable: 70}"))
    assert table.models["fraud-detector"].split == (("2.2.0", 30), ("2.1.3", 70))


def test_sticky_header_is_lower_cased() -> None:
    assert (
        parse(BASE + "    sticky: header:X-User-ID\n").models["fraud-detector"].sticky_header == "x-user-id"
    )


def test_env_references_expand_with_and_without_default() -> None:
    document = edit(
        "triton-a: {url: http://127.0.0.1:8000}",
        "triton-a: {url: 'http://${TRITON_HOST}:${TRITON_PORT:-8000}'}",
    )
    table = parse(document, env={"TRITON_HOST": "gpu-7"})
    assert (table.backends["triton-a"].host, table.backends["triton-a"].port) == ("gpu-7", 8000)
    table = parse(document, env={"TRITON_HOST": "gpu-7", "TRITON_PORT": "9100"})
    assert table.backends["triton-a"].port == 9100
    # As in the shell, the default also covers a variable that is set but empty.
    table = parse(document, env={"TRITON_HOST": "gpu-7", "TRITON_PORT": ""})
    assert table.backends["triton-a"].port == 8000


def test_env_values_are_validated_like_written_values() -> None:
    text, line, column = marked(edit("{stable: 2.1.3,", '{stable: »"${STABLE}",'))
    issues = issues_of(text, env={"STABLE": "9.9.9"})
    assert [(issue.line, issue.column) for issue in issues] == [(line, column)]
    assert "points to 9.9.9, which is not a version" in issues[0].message


def test_env_expansion_reads_the_process_environment_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GW_TEST_STORE", "redis://from-env:6379")
    assert parse_table(BASE + "store: {url: '${GW_TEST_STORE}'}\n").store.url == "redis://from-env:6379"


def test_doubled_dollar_writes_a_literal_reference() -> None:
    table = parse(
        edit("target: fraud_detector/3}", "target: fraud_detector/3, metadata: {cmd: 'echo $${HOME}'}}")
    )
    assert table.models["fraud-detector"].versions["2.1.3"].metadata["cmd"] == "echo ${HOME}"


def test_duplicate_keys_are_errors_at_the_second_occurrence() -> None:
    text, line, column = marked(BASE + "    »split: {2.1.3: 5, 2.2.0: 95}\n")
    issues = issues_of(text)
    assert [(issue.line, issue.column) for issue in issues] == [(line, column)]
    assert issues[0].message == "duplicate key 'split' in model fraud-detector (first written on line 10)"


def test_duplicate_keys_in_a_flow_mapping() -> None:
    text, line, column = marked(edit("{stable: 2.1.3, candidate: 2.2.0}", "{stable: 2.1.3, »stable: 2.2.0}"))
    issues = issues_of(text)
    assert [(issue.line, issue.column, issue.message) for issue in issues] == [
        (line, column, "duplicate key 'stable' in aliases of fraud-detector (first written on line 9)")
    ]


def test_quoted_and_plain_spellings_of_one_version_are_duplicates() -> None:
    document = """\
backends: {t: {url: http://triton:8000}}
models:
  m:
    versions:
      2.2: {backend: t, target: m/1}
      »"2.2": {backend: t, target: m/2}
"""
    text, line, column = marked(document)
    issues = issues_of(text)
    assert [(i.line, i.column, i.message) for i in issues] == [
        (line, column, "duplicate key '2.2' in versions of m (first written on line 5)")
    ]


def test_yaml_merge_keys_share_settings() -> None:
    table = parse(
        edit(
            "  triton-b: {url: http://127.0.0.1:8100, timeout: 10s}",
            "  triton-b: &shared {url: http://127.0.0.1:8100, timeout: 10s, max_connections: 16}\n"
            "  triton-c: {<<: *shared, url: http://127.0.0.1:8200}",
        )
    )
    c = table.backends["triton-c"]
    assert (c.port, c.timeout, c.max_connections) == (8200, 10.0, 16)


def test_yaml_syntax_error_points_at_the_problem() -> None:
    text, line, column = marked(BASE + "    sticky: header»: x-user-id\n")
    issues = issues_of(text)
    assert [(issue.line, issue.column) for issue in issues] == [(line, column)]
    assert issues[0].message.startswith("YAML syntax error: a ':' here that YAML cannot place")


def test_unclosed_flow_mapping_is_a_syntax_error() -> None:
    issues = issues_of("backends:\n  triton-a: {url: http://127.0.0.1:8000\nmodels: {}\n")
    assert len(issues) == 1
    assert issues[0].message.startswith("YAML syntax error:")
    assert issues[0].line == 3  # where the mapping should have been closed


def test_unquoted_env_reference_in_a_flow_mapping_is_explained() -> None:
    text, line, column = marked(BASE + "store: {url: $»{REDIS_URL}}\n")
    issues = issues_of(text)
    assert [(i.line, i.column) for i in issues] == [(line, column)]
    assert 'quote values that use ${VAR} inside a {...} mapping, like "${VAR}"' in issues[0].message


def test_unquoted_env_reference_in_a_block_mapping_works() -> None:
    table = parse(BASE + "store:\n  url: ${REDIS_URL}\n", env={"REDIS_URL": "redis://cache:6379"})
    assert table.store.url == "redis://cache:6379"


def test_control_character_position() -> None:
    issues = issues_of(BASE + "    sticky: header:x\x07\n")
    assert [(i.line, i.column) for i in issues] == [(11, 21)]
    assert "character #x0007 is not allowed" in issues[0].message


def test_tab_indentation_is_explained() -> None:
    issues = issues_of("backends:\n\ttriton-a: {url: http://127.0.0.1:8000}\n")
    assert [(i.line, i.column) for i in issues] == [(2, 1)]
    assert "tab character" in issues[0].message and "spaces" in issues[0].message


def test_second_document_is_refused() -> None:
    issues = issues_of(BASE + "---\n" + BASE)
    assert [(i.line, i.column) for i in issues] == [(11, 1)]
    assert "a second document starts here" in issues[0].message


def test_empty_file() -> None:
    issues = issues_of("# nothing yet\n")
    assert [(i.line, i.column, i.message) for i in issues] == [
        (1, 1, "the file is empty; it needs at least backends: and models:")
    ]


def test_missing_backends_section_is_reported_with_its_consequences() -> None:
    text = BASE.split("models:", 1)[1]
    issues = issues_of("models:" + text)
    messages = [issue.message for issue in issues]
    assert messages[0].startswith("backends: is missing")
    assert (issues[0].line, issues[0].column) == (1, 1)
    assert "uses backend triton-a, which is not defined under backends (defined: none)" in messages[1]


def test_empty_models_section() -> None:
    text, line, column = marked(BASE.split("models:", 1)[0] + "»models:\n")
    issues = issues_of(text)
    assert [(i.line, i.column) for i in issues] == [(line, column)]
    assert issues[0].message.startswith("models is empty")


def test_recursive_metadata_alias_is_refused() -> None:
    text, line, column = marked(
        edit("target: fraud_detector/3}", "target: fraud_detector/3, metadata: »&m {self: *m}}")
    )
    issues = issues_of(text)
    assert len(issues) == 1
    assert [(i.line, i.column) for i in issues] == [(line, column)]
    assert (
        "metadata of version 2.1.3 of fraud-detector contains itself through a YAML alias"
        in issues[0].message
    )


def test_metadata_alias_bomb_is_refused() -> None:
    bomb = "{a: &a [x, x, x, x, x, x, x, x, x, x], b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a],"
    bomb += (
        " c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b], d: [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c, *c]}"
    )
    issues = issues_of(edit("target: fraud_detector/3}", f"target: fraud_detector/3, metadata: {bomb}}}"))
    assert len(issues) == 1
    assert "is too large" in issues[0].message


def test_several_errors_are_reported_together_in_file_order() -> None:
    document = """\
backends:
  triton-a: {url: https://127.0.0.1:8000}
models:
  fraud-detector:
    versions:
      2.1.3: {backend: triton-a, target: fraud_detector/3}
      2.2.0: {backend: triton-c, target: fraud_detector/4}
    splt: {2.1.3: 95}
    split: {2.1.3: 100, 2.2.0: 5}
store: {url: "${REDIS_URL}", on_error: fail_closed}
"""
    issues = issues_of(document)
    assert [(issue.line, issue.column) for issue in issues] == [(2, 19), (7, 24), (8, 5), (9, 5), (10, 14)]
    assert "https, which is not supported yet" in issues[0].message
    assert (
        "uses backend triton-c, which is not defined under backends (defined: triton-a)" in issues[1].message
    )
    assert "unknown key 'splt'" in issues[2].message
    assert issues[3].message == "split for fraud-detector adds up to 105, not 100"
    assert "REDIS_URL is not set" in issues[4].message


def test_issue_and_error_render_as_file_line_column_message() -> None:
    issues = [ConfigIssue("routes.yaml", 3, 7, "first problem"), ConfigIssue("routes.yaml", 9, 1, "second")]
    assert str(issues[0]) == "routes.yaml:3:7: first problem"
    assert str(ConfigError(issues)) == "routes.yaml:3:7: first problem\nroutes.yaml:9:1: second"


def test_load_table_names_the_file_in_every_issue(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(edit("{backend: triton-b, target", "{backend: triton-z, target"))
    with pytest.raises(ConfigError) as caught:
        load_table(path)
    assert [str(issue).split(": ", 1)[0] for issue in caught.value.issues] == [f"{path}:8:24"]


def test_load_table_reports_an_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_table(tmp_path / "missing.yaml")
    assert "cannot read the file" in str(caught.value)


def test_load_table_reports_bytes_that_are_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_bytes(BASE.encode() + b"    sticky: header:x-\xff\n")
    with pytest.raises(ConfigError) as caught:
        load_table(path)
    assert [(i.line, i.column) for i in caught.value.issues] == [(11, 22)]
    assert "not UTF-8" in caught.value.issues[0].message


def test_revision_changes_with_the_file_bytes(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(BASE)
    first = load_table(path).revision
    path.write_text(BASE + "# a comment changes the revision too\n")
    assert load_table(path).revision != first
    assert first == hashlib.sha256(BASE.encode()).hexdigest() == parse(BASE).revision


def run_validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_validate_accepts_a_good_file(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(FULL)
    result = run_validate(path)
    assert result.returncode == 0, result.stderr
    assert f"{path}: OK, 1 model(s), 2 version(s)" in result.stdout


def test_cli_validate_lists_every_error_and_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(
        edit("split: {2.1.3: 95, 2.2.0: 5}", "split: {2.1.3: 100, 2.2.0: 5}\n    sticky: cookie:x").replace(
            "triton-b, target", "triton-c, target"
        )
    )
    result = run_validate(path)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[:3] == [
        f"{path}:8:24: version 2.2.0 of fraud-detector uses backend triton-c, "
        "which is not defined under backends (defined: triton-a, triton-b)",
        f"{path}:10:5: split for fraud-detector adds up to 105, not 100",
        f"{path}:11:13: sticky for fraud-detector must be header:NAME, "
        "for example header:x-user-id, not 'cookie:x'",
    ]
    assert "3 error(s)" in lines[3]
