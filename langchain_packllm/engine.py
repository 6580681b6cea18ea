"""The fusion engine: members score the prompt, weights are solved, decoding samples from the mix.

``FusionEngine`` knows nothing of LangChain. It serves the LangChain adapters, the evaluation harness, the
benchmarks and the CLI. Per call:

1. Prefill: one forward per member over the (left-padded) batch of prompts. Its logits give every member's
   prompt log-probabilities, hence the weights, and the first new token; its KV cache continues decoding.
2. Weights: one solve per prompt (see :mod:`langchain_packllm.weights`).
3. Decode: each step is one cached single-token forward per member, then the mix
   ``sum_k w_k log_softmax(s_k)`` (Eq. 1), transformers' logits processors, and argmax or sampling.

Example::

    >>> engine = FusionEngine([load_member("./experts/code"), load_member("./experts/docs")])
    >>> out = engine.generate(["def main("], sampling=SamplingConfig(max_new_tokens=16))[0]
    >>> out.text, out.report.weights
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import torch
from transformers import DynamicCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from langchain_packllm import weights as weights_lib
from langchain_packllm.members import Member

# On a CPU the engine keeps the (K, B, L, V) prompt-score buffer of a call for the next one when it holds at
# most this many bytes (FusionEngine.empty_cache frees it). A fresh buffer of that size is above glibc's
# mmap threshold, so each call would fault its pages in anew: 20 ms per 65 MB here, a fifth of toy members'
# prefill. On CUDA the caching allocator already reuses memory.
KEEP_BUFFER_BYTES = 256 << 20

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightingConfig:
    """How the per-prompt weights are chosen (see :mod:`langchain_packllm.weights`)."""

    weighting: str | tuple[float, ...] = "optimal"
    tau: float = 1.0
    grid_step: float = 0.05

    def __post_init__(self) -> None:
        if not isinstance(self.weighting, str):
            object.__setattr__(self, "weighting", tuple(float(w) for w in self.weighting))
        if not (self.tau > 0 and math.isfinite(self.tau)):
            raise ValueError(f"tau must be a positive number; got {self.tau!r}.")
        weights_lib.check_strategy(self.weighting)
        if self.weighting in ("greedy", "grid"):
            weights_lib._grid_divisions(self.grid_step)

    @property
    def name(self) -> str:
        return self.weighting if isinstance(self.weighting, str) else "fixed"


@dataclass(frozen=True)
class SamplingConfig:
    """Decoding settings. ``temperature == 0`` means greedy decoding.

    ``logits_processors`` are extra transformers ``LogitsProcessor``s (``__call__(input_ids, scores) ->
    scores``) applied to the fused scores after the repetition penalty and before temperature, top-k and
    top-p (e.g. a grammar mask). The scores every processor sees (the repetition penalty included) are the
    fused log-probs ``log_softmax(sum_k w_k logits_k)``. ``input_ids`` is ``(B, L + t)``: the left-padded
    prompts (same width ``L`` for every row) followed by the ``t`` tokens generated so far.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logits_processors: tuple = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(s for s in (self.stop or ()) if s))
        object.__setattr__(self, "logits_processors", tuple(self.logits_processors or ()))
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

    def processors(self) -> LogitsProcessorList:
        procs = LogitsProcessorList()
        if self.repetition_penalty is not None and self.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        procs.extend(self.logits_processors)
        if self.temperature > 0:
            if self.temperature != 1.0:
                procs.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k is not None:
                procs.append(TopKLogitsWarper(self.top_k))
            if self.top_p is not None and self.top_p < 1.0:
                procs.append(TopPLogitsWarper(self.top_p))
        return procs


@dataclass
class FusionReport:
    """Why the pack answered as it did, for one prompt."""

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

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FusionOutput:
    """One prompt's generation: text (stop sequences cut), new token ids, why it ended, and the report."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop sequence) or "length"
    report: FusionReport


@dataclass
class StreamChunk:
    """A piece of streamed text; the last chunk of a stream carries the whole ``output``."""

    text: str
    output: FusionOutput | None = None


@dataclass
class LoglikelihoodResult:
    """lm-evaluation-harness semantics: natural-log likelihood and whether greedy decoding would match."""

    logprob: float
    is_greedy: bool
    report: FusionReport


@dataclass
class _Prefill:
    caches: list[DynamicCache]
    attention_mask: torch.Tensor | None  # (B, L) on the mix device; None when no row is padded
    next_positions: torch.Tensor | None  # (B, 1) position id of the next token; None when no padding
    mixer: _Mixer  # the rows' weights
    last_scores: list[torch.Tensor | None]  # K x (B, V): next-token logits (raw); None: weight 0 everywhere
    reports: list[FusionReport]
    input_ids: torch.Tensor  # (B, L) left-padded prompt ids, mix device


@dataclass
class _Mixer:
    """Eq. 1 for a batch, set up once per call: ``mixer(scores) = sum_k w_k s_k`` row by row, ``(B, V)`` in
    at least float32 on the mix device, from K next-token scores ``(B, V)`` (logits or log-probs: a
    per-row shift of ``s_k`` does not change the fused distribution)."""

    weights: torch.Tensor  # (B, K) on the mix device
    active: list[int]  # members with a nonzero weight in some row: the only ones read (and run)
    clamp: frozenset[int]  # active members with weight 0 in some row: their -inf must not meet 0 (NaN)
    unit: int | None  # the one active member, when it has weight 1 in every row: its scores are the mix

    @classmethod
    def build(cls, weights: torch.Tensor, device: torch.device, dtype: torch.dtype) -> _Mixer:
        """``weights`` is ``(B, K)`` on the host."""
        active = [k for k in range(weights.shape[1]) if bool(weights[:, k].any())]
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


@dataclass
class _Row:
    """Decoding state of one prompt: generated ids, decoded text, where it stopped, what was streamed."""

    ids: list[int] = field(default_factory=list)
    text: str = ""
    done: bool = False
    finish_reason: str = "length"
    emitted: int = 0
    budget: int | None = None  # most new tokens the context leaves room for


class FusionEngine:
    """Fuses a pack of causal LMs; the weights are solved per prompt.

    Args:
        members: the pack, in the order reports list them.
        mix_device: where the mix, the weight solve and sampling run (default: the first member's device).
        alignment: how members with different vocabularies are fused. ``"auto"``: not at all when they share
            one, else ``"mined"``. ``"mined"``: the paper's section 3.4: per prompt the reference tokenizer is
            that of the member with the lowest bits per byte on the prompt (each member scoring its own
            tokenization); the others read the reference tokens through minimum-edit-distance token maps and
            their logits are mapped back onto the reference vocabulary. ``"none"``: refuse different
            vocabularies. ``"prefix"`` (opt-in): every member reads its own tokens and its distributions
            are moved onto the reference vocabulary by string prefix (``langchain_packllm.bytealign``);
            prompts are decoded one at a time and ``loglikelihood`` is not available.

    Thread safety: calls are serialised by an internal lock, so concurrent callers (LangChain's thread-pool
    ``batch``) never share a cache or a random generator.
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
        if alignment not in ("auto", "mined", "prefix", "none"):
            raise ValueError(f"alignment must be 'auto', 'mined', 'prefix' or 'none'; got {alignment!r}.")
        self.members = members
        self.mix_device = torch.device(mix_device) if mix_device is not None else members[0].device
        for m in members:
            _check_model_fits_tokenizer(m)
        mismatch = self._first_vocabulary_mismatch()
        if mismatch is not None and alignment == "none":
            a, b = mismatch
            raise ValueError(
                f"Members {a!r} and {b!r} have different vocabularies and alignment='none'; use "
                "alignment='mined' to fuse them through token maps."
            )
        if alignment in ("mined", "prefix"):
            self.alignment = alignment
        else:
            self.alignment = "mined" if alignment == "auto" and mismatch else "none"
        self._aligners: dict[tuple[int, int], object] = {}
        self._maps: dict[tuple[int, int], _TokenMap | None] = {}
        self._ref = 0  # the reference member of the call in progress (always 0 without alignment)
        self.vocab_size = min(m.vocab_size for m in members)
        self._use_reference(0)  # aligned packs: the reference vocabulary's size
        self._heads: dict[int, _LinearHead | None] = {}
        # Read once: these lookups walk the model or its config and cost tens of microseconds each.
        self._devices = [m.device for m in members]
        lengths = [m.max_length for m in members if m.max_length is not None]
        self._max_length = min(lengths) if lengths else None
        self._eos_ids = [m.eos_token_ids for m in members]
        self._scores_dtype = torch.float32  # the prompt scores' dtype: at least float32
        for m in members:
            self._scores_dtype = torch.promote_types(self._scores_dtype, m.model.dtype)
        self._lock = threading.Lock()  # not an RLock: async streams resume on other threads
        self._spare: torch.Tensor | None = None  # the last prompt-score buffer, kept on the CPU
        self._spare_lock = threading.Lock()
        self._set_device_groups(_device_groups(members))

    def _set_device_groups(self, groups: list[list[int]]) -> None:
        """Members on different devices run their forwards concurrently, one thread per device, so a step
        costs about the slowest device rather than the sum. One device (e.g. CPU only): in order, no thread."""
        self._groups = groups
        self._pool = (
            ThreadPoolExecutor(len(groups), thread_name_prefix="packllm") if len(groups) > 1 else None
        )

    def empty_cache(self) -> None:
        """Free the prompt-score buffer kept between calls on the CPU (at most ``KEEP_BUFFER_BYTES``; it
        spares the next call the page faults of a fresh buffer), as ``torch.cuda.empty_cache`` frees
        CUDA's cached blocks."""
        with self._spare_lock:
            self._spare = None

    def _score_buffer(self, shape: tuple[int, ...]) -> torch.Tensor:
        """An uninitialised ``shape`` tensor for the prompt scores: the kept buffer when it is large enough."""
        numel = math.prod(shape)
        with self._spare_lock:
            spare, self._spare = self._spare, None
        if spare is None or spare.numel() < numel:
            del spare  # freed before the new one is made
            spare = torch.empty(numel, dtype=self._scores_dtype, device=self.mix_device)
        return spare[:numel].view(shape)

    def _recycle(self, scores: torch.Tensor) -> None:
        """Keep the buffer behind ``scores`` (from :meth:`_score_buffer`; no view of it may be used after
        this) for the next call, on a CPU and up to ``KEEP_BUFFER_BYTES``."""
        flat = scores if scores._base is None else scores._base
        if flat.device.type == "cpu" and flat.numel() * flat.element_size() <= KEEP_BUFFER_BYTES:
            with self._spare_lock:
                if self._spare is None or self._spare.numel() < flat.numel():
                    self._spare = flat

    # ------------------------------------------------------------------ set-up

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    @property
    def tokenizer(self):
        """The tokenizer prompts are encoded with: the shared one, or the current reference member's."""
        return self.members[self._ref].tokenizer

    @property
    def max_length(self) -> int | None:
        """The shortest member context."""
        return self._max_length

    def _eos(self, k: int | None = None) -> set[int]:
        """Member k's end-of-sequence ids, or every member's."""
        return self._eos_ids[k] if k is not None else set().union(*self._eos_ids)

    def _first_vocabulary_mismatch(self) -> tuple[str, str] | None:
        ref = self.members[0]
        ref_vocab = ref.tokenizer.get_vocab()
        for other in self.members[1:]:
            if other.tokenizer.get_vocab() != ref_vocab:
                return ref.name, other.name
        return None

    # ------------------------------------------------------------------ alignment

    def _token_map(self, ref: int, k: int) -> _TokenMap | None:
        """How member k reads and writes reference-``ref`` tokens; None when no mapping is needed."""
        if self.alignment == "none":
            return None
        key = (ref, k)
        if self.alignment == "prefix":
            if ref != k and not self._aligner(ref, k).identity:
                raise RuntimeError(
                    f"Member {self.names[k]!r} reads its own tokens under alignment='prefix'; this path "
                    "(batched scoring, loglikelihood, evaluation) needs alignment='mined'."
                )
            return None
        if key not in self._maps:
            if ref == k:
                self._maps[key] = None
            else:
                from langchain_packllm.alignment import MinEDMap

                mined = MinEDMap.from_tokenizers(self.members[ref].tokenizer, self.members[k].tokenizer)
                approx = ~torch.as_tensor(mined.exact).to(self.mix_device)
                self._maps[key] = _TokenMap(mined.ids_on(self._devices[k]), approx)
        return self._maps[key]

    def _aligner(self, ref: int, k: int):
        """The prefix aligner moving member k's distributions onto reference ``ref``'s vocabulary."""
        if (ref, k) not in self._aligners:
            from langchain_packllm.bytealign import PrefixAligner

            self._aligners[(ref, k)] = PrefixAligner(self.members[k].tokenizer, self.members[ref].tokenizer)
        return self._aligners[(ref, k)]

    @contextlib.contextmanager
    def _reference(self, ref: int) -> Iterator[None]:
        """Read and write member ``ref``'s vocabulary for the duration of a block (then member 0's again)."""
        self._use_reference(ref)
        try:
            yield
        finally:
            self._use_reference(0)

    def _use_reference(self, ref: int) -> None:
        """Make member ``ref``'s tokenizer the reference of the call in progress (aligned packs only)."""
        self._ref = ref
        if self.alignment != "none":
            self.vocab_size = len(self.members[ref].tokenizer)

    def prepare_alignment(self) -> None:
        """Build (or load from the disk cache) every token map now rather than on first use."""
        if self.alignment == "mined":
            for ref in range(len(self.members)):
                for k in range(len(self.members)):
                    self._token_map(ref, k)

    @torch.inference_mode()
    def _bits_per_byte(self, text: str) -> list[float]:
        """Each member's bits per byte on ``text``, scoring its own tokenization (comparable across
        tokenizers, unlike per-token perplexity). NaN where the text has fewer than 2 tokens."""
        out = []
        for m in self.members:
            ids = list(m.tokenizer(text, add_special_tokens=True)["input_ids"])
            first = m.tokenizer.decode(ids[:1], skip_special_tokens=True) if ids else ""
            n_bytes = len(text.encode("utf-8")) - len(first.encode("utf-8"))
            if len(ids) < 2 or n_bytes <= 0:
                out.append(float("nan"))
                continue
            x = torch.tensor([ids], device=m.device)
            logits = m.model(input_ids=x).logits[0, :-1, : len(m.tokenizer)].float()
            nll = -torch.log_softmax(logits, -1).gather(-1, x[0, 1:, None]).sum()
            out.append(float(nll) / math.log(2) / n_bytes)
        return out

    def _reference_for(self, text: str) -> tuple[int, list[float] | None]:
        """The reference member for a prompt: the one with the lowest bits per byte (0 without alignment)."""
        if self.alignment == "none":
            return 0, None
        bpb = self._bits_per_byte(text)
        finite = [(v, k) for k, v in enumerate(bpb) if math.isfinite(v)]
        return (min(finite)[1] if finite else 0), bpb

    # ------------------------------------------------------------------ tokens

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt (with the tokenizer's special tokens, e.g. BOS)."""
        ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        bos = self.tokenizer.bos_token_id
        if bos is not None and ids[:2] == [bos, bos]:  # the text (e.g. a chat template) already had BOS
            ids = ids[1:]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _start_token(self) -> int:
        tok = self.tokenizer
        for tid in (tok.bos_token_id, tok.eos_token_id):
            if tid is not None:
                return int(tid)
        raise ValueError(
            "The prompt is empty and the tokenizer has neither a BOS nor an EOS token to start from; "
            "pass a non-empty prompt."
        )

    def _fit(self, ids: list[int], reserve: int) -> tuple[list[int], bool, str | None]:
        """Make a prompt decodable: a start token if empty, its tail if it does not fit the context.

        The prompt keeps at least half the shortest member context; ``reserve`` new tokens get the rest
        (generation then stops at the context limit with ``finish_reason == "length"``).
        """
        fallback = None
        if not ids:
            ids = [self._start_token()]
            fallback = "empty prompt: decoding from the start token with uniform weights"
        limit = self.max_length
        truncated = False
        if limit is not None:
            room = limit - min(reserve, limit // 2)
            if len(ids) > room:
                warnings.warn(
                    f"Prompt of {len(ids)} tokens does not fit the members' context ({limit} tokens) with "
                    f"max_new_tokens={reserve}; keeping its last {room} tokens.",
                    stacklevel=4,
                )
                ids, truncated = ids[-room:], True
        return ids, truncated, fallback

    # ------------------------------------------------------------------ forward passes

    @torch.inference_mode()
    def _logits(
        self, k: int, input_ids, attention_mask, position_ids, cache, *, hidden: bool = False
    ) -> torch.Tensor:
        """Member k's forward on reference token ids: its logits over the reference vocabulary ``(B, L, V)``,
        on its own device and in its own dtype. Members of another vocabulary read and write through their
        MinED token map. ``hidden=True`` runs the base model only and returns its last hidden state
        ``(B, L, H)`` (see :meth:`_linear_head`)."""
        member = self.members[k]
        dev = self._devices[k]
        input_ids = input_ids.to(dev)
        token_map = self._token_map(self._ref, k)
        if token_map is not None:
            input_ids = token_map.ids[input_ids]  # reference ids -> member ids
        module = self._linear_head(k).base if hidden else member.model
        out = module(
            input_ids=input_ids,
            attention_mask=None if attention_mask is None else attention_mask.to(dev),
            position_ids=None if position_ids is None else position_ids.to(dev),
            past_key_values=cache,
            use_cache=cache is not None,
        )
        if hidden:
            return out.last_hidden_state
        if token_map is not None:
            return out.logits.index_select(-1, token_map.ids)  # member logits -> reference vocabulary
        return out.logits[..., : self.vocab_size]

    def _linear_head(self, k: int) -> _LinearHead | None:
        """Member k's output layer when its logits are exactly ``base(x).last_hidden_state @ W.T + b`` (the
        shape of every ``*ForCausalLM`` without logit scaling or soft-capping), checked once against the
        model's own forward on a few tokens; else None. Then the prefill writes the prompt's logits straight
        into the solve buffer (one matrix product) instead of copying the model's own ``(B, L, V)`` output."""
        if k not in self._heads:
            self._heads[k] = _linear_head(self.members[k])
        return self._heads[k]

    @staticmethod
    def _last_logprobs(logits: torch.Tensor) -> torch.Tensor:
        """Next-token log-probs ``(B, V)`` of the last position, at least float32, on the logits' device."""
        last = logits[:, -1]
        return torch.log_softmax(last.to(torch.promote_types(last.dtype, torch.float32)), dim=-1)

    def _run_members(
        self, fn: Callable[[int], torch.Tensor], active: Sequence[int] | None = None
    ) -> list[torch.Tensor | None]:
        """``[fn(k) for k in members]`` (``None`` for members not in ``active``, when given); with members on
        several devices, one thread per device."""
        K = len(self.members)
        wanted = range(K) if active is None else sorted(set(active))
        out: list[torch.Tensor | None] = [None] * K
        if self._pool is None:
            for k in wanted:
                out[k] = fn(k)
            return out

        def run_group(group: list[int]) -> list[torch.Tensor]:
            with torch.inference_mode():
                return [fn(k) for k in group]

        groups = [[k for k in g if k in wanted] for g in self._groups]
        futures = [(group, self._pool.submit(run_group, group)) for group in groups if group]
        for group, future in futures:
            for k, value in zip(group, future.result()):
                out[k] = value
        return out

    def _step(self, next_ids, mask, positions, caches, active: Sequence[int]) -> list[torch.Tensor | None]:
        """One cached decode step of the ``active`` members: their raw next-token logits ``(B, V)``, on
        their own devices (``None`` for the others, whose weight is 0 in every row: their forward is
        skipped, and their cache, never read again, falls behind)."""

        def one(k: int) -> torch.Tensor:
            return self._logits(k, next_ids, mask, positions, caches[k])[:, -1]

        return self._run_members(one, active)

    def _pad(self, batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-pad: ``(B, L)`` ids and attention mask on the mix device."""
        L = max(len(ids) for ids in batch)
        pad = self._start_token() if self.tokenizer.pad_token_id is None else self.tokenizer.pad_token_id
        input_ids = torch.full((len(batch), L), int(pad), dtype=torch.long)
        mask = torch.zeros((len(batch), L), dtype=torch.long)
        for b, ids in enumerate(batch):
            input_ids[b, L - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            mask[b, L - len(ids) :] = 1
        return input_ids.to(self.mix_device), mask.to(self.mix_device)

    def member_logprobs(self, batch: list[list[int]], *, use_cache: bool = False):
        """Prefill every member on a batch of token-id lists.

        Returns ``(logprobs, input_ids, attention_mask, caches)`` where ``logprobs`` is a list of K tensors
        ``(B, L, V)`` (float32, mix device), positions left-padded to ``L``.
        """
        scores, input_ids, mask, caches, _ = self._prefill_scores(batch, use_cache=use_cache)
        logprobs = [torch.log_softmax(s, dim=-1) for s in scores]
        self._recycle(scores)
        return logprobs, input_ids, mask, caches

    def _prefill_scores(self, batch: list[list[int]], *, use_cache: bool):
        """One forward per member over the left-padded batch.

        Returns ``(scores, input_ids, attention_mask, caches, last)``: ``scores`` is ``(K, B, L, V)`` raw
        logits (at least float32) on the mix device, written member by member into one buffer so that no
        member's logits are held twice; ``last`` is a copy of the last position's ``(K, B, V)``. The weight
        solve works on raw logits (they give the same fused distribution as log-probs), so the prompt
        positions are never log-softmaxed. ``-inf`` logits are raised to the dtype's lowest finite value,
        so that a member with weight 0 contributes 0, not NaN, to the mix. A batch without padding
        (e.g. one prompt) is run without attention mask and position ids, as a member alone would be.
        """
        input_ids, mask = self._pad(batch)
        padded = _is_padded(batch)
        positions = (mask.cumsum(-1) - 1).clamp(min=0) if padded else None
        K, (B, L) = len(self.members), input_ids.shape
        scores = self._score_buffer((K, B, L, self.vocab_size))
        caches = [DynamicCache(config=m.model.config) if use_cache else None for m in self.members]

        unpadded_mask = mask if padded else None
        self._run_members(
            lambda k: self._prefill_member(k, scores[k], input_ids, unpadded_mask, positions, caches[k])
        )
        last = scores[:, :, -1].clone()  # (K, B, V): the buffer is freed after the solve
        return scores, input_ids, mask, caches, last

    def _prefill_member(self, k: int, out: torch.Tensor, input_ids, mask, positions, cache) -> None:
        """Member k's forward over the batch, its logits written into ``out`` ``(B, L, V)`` (a slice of the
        solve buffer): through :meth:`_linear_head` when it applies (one matrix product into ``out``),
        else the model's own logits copied in."""
        lowest = torch.finfo(out.dtype).min
        head = self._linear_head(k) if self._token_map(self._ref, k) is None else None
        if head is None:
            logits = self._logits(k, input_ids, mask, positions, cache)
            if logits.dtype == out.dtype and logits.device == out.device:
                torch.clamp(logits, min=lowest, out=out)
            else:
                out.copy_(logits).clamp_min_(lowest)
            return
        try:
            h = self._logits(k, input_ids, mask, positions, cache, hidden=True).flatten(0, 1)  # (B*L, H)
        except TypeError:  # a base model that does not take these arguments: the model's own forward
            self._heads[k] = None
            return self._prefill_member(k, out, input_ids, mask, positions, cache)
        weight = head.weight[: self.vocab_size]
        bias = None if head.bias is None else head.bias[: self.vocab_size]
        out = out.view(h.shape[0], -1)
        with torch.no_grad():
            if h.device != out.device:
                out.copy_(torch.nn.functional.linear(h, weight, bias)).clamp_min_(lowest)
            elif h.dtype == out.dtype:  # a linear layer: finite, no clamp
                if bias is None:
                    torch.mm(h, weight.T, out=out)
                else:
                    torch.addmm(bias, h, weight.T, out=out)
            else:
                _mm_upcast(h, weight, bias, out)

    # ------------------------------------------------------------------ weights

    def _solve(
        self, prompt_lp: torch.Tensor, targets: torch.Tensor, config: WeightingConfig, fallback: str | None
    ) -> tuple[torch.Tensor, FusionReport]:
        """Weights and report for one prompt. ``prompt_lp`` is ``(K, T, V)`` log-probs or raw logits,
        ``targets`` ``(T,)``."""
        K, T = prompt_lp.shape[0], prompt_lp.shape[1]
        names = self.names
        start = time.perf_counter()
        if T == 0:
            if fallback is None:
                fallback = "prompt has fewer than 2 tokens: no perplexity, uniform weights"
            w = weights_lib.uniform(K)
            if not isinstance(config.weighting, str):
                w = weights_lib.check_fixed(config.weighting, K)
            ppl = torch.full((K,), float("nan"), dtype=torch.float64)
            fused_ppl = float("nan")
        else:
            solution = weights_lib.solve_with_stats(
                config.weighting, prompt_lp, targets, tau=config.tau, grid_step=config.grid_step
            )
            w, ppl, fused_ppl = solution.weights, solution.perplexities, math.exp(solution.loss)
            if bool(ppl.isnan().any()):
                bad = names[int(ppl.isnan().nonzero()[0])]
                raise FloatingPointError(
                    f"Member {bad!r} produced NaN logits on the prompt; check its weights and dtype."
                )
        seconds = time.perf_counter() - start
        order = [names[i] for i in torch.argsort(ppl, stable=True).tolist()] if T else list(names)
        report = FusionReport(
            weights={n: float(v) for n, v in zip(names, w.tolist())},
            perplexities={n: float(v) for n, v in zip(names, ppl.tolist())},
            fused_perplexity=fused_ppl,
            order=order,
            weighting=config.name,
            solve_seconds=seconds,
            prompt_tokens=T + 1,
            fallback=fallback,
        )
        return w, report

    def _prefill(
        self, prompts: Sequence[str], config: WeightingConfig, reserve: int, use_cache: bool = True
    ) -> _Prefill:
        fitted = [self._fit(self.encode(p), reserve) for p in prompts]
        batch = [ids for ids, _, _ in fitted]
        scores, input_ids, mask, caches, last = self._prefill_scores(batch, use_cache=use_cache)
        L = input_ids.shape[1]
        rows_w, reports = [], []
        for b, (ids, truncated, fallback) in enumerate(fitted):
            first = L - len(ids)
            prompt_scores = scores[:, b, first : L - 1]  # (K, n-1, V), a view
            targets = input_ids[b, first + 1 :]  # (n-1,)
            w, report = self._solve(prompt_scores, targets, config, fallback)
            report.truncated = truncated
            report.prompt_tokens = len(ids)
            self._note_alignment(report, input_ids[b, first:])
            rows_w.append(w)
            reports.append(report)
        self._recycle(scores)  # decoding needs only the caches and the last logits
        del scores, prompt_scores
        mixer = _Mixer.build(torch.stack(rows_w), self.mix_device, last.dtype)
        padded = _is_padded(batch)
        last_scores = [last[k] if k in mixer.active else None for k in range(len(self.members))]
        positions = mask.sum(-1, keepdim=True) if padded else None  # (B, 1)
        return _Prefill(caches, mask if padded else None, positions, mixer, last_scores, reports, input_ids)

    def _note_alignment(
        self, report: FusionReport, ids: torch.Tensor, bpb: list[float] | None = None
    ) -> None:
        """Record, for aligned packs, the reference member and how many prompt tokens were mapped inexactly."""
        if self.alignment == "none":
            return
        report.reference = self.names[self._ref]
        approx = torch.zeros_like(ids, dtype=torch.bool)
        for k in range(len(self.members)):
            token_map = self._token_map(self._ref, k)
            if token_map is not None:
                approx |= token_map.approx[ids]
        report.approx_tokens = int(approx.sum())
        if bpb is not None:
            report.bits_per_byte = dict(zip(self.names, bpb))

    def _by_reference(self, prompts: Sequence[str]) -> dict[int, tuple[list[int], list]]:
        """Prompts grouped by reference member: ``{ref: (prompt indices, their bits per byte)}``."""
        groups: dict[int, tuple[list[int], list]] = {}
        for i, prompt in enumerate(prompts):
            ref, bpb = self._reference_for(prompt)
            idx, bpbs = groups.setdefault(ref, ([], []))
            idx.append(i)
            bpbs.append(bpb)
        return groups

    def report(self, prompt: str, weighting: WeightingConfig | None = None) -> FusionReport:
        """The weights and perplexities the pack would use for ``prompt`` (prefill only, no decoding)."""
        with self._lock:
            ref, bpb = self._reference_for(prompt)
            with self._reference(ref):
                if self.alignment == "prefix":
                    report = self._prefix_prefill(prompt, weighting or WeightingConfig())[1]
                else:
                    report = self._prefill(
                        [prompt], weighting or WeightingConfig(), reserve=0, use_cache=False
                    ).reports[0]
            if bpb is not None:
                report.bits_per_byte = dict(zip(self.names, bpb))
            return report

    # ------------------------------------------------------------------ prefix alignment (opt-in)

    def _prefix_prefill(self, prompt: str, config: WeightingConfig):
        """Weights for one prompt under ``alignment="prefix"``: every member reads its own tokens and its
        distributions are moved onto the reference vocabulary by string prefix (see ``bytealign``).

        Returns ``(weights (K,), report, reference encoding)``.
        """
        from langchain_packllm import bytealign

        ref, K = self._ref, len(self.members)
        aligners = {k: self._aligner(ref, k) for k in range(K)}
        if not prompt:
            raise ValueError("alignment='prefix' needs a non-empty prompt.")
        for m in self.members:
            n = len(m.tokenizer(prompt)["input_ids"])
            if m.max_length is not None and n >= m.max_length:
                raise ValueError(
                    f"Prompt of {n} tokens does not fit member {m.name!r}'s context ({m.max_length}); "
                    "alignment='prefix' does not truncate: shorten the prompt or use alignment='mined'."
                )
        lp, r_enc = bytealign.reference_logprobs(self.members, ref, prompt, aligners)  # (K, T, V_ref)
        lp = bytealign.smooth_logprobs(lp).to(self.mix_device)
        targets = torch.tensor(r_enc.ids[r_enc.n_special :], device=self.mix_device)  # (T,)
        w, report = self._solve(lp, targets, config, None)
        report.prompt_tokens = len(r_enc.ids)
        report.reference = self.names[ref]
        return w, report, r_enc

    def _decode_prefix(
        self, prompts: Sequence[str], weighting: WeightingConfig, sampling: SamplingConfig, track_text=True
    ) -> Iterator[tuple[list[_Row], list[FusionReport]]]:
        """``_decode`` for one prompt under ``alignment="prefix"``: the reference (and members sharing its
        tokenizer) decode with their KV caches as usual; every other member follows the growing text with
        its own tokens (``bytealign.MemberTextState``: re-encode a tail window, crop its cache, forward the
        new tokens) and the reference's row as prior. All rows are smoothed before the mix (Eq. 1)."""
        from langchain_packllm import bytealign

        (prompt,) = prompts
        ref = self._ref
        w, report, r_enc = self._prefix_prefill(prompt, weighting)
        row = _Row()
        limit = self.members[ref].max_length
        if limit is not None:
            row.budget = limit - len(r_enc.ids)
        if sampling.max_new_tokens == 0:
            yield [row], [report]
            return
        direct = [k for k in range(len(self.members)) if k == ref or self._aligner(ref, k).identity]
        states = {
            k: bytealign.MemberTextState(m.model, m.tokenizer, self._aligner(ref, k))
            for k, m in enumerate(self.members)
            if k not in direct
        }
        sequences = torch.tensor([r_enc.ids], device=self.mix_device)  # (1, L + t)
        mask = torch.ones_like(sequences)
        positions = torch.arange(sequences.shape[1], device=self.mix_device)[None]
        caches = {k: DynamicCache(config=self.members[k].model.config) for k in direct}
        rows = {
            k: self._last_logprobs(self._logits(k, sequences, mask, positions, caches[k])) for k in direct
        }
        rows = {k: v.to(self.mix_device) for k, v in rows.items()}
        prior = rows[ref]
        with torch.inference_mode():
            rows.update({k: st.start(prompt, prior=prior).to(self.mix_device) for k, st in states.items()})
        mixer = _Mixer.build(w[None], self.mix_device, prior.dtype)
        eos = self.members[ref].eos_token_ids
        processors = sampling.processors()
        generator = None
        if sampling.temperature > 0 and sampling.seed is not None:
            generator = torch.Generator(device=self.mix_device).manual_seed(int(sampling.seed))
        surfaces = self._aligner(ref, ref).reference.surfaces
        positions = positions[:, -1:] + 1
        for step in range(sampling.max_new_tokens):
            lps = [bytealign.smooth_logprobs(rows[k]) for k in range(len(self.members))]
            next_ids, (token,) = self._choose(processors, sequences, mixer, lps, sampling, generator)
            self._advance(row, token, eos, sampling.stop, track_text)
            yield [row], [report]
            if row.done or step == sampling.max_new_tokens - 1:
                return
            sequences = torch.cat([sequences, next_ids[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            for k in direct:
                logits = self._logits(k, next_ids[:, None], mask, positions, caches[k])
                rows[k] = self._last_logprobs(logits).to(self.mix_device)
            positions = positions + 1
            piece = surfaces[token] or b""  # a special token adds no text
            with torch.inference_mode():
                for k, st in states.items():
                    rows[k] = st.append(piece, prior=rows[ref]).to(self.mix_device)

    # ------------------------------------------------------------------ decoding

    def _decode(
        self,
        prompts: Sequence[str],
        weighting: WeightingConfig,
        sampling: SamplingConfig,
        track_text: bool = True,
    ) -> Iterator[tuple[list[_Row], list[FusionReport]]]:
        """Generator over decode steps: yields the rows' state after the prefill and after every step.

        ``track_text=False`` (with no stop sequences) leaves ``row.text`` empty: the caller decodes once.
        Every step costs the active members' cached forwards, the mix, and one host transfer (the chosen
        ids and the NaN flags together); the prompt ids are extended only for logits processors that
        read them, and the attention mask and position ids only when some prompt is padded.
        """
        track_text = track_text or bool(sampling.stop)
        state = self._prefill(prompts, weighting, reserve=sampling.max_new_tokens)
        limit = self.max_length
        rows = [_Row(budget=None if limit is None else limit - r.prompt_tokens) for r in state.reports]
        if sampling.max_new_tokens == 0:
            yield rows, state.reports
            return
        if self.alignment == "none":
            eos = self._eos()
        else:
            eos = self._eos(self._ref)
        processors = sampling.processors()
        generator = None
        if sampling.temperature > 0 and sampling.seed is not None:
            generator = torch.Generator(device=self.mix_device).manual_seed(int(sampling.seed))
        sequences = state.input_ids  # (B, L + t), kept up to date only when processors read it
        mask, positions = state.attention_mask, state.next_positions
        scores = state.last_scores
        ones = None if mask is None else torch.ones_like(mask[:, :1])
        for step in range(sampling.max_new_tokens):
            next_ids, tokens = self._choose(processors, sequences, state.mixer, scores, sampling, generator)
            for row, tok in zip(rows, tokens):
                if not row.done:
                    self._advance(row, tok, eos, sampling.stop, track_text)
            yield (
                rows,
                state.reports,
            )  # no grad-mode context spans this: a stream may resume on another thread
            if all(r.done for r in rows) or step == sampling.max_new_tokens - 1:
                return
            ids = next_ids[:, None]  # (B, 1)
            if processors:
                sequences = torch.cat([sequences, ids], dim=1)
            if mask is not None:
                mask = torch.cat([mask, ones], dim=1)
            scores = self._step(ids, mask, positions, state.caches, state.mixer.active)
            if positions is not None:
                positions = positions + 1

    @torch.inference_mode()
    def _choose(
        self, processors, sequences, mixer: _Mixer, scores, sampling: SamplingConfig, generator
    ) -> tuple[torch.Tensor, list[int]]:
        """Mix (Eq. 1), apply the logits processors, then argmax or sample: the next token of every row,
        ``(B,)`` on the mix device and as a list. The ids come back to the host in one transfer together
        with each row's top score, which is NaN or +inf exactly when a member's scores held NaN or +inf
        (then this raises, naming the member).

        Logits processors see the fused log-probs ``log_softmax(sum_k w_k s_k)``; greedy decoding without
        processors takes the argmax of ``sum_k w_k s_k`` directly (the same token: the log-softmax only
        shifts each row).
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
        exact = fused.dtype if self.vocab_size < 2**24 else torch.float64  # ids as floats, exactly
        values = torch.cat([next_ids.to(exact), top.to(exact)]).tolist()
        if any(math.isnan(v) or v == math.inf for v in values[B:]):
            self._raise_nan(scores)
        return next_ids, [int(v) for v in values[:B]]

    def _raise_nan(self, scores: Sequence[torch.Tensor | None]) -> None:
        for m, s in zip(self.members, scores):
            if s is not None and bool((s.isnan() | s.isposinf()).any()):
                raise FloatingPointError(
                    f"Member {m.name!r} produced NaN logits; check its weights and dtype (float16 overflow "
                    "is a common cause: try torch_dtype='bfloat16' or 'float32')."
                )
        raise FloatingPointError("The fused scores are NaN; check the members' weights and dtypes.")

    def _advance(
        self, row: _Row, token: int, eos: set[int], stop: tuple[str, ...], track_text: bool = True
    ) -> None:
        if token in eos:
            row.done, row.finish_reason = True, "stop"
            return
        row.ids.append(token)
        if row.budget is not None and len(row.ids) >= row.budget:
            row.done = True  # the context is full: finish_reason stays "length"
        if not track_text:
            return
        row.text = self.decode(row.ids)
        cut = min((i for i in (row.text.find(s) for s in stop) if i >= 0), default=-1)
        if cut >= 0:
            row.text = row.text[:cut]
            row.done, row.finish_reason = True, "stop"

    def generate(
        self,
        prompts: Sequence[str],
        weighting: WeightingConfig | None = None,
        sampling: SamplingConfig | None = None,
    ) -> list[FusionOutput]:
        """Decode a batch of prompts together, each with its own weights."""
        if isinstance(prompts, str):
            raise TypeError("generate() takes a list of prompts; wrap a single prompt in a list.")
        prompts = list(prompts)
        if not prompts:
            return []
        weighting, sampling = weighting or WeightingConfig(), sampling or SamplingConfig()
        outputs: list[FusionOutput | None] = [None] * len(prompts)
        with self._lock:
            for ref, (indices, bpbs) in self._by_reference(prompts).items():
                with self._reference(ref):
                    group = [prompts[i] for i in indices]
                    # run to the last step; text is decoded once at the end unless stop sequences need it
                    if self.alignment == "prefix":  # one prompt at a time: each member follows its text
                        steps = [list(self._decode_prefix([p], weighting, sampling))[-1] for p in group]
                        rows = [r for rs, _ in steps for r in rs]
                        reports = [rep for _, reps in steps for rep in reps]
                    else:
                        *_, (rows, reports) = self._decode(group, weighting, sampling, track_text=False)
                    for i, r, rep, bpb in zip(indices, rows, reports, bpbs):
                        if bpb is not None:
                            rep.bits_per_byte = dict(zip(self.names, bpb))
                        text = r.text if sampling.stop else self.decode(r.ids)
                        outputs[i] = FusionOutput(text, list(r.ids), r.finish_reason, rep)
        return outputs

    def stream(
        self,
        prompt: str,
        weighting: WeightingConfig | None = None,
        sampling: SamplingConfig | None = None,
    ) -> Iterator[StreamChunk]:
        """Stream one prompt's text. Chunks never split a UTF-8 character nor show part of a stop sequence;
        they concatenate to ``generate([prompt])[0].text``. The last chunk carries the full output."""
        weighting, sampling = weighting or WeightingConfig(), sampling or SamplingConfig()
        with self._lock:
            ref, bpb = self._reference_for(prompt)
            with self._reference(ref):
                decode = self._decode_prefix if self.alignment == "prefix" else self._decode
                for rows, reports in decode([prompt], weighting, sampling):  # noqa: B007
                    row = rows[0]
                    if row.done:
                        break
                    safe = _safe_prefix_length(row.text, sampling.stop)
                    if safe > row.emitted:
                        yield StreamChunk(row.text[row.emitted : safe])
                        row.emitted = safe
        if bpb is not None:
            reports[0].bits_per_byte = dict(zip(self.names, bpb))
        output = FusionOutput(row.text, list(row.ids), row.finish_reason, reports[0])
        yield StreamChunk(row.text[row.emitted :], output=output)

    # ------------------------------------------------------------------ scoring

    def loglikelihood(
        self, requests: Sequence[tuple[str, str]], weighting: WeightingConfig | None = None
    ) -> list[LoglikelihoodResult]:
        """Log-likelihood of each ``continuation`` given its ``context`` under the fused model, with the
        weights solved on the context alone (lm-evaluation-harness ``loglikelihood`` semantics)."""
        weighting = weighting or WeightingConfig()
        results = []
        with self._lock:
            for context, continuation in requests:
                ref, bpb = self._reference_for(context)
                with self._reference(ref):
                    results.append(self._loglikelihood_one(context, continuation, weighting, bpb))
        return results

    def _loglikelihood_one(
        self, context: str, continuation: str, weighting: WeightingConfig, bpb: list[float] | None
    ) -> LoglikelihoodResult:
        ctx_ids = self.encode(context) or [self._start_token()]
        n_ctx = len(ctx_ids)
        whole = self.encode(context + continuation) if context else []
        if whole[:n_ctx] != ctx_ids:  # empty context, or tokenisation merged across the boundary
            whole = ctx_ids + list(self.tokenizer(continuation, add_special_tokens=False)["input_ids"])
        if len(whole) == n_ctx:
            raise ValueError(f"Continuation {continuation!r} encodes to no tokens; it has no likelihood.")
        limit = self.max_length
        if limit is not None and len(whole) > limit:
            raise ValueError(
                f"Context plus continuation is {len(whole)} tokens, longer than the members' context "
                f"({limit}); shorten the context."
            )
        scores, input_ids, _, _, _ = self._prefill_scores([whole], use_cache=False)
        lp = scores[:, 0]  # (K, L, V) raw logits: the fused log-softmax below normalises
        ids = input_ids[0]
        fallback = None if context else "empty context: uniform weights"
        w, report = self._solve(lp[:, : n_ctx - 1], ids[1:n_ctx], weighting, fallback)
        report.prompt_tokens = n_ctx
        self._note_alignment(report, ids[:n_ctx], bpb)
        fused = torch.einsum("k,ktv->tv", w.to(lp), lp[:, n_ctx - 1 : -1])  # (C, V)
        fused = torch.log_softmax(fused.double(), dim=-1)
        cont = ids[n_ctx:]
        logprob = float(fused.gather(-1, cont.view(-1, 1)).sum())
        is_greedy = bool((fused.argmax(-1) == cont).all())
        self._recycle(scores)
        return LoglikelihoodResult(logprob, is_greedy, report)


@dataclass
class _TokenMap:
    """A member's view of the reference vocabulary: ``ids[r]`` is its token for reference token r (MinED);
    ``approx[r]`` says the match was not exact."""

    ids: torch.Tensor  # (V_ref,) long, on the member's device
    approx: torch.Tensor  # (V_ref,) bool, on the mix device


@dataclass
class _LinearHead:
    base: torch.nn.Module  # the model without its output layer: ``base(...).last_hidden_state``
    weight: torch.Tensor  # (V, H)
    bias: torch.Tensor | None


@torch.inference_mode()
def _linear_head(member: Member) -> _LinearHead | None:
    """See :meth:`FusionEngine._linear_head`: the check runs the model and its base on four tokens."""
    model = member.model
    base = getattr(model, getattr(model, "base_model_prefix", "") or "", None)
    head = model.get_output_embeddings()
    if not isinstance(base, torch.nn.Module) or base is model or type(head) is not torch.nn.Linear:
        return None
    ids = torch.arange(1, 5, device=member.device)[None] % head.weight.shape[0]
    try:
        want = model(input_ids=ids, use_cache=False).logits
        got = torch.nn.functional.linear(
            base(input_ids=ids, use_cache=False).last_hidden_state, head.weight, head.bias
        )
    except Exception:  # noqa: BLE001 - any model that does not fit the pattern keeps its own forward
        return None
    tol = 1e-5 if want.dtype in (torch.float32, torch.float64) else 1e-2
    if got.shape != want.shape or not torch.allclose(got.float(), want.float(), rtol=tol, atol=tol):
        return None
    return _LinearHead(base, head.weight, head.bias)


def _mm_upcast(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """``out = h @ weight.T + bias`` for half-precision ``h`` and ``weight`` and a float32 ``out``: on CUDA
    one matrix product with float32 output (``torch.mm(..., out_dtype=)``), elsewhere the product in the
    members' dtype copied into ``out``."""
    if h.is_cuda:
        try:
            torch.mm(h, weight.T, out_dtype=out.dtype, out=out)
        except (RuntimeError, TypeError):
            pass
        else:
            if bias is not None:
                out += bias
            return
    out.copy_(torch.nn.functional.linear(h, weight, bias))


def _is_padded(batch: Sequence[Sequence[int]]) -> bool:
    """Whether left-padding a batch of token-id lists pads any row (their lengths differ)."""
    return len({len(ids) for ids in batch}) > 1


def _check_model_fits_tokenizer(m: Member) -> None:
    top = max(m.tokenizer.get_vocab().values(), default=-1)
    if m.vocab_size <= top:
        raise ValueError(
            f"Member {m.name!r} has {m.vocab_size} output logits but its tokenizer has token id {top}; "
            "the model and tokenizer do not match."
        )


def _device_groups(members: Sequence[Member]) -> list[list[int]]:
    """Member indices grouped by device, accelerators first (their work queues while the CPU computes)."""
    groups: dict[torch.device, list[int]] = {}
    for k, m in enumerate(members):
        groups.setdefault(m.device, []).append(k)
    return sorted(groups.values(), key=lambda g: members[g[0]].device.type == "cpu")


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
