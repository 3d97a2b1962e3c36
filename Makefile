# Every target installs what it needs first, so a fresh clone needs nothing but python3.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint format run-agent bench bench-quick soak test-slow test-cluster dist clean install-systemd

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check chiffon_worker tests bench
	$(BIN)/ruff format --check chiffon_worker tests bench
	$(BIN)/mypy --strict chiffon_worker

format: install
	$(BIN)/ruff format chiffon_worker tests bench
	$(BIN)/ruff check --fix chiffon_worker tests bench

run-agent: install
	$(BIN)/chiffon-worker run --log-format text

# A wheel install compiles bytecode; this editable one may not have (under
# PYTHONDONTWRITEBYTECODE), and compiling at every start costs the worker half
# a MiB of memory that production never pays: measure what production runs.
bench: install
	$(BIN)/python -m compileall -q chiffon_worker
	$(BIN)/python -m bench

bench-quick: install
	$(BIN)/python -m compileall -q chiffon_worker
	$(BIN)/python -m bench --quick

soak: install
	$(BIN)/pytest -m soak -p no:cacheprovider -s tests/integration

test-slow: install
	$(BIN)/pytest -m slow -p no:cacheprovider tests/integration

# Starts three private RabbitMQ nodes as one cluster (about 20 s), then stops
# nodes under load: a few minutes, so not in `make test`.
test-cluster: install
	$(BIN)/pytest -m cluster -p no:cacheprovider tests/cluster

dist: install
	rm -rf dist
	$(BIN)/python -m build --outdir dist .

clean:
	rm -rf $(VENV) dist build *.egg-info .pytest_cache .mypy_cache .ruff_cache

# Installs the units for a venv already on the host: make install-systemd VENV_PATH=/opt/chiffon-worker/venv
VENV_PATH ?= /opt/chiffon-worker/venv
install-systemd:
	systemd/install.sh $(VENV_PATH)
