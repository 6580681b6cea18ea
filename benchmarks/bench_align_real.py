"""MinED map build times on the real pack's tokenizers (SmolLM2 49,152, Gemma 3 262,144, Qwen2.5 151,936):
every directed map built cold by the fast search, against the exhaustive search (every approximate token
against every candidate, rapidfuzz ``cdist`` on all cores) timed on a random sample of tokens per
direction and extrapolated; the sampled tokens' maps are checked equal.

Needs the real pack (``packllm pack real``). Run from the repo root (about 2 minutes on 2 cores):
    python -m benchmarks.bench_align_real --out docs/results/bench-align-real.json

The same as ``packllm bench --only align``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from langchain_packllm.lab.bench import BenchConfig, format_results, run_all


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="", help="write the JSON results here")
    args = parser.parse_args(argv)
    results = run_all(
        BenchConfig.quick_config(), only=("align",), progress=lambda m: print(m, file=sys.stderr)
    )
    print(format_results(results))
    if args.out:
        Path(args.out).write_text(json.dumps(asdict(results), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
