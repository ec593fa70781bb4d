# `make run` and `make test` work on a fresh clone: they build .venv and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
LINTED := gateway backends tests load_tests scripts deploy

.PHONY: install run demo test lint typecheck unit tools bench bench-dataplane clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[backends,test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) scripts/run_local.py --routes routes.yaml

# With `make run` serving in another terminal: steady traffic, then the canary fails and is rolled back.
demo: $(STAMP)
	$(PY) scripts/demo.py --routes routes.yaml

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# Debian packages the tests drive: chromium (the dashboard, through Playwright) and promtool (alert rules).
tools:
	@command -v chromium >/dev/null && command -v promtool >/dev/null || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    chromium prometheus >/dev/null; }

unit: $(STAMP) tools
	$(VENV)/bin/pytest -q -p no:cacheprovider

test: lint typecheck unit

# The production path: nginx, the bare gateway, keys + limits on the memory store and on Redis.
bench: $(STAMP)
	load_tests/ensure_tools.sh
	$(PY) load_tests/bench_limits.py

# The data plane alone: the gateway against nginx and the direct backend, throughput and latency.
bench-dataplane: $(STAMP)
	load_tests/ensure_tools.sh
	$(PY) load_tests/bench.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
