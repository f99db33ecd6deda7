# The project's commands. Make creates and uses its own virtualenv (.venv); nothing is
# installed into the system Python. Real servers (Cassandra from Maven Central, etcd from
# Debian) are fetched into ~/.cache/redledger by clients/localcluster/, never into the repo.

PYTHON_SYS ?= python3.11
VENV       ?= .venv
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.installed
REGIONS    ?= r1
PORT       ?= 50051

.PHONY: help install proto run lint test test-fast services services-stop services-status bench chaos certs clean

help:
	@echo "make run              ledger on the embedded default at localhost:$(PORT)"
	@echo "make lint             ruff + mypy (configured in pyproject.toml); make test runs it first"
	@echo "make test             lint, then the whole suite (starts real Cassandra + etcd itself)"
	@echo "make test-fast        unit + embedded-store tests only"
	@echo "make services         start real Cassandra ($(REGIONS)) + etcd on loopback"
	@echo "make services-status / services-stop"
	@echo "make bench            ledger-bench on the embedded default and on Cassandra + etcd"
	@echo "make chaos            every ledger-chaos drill; report in chaos-out/"
	@echo "make proto            regenerate clients/python/ledgerpb from proto/"
	@echo "make certs            a development CA, certificates and policy in certs/ (mutual TLS)"

# Two distributions: the server (this directory) and the client library with the generated
# stubs (clients/python, redledger-client), which the server imports too.
$(STAMP): pyproject.toml clients/python/pyproject.toml
	@command -v $(PYTHON_SYS) >/dev/null || { echo "need $(PYTHON_SYS)"; exit 1; }
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip==24.3.1
	$(PY) -m pip install --quiet -e ./clients/python -e '.[dev,bench]'
	touch $(STAMP)

install: $(STAMP)

proto: $(STAMP)
	PYTHON=$(PY) proto/generate.sh

run: $(STAMP)
	$(VENV)/bin/ledgerd dev --port $(PORT)

# Development certificates only (the CA key sits beside them): ledgerctl certs --help.
certs: $(STAMP)
	$(VENV)/bin/ledgerctl certs --dir certs

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy

# The suite runs only on code that passes the lint.
test: $(STAMP) lint
	$(PY) -m pytest -p no:cacheprovider -rs --durations=40

test-fast: $(STAMP)
	$(PY) -m pytest -p no:cacheprovider -m "not real"

services: $(STAMP)
	$(PY) -m clients.localcluster start --regions $(REGIONS)

services-stop: $(STAMP)
	$(PY) -m clients.localcluster stop

services-status: $(STAMP)
	$(PY) -m clients.localcluster status

bench: $(STAMP)
	$(VENV)/bin/ledger-bench --backend embedded
	$(VENV)/bin/ledger-bench --backend cassandra

# Every scenario under a transfer load beside the bank (transfers/s offered; 0: the bank only).
CHAOS_LOAD ?= 60
chaos: $(STAMP)
	$(VENV)/bin/ledger-chaos --load $(CHAOS_LOAD) --out chaos-out

clean:
	rm -rf $(VENV) .ledger-dev build *.egg-info
