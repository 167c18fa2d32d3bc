#!/usr/bin/env bash
# One-GPU benchmark for a machine with Python 3.12 and a CUDA build of torch but no network, Ray,
# DeepSpeed, Hydra or W&B: installs DeepSpeed, hydra-core and omegaconf (and their dependencies)
# from the wheel files in benchmarks/wheels/ (`make gpu-wheels` puts them there), then runs
# benchmarks/gpu_bench.py: DeepSpeed ZeRO-1 bf16 training of the GPT-2 124M-class model without
# Ray (tokens/s, MFU) and the serving engine's decode tokens/s. Well inside 10 minutes on one H200.
#
#   bash benchmarks/gpu.sh [extra gpu_bench.py arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=benchmarks/wheels

"$PY" -c 'import torch, sys; assert torch.cuda.is_available(), "no CUDA GPU visible"; print("torch", torch.__version__, "on", torch.cuda.get_device_name(0), "python", sys.version.split()[0])'
if ! "$PY" -c 'import deepspeed, omegaconf, hydra' 2>/dev/null; then
  if [ ! -d "$WHEELS" ]; then
    echo "no $WHEELS/: run 'make gpu-wheels' on a machine with network access and carry the folder here" >&2
    exit 2
  fi
  # --no-index: nothing from the network; --no-deps on torch's side: keep the machine's CUDA build
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" deepspeed hydra-core omegaconf
fi
export DS_BUILD_OPS=0 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" benchmarks/gpu_bench.py "$@"
