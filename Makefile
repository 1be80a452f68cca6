# evsim: `make run` and `make test` bootstrap .venv from the project's own files.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
EXTRAS ?= dev,live
comma  := ,
# one stamp per set of extras installed into .venv (installed again when pyproject.toml is
# newer): .installed-base is the package and its runtime dependencies alone, what `make run`
# needs (about half the install time of dev,live: a fresh clone shows its table sooner)
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
BASE   := $(VENV)/.installed-base

.PHONY: run test test-slow lint bench bench-protocol bench-live bench-hops lab diagrams test-protocol-long clean venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed-%: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".$(if $(filter base,$*),,[$(subst -,$(comma),$*)])"
	touch $@

venv: $(STAMP)

run: $(BASE)
	$(BIN)/evsim simulate --out runs/default

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/sim_throughput.py

bench-protocol: $(STAMP)
	$(BIN)/python bench/protocol_throughput.py

bench-live: $(STAMP)
	$(BIN)/python bench/live_load.py

bench-hops: $(STAMP)
	$(BIN)/python bench/live_hops.py

diagrams: $(STAMP)
	$(BIN)/python docs/make_diagrams.py

test-protocol-long: $(STAMP)
	EVSIM_PROTOCOL_EXAMPLES=5000 $(BIN)/python -m pytest -q tests/test_protocol_stateful.py

lab:
	$(MAKE) EXTRAS=dev,live,lab venv
	$(BIN)/jupyter lab notebooks/

clean:
	rm -rf runs .pytest_cache

.PHONY: reliability
reliability: $(STAMP)
	$(BIN)/python bench/reliability.py --runs 3
