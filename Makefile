# tuneloop: two commands do all set-up.
#   make demo   venv + install + the SFT pipeline on embedded defaults
#   make test   venv + install + the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
# one variable per export line: `export A=1 B=2` would set A to "1 B=2"
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export TOKENIZERS_PARALLELISM := false
export DS_ACCELERATOR := cpu
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: install sysdeps demo test lint bench clean help

help:
	@echo "make demo | make test | make lint | make bench | make clean"

$(STAMP): pyproject.toml requirements/constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	# torch first and pinned: pip takes the local CPU wheel; never let a resolver pick a CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c requirements/constraints.txt -e '.[dev]'
	$(PIP) check
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	PREFECT_HOME=$(CURDIR)/.tuneloop/prefect $(VENV)/bin/tuneloop demo $(ARGS)

# System packages the suite needs beyond the venv: headless Chromium renders the HTML report in a test.
# Installed here (not only in .ci/run) so `make test` alone passes on a fresh machine.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
sysdeps:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  echo "installing Debian package chromium (the report's headless-browser test)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; }

test: $(STAMP) sysdeps
	$(VENV)/bin/ruff check .
	PREFECT_HOME=$(CURDIR)/.tuneloop/prefect-test $(PY) -m pytest -q -p no:cacheprovider --durations=15 $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) -m bench.run_all

clean:
	rm -rf .tuneloop .cache
