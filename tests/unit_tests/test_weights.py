"""Each weighting strategy against a plain re-computation written here."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from langchain_packllm import weights as W


def plain_loss(w, lp, y) -> float:
    """Eq. 3 written out: mean over positions of -log softmax(sum_k w_k s_k)[x_i]."""
    K, T, V = lp.shape
    total = 0.0
    for i in range(T):
        fused = [sum(float(w[k]) * float(lp[k, i, v]) for k in range(K)) for v in range(V)]
        m = max(fused)
        lse = m + math.log(sum(math.exp(f - m) for f in fused))
        total += lse - fused[int(y[i])]
    return total / T


def plain_ppl(lp_k, y) -> float:
    return math.exp(-sum(float(lp_k[i, int(y[i])]) for i in range(len(y))) / len(y))


def make_problem(seed: int, K: int, T: int = 12, V: int = 30):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(T, V, generator=g, dtype=torch.float64) * 2
    lp = torch.stack(
        [
            (
                base * float(torch.rand(1, generator=g)) * 2
                + torch.randn(T, V, generator=g, dtype=torch.float64) * 2
            ).log_softmax(-1)
            for _ in range(K)
        ]
    )
    y = torch.randint(0, V, (T,), generator=g)
    if seed % 2:  # targets member 0 likes, so the optimum leans to a vertex/edge
        y = lp[0].argmax(-1)
    return lp, y


def test_prompt_loss_and_perplexity_match_plain() -> None:
    lp, y = make_problem(0, 3)
    w = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    assert W.prompt_loss(w, lp, y) == pytest.approx(plain_loss(w, lp, y), abs=1e-10)
    ppl = W.perplexities(lp, y)
    for k in range(3):
        assert float(ppl[k]) == pytest.approx(plain_ppl(lp[k], y), rel=1e-10)


@pytest.mark.parametrize("tau", [0.1, 1.0, 3.0])
def test_sim_is_eq4(tau: float) -> None:
    lp, y = make_problem(1, 4)
    ppls = [plain_ppl(lp[k], y) for k in range(4)]
    scores = [-math.log(p) / tau for p in ppls]
    m = max(scores)
    expected = [math.exp(s - m) / sum(math.exp(t - m) for t in scores) for s in scores]
    got = W.solve("sim", lp, y, tau=tau)
    assert got.tolist() == pytest.approx(expected, abs=1e-12)


def test_uniform_and_top1() -> None:
    lp, y = make_problem(2, 3)
    assert W.solve("uniform", lp, y).tolist() == pytest.approx([1 / 3] * 3)
    best = min(range(3), key=lambda k: plain_ppl(lp[k], y))
    expected = [0.0] * 3
    expected[best] = 1.0
    assert W.solve("top1", lp, y).tolist() == expected


def plain_greedy(lp, y, step=0.05):
    """Algorithm 1, transcribed: sort by PPL, fuse pairwise with a grid over lambda, update weights."""
    K = lp.shape[0]
    order = sorted(range(K), key=lambda k: plain_ppl(lp[k], y))
    n = round(1 / step)
    s = lp[order[0]].clone()
    lam_star = [1.0] + [0.0] * (K - 1)
    for k in range(1, K):
        nxt = lp[order[k]]
        best_lam, best_loss = None, float("inf")
        for j in range(n + 1):
            lam = j / n
            mix = torch.stack([s, nxt])
            loss = plain_loss([lam, 1 - lam], mix, y)
            if loss < best_loss - 1e-12:
                best_lam, best_loss = lam, loss
        s = best_lam * s + (1 - best_lam) * nxt
        lam_star = [best_lam * v for v in lam_star[:k]] + [1 - best_lam] + lam_star[k + 1 :]
    w = [0.0] * K
    for pos, k in enumerate(order):
        w[k] = lam_star[pos]
    return w


@pytest.mark.parametrize("seed,K", [(3, 2), (4, 3), (5, 4)])
def test_greedy_is_algorithm_1(seed: int, K: int) -> None:
    lp, y = make_problem(seed, K, T=6, V=12)
    assert W.solve("greedy", lp, y, grid_step=0.05).tolist() == pytest.approx(plain_greedy(lp, y), abs=1e-12)


def test_simplex_grid_enumerates_every_point_once() -> None:
    pts = W.simplex_grid(4, 0.1)
    assert pts.shape == (math.comb(10 + 3, 3), 4)
    assert torch.allclose(pts.sum(1), torch.ones(pts.shape[0], dtype=torch.float64))
    assert (pts >= 0).all()
    as_ints = {tuple(round(v * 10) for v in row) for row in pts.tolist()}
    plain = {c for c in itertools.product(range(11), repeat=4) if sum(c) == 10}
    assert as_ints == plain


def test_grid_is_exhaustive_minimum() -> None:
    lp, y = make_problem(6, 3, T=5, V=10)
    got = W.solve("grid", lp, y, grid_step=0.1)
    best = min(
        (plain_loss([a / 10, b / 10, (10 - a - b) / 10], lp, y), (a / 10, b / 10, (10 - a - b) / 10))
        for a in range(11)
        for b in range(11 - a)
    )
    assert W.prompt_loss(got, lp, y) == pytest.approx(best[0], abs=1e-12)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_optimal_never_worse_than_grid_or_greedy(seed: int, dtype) -> None:
    K = 2 + seed % 4
    lp, y = make_problem(seed, K)
    lp = lp.to(dtype)
    opt = W.solve("optimal", lp, y)
    assert opt.min() >= 0 and float(opt.sum()) == pytest.approx(1.0, abs=1e-12)
    lp64 = lp.double()
    f_opt = W.prompt_loss(opt, lp64, y)
    for rival in ("grid", "greedy", "uniform", "top1", "sim"):
        f_rival = W.prompt_loss(W.solve(rival, lp, y, grid_step=0.1 if K > 3 else 0.05), lp64, y)
        assert f_opt <= f_rival + 1e-6, rival


def test_optimal_matches_fine_line_search_for_two_members() -> None:
    lp, y = make_problem(8, 2)
    opt = W.solve("optimal", lp, y)
    lams = torch.linspace(0, 1, 2001, dtype=torch.float64)
    losses = W.prompt_losses(torch.stack([lams, 1 - lams], 1), lp, y)
    assert W.prompt_loss(opt, lp, y) <= float(losses.min()) + 1e-12
    assert float(opt[0]) == pytest.approx(float(lams[losses.argmin()]), abs=1e-3)


def test_optimal_satisfies_kkt() -> None:
    lp, y = make_problem(10, 4)
    w = W.optimal(lp, y)
    _, g, _ = W._loss_grad_hess(w, lp, W.target_logprobs(lp, y))
    active = w > 1e-9
    mu = float(g[active].mean())
    assert torch.allclose(g[active], torch.full_like(g[active], mu), atol=1e-7)
    assert (g[~active] >= mu - 1e-7).all()


def test_identical_members_are_handled() -> None:
    lp, y = make_problem(11, 1)
    lp = torch.cat([lp, lp, lp])
    w = W.solve("optimal", lp, y)
    assert float(w.sum()) == pytest.approx(1.0)
    assert W.prompt_loss(w, lp, y) == pytest.approx(W.prompt_loss(W.uniform(3), lp, y), abs=1e-12)


@pytest.mark.parametrize(
    "bad,match",
    [
        ([0.5, 0.5, 0.0, 0.0], "3 members"),
        ([0.5, 0.6, -0.1], ">= 0"),
        ([0.2, 0.2, 0.2], "sum to 1"),
        ([float("nan"), 0.5, 0.5], "finite"),
    ],
)
def test_fixed_weights_are_validated(bad, match) -> None:
    with pytest.raises(ValueError, match=match):
        W.check_fixed(bad, 3)


def test_unknown_strategy_and_bad_step() -> None:
    lp, y = make_problem(12, 2)
    with pytest.raises(ValueError, match="Unknown weighting 'best'"):
        W.solve("best", lp, y)
    with pytest.raises(ValueError, match="grid_step"):
        W.solve("greedy", lp, y, grid_step=0.3)


@pytest.mark.parametrize(
    "weighting", ["optimal", "greedy", "grid", "sim", "uniform", "top1", (0.2, 0.3, 0.5)]
)
def test_solve_with_stats_reports_loss_and_perplexities_on_raw_logits(weighting) -> None:
    lp, y = make_problem(13, 3)
    raw = lp + torch.randn(3, lp.shape[1], 1, dtype=torch.float64) * 5  # per-position shifts: raw logits
    sol = W.solve_with_stats(weighting, raw, y, grid_step=0.1)
    assert sol.weights.tolist() == pytest.approx(W.solve(weighting, lp, y, grid_step=0.1).tolist(), abs=1e-9)
    assert sol.loss == pytest.approx(W.prompt_loss(sol.weights, lp, y), abs=1e-9)
    assert sol.perplexities.tolist() == pytest.approx([plain_ppl(lp[k], y) for k in range(3)], rel=1e-9)
