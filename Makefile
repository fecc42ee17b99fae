# Two commands on a fresh machine: `make run` (the service on :8003) and `make test`.
PYTHON ?= python3
HOST ?= 127.0.0.1
PORT ?= 8003
# uvicorn processes. One for the embedded default: its rate limits (memory://) count per
# process. With RATE_LIMIT_STORAGE=redis://… run one per core: `make run WORKERS=$$(nproc)`.
WORKERS ?= 1
# pytest processes for `make test` (pytest-xdist), each with its own test database. The
# slow tests are handed out first, two tests at a time, so no long one is left for the end.
TEST_WORKERS ?= 2
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test worker migrate bench bench-quick

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.runtime: requirements.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@ $(VENV)/.runtime

run: $(VENV)/.runtime
	$(BIN)/uvicorn main:app --host $(HOST) --port $(PORT) --workers $(WORKERS) \
		--http serving:GuardedHTTP --timeout-keep-alive 5

# The independent DKIM verifier the tests check our signatures with (Debian's opendkim,
# run in its test mode only; its service is not needed).
OPENDKIM := /usr/sbin/opendkim
$(OPENDKIM):
	apt-get install -y -q --no-install-recommends opendkim \
		|| (apt-get update -q && apt-get install -y -q --no-install-recommends opendkim)

test: $(VENV)/.dev $(OPENDKIM)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .
	$(BIN)/pytest -n $(TEST_WORKERS) --maxschedchunk 2

worker: $(VENV)/.runtime
	$(BIN)/python worker.py

migrate: $(VENV)/.runtime
	$(BIN)/alembic upgrade head

# Not part of `make test`: minutes of load on PostgreSQL, SMTP sinks and the service.
bench: $(VENV)/.dev
	sh bench/setup.sh
	$(BIN)/python bench/run.py

bench-quick: $(VENV)/.dev
	sh bench/setup.sh
	$(BIN)/python bench/run.py --quick
