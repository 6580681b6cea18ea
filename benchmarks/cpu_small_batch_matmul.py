"""Why a small batch decodes slower than its prompts one by one on this CPU: a matrix product of a few rows
(a batched decode step, M = batch size) against a member's weight costs several times one row's.

    python benchmarks/cpu_small_batch_matmul.py [threads]  # ms per torch.nn.functional.linear (default 2)
"""

import sys
import time

import torch

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)


def ms(f, n: int = 6) -> float:
    f()
    start = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - start) / n * 1e3


# Gemma-3-270M's output layer, Qwen2.5-0.5B's MLP up/down projections, Gemma's attention output
for V, H in ((262144, 640), (4864, 896), (896, 4864), (2048, 640)):
    W = torch.randn(V, H)
    cells = []
    for M in (1, 2, 3, 4, 8, 16):
        x = torch.randn(M, H)
        cells.append(f"M={M}: {ms(lambda x=x, W=W: torch.nn.functional.linear(x, W)):.1f}")
    print(f"({V}, {H}) ms per product:", ", ".join(cells), flush=True)
