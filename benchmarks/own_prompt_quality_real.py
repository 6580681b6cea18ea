"""Quality of ``alignment="own-prompt"`` against ``"mined"`` on the REAL pack (SmolLM2-135M, Gemma3-270M,
Qwen2.5-Coder-0.5B), through the engine's public ``loglikelihood`` only.

The held-out passages and their prompt / rest cut are ``alignment_quality_real``'s (``split_passage``: the
eval's prompt length, moved to the first byte where all three tokenizers start a token). For each passage
and each mode, ``engine.loglikelihood([(prompt, rest)], weighting)`` gives the fused log-likelihood of the
rest with the weights solved on the prompt (the reference chosen on the prompt, as every call does):

- ``optimal`` and ``uniform`` weights: the fused bits per byte on the rest;
- one-hot weights on each member that is not the chosen reference: that member **inside the pack** (under
  MinED it reads the whole text through its map; under own-prompt it reads the prompt with its own tokens
  and the rest through its map, as it reads what the pack generates), against the member alone (a pack of
  that member only: its own tokens throughout), on the same bytes.

Run from the repo root (about 6 minutes on 2 idle cores for ``--docs 2``)::

    PACKLLM_HOME=$HOME/.cache/packllm .venv/bin/python -m benchmarks.own_prompt_quality_real \\
        --docs 2 --tokens 128 --out docs/results/own-prompt-quality-real.json
"""

from __future__ import annotations

import math
import time

from benchmarks.alignment_quality_real import real_members, script_main, split_passage
from langchain_packllm import FusionEngine, WeightingConfig
from langchain_packllm.lab.pack.real import real_eval_documents

LOG2 = math.log(2)
MODES = ("mined", "own-prompt")


def run(args) -> dict:
    members = real_members()
    names = [m.name for m in members]
    K = len(members)
    engines = {mode: FusionEngine(members, alignment=mode) for mode in args.modes.split(",")}
    next(iter(engines.values())).prepare_alignment(progress=False)
    alone = [FusionEngine([m]) for m in members]
    nll: dict[str, dict[str, float]] = {}  # row -> domain -> nats
    inside: dict[
        tuple[str, int], dict[str, list[float]]
    ] = {}  # (mode, k) -> domain -> [inside, alone, bytes]
    nbytes: dict[str, int] = {}
    chosen: dict[str, dict[str, int]] = {}

    def add(row: str, domain: str, value: float) -> None:
        nll.setdefault(row, {}).setdefault(domain, 0.0)
        nll[row][domain] += value

    started = time.perf_counter()
    for domain, docs in real_eval_documents(args.docs).items():
        nbytes[domain] = 0
        for doc in docs:
            passage = split_passage(doc, members, args.tokens)
            if passage is None:
                continue
            _, data, split, _ = passage
            prompt, rest = data[:split].decode("utf-8"), data[split:].decode("utf-8")
            nbytes[domain] += len(data) - split
            own = []
            for k, engine in enumerate(alone):
                (res,) = engine.loglikelihood([(prompt, rest)], WeightingConfig([1.0]))
                own.append(-res.logprob)
                add(names[k], domain, own[k])
            for mode, engine in engines.items():
                if args.reweight:  # weights that follow the text: re-solved every N tokens of the rest
                    config = WeightingConfig("optimal", reweight_every=args.reweight)
                    (res,) = engine.loglikelihood([(prompt, rest)], config)
                    add(f"{mode} optimal, reweight_every={args.reweight}", domain, -res.logprob)
                for weighting in ("optimal", "uniform"):
                    (res,) = engine.loglikelihood([(prompt, rest)], WeightingConfig(weighting))
                    add(f"{mode} {weighting}", domain, -res.logprob)
                ref = names.index(res.report.reference)
                chosen.setdefault(mode, {}).setdefault(res.report.reference, 0)
                chosen[mode][res.report.reference] += 1
                for k in range(K):
                    if k == ref:
                        continue
                    onehot = [1.0 if j == k else 0.0 for j in range(K)]
                    (res,) = engine.loglikelihood([(prompt, rest)], WeightingConfig(onehot))
                    cell = inside.setdefault((mode, k), {}).setdefault(domain, [0.0, 0.0, 0])
                    cell[0] += -res.logprob
                    cell[1] += own[k]
                    cell[2] += len(data) - split
            print(f"{domain}: {time.perf_counter() - started:.0f} s", flush=True)
    domains = list(nbytes)
    total = sum(nbytes.values())
    bpb = {
        row: {**{d: per[d] / nbytes[d] / LOG2 for d in domains}, "all": sum(per.values()) / total / LOG2}
        for row, per in nll.items()
    }
    best = min(names, key=lambda n: bpb[n]["all"])
    oracle = {d: min(bpb[n][d] for n in names) for d in domains}
    oracle["all"] = sum(min(nll[n][d] for n in names) for d in domains) / total / LOG2
    bpb["best-single (oracle per domain)"] = oracle
    members_inside = {}
    for (mode, k), per in inside.items():
        ins, alo, n = (sum(v[i] for v in per.values()) for i in range(3))
        members_inside[f"{mode}: {names[k]}"] = {
            **{d: v[0] / v[1] for d, v in per.items()},
            "all": ins / alo,
            "bytes": n,
        }
    return {
        "command": f"python -m benchmarks.own_prompt_quality_real --docs {args.docs} --tokens {args.tokens} "
        f"--reweight {args.reweight} --modes {args.modes}",
        "bytes": nbytes,
        "bits_per_byte": bpb,
        "best_member": best,
        "chosen_references": chosen,
        "members_inside_over_alone": members_inside,
        "seconds": time.perf_counter() - started,
    }


def markdown(result: dict) -> str:
    domains = list(result["bytes"])
    cols = [*domains, "all"]
    lines = ["**Bits per byte on the rest of each passage (lower is better)**", "",
             "| row | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]  # fmt: skip
    for row, per in result["bits_per_byte"].items():
        lines.append(f"| {row} | " + " | ".join(f"{per[c]:.3f}" for c in cols) + " |")
    lines += ["", "**A member that is not the reference, inside the pack / alone (same bytes)**", "",
              "| mode: member | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]  # fmt: skip
    for row, per in result["members_inside_over_alone"].items():
        lines.append(f"| {row} | " + " | ".join(f"{per[c]:.3f}" if c in per else "" for c in cols) + " |")
    lines += ["", f"chosen references: {result['chosen_references']}", f"({result['seconds']:.0f} s)"]
    return "\n".join(lines)


def main() -> None:
    script_main(
        __doc__,
        run,
        markdown,
        ("--reweight", {"type": int, "default": 0, "help": "also re-solve every N tokens (0: off)"}),
        ("--modes", {"default": ",".join(MODES), "help": "comma-separated alignment modes"}),
    )


if __name__ == "__main__":
    main()
