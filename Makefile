# Two commands set everything up on a fresh machine:
#   make demo   # venv + install + the bootstrap cycle on the synthetic web
#   make test   # venv + install + the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
VLP := $(VENV)/bin/vlp

# Offline, no telemetry (the CLI sets the same defaults itself: vlp_core/env.py).
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export NO_ALBUMENTATIONS_UPDATE := 1
export RAY_USAGE_STATS_ENABLED := 0
export WANDB_MODE := disabled
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 60
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test bench clean help

help:
	@echo "make demo   - install, then run the bootstrap cycle on the synthetic web"
	@echo "make test   - install, then run the test suite"
	@echo "make bench  - run the benchmarks in bench/ (long)"
	@echo "make clean  - remove the venv and demo outputs"

install: $(VENV)/.installed

# img2dataset goes in with --no-deps: its `dataclasses` backport breaks Prefect's server.
$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps img2dataset==1.47.0
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

demo: install
	$(VLP) demo

test: install
	$(PY) -m pytest -q -ra --durations=15 tests

bench: install
	$(PY) bench/ingest.py

clean:
	rm -rf $(VENV) work demo
