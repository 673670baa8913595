# The two commands of the README: `make serve` and `make test`. Both install what they need first.
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 5001

.PHONY: setup setup-test serve test lint typecheck unit

setup:
	@./scripts/setup.sh

# The tests also need a headless browser (the playground test); serving does not.
setup-test:
	@SD_ENDPOINT_SETUP_BROWSER=1 ./scripts/setup.sh

serve: setup
	$(BIN)/sd-endpoint serve --host $(HOST) --port $(PORT)

lint: setup-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup-test
	$(BIN)/mypy src/

unit: setup-test
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test: lint typecheck unit
