# The two commands of the README: `make serve` and `make test`. Both install what they need first.
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 5001

.PHONY: setup serve test lint typecheck unit

setup:
	@./scripts/setup.sh

serve: setup
	$(BIN)/sd-endpoint serve --host $(HOST) --port $(PORT)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy src/

unit: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test: lint typecheck unit
