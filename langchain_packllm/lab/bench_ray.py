"""``packllm bench --only ray``: the Ray backend (members in Ray actors) against the in-process engine.

For each pack size K and batch size B, on the same saved members: the fused decode step and the time to
first token of the in-process engine and of ``backend="ray"``, interleaved and summarised by medians; the
members' own cached steps (the bound: their sum for members run in turn in one process, their maximum for
members stepping concurrently each on its own device); a no-op actor round trip; and the bytes a step
moves across processes (:func:`step_bytes`). Ray is started here (a local cluster with the machine's
cores) unless this process is already connected to one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch

from langchain_packllm.engine import FusionEngine, SamplingConfig, WeightingConfig
from langchain_packllm.members import Member


def step_bytes(K: int, B: int, vocab: int, itemsize: int, padded: bool = False) -> dict[str, int]:
    """Bytes of tensor data a decode step moves between the driver and K actors (Ray's own task message,
    a few hundred bytes per actor call, comes on top): in, the new ids (8 bytes per row; with padding, one
    mask column and the positions too); out, each member's next-token logits, ``B * V`` in its dtype."""
    per_row_in = 8 * (3 if padded else 1)
    return {"in": K * B * per_row_in, "out": K * B * vocab * itemsize}


def prompt_bytes(K: int, B: int, L: int, vocab: int, itemsize: int, padded: bool = False) -> dict[str, int]:
    """Bytes of tensor data a call's prefill moves: the ids in (with padding, the mask and positions too),
    every position's logits out (the weight solve reads the full distributions)."""
    return {"in": K * B * L * 8 * (3 if padded else 1), "out": K * B * L * vocab * itemsize}


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2])


def _ttft(engine: FusionEngine, prompt: list[str]) -> float:
    start = time.perf_counter()
    engine.generate(prompt, WeightingConfig("optimal"), SamplingConfig(max_new_tokens=1))
    return time.perf_counter() - start


def bench_ray(
    members: list[Member],
    paths: list[str],
    cfg,
    progress: Callable[[str], None],
) -> list[dict]:
    """Rows per (K, B): see the module docstring. ``members`` are the in-process members loaded from
    ``paths`` (which the actors load)."""
    import ray

    from langchain_packllm.lab.bench import fused_step_seconds, member_step_seconds, random_prompts
    from langchain_packllm.ray_backend import LOCAL_SYSTEM_CONFIG, load_ray_engine

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(
            num_cpus=os.cpu_count(),
            include_dashboard=False,
            log_to_driver=False,
            _system_config=LOCAL_SYSTEM_CONFIG,
        )
    rows = []
    try:
        noop = ray.remote(lambda: None)
        ray.get(noop.remote())
        for K in cfg.ks:
            local = FusionEngine(members[:K])
            remote = load_ray_engine(paths[:K], device=cfg.device, torch_dtype=cfg.dtype)
            threads = [m.extra["ray"]["torch_threads"] for m in remote.members]
            actor = remote.actors[0]
            ray.get(actor.pid.remote())
            trip = []
            for _ in range(50):
                t0 = time.perf_counter()
                ray.get(actor.pid.remote())
                trip.append(time.perf_counter() - t0)
            for B in cfg.batch_sizes:
                batch = random_prompts(cfg.vocab_size, cfg.decode_prompt, B, cfg.seed + B)
                ttft_prompt = random_prompts(cfg.vocab_size, cfg.ttft_prompt, 1, cfg.seed + 99)
                ids, mask = local.scorer.pad(local.reference(0), [local.encode(p) for p in batch])
                each = [ids] * K  # the bench members share one vocabulary
                steps = cfg.decode_tokens
                for engine in (local, remote):  # warm-up
                    fused_step_seconds(engine, batch, steps)
                    _ttft(engine, ttft_prompt)
                fl, fr, own, tl, tr = [], [], [[] for _ in range(K)], [], []
                for _ in range(cfg.repeats):
                    fl.append(fused_step_seconds(local, batch, steps))
                    fr.append(fused_step_seconds(remote, batch, steps))
                    for k, m in enumerate(local.members):
                        own[k].append(member_step_seconds(m.model, each[k], mask, steps))
                    tl.append(_ttft(local, ttft_prompt))
                    tr.append(_ttft(remote, ttft_prompt))
                t_own = [_median(o) for o in own]
                itemsize = torch.empty((), dtype=local.members[0].model.dtype).element_size()
                vocab = local.members[0].vocab_size
                row = {
                    "K": K,
                    "batch": B,
                    "steps": steps,
                    "actor_threads": threads,
                    "inprocess_step_ms": 1e3 * _median(fl),
                    "ray_step_ms": 1e3 * _median(fr),
                    "ray_to_inprocess_throughput": _median([fl[r] / fr[r] for r in range(cfg.repeats)]),
                    "ray_overhead_ms_per_step": 1e3 * (_median(fr) - _median(fl)),
                    "members_sum_ms": 1e3 * sum(t_own),
                    "members_max_ms": 1e3 * max(t_own),
                    "ray_to_sum_bound": _median([sum(o[r] for o in own) / fr[r] for r in range(cfg.repeats)]),
                    "ray_to_max_bound": _median([max(o[r] for o in own) / fr[r] for r in range(cfg.repeats)]),
                    "inprocess_ttft_ms": 1e3 * _median(tl),
                    "ray_ttft_ms": 1e3 * _median(tr),
                    "ttft_ratio_ray_to_inprocess": _median([tr[r] / tl[r] for r in range(cfg.repeats)]),
                    "actor_round_trip_ms": 1e3 * _median(trip),
                    "step_bytes_out": step_bytes(K, B, vocab, itemsize)["out"],
                }
                rows.append(row)
                progress(
                    f"ray K={K} B={B}: step {row['ray_step_ms']:.1f} ms on Ray, "
                    f"{row['inprocess_step_ms']:.1f} ms in-process (members' own: sum "
                    f"{row['members_sum_ms']:.1f}, max {row['members_max_ms']:.1f}); TTFT "
                    f"{row['ray_ttft_ms']:.0f} vs {row['inprocess_ttft_ms']:.0f} ms"
                )
            remote.close()
            local.close()
    finally:
        if started_here:
            ray.shutdown()
    return rows


RAY_COLUMNS = [
    ("K", "K", "d"),
    ("batch", "batch", "d"),
    ("in-process ms/step", "inprocess_step_ms", ".2f"),
    ("Ray ms/step", "ray_step_ms", ".2f"),
    ("Ray / in-process throughput", "ray_to_inprocess_throughput", ".3f"),
    ("Ray overhead ms/step", "ray_overhead_ms_per_step", ".2f"),
    ("members' steps, sum ms", "members_sum_ms", ".2f"),
    ("members' steps, max ms", "members_max_ms", ".2f"),
    ("Ray / sum bound", "ray_to_sum_bound", ".3f"),
    ("Ray / max bound", "ray_to_max_bound", ".3f"),
    ("in-process TTFT ms", "inprocess_ttft_ms", ".1f"),
    ("Ray TTFT ms", "ray_ttft_ms", ".1f"),
    ("TTFT Ray / in-process", "ttft_ratio_ray_to_inprocess", ".3f"),
    ("actor round trip ms", "actor_round_trip_ms", ".2f"),
    ("bytes out per step", "step_bytes_out", "d"),
]
