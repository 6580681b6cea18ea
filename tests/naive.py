"""Naive references the engine is checked against, written plainly (no cache, no batching), and a counter
of what the members read, shared by the tests of several modules."""

from __future__ import annotations

import itertools
import math

import torch

from langchain_packllm.alignment import MinEDMap


def mined_cols(logits: torch.Tensor, mined: MinEDMap) -> torch.Tensor:
    """A member's logits read on the reference vocabulary: the logit of each reference token's MinED image,
    less log n where n reference tokens share that image (each gets 1/n of its probability)."""
    ids = torch.as_tensor(mined.ids)
    shared = torch.bincount(ids, minlength=mined.dst_vocab_size)[ids]
    return logits[..., ids] - torch.log(shared.double()).to(logits)


def own_prompt_next_logprobs(members, ref: int, own: list[list[int]], out: list[int], maps) -> torch.Tensor:
    """``(K, V_ref)``: each member's next-token log-probs on the reference vocabulary (``alignment=
    "own-prompt"``, no cache) after its own prompt ids ``own[k]`` and the new reference tokens ``out``, read
    through its MinED map ``maps[k]`` (ref -> member) by every member but the reference."""
    ref_tok = members[ref].tokenizer
    rows = []
    with torch.no_grad():
        for k, m in enumerate(members):
            inp = own[k] + (out if k == ref else [int(maps[k].ids[i]) for i in out])
            logits = m.model(input_ids=torch.tensor([inp])).logits[0, -1].double()
            cols = logits[: len(ref_tok)] if k == ref else mined_cols(logits, maps[k])
            rows.append(torch.log_softmax(cols, -1))
    return torch.stack(rows)


def plain_bits_per_byte(members, text: str) -> list[float]:
    """Bits per byte of each member on the same bytes: after the longest first token among the members,
    from each member's first token that starts there (character offsets; these texts are ASCII)."""
    encs = [m.tokenizer(text, return_offsets_mapping=True) for m in members]
    skip = max(next(e for s, e in enc["offset_mapping"] if e > s) for enc in encs)
    out = []
    for m, enc in zip(members, encs, strict=True):
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        start = next(i for i, (s, e) in enumerate(offsets) if e > s and s >= skip)
        with torch.no_grad():
            lp = torch.log_softmax(m.model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        nll = -sum(float(lp[i - 1, ids[i]]) for i in range(start, len(ids)))
        out.append(nll / math.log(2) / (len(text) - offsets[start][0]))
    return out


def quadratic(lp: torch.Tensor, y: int, w: torch.Tensor):
    """One position's loss ``f(w) = logsumexp(sum_k w_k lp_k) - sum_k w_k lp_k[y]``: its value, gradient
    and Hessian at ``w`` (``lp`` is ``(K, V)``)."""
    fused = w @ lp
    p = torch.softmax(fused, -1)
    mean = lp @ p
    second = (lp * p) @ lp.T
    return float(torch.logsumexp(fused, -1) - w @ lp[:, y]), mean - lp[:, y], second - torch.outer(mean, mean)


def simplex_qp_by_supports(terms) -> torch.Tensor:
    """argmin over the simplex of ``sum_i f_i + g_i.(w - w_i) + (w - w_i)^T H_i (w - w_i) / 2``: the
    equality-constrained minimum on every support, kept when feasible; the lowest wins."""
    K = terms[0][1].shape[0]
    A = sum(H for _, _, H, _ in terms)
    b = sum(g - H @ wi for _, g, H, wi in terms)

    def value(w):
        return float(b @ w + 0.5 * w @ A @ w)

    best, best_w = float("inf"), None
    for size in range(1, K + 1):
        for support in itertools.combinations(range(K), size):
            S = list(support)
            kkt = torch.zeros(size + 1, size + 1, dtype=torch.float64)
            kkt[:size, :size] = A[S][:, S]
            kkt[:size, size] = kkt[size, :size] = 1.0
            rhs = torch.cat([-b[S], torch.ones(1, dtype=torch.float64)])
            sol = torch.linalg.lstsq(kkt, rhs).solution
            w = torch.zeros(K, dtype=torch.float64)
            w[S] = sol[:size]
            if bool((w >= -1e-12).all()) and value(w.clamp_min(0)) < best - 1e-15:
                best, best_w = value(w.clamp_min(0)), w.clamp_min(0) / w.clamp_min(0).sum()
    return best_w


class EmbeddedTokens:
    """How many tokens each member's input embedding has read (every forward, full or base, passes it)."""

    def __init__(self, members):
        self.counts = [0] * len(members)
        self.handles = [
            m.model.get_input_embeddings().register_forward_hook(self._hook(k)) for k, m in enumerate(members)
        ]

    def _hook(self, k):
        def hook(module, args, output):
            self.counts[k] += int(args[0].numel())

        return hook

    def take(self) -> list[int]:
        counts, self.counts = self.counts, [0] * len(self.counts)
        return counts

    def close(self) -> None:
        for h in self.handles:
            h.remove()
