"""Host-side cost of the solvers: ``optimal`` and ``greedy`` on problems so small (T = 8, V = 256) that the
arithmetic is negligible, so what is timed is Python and per-op dispatch (on a GPU, launches add to it).

    python benchmarks/solver_host_overhead.py [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial

import torch

from langchain_packllm import weights as W
from langchain_packllm.lab.bench import random_problem, run_times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| K | optimal ms | greedy ms |\n|---|---|---|")
    for K in (2, 3, 5, 8):
        lp, y = random_problem(K, 8, 256, K)
        lp, y = lp.to(args.device), y.to(args.device)
        res = {}
        for name in ("optimal", "greedy"):
            for _ in range(5):
                W.solve_with_stats(name, lp, y)
            times = run_times(partial(W.solve_with_stats, name, lp, y), args.repeats, args.device)
            res[name] = 1e3 * statistics.median(times)
        print(f"| {K} | {res['optimal']:.3f} | {res['greedy']:.3f} |")


if __name__ == "__main__":
    main()
