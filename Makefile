# Every target sets itself up: a fresh Debian machine with Python 3.11 needs nothing else.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_ARGS ?= --scenario outage --duration 25

.PHONY: demo test unit integration bench bench-failover bench-replication bench-reconcile bench-switchover bench-fleet lint fmt clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: install Python 3.11" >&2; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ddb-sidecar demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/pytest

unit: $(STAMP)
	$(BIN)/pytest tests/unit

integration: $(STAMP)
	$(BIN)/pytest tests/integration

bench: $(STAMP)
	@command -v wrk >/dev/null || { command -v apt-get >/dev/null && (apt-get install -y -qq wrk >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq wrk >/dev/null)) || echo "wrk not installed: the benchmark falls back to its Python load generator"; }
	$(BIN)/python -m bench.proxy_bench

bench-failover: $(STAMP)
	$(BIN)/python -m bench.failover_bench $(BENCH_ARGS)

bench-replication: $(STAMP)
	$(BIN)/python -m bench.replication_bench $(BENCH_ARGS)

bench-reconcile: $(STAMP)
	$(BIN)/python -m bench.reconcile_bench $(BENCH_ARGS)

bench-switchover: $(STAMP)
	$(BIN)/python -m bench.switchover_bench $(BENCH_ARGS)

bench-fleet: $(STAMP)
	$(BIN)/python -m bench.fleet_bench $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check sidecar tests bench
	$(BIN)/ruff format --check sidecar tests bench
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff format sidecar tests bench
	$(BIN)/ruff check --fix sidecar tests bench

clean:
	rm -rf $(VENV) run .pytest_cache .mypy_cache .ruff_cache
