# swarmfold: the two commands of a fresh machine are `make demo` and `make test`.
#
#   make demo     set up .venv, then run a 3-peer swarm on the embedded default corpus (stdlib shards)
#   make test     set up .venv (and Chromium, as root), then run the whole test suite
#   make test-fast  the inner loop: every test not marked slow (no multi-peer, multi-process runs)
#   make lint     ruff and mypy
#   make browser  install Debian's chromium if it is missing (the dashboard tests need it)
#   make bench    the inner-loop benchmark (writes results/bench_inner_loop.json)
#
# Setup is idempotent: it runs again only when pyproject.toml is newer than the stamp
# file in .venv. torch is pinned to 2.13.0 and installed first, on its own, so that pip
# never picks a different (or a CUDA) build to satisfy the project's looser range.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.swarmfold-setup
TORCH_VERSION := 2.13.0
PYTEST_ARGS ?=
# `make test` runs on this many pytest-xdist workers (the suite is mostly peers waiting on each other and on
# the network, so two workers on two cores take about 60% of one worker's time); TEST_WORKERS=0 runs it in
# one process. Tests that share a module fixture stay on one worker (xdist_group marks, --dist loadgroup).
TEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadgroup)
DEMO_DIR ?= runs/demo
DEMO_PEERS ?= 3
DEMO_ARGS ?=

# `make test` installs Chromium first only where it can: as root with apt-get.
BROWSER_DEP := $(shell [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && echo browser)

.PHONY: setup demo test test-fast lint browser bench clean-demo

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "swarmfold needs Python >= 3.11; run: make PYTHON=python3.11 ..." >&2; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c 'import sys, torch; sys.exit(torch.__version__.split("+")[0] != "$(TORCH_VERSION)")' \
	  2>/dev/null || $(BIN)/pip install "torch==$(TORCH_VERSION)"
	$(BIN)/pip install -e '.[dev]'
	touch $@

# The demo: N real peers on 127.0.0.1 train the tiny model on stdlib shards, then the
# swarm is compared with each peer alone and with data-parallel (see README).
demo: $(STAMP)
	$(BIN)/swarmfold --log-level WARNING demo --peers $(DEMO_PEERS) --out $(DEMO_DIR) $(DEMO_ARGS)

clean-demo:
	rm -rf $(DEMO_DIR)

test: $(STAMP) $(BROWSER_DEP)
	$(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest $(XDIST) -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)  # both run, so one report shows every problem
	@status=0; \
	$(BIN)/ruff check swarmfold tests scripts || status=1; \
	$(BIN)/mypy || status=1; \
	exit $$status

browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then \
	  echo "chromium: $$(command -v chromium || command -v chromium-browser)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; \
	else \
	  echo "chromium is missing: install it as root (apt-get install chromium); the browser tests skip without it" >&2; \
	fi

bench: $(STAMP)
	$(BIN)/python scripts/bench_inner_loop.py
