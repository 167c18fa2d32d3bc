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

.PHONY: install train test test-fast clean cluster-up cluster-down serve bench gpu-wheels

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

serve: install  ## serve the newest export of the newest run on 127.0.0.1:8000 (OpenAI-compatible)
	$(PY) -m launcher.serve $(ARGS)

test: install  ## all tests, the slow end-to-end ones included (CI runs exactly this)
	$(PY) -m pytest -v --durations=15 $(PYTEST_ARGS)

test-fast: install  ## the tests that start no Ray cluster
	$(PY) -m pytest -v -m "not slow" $(PYTEST_ARGS)

bench: install  ## the speed benchmarks (benchmarks/*.py): tables printed, JSON in benchmarks/results/
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/bf16_parity.py
	$(PY) benchmarks/optimizer_step.py
	$(PY) benchmarks/decode_throughput.py
	$(PY) benchmarks/prefix_cache.py
	$(PY) benchmarks/chunked_prefill.py
	$(PY) benchmarks/int8_kernels.py
	$(PY) benchmarks/guided_decoding.py
	$(PY) benchmarks/serve_throughput.py
	$(PY) benchmarks/prefix_routing.py
	$(PY) benchmarks/recipe_parity.py $(if $(DATA),--data $(DATA),)

# Wheels for benchmarks/gpu.sh on an offline GPU machine with Python 3.12 and its own CUDA torch.
GPU_WHEELS := benchmarks/wheels
gpu-wheels: install  ## download/build the wheels benchmarks/gpu.sh installs (Python 3.12, x86_64 Linux)
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	DS_BUILD_OPS=0 $(PIP) wheel -q --no-deps --no-build-isolation -w $(GPU_WHEELS) $(DEEPSPEED) antlr4-python3-runtime==4.9.3
	$(PIP) download -q --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d $(GPU_WHEELS) \
	  pydantic einops hjson msgpack ninja numpy packaging psutil py-cpuinfo tqdm PyYAML
	$(PIP) download -q --no-deps --only-binary=:all: -d $(GPU_WHEELS) hydra-core==1.3.8 omegaconf==2.3.1

# A local Ray head for trying `ray job submit` (cluster/README.md). Loopback only, so token auth is
# explicitly off here and in the submit recipe; real clusters use RAY_AUTH_MODE=token. The venv
# goes first on PATH so job entrypoints (`python -m launcher.train`) run with this project's Python.
RAY_PORT ?= 6379
DASHBOARD_PORT ?= 8265
CLUSTER_CPUS ?= 4
cluster-up: install  ## start a local Ray head on 127.0.0.1 (dashboard/job API on :8265)
	PATH="$(abspath $(VENV))/bin:$$PATH" RAY_AUTH_MODE=disabled $(VENV)/bin/ray start --head \
	  --node-ip-address=127.0.0.1 --port=$(RAY_PORT) --dashboard-host=127.0.0.1 \
	  --dashboard-port=$(DASHBOARD_PORT) --num-cpus=$(CLUSTER_CPUS) --disable-usage-stats
	@echo "submit: RAY_AUTH_MODE=disabled $(VENV)/bin/ray job submit --address http://127.0.0.1:$(DASHBOARD_PORT) --working-dir . --runtime-env cluster/runtime_env.yaml -- python -m launcher.train cluster=multi_node cluster.shared_storage=true run.storage=$(CURDIR)/outputs/runs ..."

cluster-down:  ## stop the local Ray head (and any Ray processes of this user)
	$(VENV)/bin/ray stop --force

clean:  ## remove runs, caches and W&B files (keeps .venv)
	rm -rf outputs multirun
