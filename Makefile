# MedExperts: `make run` sets everything up and runs the default pipeline; `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
PROFILE ?=
ARGS ?=
# pytest-xdist processes for the suite: each has its own Prefect server and its share of the CPU threads. Two halve
# the idle time of the end-to-end tests (they wait on subprocesses and servers) on a 2-core machine; WORKERS=0 runs
# the suite in one process (e.g. to debug with -s or pdb).
WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(WORKERS) --maxschedchunk 1

.DEFAULT_GOAL := help
.PHONY: help setup run test test-fast test-flower repro ui bench lint clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-8s %s\n", $$1, $$2}'

# .ci/install: uv with pip's configuration (a fraction of pip's time); MEDEXPERTS_INSTALLER=pip installs with pip
$(VENV)/.installed: pyproject.toml .ci/install .ci/pip_config.py
	bash .ci/install $(VENV) -e ".[test]"
	@touch $@

setup: $(VENV)/.installed ## create .venv and install the project (CPU torch 2.13.0)

run: setup ## run the retrain pipeline on the shipped data (quick profile; PROFILE=full for all data)
	$(BIN)/medexperts run $(if $(PROFILE),--profile $(PROFILE)) $(ARGS)

# The Flower parity test (its own site environment: an install, then a SuperLink's rounds it mostly waits on) runs
# beside the suite; its output follows the suite's, and either failing fails the target.
test: setup ## what CI runs: the import-layer contract, the test suite, the Flower parity test in a site environment
	$(BIN)/lint-imports --no-cache
	@echo "bash .ci/flower > .flower-test.log (beside the suite)"; bash .ci/flower > .flower-test.log 2>&1 & site=$$!; \
	$(PYTEST) $(ARGS); suite=$$?; \
	wait $$site; flower=$$?; echo "--- bash .ci/flower (exit $$flower):"; cat .flower-test.log; \
	exit $$(( suite != 0 || flower != 0 ))

test-flower: ## only the Flower parity test (a second venv, .flower-venv: the flwr extra, no orchestration stack)
	bash .ci/flower

test-fast: setup ## the suite without the end-to-end (slow) tests: a contributor's inner loop
	$(BIN)/lint-imports --no-cache
	$(PYTEST) -m "not slow" $(ARGS)

repro: setup ## reproduce the stages with DVC (dvc.yaml; refused while it lags the stage table's code deps)
	$(BIN)/medexperts dvc-yaml --check
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro $(ARGS)

ui: setup ## open the MLflow UI on 127.0.0.1:5000
	$(BIN)/medexperts ui

BENCH_WORK ?= .bench-work

bench: setup ## run the benchmarks (bench/results/*.json + MLflow runs), then refresh the README tables
	$(BIN)/medexperts bench pipeline
	$(BIN)/medexperts bench train_throughput
	$(BIN)/medexperts bench experts --work $(BENCH_WORK)
	$(BIN)/medexperts bench decompose
	$(BIN)/medexperts bench fusion --work $(BENCH_WORK)
	$(BIN)/medexperts bench routing
	$(BIN)/medexperts bench federated
	$(BIN)/medexperts bench baselines
	$(BIN)/medexperts bench multilabel_probe
	$(BIN)/medexperts bench fixed_cost
	$(BIN)/medexperts bench full_profile_time
	$(BIN)/medexperts bench readme

lint: setup ## compile-check every module
	$(PY) -m compileall -q components flows tests bench

clean: ## stop the project's Prefect server, remove generated artifacts and local tracking state (keeps .venv)
	if [ -x $(BIN)/medexperts ]; then $(BIN)/medexperts services down; fi
	rm -rf artifacts mlruns mlflow.db .prefect .dvc/cache .dvc/tmp
