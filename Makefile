# One command per check, for humans and CI alike.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# PyTorch is installed first, from a spec the caller can set, so a CPU machine never
# pulls a CUDA build by accident. CUDA machines: make install TORCH_SPEC="torch==2.13.0"
# with the index of their choice in PIP_EXTRA_INDEX_URL.
TORCH_SPEC ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL ?= tiny
PYTEST_ARGS ?=

.PHONY: install lint test check serve clean

$(BIN)/kontext-server: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	@if [ -f tests/e2e/js/package.json ] && command -v npm >/dev/null; then \
	  (cd tests/e2e/js && npm ci --silent --no-audit --no-fund); fi
	@touch $@

install: $(BIN)/kontext-server

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports

test: install
	HF_HUB_OFFLINE=1 $(BIN)/pytest $(PYTEST_ARGS)

check: lint test

serve: install
	$(BIN)/kontext-server serve --host $(HOST) --port $(PORT) --model $(MODEL)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
