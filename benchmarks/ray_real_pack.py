"""The real pack (packllm pack real: three GGUF members of three vocabularies, MinED) on backend="ray"
against the in-process engine: outputs compared token for token, fused decode step and time to first
token, interleaved repeats, medians.

    .venv/bin/python benchmarks/ray_real_pack.py [--tokens 16] [--repeats 3] [--threads 1]

The actors use ``--threads`` torch threads each (the in-process engine too, so that both compute the
same floats); Ray runs locally with the machine's cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import ray

    from langchain_packllm import FusionEngine, SamplingConfig, WeightingConfig
    from langchain_packllm.lab.pack.real import REAL_NAMES, real_pack_paths
    from langchain_packllm.members import load_member
    from langchain_packllm.ray_backend import LOCAL_SYSTEM_CONFIG, load_ray_engine

    paths = real_pack_paths()
    ray.init(
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        log_to_driver=False,
        _system_config=LOCAL_SYSTEM_CONFIG,
    )
    local = FusionEngine([load_member(p, name=n, device="cpu") for p, n in zip(paths, REAL_NAMES)])
    remote = load_ray_engine(
        paths, names=REAL_NAMES, device="cpu", member_resources=[{"torch_threads": args.threads}] * 3
    )
    local.prepare_alignment(progress=False)
    remote.prepare_alignment(progress=False)
    prompt = ['def parse_args(argv):\n    """Parse the command line."""\n    parser = argparse.']
    sampling = SamplingConfig(max_new_tokens=args.tokens)
    first = SamplingConfig(max_new_tokens=1)
    weighting = WeightingConfig("optimal")
    a, b = local.generate(prompt, weighting, sampling)[0], remote.generate(prompt, weighting, sampling)[0]
    equal = a.token_ids == b.token_ids and a.report.weights == b.report.weights
    times = {"inprocess_call": [], "ray_call": [], "inprocess_ttft": [], "ray_ttft": []}
    for _ in range(args.repeats):
        for name, engine in (("inprocess", local), ("ray", remote)):
            t0 = time.perf_counter()
            engine.generate(prompt, weighting, first)
            times[f"{name}_ttft"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = engine.generate(prompt, weighting, sampling)[0]
            times[f"{name}_call"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    n = len(a.token_ids)
    row = {
        "members": REAL_NAMES,
        "new_tokens": n,
        "outputs_equal": equal,
        "weights": b.report.weights,
        "reference": b.report.reference,
        "inprocess_ttft_ms": 1e3 * med["inprocess_ttft"],
        "ray_ttft_ms": 1e3 * med["ray_ttft"],
        # per-step: (whole call - TTFT) / (tokens - 1)
        "inprocess_step_ms": 1e3 * (med["inprocess_call"] - med["inprocess_ttft"]) / max(n - 1, 1),
        "ray_step_ms": 1e3 * (med["ray_call"] - med["ray_ttft"]) / max(n - 1, 1),
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "last_text": out.text,
    }
    print(json.dumps(row, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(row, f, indent=2)
    remote.close()
    ray.shutdown()


if __name__ == "__main__":
    main()
