#!/usr/bin/env bash
# Fusion overhead on one CUDA GPU: K members on cuda:0, the mix on cuda:0.
# Usage: bash benchmarks/gpu_bench.sh [python]   (run from the repository root)
# Writes bench-cuda-quick.json and bench-cuda.json and prints the tables.
# The decode/TTFT figures are ratios within one run; peak memory uses torch.cuda.max_memory_allocated.
set -euo pipefail
PY="${1:-.venv/bin/python}"
export PYTHONPATH="${PYTHONPATH:-}:$(pwd)"
"$PY" - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device visible"
print("GPU:", torch.cuda.get_device_name(0))
PY
# Correctness on the GPU first: the engine's tests against naive decoders, with members on cuda:0.
PACKLLM_TEST_DEVICE=cuda "$PY" -m pytest -q tests/unit_tests/test_engine.py -x
"$PY" -m langchain_packllm.cli bench --quick --device cuda --out bench-cuda-quick.json
# Full sizes (vocab 32k; solvers up to V=128k; the solver section runs on the CPU tensors it builds).
"$PY" -m langchain_packllm.cli bench --device cuda --only decode,ttft,memory --out bench-cuda.json
