# `make run`: set up the environment when missing and run the main job (CIFAR-10, CPU-sized).
# `make test`: set up the environment when missing and run the test suite.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export DO_NOT_TRACK := true
export PYTHONUNBUFFERED := 1

.PHONY: setup run smoke test lint bench clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c requirements.lock -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/quest run
	$(BIN)/quest track
	$(BIN)/quest promote

smoke: $(STAMP)
	$(BIN)/quest run --preset smoke

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/kmeans_bench.py

clean:
	rm -rf data/prepared data/features models/teacher models/codebook models/students \
		metrics plots logs .quest
