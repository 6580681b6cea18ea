"""Importance weights: how much each member counts for one prompt.

Every strategy takes the members' log-probabilities at the prompt positions and returns a point of the
probability simplex (``w_k >= 0``, ``sum_k w_k = 1``):

- ``uniform``: ``1 / K``.
- ``top1``: all weight on the member with the lowest prompt perplexity.
- ``sim``: Eq. 4, ``softmax_k(-log PPL_k / tau)``.
- ``greedy``: Algorithm 1 of the paper (PackLLM-opt): members sorted by perplexity, fused pairwise, each
  pair weight chosen on a grid of step ``grid_step``.
- ``grid``: the exhaustive grid over the simplex (the paper's Table 4 row), evaluated in batches.
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

import torch

STRATEGIES = ("optimal", "greedy", "grid", "sim", "uniform", "top1")

# Upper bound on the elements of one temporary (G, T, V) block when many weight vectors are scored.
_BLOCK_ELEMENTS = 1 << 25


def target_logprobs(logprobs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each member's log-probability of the true next token: ``(K, T, V), (T,) -> (K, T)``."""
    index = targets.to(logprobs.device).view(1, -1, 1).expand(logprobs.shape[0], -1, 1)
    return logprobs.gather(-1, index).squeeze(-1)


def perplexities(logprobs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Eq. 2 for every member: ``exp(-mean_i log p_k(x_i | x_<i))``, shape ``(K,)``."""
    return torch.exp(-target_logprobs(logprobs, targets).double().mean(-1))


def prompt_losses(candidates: torch.Tensor, logprobs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Eq. 3's objective (mean negative log-likelihood of the prompt) for many weight vectors at once.

    ``candidates`` is ``(G, K)``; returns ``(G,)`` in float64. Work is done in blocks so that no temporary
    exceeds a fixed number of elements, whatever ``G``.
    """
    K, T, V = logprobs.shape
    flat = logprobs.reshape(K, T * V)  # (K, T*V)
    tgt = target_logprobs(logprobs, targets)  # (K, T)
    candidates = candidates.to(device=logprobs.device, dtype=logprobs.dtype)
    block = max(1, _BLOCK_ELEMENTS // max(1, T * V))
    out = []
    for start in range(0, candidates.shape[0], block):
        w = candidates[start : start + block]  # (g, K)
        fused = (w @ flat).view(-1, T, V)  # (g, T, V)
        lse = torch.logsumexp(fused, dim=-1)  # (g, T)
        out.append((lse - w @ tgt).double().mean(-1))
    return torch.cat(out)


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
    n = _grid_divisions(step)
    K = logprobs.shape[0]
    order = torch.argsort(perplexities(logprobs, targets), stable=True).tolist()  # Eq. 5
    lambdas = torch.arange(n + 1, dtype=torch.float64) / n  # (n+1,)
    pair = torch.stack([lambdas, 1.0 - lambdas], dim=1)  # (n+1, 2)
    fused = logprobs[order[0]]  # (T, V)  s^(1)
    sorted_w = torch.zeros(K, dtype=torch.float64)
    sorted_w[0] = 1.0
    for k in range(1, K):
        both = torch.stack([fused, logprobs[order[k]]])  # (2, T, V)
        lam = float(lambdas[int(torch.argmin(prompt_losses(pair, both, targets)))])
        fused = lam * fused + (1.0 - lam) * logprobs[order[k]]  # Eq. 7
        sorted_w[:k] *= lam
        sorted_w[k] = 1.0 - lam
    w = torch.zeros(K, dtype=torch.float64)
    w[order] = sorted_w
    return w


def simplex_grid(num_members: int, step: float = 0.05) -> torch.Tensor:
    """Every point of the simplex whose coordinates are multiples of ``step``: ``(G, K)``, G = C(n+K-1, K-1)."""
    n = _grid_divisions(step)
    K = num_members
    # Stars and bars: choose K-1 bar positions among n+K-1 slots.
    bars = torch.tensor(list(itertools.combinations(range(n + K - 1), K - 1)), dtype=torch.long)
    bars = bars.view(-1, K - 1)
    edges = torch.cat(
        [torch.full((bars.shape[0], 1), -1), bars, torch.full((bars.shape[0], 1), n + K - 1)], dim=1
    )
    counts = edges[:, 1:] - edges[:, :-1] - 1  # (G, K)
    return counts.double() / n


def grid(logprobs: torch.Tensor, targets: torch.Tensor, step: float = 0.05) -> torch.Tensor:
    """Exhaustive grid search over the simplex; the first of equal minima wins."""
    points = simplex_grid(logprobs.shape[0], step)
    losses = prompt_losses(points, logprobs, targets)
    return points[int(torch.argmin(losses))]


def _loss_grad_hess(
    w: torch.Tensor, logprobs: torch.Tensor, tgt: torch.Tensor
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Objective, gradient ``(K,)`` and Hessian ``(K, K)`` of Eq. 3 at ``w``.

    With ``p_i`` the fused distribution at position i: ``grad_k = mean_i (E_p[s_k] - s_k,x_i)`` and
    ``H_kl = mean_i Cov_p(s_k, s_l)``. Positions are processed in chunks to bound memory.
    """
    K, T, V = logprobs.shape
    wd = w.to(device=logprobs.device, dtype=logprobs.dtype)
    chunk = max(1, _BLOCK_ELEMENTS // max(1, K * V))
    loss = 0.0
    grad = torch.zeros(K, dtype=torch.float64, device=logprobs.device)
    hess = torch.zeros(K, K, dtype=torch.float64, device=logprobs.device)
    for start in range(0, T, chunk):
        s = logprobs[:, start : start + chunk]  # (K, c, V)
        fused = torch.einsum("k,kcv->cv", wd, s)  # (c, V)
        lse = torch.logsumexp(fused, dim=-1)  # (c,)
        p = torch.exp(fused - lse[:, None])  # (c, V)
        mean_s = torch.einsum("cv,kcv->kc", p, s)  # (K, c)   E_p[s_k]
        sp = s * p.sqrt()  # (K, c, V)
        second = torch.einsum("kcv,lcv->kl", sp, sp)  # (K, K)  sum_c E_p[s_k s_l]
        loss += float((lse - wd @ tgt[:, start : start + chunk]).double().sum())
        grad += (mean_s - tgt[:, start : start + chunk]).double().sum(-1)
        hess += second.double() - mean_s.double() @ mean_s.double().T
    return loss / T, (grad / T).cpu(), (hess / T).cpu()


def optimal(
    logprobs: torch.Tensor,
    targets: torch.Tensor,
    *,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> torch.Tensor:
    """The exact minimiser of Eq. 3 over the simplex (active-set Newton method).

    The objective is convex, so the KKT point this finds is the global minimum: for some ``mu``,
    ``grad_k = mu`` where ``w_k > 0`` and ``grad_k >= mu`` where ``w_k = 0``. Each iteration takes an
    equality-constrained Newton step on the free set, shortened to stay feasible and to decrease the loss
    (Armijo backtracking); a member leaves the free set when its weight reaches 0 and joins it when its
    reduced gradient is negative at a point that is optimal on the current face.
    """
    K = logprobs.shape[0]
    if K == 1:
        return torch.ones(1, dtype=torch.float64)
    tgt = target_logprobs(logprobs, targets)  # (K, T)
    starts = torch.cat([torch.eye(K, dtype=torch.float64), uniform(K).view(1, K)])
    start_losses = prompt_losses(starts, logprobs, targets)
    w = starts[int(torch.argmin(start_losses))].clone()
    free = w > 0
    f, g, H = _loss_grad_hess(w, logprobs, tgt)
    for _ in range(max_iter):
        idx = free.nonzero().flatten()
        n = idx.numel()
        # KKT system of the face: [H_FF 1; 1^T 0] [d; -mu] = [-g_F; 0]
        Hff = H[idx][:, idx]
        ridge = 1e-12 * max(1.0, float(Hff.diagonal().abs().max()))
        kkt = torch.zeros(n + 1, n + 1, dtype=torch.float64)
        kkt[:n, :n] = Hff + ridge * torch.eye(n, dtype=torch.float64)
        kkt[:n, n] = 1.0
        kkt[n, :n] = 1.0
        rhs = torch.cat([-g[idx], torch.zeros(1, dtype=torch.float64)])
        sol = torch.linalg.lstsq(kkt, rhs.view(-1, 1)).solution.flatten()
        d = torch.zeros(K, dtype=torch.float64)
        d[idx] = sol[:n]
        mu = -float(sol[n])
        if float(d.abs().max()) < 1e-9 or abs(float(g @ d)) < tol:
            reduced = g - mu  # (K,)
            reduced[free] = 0.0
            j = int(torch.argmin(reduced))
            if float(reduced[j]) >= -1e-9:
                break  # KKT holds: global optimum of the convex problem
            free[j] = True
            continue
        # Feasible step length (ratio test) and Armijo backtracking.
        shrinking = d < 0
        alpha_max = 1.0
        if bool(shrinking.any()):
            alpha_max = min(1.0, float((w[shrinking] / -d[shrinking]).min()))
        slope = float(g @ d)
        alpha, accepted = alpha_max, False
        for _ in range(40):
            cand = (w + alpha * d).clamp_min(0.0)
            cand /= cand.sum()
            f_new = prompt_loss(cand, logprobs, targets)
            if f_new <= f + 1e-4 * alpha * slope or f_new < f:
                accepted = True
                break
            alpha *= 0.5
        if not accepted:
            break
        w = cand
        if alpha == alpha_max and alpha_max < 1.0:
            free &= w > 1e-15
            w[~free] = 0.0
            w /= w.sum()
        f, g, H = _loss_grad_hess(w, logprobs, tgt)
    return w


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


def solve(
    weighting: str | Sequence[float],
    logprobs: torch.Tensor,
    targets: torch.Tensor,
    *,
    tau: float = 1.0,
    grid_step: float = 0.05,
) -> torch.Tensor:
    """Weights ``(K,)`` (float64, on the CPU) for one prompt under the named strategy.

    ``logprobs`` is ``(K, T, V)`` and ``targets`` ``(T,)``, with ``T >= 1``.
    """
    K = logprobs.shape[0]
    check_strategy(weighting, K)
    if not isinstance(weighting, str):
        return check_fixed(weighting, K)
    if weighting == "uniform":
        return uniform(K)
    if weighting == "top1":
        return top1(perplexities(logprobs, targets))
    if weighting == "sim":
        return sim(perplexities(logprobs, targets), tau)
    if weighting == "greedy":
        return greedy(logprobs, targets, grid_step)
    if weighting == "grid":
        return grid(logprobs, targets, grid_step)
    return optimal(logprobs, targets)
