"""Run every benchmark and write the tables and JSON: a thin wrapper over ``packllm bench``.

python benchmarks/run_all.py --quick --out docs/results/bench-cpu-quick.json
python benchmarks/run_all.py --device cuda --out bench-cuda.json
"""

from __future__ import annotations

import sys

from langchain_packllm.lab.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
