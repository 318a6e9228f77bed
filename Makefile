# `make run`: set up the environment when missing and run the main job (CIFAR-10, CPU-sized).
# `make test`: set up the environment when missing and run the test suite.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export DO_NOT_TRACK := true
export PYTHONUNBUFFERED := 1

.PHONY: setup run smoke test test-fast lint bench clean mlflow-ui prefect-server serve gpu-study docs

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c requirements.lock -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

# quest run ends with the report stage, so no separate `quest report` here
run: $(STAMP)
	$(BIN)/quest run
	$(BIN)/quest track
	$(BIN)/quest promote

smoke: $(STAMP)
	$(BIN)/quest run --preset smoke

# tests run in PYTEST_WORKERS processes (pytest-xdist), each test file on one worker, so a
# file's module fixtures (a DVC project, a Prefect server) are built once
PYTEST_WORKERS ?= 2
PYTEST_PAR := -n $(PYTEST_WORKERS) --dist loadfile

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q $(PYTEST_PAR)

# the everyday subset: every test not marked slow (make test still runs them all)
test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q $(PYTEST_PAR) -m "not slow and not cuda"

# the documentation site (docs/ + mkdocs.yml) into site/; `.venv/bin/mkdocs serve` previews it
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# local servers listen on 127.0.0.1 only; QUEST_SERVER_HOST=<address> chooses another interface
mlflow-ui: $(STAMP)
	$(BIN)/python -m flows.local_servers mlflow

prefect-server: $(STAMP)
	$(BIN)/python -m flows.local_servers prefect

# the champion student (models:/quest-student@champion) over HTTP on 127.0.0.1:5001, WORKERS
# processes (docs/serving.md):
# curl -X POST -H 'Content-Type: application/json' -d '{"images": ["<base64 JPEG>"]}'
#      http://127.0.0.1:5001/invocations      (or {"inputs": uint8 N x H x W x C})
WORKERS ?= 2
serve: $(STAMP)
	$(BIN)/python -m flows.local_servers model --workers $(WORKERS)

# The published-length comparison on CUDA (studies/gpu-cifar10.yaml). Runs with any Python that
# has torch, torchvision, numpy, pyyaml and pydantic (a GPU machine's own, without this venv;
# scripts/gpu_check.sh installs pydantic from .whl/ when it is missing):
# `make gpu-study GPU_PY=python3 SETTING=published`; records go to results/gpu-cifar10/.
GPU_PY ?= $(BIN)/python
SETTING ?= short
gpu-study:
	PYTHONPATH=. $(GPU_PY) -m quest study studies/gpu-cifar10.yaml --setting $(SETTING)

# K = 1024: the step goal's vocabulary (quest/kd <= 1.15x), the main job's default until K = 256
bench: $(STAMP)
	$(BIN)/quest bench --set codebook.k=1024

clean:
	rm -rf data/prepared data/features models/teacher models/codebook models/students \
		metrics plots reports logs .quest
