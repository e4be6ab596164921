# swarmfold: the two commands of a fresh machine are `make demo` and `make test`.
#
#   make demo     set up .venv, then train on the embedded default corpus (the stdlib shards)
#   make test     set up .venv (and Chromium, as root), then run the whole test suite
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
DEMO_DIR ?= runs/demo
DEMO_ROUNDS ?= 6

# `make test` installs Chromium first only where it can: as root with apt-get.
BROWSER_DEP := $(shell [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && echo browser)

.PHONY: setup demo test lint browser bench clean-demo

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "swarmfold needs Python >= 3.11; run: make PYTHON=python3.11 ..." >&2; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c 'import sys, torch; sys.exit(torch.__version__.split("+")[0] != "$(TORCH_VERSION)")' \
	  2>/dev/null || $(BIN)/pip install "torch==$(TORCH_VERSION)"
	$(BIN)/pip install -e '.[dev]'
	touch $@

# Until the swarm demo lands, the demo trains one peer alone: the loss falls round by
# round, then the model writes a sample. (To be replaced by `swarmfold demo`.)
demo: $(STAMP)
	rm -rf $(DEMO_DIR)/work
	$(BIN)/swarmfold data stdlib --shards 2 --out $(DEMO_DIR)/data
	test -f $(DEMO_DIR)/spec.toml || $(BIN)/swarmfold init --preset tiny --out $(DEMO_DIR)/spec.toml
	$(BIN)/swarmfold --log-level WARNING train --spec $(DEMO_DIR)/spec.toml --data $(DEMO_DIR)/data/shard-0 \
	  --workdir $(DEMO_DIR)/work --rounds $(DEMO_ROUNDS) --threads 1
	$(BIN)/swarmfold --log-level WARNING eval $(DEMO_DIR)/work --data $(DEMO_DIR)/data/shard-1 --max-windows 256 --threads 1
	@echo "--- a sample from the model (prompt: 'def '):"
	@$(BIN)/swarmfold --log-level WARNING generate $(DEMO_DIR)/work --prompt "def " --tokens 200 --temperature 0.5 --threads 1

clean-demo:
	rm -rf $(DEMO_DIR)

test: $(STAMP) $(BROWSER_DEP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

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
