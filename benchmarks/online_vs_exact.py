"""How close the weights that follow the text (``reweight_every``) come to the exact optimum of Eq. 3 on
the text read so far, on the expert pack's held-out documents (shared tokenizer).

For each document: weights solved on its first 32 tokens (or 20%), then the rest read 16 tokens at a time
with ``OnlineWeights`` (the second-order model, bounded state); at every re-solve, the exact optimum of
Eq. 3 on all the positions read so far is solved too (``weights.solve``, which keeps every position's
scores). Printed: the mean and worst gap in prompt loss (nats per token) between the two, and the mean
L1 distance between the weight vectors.

    python benchmarks/online_vs_exact.py [--docs 10] [--every 16]
"""

from __future__ import annotations

import argparse

import torch

from langchain_packllm import FusionEngine
from langchain_packllm import weights as W
from langchain_packllm.lab.evaluation import lm_prompt_length
from langchain_packllm.lab.pack import build_pack
from langchain_packllm.members import load_member
from langchain_packllm.online import OnlineWeights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=10, help="held-out documents per domain")
    parser.add_argument("--every", type=int, default=16)
    args = parser.parse_args()
    manifest = build_pack("default", "shared")
    engine = FusionEngine(
        [load_member(p, name=n) for n, p in zip(manifest.expert_names, manifest.expert_paths)]
    )
    gaps, dists = [], []
    for domain in manifest.domain_names:
        for text in manifest.heldout_documents(domain)[: args.docs]:
            ids = engine.encode(text)[: engine.max_length or 512]
            n_p = lm_prompt_length(len(ids))
            if len(ids) < 16 or n_p < 2:
                continue
            lp_list, input_ids, _, _ = engine.member_logprobs([ids])
            lp = torch.stack([x[0, :-1] for x in lp_list])  # (K, n-1, V)
            y = input_ids[0, 1:]
            sol = W.solve_with_stats("optimal", lp[:, : n_p - 1], y[: n_p - 1])
            online = OnlineWeights.start("optimal", args.every, [sol], [n_p - 1], [n_p])
            for start in range(n_p - 1, len(y) - args.every + 1, args.every):
                end = start + args.every
                online.target_logprobs(lp[:, start:end], y[start:end])
                exact = W.solve("optimal", lp[:, :end], y[:end])
                w = online.weights[0]
                f_online = W.prompt_loss(w.float(), lp[:, :end], y[:end])
                f_exact = W.prompt_loss(exact.float(), lp[:, :end], y[:end])
                gaps.append(f_online - f_exact)
                dists.append(float((w - exact).abs().sum()))
    gaps_t = torch.tensor(gaps)
    print(f"{len(gaps)} re-solves over {args.docs} documents per domain, every {args.every} tokens")
    print(f"loss gap online - exact (nats/token): mean {gaps_t.mean():.2e}, max {gaps_t.max():.2e}")
    print(f"mean L1 distance between the weight vectors: {sum(dists) / len(dists):.4f}")


if __name__ == "__main__":
    main()
