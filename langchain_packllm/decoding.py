"""Decoding: the prompt's weights, then one loop over a step source, with stopping criteria as objects.

A call's prefill gives the weights of every prompt (one solve each) and its :class:`~langchain_packllm.
config.FusionReport`, built once. Decoding then runs :func:`decode_loop` over a *step source*: the object
that yields every member's next-token scores over the reference vocabulary, step after step:

- :class:`CachedSteps` (shared vocabulary, and MinED): each member reads the reference ids (mapped through
  its token map when it has another vocabulary) with its own KV cache, all rows of the batch at once.
- :class:`PrefixSteps` (``alignment="prefix"``, one prompt): the reference (and members sharing its
  tokenizer) decode with their KV caches; every other member follows the growing text with its own tokens.

Each step mixes the scores (Eq. 1), applies the logits processors, picks the tokens, and asks the stopping
criteria (:class:`StopOnEos`, :class:`StopAtContext`, :class:`StopOnStrings`) whether each row is done.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from langchain_packllm import weights as weights_lib
from langchain_packllm.config import FusionReport, SamplingConfig, WeightingConfig
from langchain_packllm.online import OnlineWeights
from langchain_packllm.reference import Plan, Reference
from langchain_packllm.scoring import Scorer, last_logprobs

# ---------------------------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class Solution:
    """One prompt's weights ``(K,)`` and what the report says of them."""

    weights: torch.Tensor
    perplexities: torch.Tensor  # (K,) float64, NaN when the prompt has no perplexity
    fused_perplexity: float
    seconds: float
    fallback: str | None
    positions: int = 0  # prompt positions the weights were solved on
    gradient: torch.Tensor | None = None  # (K,) ``optimal``: the loss's gradient and Hessian at the weights
    hessian: torch.Tensor | None = None  # (K, K)


def solve(
    prompt_scores: torch.Tensor, targets: torch.Tensor, config: WeightingConfig, fallback: str | None
) -> Solution:
    """The weights of one prompt. ``prompt_scores`` is ``(K, T, V)`` log-probs or raw logits (position i
    predicts ``targets[i]``), ``targets`` ``(T,)``. ``T == 0``: uniform weights (or the fixed ones)."""
    K, T = prompt_scores.shape[0], prompt_scores.shape[1]
    start = time.perf_counter()
    if T == 0:
        if fallback is None:
            fallback = "prompt has fewer than 2 tokens: no perplexity, uniform weights"
        w = weights_lib.uniform(K)
        if not isinstance(config.weighting, str):
            w = weights_lib.check_fixed(config.weighting, K)
        ppl = torch.full((K,), float("nan"), dtype=torch.float64)
        return Solution(w, ppl, float("nan"), time.perf_counter() - start, fallback)
    bad = nonfinite_members(prompt_scores)
    if bad.any():  # NaN perplexities for those members and no fallback: make_report raises, naming them
        ppl = torch.where(bad, float("nan"), 1.0).to(torch.float64)
        return Solution(weights_lib.uniform(K), ppl, float("nan"), time.perf_counter() - start, None)
    s = weights_lib.solve_with_stats(
        config.weighting, prompt_scores, targets, tau=config.tau, grid_step=config.grid_step
    )
    seconds = time.perf_counter() - start
    return Solution(s.weights, s.perplexities, math.exp(s.loss), seconds, fallback, T, s.gradient, s.hessian)


def start_online(
    config: WeightingConfig, solutions: Sequence[Solution], positions: Sequence[int]
) -> OnlineWeights | None:
    """The call's weights that follow the text (``config.reweight_every``), from its prompt solves; None
    when off. ``positions[b]``: where row b's first new token sits (its prompt's length)."""
    if config.reweight_every is None:
        return None
    counts = [s.positions for s in solutions]
    return OnlineWeights.start(
        config.weighting, config.reweight_every, solutions, counts, positions, tau=config.tau
    )


def with_trajectories(
    reports: list[FusionReport], online: OnlineWeights | None, names: Sequence[str]
) -> list[FusionReport]:
    """The reports with each row's weight trajectory so far (unchanged when the weights do not follow the
    text)."""
    if online is None:
        return reports
    return [
        dataclasses.replace(r, trajectory=tuple((p, dict(zip(names, w))) for p, w in online.trajectory[b]))
        for b, r in enumerate(reports)
    ]


def nonfinite_members(prompt_scores: torch.Tensor) -> torch.Tensor:
    """``(K,)`` bool: members whose prompt scores ``(K, T, V)`` hold NaN or +inf, or a position where every
    token is -inf (the scorer raises -inf to the dtype's lowest value, which is checked too). One pass."""
    top = prompt_scores.amax(dim=-1)  # (K, T): NaN or +inf if any score is; -inf / lowest if all are
    return ~(top.isfinite() & (top > torch.finfo(top.dtype).min)).all(dim=-1).cpu()


def make_report(
    solution: Solution,
    names: Sequence[str],
    config: WeightingConfig,
    *,
    prompt_tokens: int,
    truncated: bool = False,
    reference: Reference | None = None,
    approx_tokens: int = 0,
    bits_per_byte: Sequence[float] | None = None,
) -> FusionReport:
    """The report of one prompt, every field at once. NaN perplexities raise, naming the member."""
    ppl = solution.perplexities
    if bool(ppl.isnan().any()) and solution.fallback is None:
        bad = names[int(ppl.isnan().nonzero()[0])]
        raise FloatingPointError(
            f"Member {bad!r} produced non-finite logits on the prompt (NaN, +inf, or -inf for every token); "
            "check its weights and dtype (float16 overflow is a common cause: try torch_dtype='bfloat16' or "
            "'float32')."
        )
    has_ppl = not bool(ppl.isnan().all())
    order = [names[i] for i in torch.argsort(ppl, stable=True).tolist()] if has_ppl else list(names)
    aligned = reference is not None and reference.alignment != "none"
    return FusionReport(
        weights={n: float(v) for n, v in zip(names, solution.weights.tolist())},
        perplexities={n: float(v) for n, v in zip(names, ppl.tolist())},
        fused_perplexity=solution.fused_perplexity,
        order=order,
        weighting=config.name,
        solve_seconds=solution.seconds,
        prompt_tokens=prompt_tokens,
        fallback=solution.fallback,
        truncated=truncated,
        reference=reference.name if aligned else None,
        approx_tokens=approx_tokens if aligned else 0,
        bits_per_byte=None if bits_per_byte is None else dict(zip(names, bits_per_byte)),
    )


# ---------------------------------------------------------------------------------------------- the mix


@dataclass
class Mixer:
    """Eq. 1 for a batch, set up once per call: ``mixer(scores) = sum_k w_k s_k`` row by row, ``(B, V)`` in
    at least float32 on the mix device, from K next-token scores ``(B, V)`` (logits or log-probs: a
    per-row shift of ``s_k`` does not change the fused distribution)."""

    weights: torch.Tensor  # (B, K) on the mix device
    active: list[int]  # members with a nonzero weight in some row: the only ones read (and run)
    clamp: frozenset[int]  # active members with weight 0 in some row: their -inf must not meet 0 (NaN)
    unit: int | None  # the one active member, when it has weight 1 in every row: its scores are the mix

    @classmethod
    def build(
        cls, weights: torch.Tensor, device: torch.device, dtype: torch.dtype, keep_all: bool = False
    ) -> Mixer:
        """``weights`` is ``(B, K)`` on the host. ``keep_all``: every member is read (and run) even at
        weight 0, as weights that follow the text need every member's scores."""
        K = weights.shape[1]
        active = list(range(K)) if keep_all else [k for k in range(K) if bool(weights[:, k].any())]
        clamp = frozenset(k for k in active if not bool(weights[:, k].all()))
        unit = active[0] if len(active) == 1 and bool((weights[:, active[0]] == 1).all()) else None
        return cls(weights.to(device, dtype), active, clamp, unit)

    def __call__(self, scores: Sequence[torch.Tensor | None]) -> torch.Tensor:
        device = self.weights.device
        if self.unit is not None:
            s = scores[self.unit].to(device)
            return s if s.dtype == torch.promote_types(s.dtype, torch.float32) else s.float()
        fused = None
        for k in self.active:
            s = scores[k].to(device)
            if k in self.clamp:
                s = s.clamp_min(torch.finfo(s.dtype).min)
            w = self.weights[:, k : k + 1]
            fused = s * w if fused is None else fused.addcmul_(s, w)
        return fused


# ---------------------------------------------------------------------------------------------- stopping


@dataclass
class Row:
    """Decoding state of one prompt: generated ids, decoded text, where it stopped, what was streamed."""

    ids: list[int] = field(default_factory=list)
    text: str = ""
    done: bool = False
    finish_reason: str = "length"
    budget: int | None = None  # most new tokens the context leaves room for


class StopOnEos:
    """Ends a row on one of the reference's end-of-sequence ids (the id is not kept)."""

    def __init__(self, eos_ids: frozenset[int]):
        self.eos_ids = eos_ids

    def before(self, row: Row, token: int) -> bool:
        return token in self.eos_ids


class StopAtContext:
    """Ends a row when the context is full (``finish_reason`` stays ``"length"``)."""

    def after(self, row: Row) -> str | None:
        return "length" if row.budget is not None and len(row.ids) >= row.budget else None


class StopOnStrings:
    """Cuts a row's text before the first stop sequence and ends it there."""

    def __init__(self, stop: tuple[str, ...]):
        self.stop = stop

    def after(self, row: Row) -> str | None:
        cut = min((i for i in (row.text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut < 0:
            return None
        row.text = row.text[:cut]
        return "stop"


class Stopping:
    """The stopping criteria of one call, applied in order after each chosen token."""

    def __init__(self, reference: Reference, stop: tuple[str, ...], track_text: bool):
        self.reference = reference
        self.eos = StopOnEos(reference.eos_ids)
        self.after: list = [StopAtContext()]
        self.track_text = track_text or bool(stop)
        if stop:
            self.after.append(StopOnStrings(stop))

    def update(self, row: Row, token: int) -> None:
        if self.eos.before(row, token):
            row.done, row.finish_reason = True, "stop"
            return
        row.ids.append(token)
        if self.track_text:
            row.text = self.reference.decode(row.ids)
        for criterion in self.after:
            reason = criterion.after(row)
            if reason is not None:
                row.done, row.finish_reason = True, reason
                if reason == "stop":
                    return


# ---------------------------------------------------------------------------------------------- step sources


class CachedSteps:
    """Scores from the members' KV caches over a left-padded batch (shared vocabulary and MinED).

    Built from the prefill (:meth:`start`): it holds the caches, the attention mask and position ids
    (only when some row is padded), and the last position's scores of the members that carry weight.

    ``lazy`` (weights that follow the text): a member at weight 0 in every row skips its steps, as in
    prompt-only decoding, but the ids it missed are kept; :meth:`catch_up`, called before a re-solve, runs
    it over them in one forward and gives its scores of the missed steps (the re-solve needs every member's
    scores at every position). Its cache is then up to date, so it can take weight again at once. What is
    kept: the missed ids (and positions), at most ``reweight_every`` steps of them."""

    lazy_members = True  # catch_up brings members that skipped steps up to date

    def __init__(self, scorer: Scorer, plan: Plan, prefill, mixer: Mixer, lazy: bool = False):
        self.scorer, self.reference, self.mixer = scorer, plan.reference, mixer
        self.caches = prefill.caches
        self.views = prefill.views
        self.input_ids = prefill.input_ids  # (B, L)
        self.mask = prefill.attention_mask if prefill.padded else None
        self.positions = prefill.attention_mask.sum(-1, keepdim=True) if prefill.padded else None  # (B, 1)
        self.ones = None if self.mask is None else torch.ones_like(self.mask[:, :1])
        K = len(scorer.members)
        # the prefill ran every member: a lazy call keeps every last row (free), else only the active ones
        self.scores = [prefill.last[k] if lazy or k in mixer.active else None for k in range(K)]
        self.lazy = lazy
        # the steps since the last catch-up that skipped members (those not in the mixer: it changes only
        # at a re-solve, right after a catch-up), as (ids, positions)
        self.missed: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def advance(self, next_ids: torch.Tensor, tokens: list[int]) -> list[torch.Tensor | None]:
        ids = next_ids[:, None]  # (B, 1)
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.ones], dim=1)
        active = self.mixer.active
        self.scores = self.scorer.step(
            self.reference, ids, self.mask, self.positions, self.caches, active, self.views
        )
        if self.lazy and len(active) < len(self.scores):
            self.missed.append((ids, self.positions))
        if self.positions is not None:
            self.positions = self.positions + 1
        return self.scores

    def catch_up(self) -> dict[int, list[torch.Tensor]]:
        """Run every member that skipped steps over the ids it missed, one forward each (concurrently across
        devices): ``{k: [scores (B, V) of each missed step, oldest first]}``. Each list holds the scores the
        member would have given at those steps, had it run them (up to the rounding of one forward of ``n``
        tokens against ``n`` forwards of one)."""
        if not self.missed:
            return {}
        late = [k for k in range(len(self.scores)) if k not in self.mixer.active]
        ids = torch.cat([i for i, _ in self.missed], dim=1)  # (B, n)
        pos = None if self.positions is None else torch.cat([p for _, p in self.missed], dim=1)
        read = self.scorer.read(self.reference, ids, self.mask, pos, self.caches, late, self.views)
        self.missed = []
        names = [m.name for m in self.scorer.members]
        out: dict[int, list[torch.Tensor]] = {}
        for k in late:
            if _bad_scores(read[k]):  # (B, n, V)
                raise_bad_scores([read[k].flatten(0, 1)], [names[k]])
            out[k] = list(read[k].unbind(1))
        return out


class PrefixSteps:
    """Scores under ``alignment="prefix"`` for one prompt: the reference (and members sharing its tokenizer)
    decode with their KV caches; every other member follows the growing text with its own tokens
    (``bytealign.MemberTextState``: re-encode a tail window, crop its cache, forward the new tokens) with the
    reference's row as prior. Every row is smoothed before the mix (Eq. 1)."""

    lazy_members = False  # every member runs every step (weights that follow the text: Mixer keep_all)

    def __init__(self, scorer: Scorer, plan: Plan, ids: list[int], mixer: Mixer, readings: list):
        """``readings``: each member's ``bytealign.TextReading`` of the prompt (the prefill's forwards, with
        their caches): decoding continues from them instead of reading the prompt again."""
        from langchain_packllm import bytealign

        self._bytealign = bytealign
        ref = plan.reference
        self.scorer, self.reference, self.mixer = scorer, ref, mixer
        members = scorer.members
        self.direct = [k for k in range(len(members)) if k == ref.index or ref.aligners[k].identity]
        self.states = {
            k: bytealign.MemberTextState(m.model, m.tokenizer, ref.aligners[k])
            for k, m in enumerate(members)
            if k not in self.direct
        }
        dev = scorer.mix_device
        self.input_ids = torch.tensor([ids], device=dev)  # (1, L)
        self.mask = torch.ones_like(self.input_ids)
        if any(readings[k].enc.ids != list(ids) for k in self.direct):
            raise ValueError("PrefixSteps: the readings are not of the reference ids")
        self.caches = {k: readings[k].cache for k in self.direct}
        rows = {k: readings[k].logprobs[-1:, : ref.vocab_size].to(dev) for k in self.direct}
        with torch.inference_mode():
            prior = rows[ref.index]
            prompt = plan.prompts[0]
            rows.update({k: st.resume(prompt, readings[k], prior).to(dev) for k, st in self.states.items()})
        self.rows = rows
        self.positions = torch.full_like(self.input_ids[:, :1], self.input_ids.shape[1])  # (1, 1): the next
        self.surfaces = ref.aligners[ref.index].reference.surfaces
        self.scores = self._smoothed()

    def _smoothed(self) -> list[torch.Tensor]:
        return [self._bytealign.smooth_logprobs(self.rows[k]) for k in range(len(self.scorer.members))]

    def advance(self, next_ids: torch.Tensor, tokens: list[int]) -> list[torch.Tensor]:
        dev, ref = self.scorer.mix_device, self.reference
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        for k in self.direct:
            logits = self.scorer.logits(ref, k, next_ids[:, None], self.mask, self.positions, self.caches[k])
            self.rows[k] = last_logprobs(logits).to(dev)
        self.positions = self.positions + 1
        piece = self.surfaces[tokens[0]] or b""  # a special token adds no text
        with torch.inference_mode():
            for k, st in self.states.items():
                self.rows[k] = st.append(piece, prior=self.rows[ref.index]).to(dev)
        self.scores = self._smoothed()
        return self.scores


# ---------------------------------------------------------------------------------------------- the loop


def decode_loop(
    source,
    plan: Plan,
    rows: list[Row],
    sampling: SamplingConfig,
    track_text: bool = True,
    online: OnlineWeights | None = None,
) -> Iterator[list[Row]]:
    """The one decode loop: yields the rows after every step until all are done or the budget is spent.

    ``source`` is a step source (its ``scores`` are the first step's, ``advance(next_ids, tokens)`` gives
    the next). ``track_text=False`` (with no stop sequences) leaves ``row.text`` empty: the caller decodes
    once. Every step costs the active members' cached forwards, the mix, and one host transfer (the chosen
    ids and the NaN flags together); the prompt ids are extended only for logits processors that read them.
    ``online``: weights that follow the text; each step's scores and chosen tokens are added to it, and
    every ``online.every`` tokens a row's weights are re-solved and the mix rebuilt. A source with
    ``lazy_members`` (:class:`CachedSteps`) lets members at weight 0 skip their steps and catches them up
    before each re-solve; any other source's mixer reads every member (``Mixer.build(..., keep_all=True)``).
    """
    ref = plan.reference
    stopping = Stopping(ref, sampling.stop, track_text)
    processors = sampling.processors(plan)
    generator = None
    if sampling.temperature > 0 and sampling.seed is not None:
        generator = torch.Generator(device=source.input_ids.device).manual_seed(int(sampling.seed))
    sequences = source.input_ids  # (B, L + t), kept up to date only when processors read it
    scores = source.scores
    names = [m.name for m in source.scorer.members]
    for step in range(sampling.max_new_tokens):
        next_ids, tokens = choose(
            processors, sequences, source.mixer, scores, sampling, generator, ref, names
        )
        live = [b for b, row in enumerate(rows) if not row.done]
        for b in live:
            stopping.update(rows[b], tokens[b])
        yield rows  # no grad-mode context or lock spans this: a stream may resume on another thread
        if all(r.done for r in rows) or step == sampling.max_new_tokens - 1:
            return
        if online is not None:
            _follow(online, source, scores, next_ids, [b for b in live if not rows[b].done])
        if processors:
            sequences = torch.cat([sequences, next_ids[:, None]], dim=1)
        scores = source.advance(next_ids, tokens)


def _follow(online: OnlineWeights, source, scores, next_ids: torch.Tensor, rows: list[int]) -> None:
    """Add one step to the weights that follow the text; re-solve the rows that are due and rebuild the
    source's mix with their new weights."""
    if not rows:
        return
    online.push(scores, next_ids, rows)  # observed in one pass per re-solve (bounded by every steps)
    due = [b for b in rows if online.due(b)]
    if due:
        lazy = source.lazy_members
        if lazy:  # members that skipped steps at weight 0: their scores of those steps, in one forward
            for k, missed in source.catch_up().items():
                online.fill(k, missed)
        online.resolve(due)
        mixer = source.mixer
        source.mixer = Mixer.build(
            online.weights, mixer.weights.device, mixer.weights.dtype, keep_all=not lazy
        )


@torch.inference_mode()
def choose(
    processors, sequences, mixer: Mixer, scores, sampling: SamplingConfig, generator, ref: Reference, names
) -> tuple[torch.Tensor, list[int]]:
    """Mix (Eq. 1), apply the logits processors, then argmax or sample: the next token of every row,
    ``(B,)`` on the mix device and as a list. The ids come back to the host in one transfer together with
    each row's top score, which is NaN or +inf exactly when a member's scores held NaN or +inf, and -inf
    when every token of the row is ruled out (then this raises, naming the member or the cause).

    Logits processors see the fused log-probs ``log_softmax(sum_k w_k s_k)``; greedy decoding without
    processors takes the argmax of ``sum_k w_k s_k`` directly (the same token: the log-softmax only shifts
    each row).
    """
    fused = mixer(scores)  # (B, V)
    if processors:
        fused = processors(sequences, torch.log_softmax(fused, dim=-1))
    if sampling.temperature > 0:
        top = fused.amax(-1)  # NaN if any score is NaN, +inf if any is +inf
        probs = torch.softmax(fused, dim=-1).nan_to_num_(1.0)  # flagged rows stay samplable
        next_ids = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    else:
        top, next_ids = fused.max(dim=-1)  # NaN counts as the maximum
    B = next_ids.shape[0]
    exact = fused.dtype if ref.vocab_size < 2**24 else torch.float64  # ids as floats, exactly
    values = torch.cat([next_ids.to(exact), top.to(exact)]).tolist()
    if any(math.isnan(v) or math.isinf(v) for v in values[B:]):
        raise_bad_scores(
            scores, names, all_minus_inf=all(v == -math.inf for v in values[B:] if math.isinf(v))
        )
    return next_ids, [int(v) for v in values[:B]]


def raise_bad_scores(
    scores: Sequence[torch.Tensor | None], names: Sequence[str], all_minus_inf: bool = False
):
    """Raise a clear error for scores that cannot be decoded from: NaN or +inf in a member's scores, or a
    row where every token is ruled out."""
    for name, s in zip(names, scores):
        if s is not None and _bad_scores(s):
            raise FloatingPointError(
                f"Member {name!r} produced non-finite logits while decoding (NaN, +inf, or -inf for every "
                "token); check its weights and dtype (float16 overflow is a common cause: try "
                "torch_dtype='bfloat16' or 'float32')."
            )
    if all_minus_inf:
        raise FloatingPointError(
            "Every token is ruled out at this step (the logits processors masked the whole vocabulary); "
            "check the grammar or the processors passed in SamplingConfig."
        )
    raise FloatingPointError("The fused scores are NaN; check the members' weights and dtypes.")


def _bad_scores(s: torch.Tensor) -> bool:
    """Whether scores ``(..., V)`` hold NaN or +inf, or a row where every token is -inf."""
    return bool((s.isnan() | s.isposinf()).any() | s.isneginf().all(dim=-1).any())
