# The two commands of the README: `make train` and `make test`. Both install what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-stamp
TORCH_CPU := torch==2.13.0
DEEPSPEED := deepspeed==0.19.8

export RAY_USAGE_STATS_ENABLED := 0
export WANDB_SILENT := true

.PHONY: install train test test-fast clean

install: $(STAMP)  ## idempotent: creates .venv and installs the project and test tools

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, a CPU build where there is no NVIDIA GPU (a bare `torch` pulls a CUDA build)
	if command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install -q 'torch>=2.4,<2.15'; \
	else $(PIP) install -q $(TORCH_CPU); fi
	# DeepSpeed is an sdist that imports torch at build time; its ops JIT-build when first used
	DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation $(DEEPSPEED)
	$(PIP) install -q --no-build-isolation -e '.[test]'
	touch $(STAMP)

train: install  ## train the default small GPT on the embedded corpus (pass overrides as ARGS="...")
	$(PY) -m launcher.train $(ARGS)

test: install  ## all tests, the slow end-to-end ones included (CI runs exactly this)
	$(PY) -m pytest -v $(PYTEST_ARGS)

test-fast: install  ## the tests that start no Ray cluster
	$(PY) -m pytest -v -m "not slow" $(PYTEST_ARGS)

clean:  ## remove runs, caches and W&B files (keeps .venv)
	rm -rf outputs multirun
