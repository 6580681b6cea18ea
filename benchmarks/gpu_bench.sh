#!/usr/bin/env bash
# Fusion overhead on one CUDA GPU: K members on cuda:0, the mix on cuda:0.
# Usage: bash benchmarks/gpu_bench.sh [python]   (run from the repository root)
# Writes bench-cuda-*.json and prints the tables.
# Decode/TTFT figures are ratios within one run; peak memory is torch.cuda.max_memory_allocated.
set -euo pipefail
PY="${1:-python}"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
# Correctness first: float64 members on cuda (and split cpu+cuda) decode what they decode on the CPU.
"$PY" benchmarks/gpu_check.py
if "$PY" -c "import langchain_core" 2>/dev/null; then
  # The engine's tests against naive decoders, with the members on cuda:0.
  PACKLLM_TEST_DEVICE=cuda "$PY" -m pytest -q tests/unit_tests/test_engine.py -x
fi
"$PY" benchmarks/gpu_bench.py --quick --device cuda --out bench-cuda-quick.json
# Members of TinyLlama's shape (1.1B parameters) in bfloat16, as they would be served.
"$PY" benchmarks/gpu_bench.py --quick --device cuda --size 1b --dtype bfloat16 --out bench-cuda-1b-quick.json
"$PY" benchmarks/gpu_bench.py --device cuda --size 1b --dtype bfloat16 --only solve --out bench-cuda-1b-solve.json
