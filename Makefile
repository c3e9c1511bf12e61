# The two commands of the quick start are `make run` and `make test`; everything else is optional.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test test-fast bench services services-stop clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

## run the demo on the embedded default (SQLite event store, DuckDB view, no broker)
run: install
	CDP_HOME=$${CDP_HOME:-.cdp/demo} $(BIN)/cdp demo

## install, start the services the tests need (unless CDP_KAFKA_BOOTSTRAP / CDP_POSTGRES_DSN are set), run the suite
test: install
	scripts/test.sh

## the suite without Kafka or PostgreSQL
test-fast: install
	$(BIN)/pytest -q -m "not kafka and not postgres"

bench: install
	$(BIN)/pip install --quiet -e '.[test,bench]'
	$(BIN)/python -m bench

services: install
	scripts/services.sh start

services-stop:
	scripts/services.sh stop

clean:
	rm -rf $(VENV) .cdp .services build *.egg-info
