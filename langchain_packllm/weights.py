"""Importance weights: how much each member counts for one prompt.

Every strategy takes the members' log-probabilities at the prompt positions and returns a point of the
probability simplex (``w_k >= 0``, ``sum_k w_k = 1``):

- ``uniform``: ``1 / K``.
- ``top1``: all weight on the member with the lowest prompt perplexity.
- ``sim``: Eq. 4, ``softmax_k(-log PPL_k / tau)``.
- ``greedy``: Algorithm 1 of the paper (PackLLM-opt): members sorted by perplexity, fused pairwise, each
  pair weight chosen on a grid of step ``grid_step``.
- ``grid``: the minimiser over the grid of step ``grid_step`` on the simplex (the paper's Table 4 row),
  found by branch and bound from the continuous optimum; the exhaustive search is ``grid(exhaustive=True)``.
- ``optimal``: the exact minimiser of Eq. 3. The objective
  ``f(w) = mean_i [logsumexp_v(sum_k w_k s_kiv) - sum_k w_k s_ki,x_i]`` is convex in ``w``, so an
  active-set Newton method on the simplex reaches its global minimum.

Shapes used throughout: ``K`` members, ``T`` scored prompt positions, ``V`` vocabulary entries.
``logprobs`` is ``(K, T, V)``: member k's log-softmax at position i, predicting ``targets[i]``.
Log-probabilities and raw logits give the same fused distribution (each member's log-partition is a
per-position constant), so either may be passed.

Example::

    >>> import torch
    >>> from langchain_packllm import weights
    >>> lp = torch.randn(3, 10, 50).log_softmax(-1)
    >>> y = torch.randint(0, 50, (10,))
    >>> w = weights.solve("optimal", lp, y)
    >>> float(w.sum())
    1.0
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

STRATEGIES = ("optimal", "greedy", "grid", "sim", "uniform", "top1")

# Upper bound on the elements of one temporary block (of positions, or of (T, V) candidates) in the solvers'
# passes over the scores. On a CPU the block is small: 4 MiB of float32 stays in cache, and it is below
# glibc's mmap threshold, so a freed block is reused rather than page-faulted afresh: `optimal`, `grid` and
# `greedy` ran 1.2-4x faster than with 2^25 (docs/PERFORMANCE.md, "Weight solving"). Accelerators take large
# blocks: fewer kernel launches.
_BLOCK_ELEMENTS = 1 << 25
_CPU_BLOCK_ELEMENTS = 1 << 20


def _block_elements(scores: torch.Tensor) -> int:
    """Most elements of one temporary block for passes over ``scores`` (see ``_BLOCK_ELEMENTS``)."""
    return _CPU_BLOCK_ELEMENTS if scores.device.type == "cpu" else _BLOCK_ELEMENTS


def target_scores(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each member's score (log-prob or raw logit) of the true next token: ``(K, T, V), (T,) -> (K, T)``."""
    index = targets.to(scores.device).view(1, -1, 1).expand(scores.shape[0], -1, 1)
    return scores.gather(-1, index).squeeze(-1)


def target_logprobs(logprobs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each member's log-probability of the true next token: ``(K, T, V), (T,) -> (K, T)``.

    The scores are normalised here (``s - logsumexp_v s``), so raw logits give the same answer. The
    log-partition is taken in blocks of at most ``_block_elements`` scores (``logsumexp`` makes a temporary
    as large as its input).
    """
    K, T, V = logprobs.shape
    lse = torch.empty((K, T), dtype=logprobs.dtype, device=logprobs.device)
    step = max(1, _block_elements(logprobs) // max(1, V))
    for k in range(K):
        for start in range(0, T, step):
            torch.logsumexp(logprobs[k, start : start + step], dim=-1, out=lse[k, start : start + step])
    return target_scores(logprobs, targets) - lse


def perplexities(logprobs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Eq. 2 for every member: ``exp(-mean_i log p_k(x_i | x_<i))``, shape ``(K,)``."""
    return _perplexities(target_logprobs(logprobs, targets))


def _perplexities(tgt_lp: torch.Tensor) -> torch.Tensor:
    return torch.exp(-tgt_lp.double().mean(-1)).cpu()


def prompt_losses(candidates: torch.Tensor, logprobs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Eq. 3's objective (mean negative log-likelihood of the prompt) for many weight vectors at once.

    ``candidates`` is ``(G, K)``; returns ``(G,)`` in float64. Work is done in blocks of candidates and of
    positions (:func:`_blocks`) so that no temporary exceeds a fixed number of elements, whatever ``G``,
    ``T`` and ``V``.
    """
    K, T, V = logprobs.shape
    tgt = target_scores(logprobs, targets)  # (K, T)
    candidates = candidates.to(device=logprobs.device, dtype=logprobs.dtype)
    c, g = _blocks(logprobs, T, V)
    G = candidates.shape[0]
    buf = torch.empty(min(g, G) * c * V, dtype=logprobs.dtype, device=logprobs.device)
    total = torch.zeros(G, dtype=torch.float64, device=logprobs.device)
    for t0 in range(0, T, c):
        flat = logprobs[:, t0 : t0 + c].reshape(K, -1)  # (K, c*V), a view: each member's rows are contiguous
        n = flat.shape[1] // V
        for start in range(0, G, g):
            w = candidates[start : start + g]  # (g, K)
            _, _, lse = _fused_exp(w, flat, buf[: w.shape[0] * n * V], V)  # (g * c,)
            total[start : start + g] += (lse.view(w.shape[0], n) - w @ tgt[:, t0 : t0 + c]).double().sum(-1)
    return total / T


def _exp_shifted_(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x <- exp(x - max)`` row by row, in place (no temporary of ``x``'s size: on a CPU a fresh temporary
    of a few MiB is often page-faulted in anew, as glibc trims freed heap memory). Returns the row sums
    ``(..., 1)`` and the log-partition ``torch.logsumexp(x, -1)`` ``(...)``; rows whose maximum is infinite
    are shifted by 0, as ``torch.logsumexp`` does (no ``inf - inf``)."""
    m = x.amax(-1, keepdim=True)
    m.masked_fill_(m.isinf(), 0.0)
    z = x.sub_(m).exp_().sum(-1, keepdim=True)
    return z, (m + z.log()).squeeze(-1)


def _blocks(scores: torch.Tensor, T: int, V: int) -> tuple[int, int]:
    """``(positions, candidates)`` per block of a pass that scores many weight vectors: ``candidates x
    positions x V`` stays within :func:`_block_elements` (at least one of each)."""
    limit = _block_elements(scores)
    c = max(1, min(T, limit // max(1, V)))
    return c, max(1, limit // (c * V))


def prompt_loss(w: torch.Tensor, logprobs: torch.Tensor, targets: torch.Tensor) -> float:
    """Eq. 3's objective at one weight vector ``w`` of shape ``(K,)``; ``exp`` of it is the fused PPL."""
    return float(prompt_losses(w.view(1, -1), logprobs, targets)[0])


def uniform(num_members: int) -> torch.Tensor:
    return torch.full((num_members,), 1.0 / num_members, dtype=torch.float64)


def top1(ppl: torch.Tensor) -> torch.Tensor:
    w = torch.zeros(ppl.shape[0], dtype=torch.float64)
    w[int(torch.argmin(ppl))] = 1.0
    return w


def sim(ppl: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Eq. 4: ``softmax_k(-log PPL_k / tau)``."""
    return torch.softmax(-torch.log(ppl.double()) / tau, dim=0)


def _grid_divisions(step: float) -> int:
    n = round(1.0 / step)
    if step <= 0 or step > 1 or abs(n * step - 1.0) > 1e-9:
        raise ValueError(f"grid_step must divide 1 exactly (e.g. 0.05, 0.1, 0.25); got {step!r}.")
    return n


def greedy(logprobs: torch.Tensor, targets: torch.Tensor, step: float = 0.05) -> torch.Tensor:
    """Algorithm 1 (greedy perplexity minimisation), line for line.

    Members are sorted by prompt perplexity (Eq. 5). The running fused scores start as the top-1 member's;
    each next member is mixed in with the pair weight ``lambda`` in ``[0, 1]`` (grid of ``step``) that
    minimises the prompt loss (Eq. 6), the running scores are updated (Eq. 7) and so are the weights.
    Ties go to the smallest ``lambda``, as ``argmin`` takes the first minimum.
    """
    return _greedy(logprobs, targets, step, perplexities(logprobs, targets))[0]


def _pair_losses(
    lambdas: torch.Tensor,
    fused: torch.Tensor,
    nxt: torch.Tensor,
    fused_tgt: torch.Tensor,
    nxt_tgt: torch.Tensor,
) -> torch.Tensor:
    """Eq. 6's loss of ``lambda * fused + (1 - lambda) * nxt`` for every ``lambda``: ``(n,)`` float64.

    ``fused``, ``nxt`` are ``(T, V)``; the candidates are built as ``nxt + lambda (fused - nxt)`` in blocks
    of positions and of ``lambda`` values (:func:`_blocks`).
    """
    T, V = fused.shape
    lam = lambdas.to(device=fused.device, dtype=fused.dtype)
    tgt = nxt_tgt + lam[:, None] * (fused_tgt - nxt_tgt)  # (n, T)
    c, g = _blocks(fused, T, V)
    buf = torch.empty(min(g, lam.numel()) * c * V, dtype=fused.dtype, device=fused.device)
    diff_buf = torch.empty(c * V, dtype=fused.dtype, device=fused.device)
    total = torch.zeros(lam.numel(), dtype=torch.float64, device=fused.device)
    for t0 in range(0, T, c):
        base = nxt[t0 : t0 + c]
        n = base.shape[0]
        diff = torch.sub(fused[t0 : t0 + c], base, out=diff_buf[: n * V].view(n, V))  # (c, V)
        for start in range(0, lam.numel(), g):
            lam_b = lam[start : start + g].view(-1, 1, 1)
            out = buf[: lam_b.shape[0] * n * V].view(-1, n, V)
            _, lse = _exp_shifted_(torch.addcmul(base, lam_b, diff, out=out))  # (g, c)
            total[start : start + g] += (lse - tgt[start : start + g, t0 : t0 + c]).double().sum(-1)
    return (total / T).cpu()


def _greedy(
    scores: torch.Tensor, targets: torch.Tensor, step: float, ppl: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """Algorithm 1 given the members' perplexities; returns the weights and their prompt loss."""
    n = _grid_divisions(step)
    K = scores.shape[0]
    order = torch.argsort(ppl, stable=True).tolist()  # Eq. 5
    lambdas = torch.arange(n + 1, dtype=torch.float64) / n  # (n+1,)
    tgt = target_scores(scores, targets)  # (K, T)
    fused, fused_tgt = scores[order[0]], tgt[order[0]]  # (T, V), (T,)  s^(1)
    loss = math.log(float(ppl[order[0]]))
    sorted_w = torch.zeros(K, dtype=torch.float64)
    sorted_w[0] = 1.0
    for k in range(1, K):
        nxt, nxt_tgt = scores[order[k]], tgt[order[k]]
        losses = _pair_losses(lambdas, fused, nxt, fused_tgt, nxt_tgt)  # Eq. 6
        j = int(torch.argmin(losses))
        lam, loss = float(lambdas[j]), float(losses[j])
        if k == 1:  # Eq. 7, into a buffer of its own (the first running scores are a view of the input)
            fused = torch.mul(fused, lam)
        else:
            fused.mul_(lam)
        fused.add_(nxt, alpha=1.0 - lam)
        fused_tgt = lam * fused_tgt + (1.0 - lam) * nxt_tgt
        sorted_w[:k] *= lam
        sorted_w[k] = 1.0 - lam
    w = torch.zeros(K, dtype=torch.float64)
    w[order] = sorted_w
    return w, loss


def simplex_grid(num_members: int, step: float = 0.05) -> torch.Tensor:
    """Every point of the simplex whose coordinates are multiples of ``step``: ``(G, K)``, G = C(n+K-1, K-1)."""
    n = _grid_divisions(step)
    K = num_members
    # Stars and bars: choose K-1 bar positions among n+K-1 slots.
    combos = list(itertools.combinations(range(n + K - 1), K - 1))
    bars = torch.tensor(combos, dtype=torch.long).reshape(len(combos), K - 1)
    edges = torch.cat(
        [torch.full((bars.shape[0], 1), -1), bars, torch.full((bars.shape[0], 1), n + K - 1)], dim=1
    )
    counts = edges[:, 1:] - edges[:, :-1] - 1  # (G, K)
    return counts.double() / n


def grid(
    logprobs: torch.Tensor, targets: torch.Tensor, step: float = 0.05, *, exhaustive: bool = False
) -> torch.Tensor:
    """The minimiser of Eq. 3 over the simplex grid of ``step``; the first of equal minima wins.

    By default a branch-and-bound search (:func:`_grid`) that evaluates only the grid points that could
    still beat the best one found; ``exhaustive=True`` scores every point (the reference it must match).
    """
    if exhaustive:
        return _grid_exhaustive(logprobs, targets, step)[0]
    return _grid(logprobs, targets, step)[0]


def _grid_exhaustive(scores: torch.Tensor, targets: torch.Tensor, step: float) -> tuple[torch.Tensor, float]:
    """Score every grid point; the first of equal minima (in :func:`simplex_grid` order) wins."""
    points = simplex_grid(scores.shape[0], step)
    losses = prompt_losses(points, scores, targets)
    best = int(torch.argmin(losses))
    return points[best], float(losses[best])


def _losses_grads(
    candidates: torch.Tensor, scores: torch.Tensor, tgt: torch.Tensor, buf: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 3's loss ``(G,)`` and gradient ``(G, K)`` (float64, CPU) at many weight vectors, one pass each.

    ``grad_k = mean_i (E_p[s_k] - s_k,x_i)`` with ``p_i`` the fused distribution; ``tgt`` is ``(K, T)``.
    ``buf`` is a flat work buffer in the scores' dtype and device, reused across calls (a fresh large
    tensor costs page faults): blocks of ``chunk`` positions, and of as many candidates as ``buf`` holds
    at ``chunk * V`` elements each, are fused at once.
    """
    K, T, V = scores.shape
    cand = candidates.to(device=scores.device, dtype=scores.dtype)
    G = cand.shape[0]
    block = max(1, buf.numel() // (chunk * V))
    loss = torch.zeros(G, dtype=torch.float64, device=scores.device)
    grad = torch.zeros(G, K, dtype=torch.float64, device=scores.device)
    for t0 in range(0, T, chunk):
        s = scores[:, t0 : t0 + chunk]  # (K, c, V)
        c = s.shape[1]
        flat = s.reshape(K, c * V)  # a view: each member's rows are contiguous
        by_position = s.permute(1, 2, 0)  # (c, V, K) view
        t = tgt[:, t0 : t0 + c]  # (K, c)
        for start in range(0, G, block):
            w = cand[start : start + block]  # (g, K)
            g = w.shape[0]
            e, z, lse = _fused_exp(w, flat, buf[: g * c * V], V)  # unnormalised fused distribution, row sums
            e, z, lse = e.view(g, c, V), z.view(g, c), lse.view(g, c)
            loss[start : start + g] += (lse - w @ t).double().sum(-1)
            mean_s = torch.bmm(e.transpose(0, 1), by_position)  # (c, g, K)  sum_v e_v s_kv
            mean_s = mean_s.double() / z.T.double().unsqueeze(-1)  # E_p[s_k]
            grad[start : start + g] += (mean_s - t.double().T.unsqueeze(1)).sum(0)  # (g, K)
    return (loss / T).cpu(), (grad / T).cpu()


def _grid(
    scores: torch.Tensor,
    targets: torch.Tensor,
    step: float,
    ppl: torch.Tensor | None = None,
    *,
    tol: float | None = None,
    round_size: int = 8,
    by_bound: bool = False,
    stats: dict | None = None,
) -> tuple[torch.Tensor, float]:
    """The grid minimiser of :func:`_grid_exhaustive`, by branch and bound with cutting planes.

    Eq. 3's loss ``f`` is convex, so every evaluated point ``z`` gives a plane below it:
    ``f(y) >= f(z) + grad f(z) . (y - z)`` for every grid point ``y``; the lower bound of ``y`` is the
    highest such plane. The loss and gradient of a point cost one pass over the scores
    (:func:`_losses_grads`). The search starts at the continuous optimum (:func:`_optimal_state`), whose
    plane is the first bound and whose Hessian gives a quadratic model of ``f`` that orders the grid
    points. It evaluates, ``round_size`` at a time, the points of smallest model value among those whose
    lower bound does not exceed the best loss found plus ``tol``, adds their planes, and stops when no
    unevaluated point is left under that level. Every point that could tie or beat the best is thus
    evaluated, and the first of equal minima in :func:`simplex_grid` order wins, as in the exhaustive
    search. ``by_bound=True`` orders the evaluations by lower bound instead (textbook best-first branch and
    bound; same result, usually more evaluations; the tests use it to exercise the pruning). ``tol`` covers the rounding of computed losses and gradients:
    ``eps * max|s| * (16 + 32 log2 V)`` (about 2e-3 for float32 log-probs down to -30 at V = 32768,
    measured rounding being 10-100 times smaller; 3e-12 in float64). A loss whose rounding exceeds it
    could differ from the exhaustive search's; so could two grid points whose losses differ by less than
    the rounding, where the exhaustive search's own choice is set by rounding. On random problems
    (K = 5, step 0.05) about 16-20 of the 10,626 points are evaluated; if members are identical the
    planes are flat and every point is. A non-finite loss or gradient falls back to the exhaustive search.
    ``stats``, if given, receives the counts of evaluated points and rounds.
    """
    K, T, V = scores.shape
    points = simplex_grid(K, step)  # (G, K)
    G = points.shape[0]
    if K == 1 or G <= 2 * K:
        return _grid_exhaustive(scores, targets, step)
    if ppl is None:
        ppl = perplexities(scores, targets)
    tgt = target_scores(scores, targets)  # (K, T)
    w_opt, f_opt, g_opt, h_opt = _optimal_state(scores, targets, ppl, tgt)
    chunk, block = _blocks(scores, T, V)
    buf = torch.empty(min(block, round_size) * chunk * V, dtype=scores.dtype, device=scores.device)
    if tol is None:
        eps = torch.finfo(scores.dtype).eps
        scale = max(1.0, float(scores.amax()), -float(scores.amin()))
        tol = eps * scale * (16 + 32 * math.log2(max(2, V)))
    losses = torch.full((G,), math.inf, dtype=torch.float64)
    evaluated = torch.zeros(G, dtype=torch.bool)
    # Lower bound from convexity: f(y) >= f(z) + g(z).(y - z) for every evaluated z (and the optimum).
    d = points - w_opt  # (G, K)
    lower = f_opt + d @ g_opt  # (G,)
    model = lower + 0.5 * ((d @ h_opt) * d).sum(1)  # quadratic model: only orders the evaluations
    order = torch.argsort(lower if by_bound else model, stable=True)[:round_size]
    n_rounds = 0
    while True:
        n_rounds += 1
        f, g = _losses_grads(points[order], scores, tgt, buf, chunk)
        if not bool(torch.isfinite(f).all() and torch.isfinite(g).all()):
            return _grid_exhaustive(scores, targets, step)
        losses[order] = f
        evaluated[order] = True
        offsets = f - (g * points[order]).sum(1)  # (b,)
        lower = torch.maximum(lower, (points @ g.T + offsets).amax(1))
        best = float(losses.min())
        open_ = (~evaluated) & (lower <= best + tol)
        idx = open_.nonzero().flatten()
        if idx.numel() == 0:
            break
        order = idx[torch.argsort((lower if by_bound else model)[idx], stable=True)[:round_size]]
    j = int(torch.argmin(losses))  # the first of equal minima, as in simplex_grid order
    if stats is not None:
        stats.update(evaluated=int(evaluated.sum()), rounds=n_rounds, points=G, tol=tol)
    return points[j], float(losses[j])


class _PassBuffers:
    """Work buffers for repeated passes over one ``(K, T, V)`` score tensor, allocated once per solve.

    A fresh large tensor costs page faults on every pass (on a CPU, as much as the arithmetic), so the
    fused scores ``(c * V,)`` and the products ``s * p`` ``(K * c * V,)`` of a chunk of ``c`` positions
    live here and are overwritten by each pass.
    """

    def __init__(self, scores: torch.Tensor) -> None:
        K, T, V = scores.shape
        limit = _block_elements(scores)
        if (
            scores.is_cuda
        ):  # fewer, larger chunks (launches); the scratch stays within a quarter of the scores
            limit = max(limit, min(K * T * V // 4, 1 << 28))
        self.chunk = max(1, min(T, limit // max(1, K * V)))
        self.fused = torch.empty(self.chunk * V, dtype=scores.dtype, device=scores.device)
        self._products: torch.Tensor | None = None
        self._shape = (K, V)

    def products(self) -> torch.Tensor:
        if self._products is None:
            K, V = self._shape
            self._products = torch.empty(K * self.chunk * V, dtype=self.fused.dtype, device=self.fused.device)
        return self._products


def _fused_exp(
    w: torch.Tensor, flat: torch.Tensor, out: torch.Tensor, V: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``e = exp(fused - max)`` in ``out`` ``(g * c, V)``, its row sums ``(g * c, 1)`` and the log-partition
    ``(g * c,)`` of ``fused = w @ flat``, for ``g`` weight vectors ``w`` ``(g, K)`` (or one, ``(K,)``) over
    ``c`` positions (``flat`` is ``(K, c * V)``).

    In place on one buffer: the fused scores, then ``exp`` of their difference to the row maximum.
    """
    w = w.view(-1, w.shape[-1])  # (g, K)
    e = torch.mm(w, flat, out=out.view(w.shape[0], -1)).view(-1, V)  # (g * c, V) fused scores
    z, lse = _exp_shifted_(e)  # largest entry of each row is 1
    return e, z, lse


def _loss_only(w: torch.Tensor, logprobs: torch.Tensor, tgt: torch.Tensor, work: _PassBuffers) -> float:
    """Eq. 3's objective at ``w`` (one pass, no temporaries beyond ``work``); ``tgt`` is ``(K, T)``."""
    K, T, V = logprobs.shape
    wd = w.to(device=logprobs.device, dtype=logprobs.dtype)
    loss = torch.zeros((), dtype=torch.float64, device=logprobs.device)  # on the device: one sync per pass
    for start in range(0, T, work.chunk):
        s = logprobs[:, start : start + work.chunk]  # (K, c, V)
        c = s.shape[1]
        _, _, lse = _fused_exp(wd, s.reshape(K, c * V), work.fused[: c * V], V)
        loss += (lse - wd @ tgt[:, start : start + c]).double().sum()
    return float(loss) / T


def _loss_grad_hess(
    w: torch.Tensor, logprobs: torch.Tensor, tgt: torch.Tensor, work: _PassBuffers | None = None
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Objective, gradient ``(K,)`` and Hessian ``(K, K)`` of Eq. 3 at ``w``; ``tgt`` is ``(K, T)``.

    With ``p_i`` the fused distribution at position i: ``grad_k = mean_i (E_p[s_k] - s_k,x_i)`` and
    ``H_kl = mean_i Cov_p(s_k, s_l)``. One pass over the scores, in chunks of positions to bound memory;
    the second moments are a batch of per-position ``(K, V) @ (V, K)`` products. ``work`` holds buffers
    reused across passes (made here when not given).
    """
    K, T, V = logprobs.shape
    if work is None:
        work = _PassBuffers(logprobs)
    wd = w.to(device=logprobs.device, dtype=logprobs.dtype)
    loss = torch.zeros((), dtype=torch.float64, device=logprobs.device)  # on the device: one sync per pass
    grad = torch.zeros(K, dtype=torch.float64, device=logprobs.device)
    hess = torch.zeros(K, K, dtype=torch.float64, device=logprobs.device)
    for start in range(0, T, work.chunk):
        s = logprobs[:, start : start + work.chunk]  # (K, c, V)
        c = s.shape[1]
        flat = s.reshape(K, c * V)  # a view: positions and vocabulary are contiguous
        p, z, lse = _fused_exp(wd, flat, work.fused[: c * V], V)
        p.div_(z)  # (c, V) fused distribution
        ps = torch.mul(s, p, out=work.products()[: K * c * V].view(K, c, V))  # (K, c, V)
        mean_s = ps.sum(-1)  # (K, c)   E_p[s_k]
        if s.is_cuda:  # E_p[s_k s_l] summed over positions: one (K, c*V) @ (c*V, K) product
            second = (ps.view(K, c * V) @ flat.T).double()
        else:  # c small (K, V) @ (V, K) products: twice as fast on a CPU as the one product
            second = torch.bmm(ps.transpose(0, 1), s.permute(1, 2, 0)).double().sum(0)  # (K, K)
        t = tgt[:, start : start + c]
        loss += (lse - wd @ t).double().sum()
        grad += (mean_s - t).double().sum(-1)
        hess += second - mean_s.double() @ mean_s.double().T
    packed = (torch.cat([loss.view(1), grad, hess.flatten()]) / T).cpu()  # one transfer
    return float(packed[0]), packed[1 : K + 1], packed[K + 1 :].view(K, K)


def optimal(
    logprobs: torch.Tensor,
    targets: torch.Tensor,
    *,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> torch.Tensor:
    """The exact minimiser of Eq. 3 over the simplex (Newton's method with simplex-constrained steps).

    The objective is convex, so the KKT point this finds is the global minimum: for some ``mu``,
    ``grad_k = mu`` where ``w_k > 0`` and ``grad_k >= mu`` where ``w_k = 0``. Each iteration minimises the
    loss's quadratic model (gradient and Hessian from one pass over the scores) over the simplex, with an
    active-set method on ``K``-sized arrays, and steps towards that point with Armijo backtracking; see
    :func:`_optimal_state`.
    """
    ppl = perplexities(logprobs, targets)
    return _optimal(logprobs, targets, ppl, max_iter=max_iter, tol=tol)[0]


def _optimal(
    scores: torch.Tensor, targets: torch.Tensor, ppl: torch.Tensor, *, max_iter: int = 100, tol: float = 1e-10
) -> tuple[torch.Tensor, float]:
    """:func:`optimal` given the members' perplexities; returns the weights and their prompt loss."""
    w, f, _, _ = _optimal_state(scores, targets, ppl, max_iter=max_iter, tol=tol)
    return w, f


def _face_newton(free: torch.Tensor, g: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Newton step ``d`` ``(K,)`` on the face of the simplex where ``free`` members may move, and the
    multiplier ``mu``: the KKT system ``[H_FF 1; 1^T 0] [d; -mu] = [-g_F; 0]``."""
    d, mu = _face_newton_np(free.numpy(), g.numpy(), H.numpy())
    return torch.from_numpy(d), mu


def _face_newton_np(free: np.ndarray, g: np.ndarray, H: np.ndarray) -> tuple[np.ndarray, float]:
    # K-sized arrays: numpy costs microseconds where torch's per-op overhead costs tens.
    K = g.shape[0]
    idx = np.flatnonzero(free)
    n = idx.size
    Hff, gf = (H, g) if n == K else (H[np.ix_(idx, idx)], g[idx])
    kkt = np.zeros((n + 1, n + 1))
    kkt[:n, :n] = Hff
    diag = np.arange(n)
    kkt[diag, diag] += 1e-12 * max(1.0, float(np.abs(kkt[diag, diag]).max()))  # ridge
    kkt[:n, n] = 1.0
    kkt[n, :n] = 1.0
    rhs = np.zeros(n + 1)
    rhs[:n] = -gf
    try:
        sol = np.linalg.solve(kkt, rhs)
    except np.linalg.LinAlgError:
        sol = None
    if sol is None or not np.isfinite(sol).all():  # singular: the least-squares solution
        sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
    d = np.zeros(K)
    d[idx] = sol[:n]
    return d, -float(sol[n])


def _simplex_qp(
    w: torch.Tensor,
    g: torch.Tensor,
    H: torch.Tensor,
    max_iter: int = 100,
    first: tuple[torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """Minimiser over the simplex of the quadratic model ``g.(v - w) + (v - w)^T H (v - w) / 2`` of the
    loss around ``w`` (``H`` positive semi-definite): the active-set method on ``K``-sized arrays only, no
    pass over the scores. Members leave the free set when their weight reaches 0 and join it when their
    reduced gradient is negative at the face's minimum. ``first`` is :func:`_face_newton` at ``w`` on the
    face ``w > 0`` when the caller has it."""
    w0, gn, Hn = w.numpy(), g.numpy(), H.numpy()
    v = w0.copy()
    free = v > 0
    for i in range(max_iter):
        gv = gn + Hn @ (v - w0)
        if i == 0 and first is not None:
            d, mu = first[0].numpy(), first[1]
        else:
            d, mu = _face_newton_np(free, gv, Hn)
        if float(np.abs(d).max()) < 1e-12:
            reduced = gv - mu
            reduced[free] = 0.0
            j = int(np.argmin(reduced))
            if float(reduced[j]) >= -1e-12:
                break
            free[j] = True
            continue
        shrinking = d < 0
        alpha = 1.0
        if shrinking.any():
            alpha = min(1.0, float((v[shrinking] / -d[shrinking]).min()))
        v = np.maximum(v + alpha * d, 0.0)
        if alpha < 1.0:  # the blocking member(s) reach 0 and leave the face
            free &= v > 1e-15
            v[~free] = 0.0
        v /= v.sum()
    return torch.from_numpy(v)


def _optimal_state(
    scores: torch.Tensor,
    targets: torch.Tensor,
    ppl: torch.Tensor,
    tgt: torch.Tensor | None = None,
    *,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> tuple[torch.Tensor, float, torch.Tensor, torch.Tensor]:
    """:func:`_optimal`, also returning the gradient ``(K,)`` and Hessian ``(K, K)`` at the solution.

    ``tgt`` is :func:`target_scores` (computed here when not given). Sequential quadratic programming:
    each iteration minimises the quadratic model of the loss at ``w`` over the whole simplex
    (:func:`_simplex_qp`, no pass over the scores), so members join and leave the support in the model
    rather than one pass at a time, and steps towards that point with Armijo backtracking. It stops when
    the Newton step on the current face is below ``1e-9`` (or ``|g.d| < tol``) and no reduced gradient is
    below ``-1e-9`` (KKT: the global minimum of the convex problem; that last step is then taken on the
    model, without a pass, and the loss and gradient returned are the model's), or when no trial shows a
    decrease (a step whose predicted decrease is below the loss's rounding is judged on the model at the
    trial point instead). It starts from the uniform point; after the first step, if the best vertex (whose
    loss is its member's log-perplexity, known for free) is still lower, it moves there. Every accepted
    point costs one pass over the scores, which gives the loss, gradient and Hessian together;
    backtracking trials cost a loss-only pass.
    """
    K = scores.shape[0]
    if K == 1:
        zero = torch.zeros(1, dtype=torch.float64)
        return torch.ones(1, dtype=torch.float64), math.log(float(ppl[0])), zero, zero.view(1, 1)
    if tgt is None:
        tgt = target_scores(scores, targets)  # (K, T)
    work = _PassBuffers(scores)
    w = uniform(K)
    f, g, H = _loss_grad_hess(w, scores, tgt, work)
    best = int(torch.argmin(ppl))
    vertex_loss = math.log(float(ppl[best]))
    resolution = 8 * torch.finfo(scores.dtype).eps * max(1.0, abs(f))  # rounding of a computed loss
    for it in range(max_iter):
        if it == 1 and vertex_loss < f:
            w = torch.zeros(K, dtype=torch.float64)
            w[best] = 1.0
            f, g, H = _loss_grad_hess(w, scores, tgt, work)
        free = w > 0
        d, mu = _face_newton(free, g, H)
        if float(d.abs().max()) < 1e-9 or abs(float(g @ d)) < tol:
            reduced = g - mu  # (K,)
            reduced[free] = 0.0
            if float(reduced.min()) >= -1e-9:
                # KKT holds: global optimum of the convex problem. The last Newton step, whose predicted
                # decrease -g.d/2 is below tol, is taken on the quadratic model without a pass.
                if bool((w + d >= 0).all()):
                    f, g = f + 0.5 * float(g @ d), g + H @ d
                    w = w + d
                    w /= w.sum()
                break
        d = _simplex_qp(w, g, H, first=(d, mu)) - w  # feasible for every step length in [0, 1]
        slope = float(g @ d)
        if slope > -tol:
            break  # the model sees no descent left
        alpha, accepted, full = 1.0, False, None
        for trial in range(40):
            if trial > 0 and -alpha * slope < resolution:
                break  # the decrease left is below the loss's rounding: no trial can show it
            cand = (w + alpha * d).clamp_min(0.0)
            cand[cand < 1e-15] = 0.0
            cand /= cand.sum()
            if trial == 0:
                full = _loss_grad_hess(cand, scores, tgt, work)
                f_new = full[0]
            else:
                f_new = _loss_only(cand, scores, tgt, work)
            if f_new <= f + 1e-4 * alpha * slope or f_new < f:
                accepted = True
                break
            if trial == 0 and -slope < 4 * resolution:
                # The loss cannot show so small a decrease; the model at the trial point (its pass is
                # done) can: accept the step if it leaves less predicted decrease than there was.
                left = float(full[1] @ (_simplex_qp(cand, full[1], full[2]) - cand))
                accepted = left > slope
                break
            alpha *= 0.5
        if not accepted:
            if it == 0 and vertex_loss < f:
                continue  # the vertex check at the top of the next iteration
            break
        w = cand
        f, g, H = full if trial == 0 else _loss_grad_hess(w, scores, tgt, work)
    return w, f, g, H


def check_fixed(values: Sequence[float], num_members: int) -> torch.Tensor:
    """Validate user weights: one finite, non-negative value per member, summing to 1."""
    vals = [float(v) for v in values]
    if len(vals) != num_members:
        raise ValueError(f"Got {len(vals)} fixed weights for {num_members} members; pass one per member.")
    if any(not math.isfinite(v) or v < 0 for v in vals):
        raise ValueError(f"Fixed weights must be finite and >= 0; got {vals}.")
    if abs(sum(vals) - 1.0) > 1e-6:
        raise ValueError(f"Fixed weights must sum to 1 (they sum to {sum(vals):.6g}); normalise them first.")
    return torch.tensor(vals, dtype=torch.float64)


def check_strategy(weighting: str | Sequence[float], num_members: int | None = None) -> None:
    """Raise a clear error for an unknown strategy name or bad fixed weights."""
    if isinstance(weighting, str):
        if weighting not in STRATEGIES:
            raise ValueError(
                f"Unknown weighting {weighting!r}; use one of {', '.join(STRATEGIES)} or a list of floats."
            )
    elif num_members is not None:
        check_fixed(weighting, num_members)


@dataclass
class Solution:
    """A solved prompt: the weights ``(K,)``, each member's perplexity ``(K,)`` (both float64, CPU), and
    Eq. 3's loss at the weights (``exp(loss)`` is the fused prompt perplexity). ``optimal`` also gives the
    loss's gradient ``(K,)`` and Hessian ``(K, K)`` at the weights (mean over the prompt's positions), which
    weights that follow the text start from (:mod:`langchain_packllm.online`)."""

    weights: torch.Tensor
    perplexities: torch.Tensor
    loss: float
    gradient: torch.Tensor | None = None
    hessian: torch.Tensor | None = None


def solve(
    weighting: str | Sequence[float],
    logprobs: torch.Tensor,
    targets: torch.Tensor,
    *,
    tau: float = 1.0,
    grid_step: float = 0.05,
) -> torch.Tensor:
    """Weights ``(K,)`` (float64, on the CPU) for one prompt under the named strategy.

    ``logprobs`` is ``(K, T, V)`` (log-probs or raw logits) and ``targets`` ``(T,)``, with ``T >= 1``.
    """
    return _solve(weighting, logprobs, targets, tau, grid_step, with_loss=False).weights


def solve_with_stats(
    weighting: str | Sequence[float],
    scores: torch.Tensor,
    targets: torch.Tensor,
    *,
    tau: float = 1.0,
    grid_step: float = 0.05,
) -> Solution:
    """:func:`solve`, plus the members' perplexities and the fused prompt loss, sharing one pass over the
    scores where the strategy allows (the engine's reports use this)."""
    return _solve(weighting, scores, targets, tau, grid_step, with_loss=True)


def _solve(weighting, scores, targets, tau, grid_step, *, with_loss: bool) -> Solution:
    K = scores.shape[0]
    check_strategy(weighting, K)
    ppl = perplexities(scores, targets)  # (K,)
    if bool(ppl.isnan().any()):  # NaN scores: nothing to solve; the caller names the member
        return Solution(uniform(K), ppl, float("nan"))
    loss, grad, hess = None, None, None
    if not isinstance(weighting, str):
        w = check_fixed(weighting, K)
    elif weighting == "uniform":
        w = uniform(K)
    elif weighting == "top1":
        w = top1(ppl)
        loss = math.log(float(ppl[int(torch.argmin(ppl))]))
    elif weighting == "sim":
        w = sim(ppl, tau)
    elif weighting == "greedy":
        w, loss = _greedy(scores, targets, grid_step, ppl)
    elif weighting == "grid":
        w, loss = _grid(scores, targets, grid_step, ppl)
    else:
        w, loss, grad, hess = _optimal_state(scores, targets, ppl)
    if loss is None and with_loss:
        loss = prompt_loss(w, scores, targets)
    return Solution(w, ppl, float("nan") if loss is None else loss, grad, hess)
