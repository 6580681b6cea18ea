#!/usr/bin/env bash
# Fusion overhead on one CUDA GPU: K members on cuda:0, the mix on cuda:0.
# Usage: bash benchmarks/gpu_bench.sh [python] [outdir]   (run from the repository root)
# Writes bench-cuda-*.json into outdir (default .) and prints the tables.
# Decode/TTFT figures are ratios within one run; peak memory is torch.cuda.max_memory_allocated.
set -euo pipefail
PY="${1:-python}"
OUT="${2:-.}"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
# Correctness first: float64 members on cuda (and split cpu+cuda) decode what they decode on the CPU.
"$PY" benchmarks/gpu_check.py
if "$PY" -c "import langchain_core" 2>/dev/null; then
  # The engine's tests against naive decoders, with the members on cuda:0.
  PACKLLM_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider tests/unit_tests/test_engine.py -x
fi
# Toy members (hidden 256, 4 layers, float32): fixed per-step costs weigh the most.
"$PY" benchmarks/gpu_bench.py --device cuda --out "$OUT/bench-cuda-toy.json"
# Members of TinyLlama's shape (1.1B parameters) in bfloat16, as they would be served.
"$PY" benchmarks/gpu_bench.py --device cuda --size 1b --dtype bfloat16 --out "$OUT/bench-cuda-1b.json"
