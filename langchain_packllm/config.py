"""What a call asks for (:class:`WeightingConfig`, :class:`SamplingConfig`) and what it returns
(:class:`FusionReport`, :class:`FusionOutput`, :class:`StreamChunk`, :class:`LoglikelihoodResult`).

Configs are frozen and checked when built: a bad value raises ``ValueError`` (or ``TypeError`` for a wrong
type) naming the setting, whoever builds them (the LangChain adapters, the evaluation, a user). Results are
frozen too: a report is built once, with every field, and dicts are derived from it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from langchain_packllm import weights as weights_lib
from langchain_packllm.online import check_online

if TYPE_CHECKING:
    from langchain_packllm.reference import Plan


def _number(name: str, value: Any, *, integer: bool = False, optional: bool = False) -> Any:
    """``value`` as a finite int/float, or a clear error naming the setting (bools are not numbers)."""
    if value is None and optional:
        return None
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        want = "an integer" if integer else "a number"
        raise TypeError(f"{name} must be {want}{' or None' if optional else ''}; got {value!r}.")
    if not integer and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number; got {value!r}.")
    return int(value) if integer else float(value)


@dataclass(frozen=True)
class WeightingConfig:
    """How the per-prompt weights are chosen (see :mod:`langchain_packllm.weights`).

    ``reweight_every=N`` re-solves them every ``N`` tokens on all the text so far (prompt plus generated or
    already-scored text; see :mod:`langchain_packllm.online`); None (the default) solves them once, on the
    prompt. It works with the weightings that depend on the text: ``optimal``, ``sim`` and ``top1``.
    """

    weighting: str | tuple[float, ...] = "optimal"
    tau: float = 1.0
    grid_step: float = 0.05
    reweight_every: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.weighting, str):
            object.__setattr__(self, "weighting", tuple(float(w) for w in self.weighting))
        object.__setattr__(self, "tau", _number("tau", self.tau))
        object.__setattr__(self, "grid_step", _number("grid_step", self.grid_step))
        if self.tau <= 0:
            raise ValueError(f"tau must be a positive number; got {self.tau!r}.")
        weights_lib.check_strategy(self.weighting)
        if self.weighting in ("greedy", "grid"):
            weights_lib._grid_divisions(self.grid_step)
        every = _number("reweight_every", self.reweight_every, integer=True, optional=True)
        object.__setattr__(self, "reweight_every", every)
        if every is not None and every < 1:
            raise ValueError(f"reweight_every must be a positive number of tokens or None; got {every}.")
        check_online(self.weighting, every)

    @property
    def name(self) -> str:
        return self.weighting if isinstance(self.weighting, str) else "fixed"


@dataclass(frozen=True)
class SamplingConfig:
    """Decoding settings. ``temperature == 0`` means greedy decoding.

    ``logits_processors`` are extra transformers ``LogitsProcessor``s (``__call__(input_ids, scores) ->
    scores``) applied to the fused scores after the repetition penalty and before temperature, top-k and
    top-p. ``processor_factories`` build more of them per call from the call's
    :class:`~langchain_packllm.reference.Plan` (its reference tokenizer, vocabulary width and EOS ids): use
    them for anything that depends on the tokenizer, such as a grammar mask, since the reference member is
    chosen per prompt. The scores every processor sees (the repetition penalty included) are the fused
    log-probs ``log_softmax(sum_k w_k logits_k)`` over the reference vocabulary. ``input_ids`` is
    ``(B, L + t)``: the left-padded prompts (same width ``L`` for every row) followed by the ``t`` tokens
    generated so far.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logits_processors: tuple = ()
    processor_factories: tuple[Callable[[Plan], Sequence[Any]], ...] = ()

    def __post_init__(self) -> None:
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):  # one stop sequence, not one per character
            stop = (stop,)
        for s in stop:
            if not isinstance(s, str):
                raise TypeError(f"stop sequences must be strings; got {s!r} in stop={self.stop!r}.")
        object.__setattr__(self, "stop", tuple(s for s in stop if s))
        object.__setattr__(self, "logits_processors", tuple(self.logits_processors or ()))
        object.__setattr__(self, "processor_factories", tuple(self.processor_factories or ()))
        set_ = object.__setattr__
        set_(self, "max_new_tokens", _number("max_new_tokens", self.max_new_tokens, integer=True))
        set_(self, "temperature", _number("temperature", self.temperature))
        set_(self, "top_k", _number("top_k", self.top_k, integer=True, optional=True))
        set_(self, "top_p", _number("top_p", self.top_p, optional=True))
        set_(
            self, "repetition_penalty", _number("repetition_penalty", self.repetition_penalty, optional=True)
        )
        set_(self, "seed", _number("seed", self.seed, integer=True, optional=True))
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0; got {self.max_new_tokens}.")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy); got {self.temperature}.")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None; got {self.top_k}.")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] or None; got {self.top_p}.")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 or None; got {self.repetition_penalty}.")

    def processors(self, plan: Plan | None = None) -> LogitsProcessorList:
        """The call's logits processors, in order: repetition penalty, the extra ones (static, then those
        the factories build from ``plan``), then temperature, top-k, top-p when sampling."""
        procs = LogitsProcessorList()
        if self.repetition_penalty is not None and self.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        procs.extend(self.logits_processors)
        if self.processor_factories:
            if plan is None:
                raise ValueError("processor_factories need the call's plan; pass plan=.")
            for factory in self.processor_factories:
                procs.extend(factory(plan))
        if self.temperature > 0:
            if self.temperature != 1.0:
                procs.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k is not None:
                procs.append(TopKLogitsWarper(self.top_k))
            if self.top_p is not None and self.top_p < 1.0:
                procs.append(TopPLogitsWarper(self.top_p))
        return procs


@dataclass(frozen=True)
class FusionReport:
    """Why the pack answered as it did, for one prompt. Built once, with every field."""

    weights: dict[str, float]
    perplexities: dict[str, float]
    fused_perplexity: float
    order: list[str]
    weighting: str
    solve_seconds: float
    prompt_tokens: int
    fallback: str | None = None
    truncated: bool = False
    reference: str | None = None  # whose tokenizer the prompt was read with (packs of mixed vocabularies)
    approx_tokens: int = 0  # prompt tokens some member could only read through an approximate (MinED) map
    bits_per_byte: dict[str, float] | None = None  # each member on its own tokenization (mixed packs)
    # With reweight_every: (position, weights) from the prompt's on, each in use from that token on
    # (positions count the prompt's tokens; ``weights`` above stays the prompt's). None otherwise.
    trajectory: tuple[tuple[int, dict[str, float]], ...] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class FusionOutput:
    """One prompt's generation: text (stop sequences cut), new token ids, why it ended, and the report."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop sequence) or "length"
    report: FusionReport

    def info(self) -> dict[str, Any]:
        """The whole report plus the completion's token count and finish reason, as a JSON-friendly dict
        (what the LangChain adapters put in ``generation_info`` / ``response_metadata``)."""
        return {
            **self.report.to_dict(),
            "completion_tokens": len(self.token_ids),
            "finish_reason": self.finish_reason,
        }


@dataclass(frozen=True)
class StreamChunk:
    """A piece of streamed text; the last chunk of a stream carries the whole ``output``."""

    text: str
    output: FusionOutput | None = None


@dataclass(frozen=True)
class LoglikelihoodResult:
    """lm-evaluation-harness semantics: natural-log likelihood and whether greedy decoding would match."""

    logprob: float
    is_greedy: bool
    report: FusionReport
