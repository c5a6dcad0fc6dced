# The two commands a newcomer runs: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 8080
REPOSITORY ?= examples/models

.PHONY: run test package venv lint bench examples clean etcd

# Re-install only when the dependency list changes.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# KServe's and MLServer's clients for the tests, without their conflicting pins (pyproject)
	$(BIN)/python -m pip install --quiet --no-deps --upgrade --target $(VENV)/third-party-clients \
		kserve==0.21.0 mlserver==1.7.1
	touch $@

venv: $(VENV)/.installed

# serverless@3 and serverless-offline@13, pinned by package-lock.json (tests run them).
node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

# etcd for the registry tests (docs/registry.md): Debian's etcd-server, installed only when
# `etcd` is missing and apt-get is there (as root); elsewhere those tests are skipped.
etcd:
	@command -v etcd >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || \
	  [ "$$(id -u)" != 0 ] || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq --no-install-recommends etcd-server >/dev/null; }

run: venv
	$(BIN)/shardserve serve --repository $(REPOSITORY) --host $(HOST) --port $(PORT)

test: venv node_modules/.installed etcd
	$(BIN)/python -m pytest -q

# One self-contained zip per Lambda function in build/lambda (docs/serverless.md#deploying).
package: venv node_modules/.installed
	SLS_TELEMETRY_DISABLED=1 PATH="$(abspath $(BIN)):$$PATH" npx serverless package

lint: venv
	$(BIN)/ruff check runtime plugins handlers tests benchmarks examples

bench: venv
	$(BIN)/python benchmarks/overhead.py

# Rebuild the example models (deterministic: seeded, same bytes every time).
examples: venv
	$(BIN)/python examples/build_models.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
