"""Mapped heads on the REAL pack (SmolLM2-135M, Gemma3-270M, Qwen2.5-Coder-0.5B), with each member as the
reference in turn: a member read through a MinED map computes its logits on the member ids the map reads
only (``Scorer.mapped_head``) against its whole output layer gathered (``mapped_head_max_fraction = 0``).

For each reference, in one run, interleaved repeats of: the prefill of one prompt (``engine.score``: every
member's forward over the reference's ids, its logits on the reference vocabulary) and the fused decode
step (batch 1, uniform weights, no EOS: ``lab.bench.fused_step_seconds``), each with the mapped heads on and
off. Prints the medians, the ratios on / off, which members got a mapped head and the rows it keeps, and
checks that both engines give the same prompt scores.

Run from the repo root (about 6 minutes on 2 idle cores)::

    PACKLLM_HOME=$HOME/.cache/packllm .venv/bin/python -m benchmarks.mapped_head_real \\
        --out docs/results/mapped-head-real.json
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from benchmarks.alignment_quality_real import real_members, script_main
from langchain_packllm import FusionEngine
from langchain_packllm.lab.bench import fused_step_seconds, real_texts


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    members = real_members()
    on, off = FusionEngine(members), FusionEngine(members)
    off.scorer.mapped_head_max_fraction = 0.0
    on.prepare_alignment(progress=False)
    rows = []
    for r, name in enumerate(on.names):
        ref, ref_off = on.reference(r), off.reference(r)
        (prompt,) = real_texts(ref.tokenizer, args.prompt, 1, seed=r)
        ids = [ref.encode(prompt)]
        (short,) = real_texts(ref.tokenizer, 32, 1, seed=10 + r)
        got = on.score(ids, ref).scores.clone()
        same = bool(torch.allclose(got, off.score(ids, ref_off).scores, rtol=1e-5, atol=1e-4))
        del got
        for engine in (on, off):  # warm-up: kernels, the mapped heads' copies
            fused_step_seconds(engine, [short], 2, no_eos=True, reference=r)
        t = {"prefill_on": [], "prefill_off": [], "step_on": [], "step_off": []}
        for _ in range(args.repeats):
            for tag, engine, reference in (("on", on, ref), ("off", off, ref_off)):
                start = time.perf_counter()
                engine.scorer.recycle(engine.score(ids, reference).scores)
                t[f"prefill_{tag}"].append(time.perf_counter() - start)
                t[f"step_{tag}"].append(
                    fused_step_seconds(engine, [short], args.steps, no_eos=True, reference=r)
                )
        heads = {}
        for k, m in enumerate(members):
            head = on.scorer.mapped_head(ref, k)
            if ref.token_maps[k] is not None:
                full = m.model.get_output_embeddings().weight.shape[0]
                heads[m.name] = None if head is None else f"{head.weight.shape[0]} of {full} rows"
        med = {key: statistics.median(v) for key, v in t.items()}
        rows.append({
            "reference": name,
            "prompt_tokens": len(ids[0]),
            "mapped_heads": heads,
            "scores_equal": same,
            "prefill_ms_on": 1e3 * med["prefill_on"],
            "prefill_ms_off": 1e3 * med["prefill_off"],
            "prefill_ratio": statistics.median(a / b for a, b in zip(t["prefill_on"], t["prefill_off"])),
            "step_ms_on": 1e3 * med["step_on"],
            "step_ms_off": 1e3 * med["step_off"],
            "step_ratio": statistics.median(a / b for a, b in zip(t["step_on"], t["step_off"])),
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return {"threads": args.threads, "repeats": args.repeats, "steps": args.steps, "rows": rows}


def markdown(result: dict) -> str:
    lines = [
        "| reference | prompt tokens | mapped heads (rows kept) | prefill ms on / off (ratio) | decode step ms on / off (ratio) | scores equal |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        heads = ", ".join(f"{k}: {v or 'whole'}" for k, v in r["mapped_heads"].items())
        lines.append(
            f"| {r['reference']} | {r['prompt_tokens']} | {heads} | {r['prefill_ms_on']:.0f} / "
            f"{r['prefill_ms_off']:.0f} ({r['prefill_ratio']:.2f}) | {r['step_ms_on']:.1f} / "
            f"{r['step_ms_off']:.1f} ({r['step_ratio']:.2f}) | {r['scores_equal']} |"
        )
    return "\n".join(lines)


def main() -> None:
    script_main(
        __doc__,
        run,
        markdown,
        ("--prompt", {"type": int, "default": 244, "help": "prompt tokens of the prefill"}),
        ("--steps", {"type": int, "default": 16, "help": "decode steps per timing"}),
        ("--repeats", {"type": int, "default": 3}),
        ("--threads", {"type": int, "default": 2}),
        passages=False,
    )


if __name__ == "__main__":
    main()
