# cspine — every pipeline step is a target. `make help` lists them with inputs and outputs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
PRESET ?= demo
DATA ?= data/synth_$(PRESET)
WORK ?= work/$(PRESET)
JOBS ?= 2
export WANDB_MODE ?= offline

.PHONY: help install test test-all synth check-data lint

help:  ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	$(VENV)/bin/pip install "$(TORCH)"
	$(VENV)/bin/pip install -e ".[dev]"
	touch $@

install: $(VENV)/.installed  ## create .venv: torch ($(TORCH)) first, then cspine with dev extras

test: install  ## run the test suite (slow tests included; skip them with PYTEST_ARGS='-m "not slow"')
	WANDB_MODE=disabled $(PY) -m pytest -q $(PYTEST_ARGS)

synth: install  ## write the synthetic dataset: PRESET=tiny|demo|full -> DATA
	$(VENV)/bin/cspine synth $(DATA) --preset $(PRESET)

check-data: install  ## census and validation of DATA -> WORK/qc_data.csv
	$(VENV)/bin/cspine check-data $(DATA) --out $(WORK)/qc_data.csv

.PHONY: folds
folds: install  ## stratified CV folds of DATA/train.csv -> WORK/folds.csv (made once, then reused)
	$(VENV)/bin/cspine folds $(DATA) --out $(WORK)/folds.csv
