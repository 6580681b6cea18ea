"""Where the time of one fused call goes: time to first token split into its phases, and one decode step,
against the members' own prefill and cached step. Runs without LangChain (like ``gpu_bench.py``).

    python benchmarks/profile_call.py --device cuda --size 1b --dtype bfloat16 -K 2 --prompt 256

Each phase is timed with a device synchronisation before and after, so the phases add up to slightly more
than an unsynchronised call; ``--profile`` also prints torch.profiler's table for one call.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import types
from collections import defaultdict
from pathlib import Path

_pkg = types.ModuleType("langchain_packllm")
_pkg.__path__ = [str(Path(__file__).resolve().parents[1] / "langchain_packllm")]
sys.modules.setdefault("langchain_packllm", _pkg)


from langchain_packllm.engine import FusionEngine, SamplingConfig, WeightingConfig  # noqa: E402
from langchain_packllm.lab import bench  # noqa: E402
from langchain_packllm.members import load_member  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", default="toy", choices=sorted(bench.MEMBER_SIZES))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("-K", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    hidden, layers = bench.MEMBER_SIZES[args.size]
    cfg = bench.BenchConfig(
        device=args.device, hidden=hidden, layers=layers, dtype=args.dtype, ttft_prompt=args.prompt
    )
    sync = lambda: bench._sync(args.device)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        paths = bench.make_bench_pack(tmp, cfg, args.K)
        members = [
            load_member(p, name=Path(p).name, device=args.device, torch_dtype=args.dtype) for p in paths
        ]
        engine = FusionEngine(members)
        prompt = bench.random_prompts(cfg.vocab_size, args.prompt, 1, 0)
        one = SamplingConfig(max_new_tokens=1)
        for _ in range(3):
            engine.generate(prompt, WeightingConfig("optimal"), one)
        phases: dict[str, list[float]] = defaultdict(list)

        def timed(name, fn):
            def wrapper(*a, **kw):
                sync()
                start = time.perf_counter()
                out = fn(*a, **kw)
                sync()
                phases[name].append(time.perf_counter() - start)
                return out

            return wrapper

        plain = {n: getattr(engine, n) for n in ("encode", "_prefill_scores", "_solve", "_choose")}
        for name, fn in plain.items():
            setattr(engine, name, timed(name, fn))
        total = []
        for _ in range(args.repeats):
            sync()
            start = time.perf_counter()
            engine.generate(prompt, WeightingConfig("optimal"), one)
            sync()
            total.append(time.perf_counter() - start)
        for name in plain:
            delattr(engine, name)
        ids, mask = engine.scorer.pad(engine.reference(0), [engine.encode(prompt[0])])
        own = [
            statistics.median(bench.member_prefill_seconds(m.model, ids, mask) for _ in range(args.repeats))
            for m in members
        ]
        med = {n: 1e3 * statistics.median(v) for n, v in phases.items()}
        print(f"K={args.K} size={args.size} dtype={args.dtype} prompt={args.prompt} device={args.device}")
        print(f"members' own prefill ms: {[round(1e3 * t, 2) for t in own]} (sum {1e3 * sum(own):.2f})")
        for name, ms in med.items():
            print(f"  {name:16s} {ms:8.2f} ms")
        rest = 1e3 * statistics.median(total) - sum(med.values())
        print(f"  {'(rest)':16s} {rest:8.2f} ms")
        print(f"  {'TTFT total':16s} {1e3 * statistics.median(total):8.2f} ms")
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + (
                [ProfilerActivity.CUDA] if args.device.startswith("cuda") else []
            )
            with profile(activities=acts) as prof:
                engine.generate(prompt, WeightingConfig("optimal"), SamplingConfig(max_new_tokens=4))
            print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30))
    return 0


if __name__ == "__main__":
    sys.exit(main())
