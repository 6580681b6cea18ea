"""The fusion engine: members score the prompt, weights are solved, decoding samples from the mix.

``FusionEngine`` knows nothing of LangChain. It serves the LangChain adapters, the evaluation harness, the
benchmarks and the CLI. It is a thin facade over one module per concern:

- :mod:`~langchain_packllm.reference`: whose tokenizer a call reads (the reference member, chosen per
  prompt in packs of mixed vocabularies), its token maps, and the :class:`~langchain_packllm.reference.Plan`
  of a call;
- :mod:`~langchain_packllm.scoring`: the members' forwards (prefill into one score buffer, cached steps),
  devices and buffers;
- :mod:`~langchain_packllm.weights`: the weight solvers;
- :mod:`~langchain_packllm.decoding`: the one decode loop over a step source, stopping criteria, the report.

Per call:

1. Plan: the reference member of each prompt, its ids (fitted to the context), grouped by reference.
2. Prefill: one forward per member over the (left-padded) batch of a group. Its logits give every member's
   prompt log-probabilities, hence the weights, and the first new token; its KV cache continues decoding.
3. Weights: one solve per prompt; the report is built once.
4. Decode: each step is one cached single-token forward per member, then the mix
   ``sum_k w_k log_softmax(s_k)`` (Eq. 1), transformers' logits processors, and argmax or sampling.

Concurrency: the engine keeps no per-call state, and no lock is held across a yield. Calls (and streams)
run concurrently and interleave forward by forward; each member runs one forward at a time, so concurrent
calls queue at the members. Outputs equal those of the calls run alone.

Example::

    >>> engine = FusionEngine([load_member("./experts/code"), load_member("./experts/docs")])
    >>> out = engine.generate(["def main("], sampling=SamplingConfig(max_new_tokens=16))[0]
    >>> out.text, out.report.weights
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import warnings
import weakref
from collections.abc import Iterator, Sequence

import torch

from langchain_packllm.config import (
    FusionOutput,
    FusionReport,
    LoglikelihoodResult,
    SamplingConfig,
    StreamChunk,
    WeightingConfig,
)
from langchain_packllm.decoding import (
    CachedSteps,
    Mixer,
    PrefixSteps,
    Row,
    decode_loop,
    make_report,
    solve,
    start_online,
    with_trajectories,
)
from langchain_packllm.members import Member
from langchain_packllm.reference import (
    Plan,
    Reference,
    ReferencePolicy,
    bits_per_byte,
    common_rows,
    decode_ids,
    encode_prompt,
    prompt_tokens,
)
from langchain_packllm.scoring import KEEP_BUFFER_BYTES, PrefillScores, Scorer

__all__ = [
    "KEEP_BUFFER_BYTES",
    "FusionEngine",
    "FusionOutput",
    "FusionReport",
    "LoglikelihoodResult",
    "SamplingConfig",
    "StreamChunk",
    "WeightingConfig",
]

logger = logging.getLogger(__name__)

_OPEN: weakref.WeakSet = weakref.WeakSet()  # engines whose worker threads end at interpreter exit


@atexit.register
def _close_all() -> None:
    for engine in list(_OPEN):
        engine.close()


class FusionEngine:
    """Fuses a pack of causal LMs; the weights are solved per prompt.

    Args:
        members: the pack, in the order reports list them.
        mix_device: where the mix, the weight solve and sampling run (default: the first member's device).
        alignment: how members with different vocabularies are fused. ``"auto"``: not at all when they share
            one, else ``"mined"``. ``"mined"``: the paper's section 3.4: per prompt the reference tokenizer is
            that of the member with the lowest bits per byte on the prompt (each member scoring its own
            tokenization); the others read the reference tokens through minimum-edit-distance token maps and
            their logits are mapped back onto the reference vocabulary. ``"own-prompt"`` (opt-in): as
            ``"mined"``, except that every member reads the prompt with its own tokens (the reference
            choice's forwards, reused: one forward per member over the prompt), the weights are solved on
            the prompt positions where every member has read up to the same byte, and only new tokens reach
            the other members through the maps; prompts are decoded one at a time. ``"none"``: refuse
            different vocabularies. ``"prefix"`` (opt-in): every member reads its own tokens and its distributions
            are moved onto the reference vocabulary by string prefix (``langchain_packllm.bytealign``);
            prompts are decoded one at a time and ``loglikelihood`` is not available.

    Thread safety: calls may run concurrently (see the module docstring). ``close()`` (or ``with
    FusionEngine(...) as engine:``) ends the per-device worker threads; they also end at interpreter exit.
    """

    def __init__(
        self,
        members: Sequence[Member],
        mix_device: str | torch.device | None = None,
        alignment: str = "auto",
    ):
        members = list(members)
        if not members:
            raise ValueError("A pack needs at least one member; got an empty list.")
        names = [m.name for m in members]
        if len(set(names)) != len(names):
            raise ValueError(
                f"Member names must be unique; got {names}. Pass names=[...] to tell them apart."
            )
        self.members = members
        self.mix_device = torch.device(mix_device) if mix_device is not None else members[0].device
        for m in members:
            _check_model_fits_tokenizer(m)
        self.references = ReferencePolicy(members, alignment, self.mix_device)
        self.alignment = self.references.alignment
        self.scorer = Scorer(members, self.mix_device)
        """The members' forwards (public seam for the evaluation and the benchmarks)."""
        lengths = [m.max_length for m in members if m.max_length is not None]
        self._max_length = min(lengths) if lengths else None
        _OPEN.add(self)

    # ------------------------------------------------------------------ set-up

    def close(self) -> None:
        """End the per-device worker threads (later calls run the members in turn) and free buffers."""
        self.scorer.close()
        self.scorer.empty_cache()
        _OPEN.discard(self)

    def __enter__(self) -> FusionEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def empty_cache(self) -> None:
        """Free the prompt-score buffer kept between calls on the CPU (at most ``KEEP_BUFFER_BYTES``; it
        spares the next call the page faults of a fresh buffer), as ``torch.cuda.empty_cache`` frees
        CUDA's cached blocks."""
        self.scorer.empty_cache()

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    @property
    def tokenizer(self):
        """The first member's tokenizer: the pack's tokenizer when members share a vocabulary. In a pack of
        mixed vocabularies each prompt is read with its own reference's (see :meth:`plan`)."""
        return self.members[0].tokenizer

    @property
    def vocab_size(self) -> int:
        """Width of the fused scores with member 0 as reference (the shared vocabulary's, when shared)."""
        if self.alignment == "none":
            return min(m.vocab_size for m in self.members)
        return len(self.members[0].tokenizer)

    @property
    def max_length(self) -> int | None:
        """The shortest member context."""
        return self._max_length

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` under member 0's reading (the pack's tokenizer when shared)."""
        return encode_prompt(self.tokenizer, text)

    def decode(self, ids: Sequence[int]) -> str:
        return decode_ids(self.tokenizer, ids)

    # ------------------------------------------------------------------ plans (public seams)

    def reference(self, index: int = 0) -> Reference:
        """The pack read through member ``index``'s tokenizer (member 0 when the vocabulary is shared)."""
        return self.references.reference(index)

    def choose_reference(self, text: str) -> tuple[Reference, tuple[float, ...] | None]:
        """The reference a prompt would be read with, and each member's bits per byte on it (mixed packs)."""
        return self.references.choose(text)

    def bits_per_byte(self, text: str) -> list[float]:
        """Each member's bits per byte on ``text``, scoring its own tokenization."""
        return bits_per_byte(self.members, text)

    def plan(
        self, prompts: Sequence[str], reserve: int = 0, reference: Reference | None = None
    ) -> list[tuple[list[int], Plan]]:
        """The plans of a call: ``[(indices into prompts, plan)]``, one per reference member (a single plan
        when the vocabulary is shared or ``reference`` is given). ``reserve`` new tokens are kept free in
        the context when a prompt is truncated."""
        if isinstance(prompts, str):
            raise TypeError("plan() takes a list of prompts; wrap a single prompt in a list.")
        return self.references.plan(prompts, reserve, self.max_length, reference, read=self._read_own)

    def _read_own(self, k: int, ids: list[int]):
        """The reference choice's forward of member k on its own ids, kept for the prefill (see
        :meth:`~langchain_packllm.reference.ReferencePolicy.plan`)."""
        return self.scorer.prefill_member(self.references.own(k), k, ids)

    def prepare_alignment(self, progress: bool = True) -> None:
        """Build (or load from the disk cache) every token map now rather than on first use: with MinED,
        one map per ordered pair of members (about a minute cold for three real vocabularies on 2 cores,
        milliseconds from the cache); nothing when every member shares one vocabulary."""
        self.references.prepare(progress=progress)

    def score(
        self, batch: Sequence[Sequence[int]], reference: Reference | None = None, *, use_cache: bool = False
    ) -> PrefillScores:
        """Every member's raw logits over ``reference``'s vocabulary on a batch of reference ids (one
        forward each, into one buffer; see :class:`~langchain_packllm.scoring.PrefillScores`). Give the
        buffer back with ``engine.scorer.recycle(result.scores)`` when done with it."""
        return self.scorer.prefill(reference or self.reference(0), batch, use_cache=use_cache)

    def member_logprobs(
        self, batch: list[list[int]], *, reference: Reference | None = None, use_cache: bool = False
    ):
        """Prefill every member on a batch of reference ids.

        Returns ``(logprobs, input_ids, attention_mask, caches)`` where ``logprobs`` is a list of K tensors
        ``(B, L, V)`` (float32, mix device), positions left-padded to ``L``.
        """
        pre = self.score(batch, reference, use_cache=use_cache)
        logprobs = [torch.log_softmax(s, dim=-1) for s in pre.scores]
        self.scorer.recycle(pre.scores)
        return logprobs, pre.input_ids, pre.attention_mask, pre.caches

    # ------------------------------------------------------------------ prefill and weights

    def _prefill(self, plan: Plan, config: WeightingConfig, use_cache: bool):
        """Weights and reports of a plan's prompts, and the step source that continues them."""
        ref = plan.reference
        if ref.alignment == "prefix":
            return self._prefix_prefill(plan, config)
        if ref.own_prompt:
            return self._own_prefill(plan, config, use_cache)
        pre = self.scorer.prefill(ref, plan.ids, use_cache=use_cache, given=plan.given_scores())
        L = pre.input_ids.shape[1]
        solutions, reports = [], []
        for b, ids in enumerate(plan.ids):
            first = L - len(ids)
            # the span every member predicts: not the first text token when some member reads no BOS
            start = first + 1 if ref.hides_start(ids) else first
            prompt_scores = pre.scores[:, b, start : L - 1]  # (K, n-1, V), a view
            targets = pre.input_ids[b, start + 1 :]  # (n-1,)
            solution = solve(prompt_scores, targets, config, plan.fallbacks[b])
            reports.append(
                make_report(
                    solution,
                    self.names,
                    config,
                    prompt_tokens=len(ids),
                    truncated=plan.truncated[b],
                    reference=ref,
                    approx_tokens=ref.approx_count(pre.input_ids[b, first:]),
                    bits_per_byte=plan.bits_per_byte[b],
                )  # fmt: skip
            )
            solutions.append(solution)
        self.scorer.recycle(pre.scores)  # decoding needs only the caches and the last logits
        pre.scores = None
        weights = torch.stack([s.weights for s in solutions])
        mixer = Mixer.build(weights, self.mix_device, pre.last.dtype)
        lazy = _follows(config)  # members at weight 0 skip steps and catch up before each re-solve
        return reports, solutions, (lambda: CachedSteps(self.scorer, plan, pre, mixer, lazy=lazy)), None

    def _own_read(self, plan: Plan, config: WeightingConfig, use_cache: bool):
        """Weights for one prompt under ``alignment="own-prompt"``: every member reads the prompt with its
        own tokens (the reference choice's forward, when the plan kept it), the weights are solved on the
        positions where every member has read up to the same byte (each member's row there read on the
        reference vocabulary through its MinED map), and decoding continues from each member's own cache,
        new tokens reaching the other members through their maps."""
        if len(plan) != 1:
            raise ValueError("alignment='own-prompt' decodes one prompt at a time.")
        ref, prompt, fallback = plan.reference, plan.prompts[0], plan.fallbacks[0]
        truncated = False
        if prompt:
            prompt, truncated = self._fit_text(prompt, plan.reserve)
        tokens = [
            prompt_tokens(m.tokenizer, prompt, self.references.own(k).start_token)
            for k, m in enumerate(self.members)
        ]
        ids = list(tokens[ref.index].ids)
        held = plan.given_own([t.ids for t in tokens])  # the choice's forwards of these very ids
        ran = self.scorer.run_members(
            lambda k: self.scorer.prefill_member(
                self.references.own(k), k, tokens[k].ids, use_cache=use_cache
            ),
            [k for k in range(len(self.members)) if held[k] is None],
        )
        forwards = [h if h is not None else r for h, r in zip(held, ran, strict=True)]
        positions, rows = common_rows(tokens, ref.index)
        if not positions and fallback is None and len(ids) > 1:
            fallback = "no prompt position where every member's tokens end at the same byte: uniform weights"
        pre = self.scorer.prefill_own(ref, ids, forwards, rows)
        del forwards, held, ran
        targets = pre.input_ids[0, [p + 1 for p in positions]]  # (T,)
        solution = solve(pre.scores[:, 0], targets, config, fallback)
        report = make_report(
            solution, self.names, config, prompt_tokens=len(ids), truncated=truncated, reference=ref,
            approx_tokens=ref.approx_count(targets), bits_per_byte=plan.bits_per_byte[0],
        )  # fmt: skip
        self.scorer.recycle(pre.scores)
        pre.scores = None
        plan = dataclasses.replace(plan, prompts=(prompt,), ids=(tuple(ids),), truncated=(truncated,))
        lengths = [(m.max_length, len(t.ids)) for m, t in zip(self.members, tokens, strict=True)]
        budget = min((limit - n for limit, n in lengths if limit is not None), default=None)
        return report, solution, pre, plan, budget

    def _own_prefill(self, plan: Plan, config: WeightingConfig, use_cache: bool):
        """:meth:`_prefill` under ``alignment="own-prompt"`` (see :meth:`_own_read`)."""
        report, solution, pre, plan, budget = self._own_read(plan, config, use_cache)
        mixer = Mixer.build(solution.weights[None], self.mix_device, pre.last.dtype)
        lazy = _follows(config)
        start = lambda: CachedSteps(self.scorer, plan, pre, mixer, lazy=lazy)  # noqa: E731
        return [report], [solution], start, [budget]

    def _prefix_prefill(self, plan: Plan, config: WeightingConfig):
        """Weights for one prompt under ``alignment="prefix"``: every member reads its own tokens and its
        distributions are moved onto the reference vocabulary by string prefix (see ``bytealign``)."""
        from langchain_packllm import bytealign

        if len(plan) != 1:
            raise ValueError("alignment='prefix' decodes one prompt at a time.")
        ref, prompt = plan.reference, plan.prompts[0]
        if not prompt:
            raise ValueError("alignment='prefix' needs a non-empty prompt.")
        prompt, truncated = self._fit_text(prompt, plan.reserve)
        aligners = dict(enumerate(ref.aligners))
        # one forward per member over its own tokens, with its cache: the choice's when it read this text
        readings = plan.given_texts(prompt) or bytealign.read_members(
            self.members, prompt, [aligners[k].member for k in range(len(self.members))]
        )
        lp, r_enc = bytealign.reference_logprobs(self.members, ref.index, prompt, aligners, readings=readings)
        lp = bytealign.smooth_logprobs(lp).to(self.mix_device)
        targets = torch.tensor(r_enc.ids[r_enc.n_special :], device=self.mix_device)  # (T,)
        solution = solve(lp, targets, config, None)
        report = make_report(
            solution, self.names, config, prompt_tokens=len(r_enc.ids), truncated=truncated, reference=ref,
            bits_per_byte=plan.bits_per_byte[0],
        )  # fmt: skip
        mixer = Mixer.build(solution.weights[None], self.mix_device, lp.dtype, keep_all=_follows(config))
        if truncated:
            plan = dataclasses.replace(plan, prompts=(prompt,))
        start = lambda: PrefixSteps(self.scorer, plan, r_enc.ids, mixer, readings)  # noqa: E731
        return [report], [solution], start, None

    def _fit_text(self, text: str, reserve: int) -> tuple[str, bool]:
        """Under ``alignment="prefix"`` every member reads the text with its own tokens: keep the tail of the
        text that every member's tokenization fits in its context with ``reserve`` new tokens (at least
        half of each context stays for the prompt), as the shared-vocabulary path keeps the tail of the ids."""
        start, rounds = 0, 0
        while rounds < 8:
            cut = 0
            for m in self.members:
                if m.max_length is None:
                    continue
                room = m.max_length - min(reserve, m.max_length // 2) - 1  # one for a start token
                enc = m.tokenizer(text[start:], add_special_tokens=True, return_offsets_mapping=True)
                n = len(enc["input_ids"])
                if n > room:
                    cut = max(cut, enc["offset_mapping"][n - room][0], 1)
            if not cut:
                break
            start, rounds = start + cut, rounds + 1
        if start:
            warnings.warn(
                f"Prompt of {len(text)} characters does not fit every member's context with "
                f"max_new_tokens={reserve}; keeping its last {len(text) - start} characters.",
                stacklevel=6,
            )
        return text[start:], start > 0

    # ------------------------------------------------------------------ decoding

    def decode_steps(
        self,
        plan: Plan,
        weighting: WeightingConfig | None = None,
        sampling: SamplingConfig | None = None,
        *,
        track_text: bool = True,
    ) -> Iterator[tuple[list[Row], list[FusionReport]]]:
        """The decode-step iterator of one plan (public seam for streaming and the benchmarks): yields the
        rows (``ids``, ``text``, ``done``, ``finish_reason``) and the reports after the prefill when
        ``max_new_tokens == 0``, else after every step. ``track_text=False`` (with no stop sequences) leaves
        ``row.text`` empty: decode the ids once at the end."""
        weighting, sampling = weighting or WeightingConfig(), sampling or SamplingConfig()
        reports, solutions, start, budgets = self._prefill(
            plan, weighting, use_cache=sampling.max_new_tokens > 0
        )
        if budgets is None:  # every member's context holds the prompt's reference ids (one per member token)
            limit = self._context_limit(plan.reference)
            budgets = [None if limit is None else limit - r.prompt_tokens for r in reports]
        rows = [Row(budget=b) for b in budgets]
        online = start_online(weighting, solutions, [r.prompt_tokens for r in reports])
        if sampling.max_new_tokens == 0:
            yield rows, with_trajectories(reports, online, self.names)
            return
        resolved = -1
        for stepped in decode_loop(start(), plan, rows, sampling, track_text, online):
            if online is not None and online.solves != resolved:  # rebuilt only when the weights moved
                resolved, reports = online.solves, with_trajectories(reports, online, self.names)
            yield stepped, reports

    def _context_limit(self, ref: Reference) -> int | None:
        if ref.alignment == "prefix":
            return self.members[ref.index].max_length
        return self.max_length

    def generate(
        self,
        prompts: Sequence[str],
        weighting: WeightingConfig | None = None,
        sampling: SamplingConfig | None = None,
        *,
        reference: Reference | None = None,
    ) -> list[FusionOutput]:
        """Decode a batch of prompts together (one batch per reference member), each with its own weights.
        ``reference`` reads every prompt with that member's tokenizer instead of choosing per prompt."""
        if isinstance(prompts, str):
            raise TypeError("generate() takes a list of prompts; wrap a single prompt in a list.")
        prompts = list(prompts)
        if not prompts:
            return []
        weighting, sampling = weighting or WeightingConfig(), sampling or SamplingConfig()
        if self.alignment in ("own-prompt", "prefix"):
            # decoded one by one anyway: each prompt planned alone keeps its choice's forwards (a plan of
            # several prompts keeps none), so every member reads each prompt once
            done = []
            for p in prompts:  # a loop, not a comprehension: warnings' stack levels point at the caller
                ((_, plan),) = self.plan([p], sampling.max_new_tokens, reference)
                done.extend(self._one(plan, weighting, sampling))
            return done
        outputs: list[FusionOutput | None] = [None] * len(prompts)
        for indices, plan in self.plan(prompts, sampling.max_new_tokens, reference):
            for i, out in zip(indices, self._one(plan, weighting, sampling)):
                outputs[i] = out
        return outputs

    def _one(self, plan: Plan, weighting: WeightingConfig, sampling: SamplingConfig) -> list[FusionOutput]:
        """Run a plan to its last step; text is decoded once at the end unless stop sequences need it."""
        *_, (rows, reports) = self.decode_steps(plan, weighting, sampling, track_text=False)
        ref = plan.reference
        return [
            FusionOutput(r.text if sampling.stop else ref.decode(r.ids), list(r.ids), r.finish_reason, rep)
            for r, rep in zip(rows, reports)
        ]

    def stream(
        self,
        prompt: str,
        weighting: WeightingConfig | None = None,
        sampling: SamplingConfig | None = None,
        *,
        reference: Reference | None = None,
    ) -> Iterator[StreamChunk]:
        """Stream one prompt's text. Chunks never split a UTF-8 character nor show part of a stop sequence;
        they concatenate to ``generate([prompt])[0].text``. The last chunk carries the full output.

        Nothing is held between chunks but the call's own state: a stream left unfinished blocks nothing."""
        if not isinstance(prompt, str):
            raise TypeError(f"stream() takes one prompt string; got {type(prompt).__name__}.")
        weighting, sampling = weighting or WeightingConfig(), sampling or SamplingConfig()
        ((_, plan),) = self.plan([prompt], sampling.max_new_tokens, reference)
        emitted = 0
        for rows, reports in self.decode_steps(plan, weighting, sampling):  # noqa: B007
            row = rows[0]
            if row.done:
                break
            safe = min(
                _safe_prefix_length(row.text, sampling.stop), plan.reference.stable_text_length(row.ids)
            )
            if safe > emitted:
                yield StreamChunk(row.text[emitted:safe])
                emitted = safe
        output = FusionOutput(row.text, list(row.ids), row.finish_reason, reports[0])
        yield StreamChunk(row.text[emitted:], output=output)

    # ------------------------------------------------------------------ scoring

    def report(
        self, prompt: str, weighting: WeightingConfig | None = None, *, reference: Reference | None = None
    ) -> FusionReport:
        """The weights and perplexities the pack would use for ``prompt`` (prefill only, no decoding)."""
        weighting = weighting or WeightingConfig()
        ((_, plan),) = self.plan([prompt], 0, reference)
        reports, solutions, _, _ = self._prefill(plan, weighting, use_cache=False)
        online = start_online(weighting, solutions, [r.prompt_tokens for r in reports])
        return with_trajectories(reports, online, self.names)[0]

    def loglikelihood(
        self, requests: Sequence[tuple[str, str]], weighting: WeightingConfig | None = None
    ) -> list[LoglikelihoodResult]:
        """Log-likelihood of each ``continuation`` given its ``context`` under the fused model, with the
        weights solved on the context alone (lm-evaluation-harness ``loglikelihood`` semantics)."""
        if self.alignment == "prefix":
            raise RuntimeError(
                "loglikelihood needs every member to read the reference tokens: build the engine with "
                "alignment='mined' (alignment='prefix' decodes only)."
            )
        weighting = weighting or WeightingConfig()
        results = []
        for context, continuation in requests:
            if not isinstance(context, str) or not isinstance(continuation, str):
                raise TypeError("loglikelihood takes (context, continuation) pairs of strings.")
            ref, bpb = self.choose_reference(context)
            results.append(self._loglikelihood_one(ref, context, continuation, weighting, bpb))
        return results

    def _loglikelihood_one(
        self, ref: Reference, context: str, continuation: str, weighting: WeightingConfig, bpb
    ) -> LoglikelihoodResult:
        ctx_ids = ref.encode(context) or [ref.start_token()]
        n_ctx = len(ctx_ids)
        whole = ref.encode(context + continuation) if context else []
        if whole[:n_ctx] != ctx_ids:  # empty context, or tokenisation merged across the boundary
            whole = ctx_ids + list(ref.tokenizer(continuation, add_special_tokens=False)["input_ids"])
        if len(whole) == n_ctx:
            raise ValueError(f"Continuation {continuation!r} encodes to no tokens; it has no likelihood.")
        limit = self.max_length
        if limit is not None and len(whole) > limit:
            raise ValueError(
                f"Context plus continuation is {len(whole)} tokens, longer than the members' context "
                f"({limit}); shorten the context."
            )
        if ref.own_prompt:
            return self._loglikelihood_own(ref, context, whole[n_ctx:], weighting, bpb)
        pre = self.scorer.prefill(ref, [whole], use_cache=False)
        lp = pre.scores[:, 0]  # (K, L, V) raw logits: the fused log-softmax below normalises
        ids = pre.input_ids[0]
        fallback = None if context else "empty context: uniform weights"
        start = 1 if ref.hides_start(whole) else 0  # the span every member predicts (see _prefill)
        solution = solve(lp[:, start : n_ctx - 1], ids[start + 1 : n_ctx], weighting, fallback)
        report = make_report(
            solution, self.names, weighting, prompt_tokens=n_ctx, reference=ref,
            approx_tokens=ref.approx_count(ids[:n_ctx]), bits_per_byte=bpb,
        )  # fmt: skip
        result = self._score_continuation(lp[:, n_ctx - 1 : -1], ids[n_ctx:], solution, report, weighting)
        self.scorer.recycle(pre.scores)
        return result

    def _score_continuation(
        self,
        rows: torch.Tensor,
        cont: torch.Tensor,
        solution,
        report: FusionReport,
        weighting: WeightingConfig,
    ) -> LoglikelihoodResult:
        """The fused log-likelihood of ``cont`` ``(C,)`` from every member's raw scores ``rows`` ``(K, C, V)``
        (row t predicts ``cont[t]``), with the context's weights, or, with ``reweight_every``, each block of
        tokens with the weights solved on the text before it."""
        online = start_online(weighting, [solution], [report.prompt_tokens])
        if online is None:
            fused = torch.einsum("k,ktv->tv", solution.weights.to(rows), rows)  # (C, V)
            fused = torch.log_softmax(fused.double(), dim=-1)
        else:
            fused = online.fused_logprobs(rows, cont)
            report = with_trajectories([report], online, self.names)[0]
        logprob = float(fused.gather(-1, cont.view(-1, 1)).sum())
        return LoglikelihoodResult(logprob, bool((fused.argmax(-1) == cont).all()), report)

    def _loglikelihood_own(
        self, ref: Reference, context: str, cont: list[int], weighting: WeightingConfig, bpb
    ) -> LoglikelihoodResult:
        """:meth:`loglikelihood` under ``alignment="own-prompt"``: every member reads the context with its
        own tokens and the continuation's reference ids through its map, as if it had generated them."""
        plan = Plan(ref, (context,), ((),), (False,), (None if context else "empty context: uniform weights",),
                    (bpb,))  # fmt: skip
        report, solution, pre, _, budget = self._own_read(plan, weighting, use_cache=True)
        if budget is not None and len(cont) > budget:
            raise ValueError(
                f"The continuation is {len(cont)} tokens and the members' contexts hold {budget} more after "
                "the context; shorten the context."
            )
        ids = torch.tensor([cont], device=self.mix_device)  # (1, C)
        K = len(self.members)
        lp = pre.last  # (K, 1, V): the context's last rows predict cont[0]
        if len(cont) > 1:
            read = self.scorer.read(ref, ids[:, :-1], None, None, pre.caches, range(K))
            lp = torch.cat([lp, torch.stack([read[k][0].to(lp) for k in range(K)])], dim=1)
        return self._score_continuation(lp, ids[0], solution, report, weighting)  # lp: (K, C, V)


def _follows(config: WeightingConfig) -> bool:
    """Whether a call's weights follow the text (then every member's scores are read at every position:
    under ``alignment="prefix"`` every member runs every step; otherwise members at weight 0 skip steps and
    catch up in one forward before each re-solve)."""
    return config.reweight_every is not None


def _check_model_fits_tokenizer(m: Member) -> None:
    top = max(m.tokenizer.get_vocab().values(), default=-1)
    if m.vocab_size <= top:
        raise ValueError(
            f"Member {m.name!r} has {m.vocab_size} output logits but its tokenizer has token id {top}; "
            "the model and tokenizer do not match."
        )


def _safe_prefix_length(text: str, stop: tuple[str, ...]) -> int:
    """How much of ``text`` can be shown now: not a trailing partial UTF-8 character (decoded as U+FFFD),
    and not a suffix that could be the start of a stop sequence."""
    end = len(text)
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for s in stop:
        for n in range(min(len(s) - 1, end), 0, -1):
            if text[end - n : end] == s[:n]:
                hold = max(hold, n)
                break
    return end - hold
