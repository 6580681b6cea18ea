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


def brute_force_grid(lp, y, step):
    """Every grid point, by itertools.product, scored in float64: ``(points (G, K), losses (G,))``."""
    K, T, V = lp.shape
    n = round(1 / step)
    counts = [c + (n - sum(c),) for c in itertools.product(range(n + 1), repeat=K - 1) if sum(c) <= n]
    pts = torch.tensor(counts, dtype=torch.float64) / n
    s = lp.double()
    fused = (pts @ s.reshape(K, T * V)).view(-1, T, V)
    tgt = s.gather(-1, y.view(1, -1, 1).expand(K, -1, 1)).squeeze(-1)  # (K, T)
    return pts, (fused.logsumexp(-1) - pts @ tgt).mean(-1)


def grid_problem(seed: int):
    """Random problems of several kinds: K in 2..5, steps 0.2 / 0.1 / 0.05."""
    K = 2 + seed % 4
    step = (0.2, 0.1, 0.05)[seed // 4 % 3]
    kind = seed // 12 % 4
    g = torch.Generator().manual_seed(100 + seed)
    T, V = 6, 20
    lp, y = make_problem(200 + seed, K, T=T, V=V)
    if kind == 1:  # nearly flat: members close to one another
        lp = (lp[:1] + 0.05 * torch.randn(K, T, V, generator=g, dtype=torch.float64)).log_softmax(-1)
    elif kind == 2:  # targets member 0 ranks first: the optimum sits on a vertex or a face
        y = lp[0].argmax(-1)
    elif kind == 3:  # raw logits: per-position shifts and a wider scale
        lp = lp * 3 + torch.randn(K, T, 1, generator=g, dtype=torch.float64) * 10
    return lp, y, step


@pytest.mark.parametrize("by_bound", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", range(48))
def test_pruned_grid_is_the_brute_force_minimum(seed: int, dtype, by_bound: bool) -> None:
    """``by_bound=True`` orders evaluations by lower bound, not by the quadratic model around the continuous
    optimum (whose first point is nearly always the answer): there the pruning decides the answer."""
    lp, y, step = grid_problem(seed)
    lp = lp.to(dtype)
    w, loss = W._grid(lp, y, step, round_size=1 if by_bound else 8, by_bound=by_bound)
    pts, losses = brute_force_grid(lp, y, step)
    order = torch.argsort(losses)
    best, gap = int(order[0]), float(losses[order[1]] - losses[order[0]])
    rounding = 1e-5 if dtype == torch.float32 else 1e-12  # well above a computed loss's rounding
    assert loss == pytest.approx(float(losses[best]), abs=rounding / 4)
    assert W.prompt_loss(w, lp.double(), y) == pytest.approx(float(losses[best]), abs=rounding / 4)
    if gap > rounding:  # one clear minimiser (all but a few of these problems): the very same point
        assert w.tolist() == pts[best].tolist()
        assert w.tolist() == W.grid(lp, y, step, exhaustive=True).tolist()
        assert w.tolist() == W.solve("grid", lp, y, grid_step=step).tolist()
    else:  # a tie within rounding: either point, as the exhaustive search's own choice is rounding's
        assert float(losses[pts.tolist().index(w.tolist())]) <= float(losses[best]) + rounding


def test_pruned_grid_problems_mostly_have_one_clear_minimiser() -> None:
    """The comparison above is of points, not just losses, for all but a few of its problems."""
    clear = 0
    for seed in range(48):
        lp, y, step = grid_problem(seed)
        _, losses = brute_force_grid(lp.float(), y, step)
        top2 = losses.topk(2, largest=False).values
        clear += float(top2[1] - top2[0]) > 1e-5
    assert clear >= 44


def test_pruned_grid_evaluates_few_points_for_five_members() -> None:
    lp, y = make_problem(21, 5, T=8, V=64)
    stats: dict = {}
    w, loss = W._grid(lp.float(), y, 0.05, stats=stats)
    assert stats["points"] == math.comb(20 + 4, 4)
    assert stats["evaluated"] < stats["points"] // 20
    pts, losses = brute_force_grid(lp.float(), y, 0.05)
    assert w.tolist() == pts[int(losses.argmin())].tolist()


def test_pruned_grid_with_identical_members_ties_within_rounding() -> None:
    lp, y = make_problem(22, 1)
    lp = torch.cat([lp, lp, lp])  # every grid point has the same loss
    w, loss = W._grid(lp, y, 0.1)
    assert float(w.sum()) == pytest.approx(1.0)
    assert loss == pytest.approx(W._grid_exhaustive(lp, y, 0.1)[1], abs=1e-12)
    assert loss == pytest.approx(W.prompt_loss(W.uniform(3), lp, y), abs=1e-12)


def test_grid_on_a_coarse_lattice_and_one_member() -> None:
    lp, y = make_problem(23, 3)
    assert W.grid(lp, y, 1.0).tolist() == W.top1(W.perplexities(lp, y)).tolist()
    assert W.grid(lp[:1], y, 0.1).tolist() == [1.0]


@pytest.mark.parametrize("seed", range(14))
def test_optimal_satisfies_kkt_on_faces_and_vertices(seed: int) -> None:
    """KKT at the returned weights, recomputed here in float64, for K up to 8 (odd seeds put the optimum
    on a vertex or a face), and the loss the solver reports is the loss at those weights."""
    K = 2 + seed % 7
    lp, y = make_problem(300 + seed, K, T=16, V=40)
    w, loss, _, _ = W._optimal_state(lp, y, W.perplexities(lp, y))
    _, g, _ = W._loss_grad_hess(w, lp, W.target_scores(lp, y))
    active = w > 0
    mu = float(g[active].mean())
    assert torch.allclose(g[active], torch.full_like(g[active], mu), atol=1e-7)
    assert (g[~active] >= mu - 1e-7).all()
    assert loss == pytest.approx(plain_loss(w, lp, y), abs=1e-10)


@pytest.mark.parametrize("block", [1, 200, 2000])
def test_solvers_do_not_depend_on_the_block_size(block: int, monkeypatch) -> None:
    """Passes over the scores run in blocks of positions or of candidates: any block size gives what the
    default (one block for so small a problem) gives. Here K = 3, T = 20, V = 30: a block of 1 is one
    position and one candidate at a time, 200 splits the positions unevenly (2 per pass chunk, 6 per
    log-partition block), 2000 holds 3 candidates."""
    lp, y = make_problem(4, 3, T=20)
    whole = {name: W.solve_with_stats(name, lp, y) for name in ("optimal", "greedy", "grid", "uniform")}
    cands = torch.tensor([[0.2, 0.5, 0.3], [1.0, 0.0, 0.0], [0.1, 0.1, 0.8]], dtype=torch.float64)
    losses = W.prompt_losses(cands, lp, y)
    monkeypatch.setattr(W, "_CPU_BLOCK_ELEMENTS", block)
    for name, want in whole.items():
        got = W.solve_with_stats(name, lp, y)
        assert got.weights.tolist() == pytest.approx(want.weights.tolist(), abs=1e-12), name
        assert got.loss == pytest.approx(want.loss, abs=1e-12) and torch.allclose(
            got.perplexities, want.perplexities
        )
    assert torch.allclose(W.prompt_losses(cands, lp, y), losses, atol=1e-12, rtol=0)
    assert W.prompt_losses(cands, lp, y).tolist() == pytest.approx(
        [plain_loss(w, lp, y) for w in cands], abs=1e-10
    )


def test_in_place_logsumexp_matches_torch_including_infinities() -> None:
    """``_exp_shifted_`` (the log-partition of every pass): torch's logsumexp, ``x`` overwritten with
    ``exp(x - row max)`` and the row sums of that."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, 7, generator=g, dtype=torch.float64) * 30
    x[0, 0, 3] = -math.inf  # a zero probability
    x[1, 2] = -math.inf  # a row of them
    x[2, 1, 0] = math.inf
    e = x.clone()
    z, got = W._exp_shifted_(e)
    want = torch.logsumexp(x, dim=-1)
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
    assert got[1, 2] == -math.inf and got[2, 1] == math.inf
    finite = want.isfinite()
    shifted = torch.exp(x - x.amax(-1, keepdim=True))
    assert torch.allclose(e[finite], shifted[finite], rtol=1e-12, atol=0)
    assert torch.allclose(z.squeeze(-1)[finite], shifted.sum(-1)[finite], rtol=1e-12, atol=0)
