"""Weights that follow the text: re-solved every ``N`` tokens on everything read so far.

PackLLM solves the weights once, on the prompt. With ``reweight_every=N`` they are solved again after every
``N`` generated (or scored) tokens, on the prompt *and* the text since, so a long answer that drifts from
code to prose moves its weight to the members that now predict it best. The score of a token only ever
uses weights solved on the tokens before it (causal: changing a later token changes no earlier score).

What is kept, per row (prompt), is bounded and does not grow with the text: Eq. 3's objective on the text so
far, ``F(w) = sum_i f_i(w)`` with ``f_i(w) = logsumexp_v(sum_k w_k s_kiv) - sum_k w_k s_ki,x_i``, as its
second-order model. Position ``i`` adds ``f_i``'s gradient ``g_i`` and Hessian ``H_i`` at the weights ``w_i``
it was read with (the prompt adds its own at its optimum, from the prompt solve), so

    F(w) ~ const + b.w + w^T A w / 2,   b = sum_i (g_i - H_i w_i),   A = sum_i H_i   (A is PSD: F is convex)

and a re-solve minimises that quadratic over the simplex (the active-set method of
:func:`~langchain_packllm.weights._simplex_qp`, on ``K``-sized arrays: microseconds, no pass over scores),
warm-started from the current weights. The state is ``K * K + K + 2`` floats per row, plus each member's
negative log-likelihood so far (``K`` floats), from which ``sim`` and ``top1`` re-solve exactly. Per token
the update costs a few passes over the ``K`` rows of scores (``O(K^2 V)``, in the scores' dtype, at least
float32; the sums in float64): a few times what the mix itself costs, small next to the members' forwards.

The model is exact at the points it was expanded at; it is an approximation elsewhere (the exact
re-solve would keep every position's ``(K, V)`` scores, which grows with the text). ``docs/RESULTS.md``
measures how close its weights come to the exact optimum on the text so far.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from langchain_packllm import weights as weights_lib

__all__ = ["ONLINE_STRATEGIES", "OnlineWeights", "check_online"]

ONLINE_STRATEGIES = ("optimal", "sim", "top1")

# Scores are clamped here before the statistics: -inf (a member ruling a token out; the scorer's stand-in
# for it is the dtype's lowest value) would give 0 * inf = NaN in the moments. Logits and log-probs of
# real tokens lie far above this floor.
_FLOOR = -1e4
_BLOCK_ELEMENTS = 1 << 22  # elements of one block of scores in observe on an accelerator (16 MiB float32)
# On a CPU, blocks small enough for a core's L2 cache (1 MiB in float32): the statistics' dozen passes
# over a block then stay in cache (a re-solve of 2 members x 128 positions x 32k: 11 ms instead of 35 ms).
_CPU_BLOCK_ELEMENTS = 1 << 18


def _block_positions(device: torch.device, per_position: int) -> int:
    """Positions per block of scores in the statistics, ``per_position`` elements each."""
    limit = _CPU_BLOCK_ELEMENTS if device.type == "cpu" else _BLOCK_ELEMENTS
    return max(1, limit // per_position)


def check_online(weighting, every: int | None) -> None:
    """A clear error when ``reweight_every`` is set with a weighting that cannot follow the text."""
    if every is None:
        return
    if isinstance(weighting, str) and weighting in ONLINE_STRATEGIES:
        return
    name = weighting if isinstance(weighting, str) else "fixed weights"
    raise ValueError(
        f"reweight_every={every} re-solves the weights on the text as it grows, which {name!r} cannot do; "
        f"use weighting={' or '.join(repr(s) for s in ONLINE_STRATEGIES)}, or leave reweight_every=None."
    )


class OnlineWeights:
    """The weights of ``B`` rows (prompts) re-solved every ``every`` tokens; see the module docstring.

    Built from each row's prompt solve (:meth:`start`). A decode step calls :meth:`observe` with the scores
    the step mixed and the tokens it chose, then :meth:`resolve` when ``every`` tokens have passed;
    scoring a known continuation calls :meth:`fused_logprobs`, which does both. ``trajectory[b]`` lists
    ``(position, weights)``: the weights in use from that token on (positions count the prompt's tokens).
    The object belongs to one call: nothing in it is shared.
    """

    def __init__(
        self,
        weighting: str,
        every: int,
        weights: torch.Tensor,
        counts: Sequence[int],
        nll: torch.Tensor,
        linear: torch.Tensor,
        hess: torch.Tensor,
        positions: Sequence[int],
        tau: float = 1.0,
    ):
        check_online(weighting, every)
        self.weighting, self.every, self.tau = weighting, int(every), float(tau)
        self.weights = weights.double().clone()  # (B, K)
        self.counts = list(counts)  # positions read so far, per row
        self.nll = nll.double().clone()  # (B, K) each member's -log-likelihood so far (sim, top1)
        self.linear = linear.double().clone()  # (B, K)   b
        self.hess = hess.double().clone()  # (B, K, K)  A
        self.positions = list(positions)  # the next position of each row
        self.seen = [0] * len(self.counts)  # tokens observed since the prompt
        self.solves = 0  # re-solves so far (any row)
        self._pending: list = []  # decode steps pushed but not yet observed (see push)
        self._waiting = [0] * len(self.counts)  # pending steps per row
        self.trajectory = [[(p, w)] for p, w in zip(self.positions, self.weights.tolist())]

    @classmethod
    def start(
        cls,
        weighting: str,
        every: int,
        solutions: Sequence[weights_lib.Solution],
        counts: Sequence[int],
        positions: Sequence[int],
        tau: float = 1.0,
    ) -> OnlineWeights:
        """From each row's prompt solve: its weights, perplexities and (``optimal``) the gradient and
        Hessian at the optimum, over ``counts[b]`` prompt positions; ``positions[b]`` is where the row's
        first new token sits."""
        K = solutions[0].weights.shape[0]
        B = len(solutions)
        nll = torch.zeros(B, K, dtype=torch.float64)
        linear = torch.zeros(B, K, dtype=torch.float64)
        hess = torch.zeros(B, K, K, dtype=torch.float64)
        for b, (sol, n) in enumerate(zip(solutions, counts)):
            if n == 0 or bool(sol.perplexities.isnan().any()):
                continue  # no prompt statistics (a fallback): the text alone will decide
            nll[b] = n * torch.log(sol.perplexities.double())
            if sol.gradient is not None and sol.hessian is not None:
                w, g, H = sol.weights.double(), sol.gradient.double(), sol.hessian.double()
                linear[b] = n * (g - H @ w)
                hess[b] = n * H
        counts = [n if not bool(s.perplexities.isnan().any()) else 0 for s, n in zip(solutions, counts)]
        weights = torch.stack([s.weights.double() for s in solutions])
        return cls(weighting, every, weights, counts, nll, linear, hess, positions, tau)

    # ------------------------------------------------------------------ statistics

    @torch.inference_mode()
    def observe(self, scores: Sequence[torch.Tensor], targets: torch.Tensor, rows: Sequence[int]) -> None:
        """Add positions read with the rows' current weights: ``scores`` are the ``K`` members' scores
        ``(P, V)`` (logits or log-probs; per-row shifts do not matter), ``targets`` ``(P,)`` the tokens
        that followed, ``rows[p]`` the row position ``p`` belongs to."""
        if len(rows) == 0:
            return
        K, V = len(scores), scores[0].shape[-1]
        step = _block_positions(scores[0].device, K * V)  # positions per block: bounded temporaries
        dtype = torch.promote_types(scores[0].dtype, torch.float32)
        for start in range(0, len(rows), step):
            block = torch.stack([x[start : start + step].to(scores[0].device, dtype) for x in scores], dim=1)
            self._observe(block, targets[start : start + step], list(rows[start : start + step]))
        self._count(rows)

    def _count(self, rows: Sequence[int]) -> None:
        for b in rows:
            self.counts[b] += 1
            self.seen[b] += 1
            self.positions[b] += 1

    def _observe(self, x: torch.Tensor, targets: torch.Tensor, rows: list[int]) -> None:
        """:meth:`observe` on ``x``, the ``(P, K, V)`` scores in at least float32, which this overwrites
        (positions first: every pass below then runs over contiguous memory)."""
        device, dtype = x.device, x.dtype
        x.clamp_min_(_FLOOR)
        P, K, V = x.shape
        idx = torch.as_tensor(rows)
        s_x = x.gather(-1, targets.to(device).view(P, 1, 1).expand(P, K, 1))  # (P, K, 1)
        x.sub_(s_x)  # each member's scores less its target's: cancels in f_i, keeps the moments small
        if self.weighting != "optimal":  # each member's own -log p(x): logsumexp of the shifted scores
            self.nll.index_add_(0, idx, torch.logsumexp(x, -1).double().cpu())
            return
        w = self.weights[idx].to(device, dtype)  # (P, K)
        p = torch.softmax(torch.bmm(w[:, None, :], x).squeeze(1), dim=-1)  # (P, V) fused distribution
        px = x * p[:, None, :]  # (P, K, V)
        g = px.sum(-1)  # (P, K)   E_p[s_k] - s_k,x: the gradient of f_i
        H = torch.bmm(px, x.transpose(1, 2)) - g[:, :, None] * g[:, None, :]  # (P, K, K)  Cov_p
        g, H, w = g.double(), H.double(), w.double()
        Hw = torch.bmm(H, w[:, :, None]).squeeze(-1)  # (P, K)
        self.linear.index_add_(0, idx, (g - Hw).cpu())
        self.hess.index_add_(0, idx, H.cpu())

    def push(self, scores: Sequence[torch.Tensor], targets: torch.Tensor, rows: Sequence[int]) -> None:
        """:meth:`observe` one decode step later, all pending steps at once (:meth:`flush`, before a
        re-solve): fewer, larger passes than one per step. ``scores`` are the step's ``K`` tensors
        ``(B, V)`` (held, not copied: step sources make new ones each step), ``targets`` ``(B,)``, ``rows``
        the rows that read this step; a member that skipped the step (weight 0 in every row) has ``None``,
        filled in with :meth:`fill` before the next flush. What is held is bounded by ``every`` steps."""
        self._pending.append((list(scores), targets, list(rows)))
        for b in rows:
            self._waiting[b] += 1

    def fill(self, k: int, scores: Sequence[torch.Tensor]) -> None:
        """Member ``k``'s scores ``(B, V)`` for the pending steps pushed without them (``None`` in its place:
        it skipped those steps at weight 0), oldest first; :meth:`flush` needs every member's scores."""
        missing = [step for step in self._pending if step[0][k] is None]
        if len(missing) != len(scores):
            raise ValueError(
                f"member {k} has {len(missing)} pending steps without scores but {len(scores)} were given"
            )
        for step, x in zip(missing, scores):
            step[0][k] = x

    def flush(self) -> None:
        """Add the pending steps' statistics (see :meth:`push`; a member's missing scores: :meth:`fill`)."""
        gaps = sorted({k for s, _, _ in self._pending for k, x in enumerate(s) if x is None})
        if gaps:
            raise ValueError(f"pending steps lack the scores of members {gaps}; give them with fill()")
        pending, self._pending = self._pending, []
        self._waiting = [0] * len(self._waiting)
        rows = [b for _, _, r in pending for b in r]
        if not rows:
            return
        index = [torch.as_tensor(r, device=t.device) for _, t, r in pending]
        targets = torch.cat([t.index_select(0, i) for (_, t, _), i in zip(pending, index)])
        first = pending[0][0][0]
        K, V, dtype = len(pending[0][0]), first.shape[-1], torch.promote_types(first.dtype, torch.float32)
        step = _block_positions(first.device, K * V)  # positions per block, as in observe
        at = 0
        while at < len(rows):  # each block's (P, K, V) gathered straight from the held steps: one copy
            x = torch.empty((min(step, len(rows) - at), K, V), dtype=dtype, device=first.device)
            filled, offset = 0, 0
            for (s, _, r), i in zip(pending, index):
                lo, hi = max(at - offset, 0), min(at + x.shape[0] - offset, len(r))
                if lo < hi:
                    for k in range(K):
                        x[filled : filled + hi - lo, k] = s[k].index_select(0, i[lo:hi].to(s[k].device))
                    filled += hi - lo
                offset += len(r)
            self._observe(x, targets[at : at + x.shape[0]], rows[at : at + x.shape[0]])
            at += x.shape[0]
        self._count(rows)

    def due(self, b: int) -> bool:
        """Whether row ``b`` has read ``every`` tokens since its last solve (pending steps included)."""
        seen = self.seen[b] + self._waiting[b]
        return seen > 0 and seen % self.every == 0

    def resolve(self, rows: Sequence[int]) -> None:
        """Re-solve the weights of ``rows`` on their text so far (warm-started from the current ones) and
        record them in the trajectory."""
        self.flush()
        for b in rows:
            n = self.counts[b]
            if n == 0:
                continue
            w = self.weights[b]
            if self.weighting == "optimal":
                A = self.hess[b] / n
                A = (A + A.T) / 2  # symmetric up to rounding
                grad = self.linear[b] / n + A @ w
                new = weights_lib._simplex_qp(w, grad, A)
            else:
                ppl = torch.exp(self.nll[b] / n)
                new = weights_lib.top1(ppl) if self.weighting == "top1" else weights_lib.sim(ppl, self.tau)
            self.weights[b] = new
            self.trajectory[b].append((self.positions[b], new.tolist()))
            self.solves += 1

    # ------------------------------------------------------------------ scoring a known continuation

    @torch.inference_mode()
    def fused_logprobs(self, scores: torch.Tensor, targets: torch.Tensor, row: int = 0) -> torch.Tensor:
        """Fused log-probs ``(C, V)`` of a known continuation of row ``row``: ``scores`` ``(K, C, V)``,
        position ``c`` predicting ``targets[c]``. Each block of ``every`` positions is read with the weights
        solved on everything before it, exactly as decoding those tokens would."""
        K, C, V = scores.shape
        out = torch.empty(C, V, dtype=torch.float64, device=scores.device)
        for c, block in self._read(scores, targets, row):
            out[c : c + block.shape[0]] = block
        return out

    @torch.inference_mode()
    def target_logprobs(self, scores: torch.Tensor, targets: torch.Tensor, row: int = 0) -> torch.Tensor:
        """:meth:`fused_logprobs` at the targets only, ``(C,)``, without the ``(C, V)`` tensor."""
        out = torch.empty(targets.shape[0], dtype=torch.float64, device=scores.device)
        for c, block in self._read(scores, targets, row):
            n = block.shape[0]
            out[c : c + n] = block.gather(-1, targets[c : c + n, None].to(block.device))[:, 0]
        return out

    def _read(self, scores: torch.Tensor, targets: torch.Tensor, row: int):
        """Blocks ``(start, fused log-probs (n, V))`` of a known continuation, each read with the weights in
        use there; the statistics are added and the weights re-solved as they pass."""
        K, C, V = scores.shape
        if targets.shape != (C,):
            raise ValueError(
                f"{C} positions of scores but targets of shape {tuple(targets.shape)}; pass one target per "
                "position."
            )
        c = 0
        while c < C:
            n = min(C - c, self.every - self.seen[row] % self.every, max(1, _BLOCK_ELEMENTS // V))
            block = scores[:, c : c + n]  # (K, n, V)
            w = self.weights[row].to(block)
            yield c, torch.log_softmax(torch.einsum("k,knv->nv", w, block).double(), dim=-1)
            self.observe(list(block.unbind(0)), targets[c : c + n], [row] * n)
            if self.due(row):
                self.resolve([row])
            c += n
