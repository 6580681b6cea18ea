"""Solver wall time against the block size of their passes over the scores (``weights._CPU_BLOCK_ELEMENTS``
on a CPU, ``weights._BLOCK_ELEMENTS`` elsewhere): the figures behind the CPU default of 2^20 elements.

    python benchmarks/solver_block_size.py [--device cpu] [--threads 2] [--out docs/results/solver-block-size-cpu.md]

Random problems as in ``packllm bench --only solve`` (``bench.random_problem``); each cell is the fastest of
``--repeats`` runs of ``weights.solve_with_stats`` (the engine's call), in milliseconds.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import torch

from langchain_packllm import weights as W
from langchain_packllm.lab.bench import random_problem, run_times

SHAPES = [(2, 64, 4096), (5, 64, 4096), (8, 64, 4096), (3, 512, 4096), (4, 256, 32000), (2, 512, 32000),
          (3, 512, 32000), (2, 128, 128000)]  # fmt: skip
BLOCKS = [25, 22, 20, 18]  # log2 of the elements per block
SOLVERS = ["optimal", "greedy", "grid", "uniform"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    attr = "_CPU_BLOCK_ELEMENTS" if torch.device(args.device).type == "cpu" else "_BLOCK_ELEMENTS"
    default = getattr(W, attr)
    lines = [
        f"Solver ms by block size ({attr}; default 2^{default.bit_length() - 1}), device {args.device}, "
        f"{args.threads} threads, fastest of {args.repeats}",
        "",
        "| K | T | V | solver | " + " | ".join(f"2^{b}" for b in BLOCKS) + " |",
        "|---|---|---|---|" + "---|" * len(BLOCKS),
    ]
    print("\n".join(lines), flush=True)
    try:
        for K, T, V in SHAPES:
            lp, y = random_problem(K, T, V, K)
            lp, y = lp.to(args.device), y.to(args.device)
            for name in SOLVERS:
                cells = []
                for b in BLOCKS:
                    setattr(W, attr, 1 << b)
                    times = run_times(partial(W.solve_with_stats, name, lp, y), args.repeats, args.device)
                    cells.append(f"{1e3 * min(times):.1f}")
                lines.append(f"| {K} | {T} | {V} | {name} | " + " | ".join(cells) + " |")
                print(lines[-1], flush=True)
    finally:
        setattr(W, attr, default)
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
