"""Whose tokenizer a call reads: the reference member, its token maps, and the plan of one call.

A pack whose members share a vocabulary reads every prompt with that vocabulary (member 0's tokenizer).
A pack of mixed vocabularies picks a reference member per prompt, the one with the lowest bits per byte on
the prompt (each member scoring its own tokenization: comparable across tokenizers, unlike per-token
perplexity); the other members read the reference tokens through token maps (MinED, paper section 3.4) or
follow the text with their own tokens (prefix alignment).

Everything a call decides travels in a :class:`Plan` (the :class:`Reference` view, the prompt ids, what was
truncated), handed to whatever renders, constrains, decodes or stops; nothing of it is stored on the engine,
so concurrent calls whose prompts pick different references never see each other's choice.

Example::

    >>> plan = engine.plan(["def main("], reserve=16)[0]
    >>> plan.reference.name, plan.reference.vocab_size, plan.ids
"""

from __future__ import annotations

import math
import re
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from langchain_packllm.members import Member

ALIGNMENTS = ("auto", "mined", "own-prompt", "prefix", "none")

# (member index, its own ids) -> (its raw scores (1, n, V), its KV cache): Scorer.prefill_member
Reader = Callable[[int, list[int]], tuple[torch.Tensor, Any]]


@dataclass(frozen=True)
class TokenMap:
    """A member's view of the reference vocabulary: ``ids[r]`` is its token for reference token r (MinED);
    ``approx[r]`` says the match was not exact.

    Each member reads a prompt with its own beginning-of-text convention, whatever the reference's:
    ``lead`` is the member's BOS id, put before the prompt when the member's tokenizer adds one and the
    reference's adds none; ``hide`` is the reference's BOS id, which a member whose tokenizer adds no BOS
    never reads (it is masked out of that member's forward, and the member has no prediction for the
    first text token). When both add one, ``ids`` maps the reference's BOS to the member's.

    ``split[r] = -log n``, where n reference tokens share r's image ``ids[r]``, is added to the member's
    gathered logits: each member token's probability is divided among the reference tokens that read it,
    so the member's distribution over the reference vocabulary still sums to one. (The paper's plain
    gather counts a member token once per reference token mapped onto it: a member reading exactly the
    reference's tokens scored a prompt perplexity 15x its own on the real pack.)"""

    ids: torch.Tensor  # (V_ref,) long, on the member's device
    approx: torch.Tensor  # (V_ref,) bool, on the mix device
    lead: int | None = None  # member id prepended to every prompt
    hide: int | None = None  # reference id masked out at the start of a prompt
    split: torch.Tensor | None = None  # (V_ref,) float on the member's device; None when no image is shared


@dataclass(frozen=True)
class Reference:
    """A call's reading of the pack through member ``index``'s tokenizer: its vocabulary width, its EOS ids,
    and how every member reads and writes that vocabulary (``token_maps[k]``: None when member k shares it
    or reads its own tokens). Immutable and shared by every call with this reference."""

    index: int
    name: str
    tokenizer: Any
    vocab_size: int  # width of the fused scores: the reference tokenizer's size (shared packs: the narrowest)
    eos_ids: frozenset[int]  # the ids that end a generation
    alignment: str  # "none", "mined" or "prefix"
    token_maps: tuple[TokenMap | None, ...]
    aligners: tuple[Any, ...] | None  # prefix mode: PrefixAligner (member k -> reference) per member
    byte_ids: frozenset[int] = frozenset()  # byte-fallback tokens (<0xNN>): their text depends on the next
    # alignment="own-prompt": every member reads the prompt with its own tokens (the reference choice's
    # forwards), new tokens through the MinED maps; prompts are decoded one at a time
    own_prompt: bool = False

    def stable_text_length(self, ids: Sequence[int]) -> int:
        """How much of ``decode(ids)`` later tokens cannot change: all of it, except the text of a trailing
        run of byte-fallback tokens (a tokenizer with byte fallback decodes a run of byte tokens that is not
        valid UTF-8 as U+FFFD for every byte, so ``<0x36>`` reads "6" until an invalid byte follows it)."""
        j = len(ids)
        while j > 0 and ids[j - 1] in self.byte_ids:
            j -= 1
        return len(self.decode(ids[:j])) if j < len(ids) else len(self.decode(ids))

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt (with the tokenizer's special tokens, e.g. BOS, never twice)."""
        return encode_prompt(self.tokenizer, text)

    def decode(self, ids: Sequence[int]) -> str:
        return decode_ids(self.tokenizer, ids)

    def start_token(self) -> int:
        """The token an empty prompt starts from: BOS, else EOS."""
        tok = self.tokenizer
        for tid in (tok.bos_token_id, tok.eos_token_id):
            if tid is not None:
                return int(tid)
        raise ValueError(
            f"The prompt is empty and {self.name!r}'s tokenizer has neither a BOS nor an EOS token to start "
            "from; pass a non-empty prompt."
        )

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return self.start_token() if pad is None else int(pad)

    @property
    def leads(self) -> bool:
        """Whether some member reads one more token than the reference (its own BOS before the prompt)."""
        return any(m is not None and m.lead is not None for m in self.token_maps)

    @property
    def hides(self) -> bool:
        """Whether some member does not read the reference's BOS (and so cannot predict the first token)."""
        return any(m is not None and m.hide is not None for m in self.token_maps)

    def hides_start(self, ids: Sequence[int]) -> bool:
        """Whether a prompt's first id is a BOS that some member does not read (prompts of 2+ tokens)."""
        return len(ids) >= 2 and any(
            m is not None and m.hide is not None and ids[0] == m.hide for m in self.token_maps
        )

    def approx_count(self, ids: torch.Tensor) -> int:
        """How many of these reference ids some member reads through an inexact (MinED) map."""
        approx = torch.zeros_like(ids, dtype=torch.bool)
        for token_map in self.token_maps:
            if token_map is not None:
                approx |= token_map.approx.to(ids.device)[ids]
        return int(approx.sum())


def added_bos(tokenizer: Any) -> int | None:
    """The id a tokenizer puts before every text it encodes (Gemma's and Llama's ``<bos>``), or None when it
    adds none (GPT-2, SmolLM2, Qwen: their ``bos_token`` is a role, not a prefix)."""
    probe = "a"
    with_specials = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and with_specials[:1] == [bos] and plain[:1] != [bos]:
        return int(bos)
    return None


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a prompt with the tokenizer's special tokens (e.g. BOS), never BOS twice."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:2] == [bos, bos]:  # the text (e.g. a chat template) already had BOS
        ids = ids[1:]
    return ids


def decode_ids(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


@dataclass(frozen=True)
class Plan:
    """One call's decisions for a group of prompts read with the same reference, made before anything is
    rendered, constrained or decoded: the reference, each prompt's ids (fitted to the context), whether it
    was truncated, why it fell back, and each member's bits per byte (mixed packs)."""

    reference: Reference
    prompts: tuple[str, ...]
    ids: tuple[tuple[int, ...], ...]  # per prompt: the reference ids fed to the members
    truncated: tuple[bool, ...]
    fallbacks: tuple[str | None, ...]
    bits_per_byte: tuple[tuple[float, ...] | None, ...]
    reserve: int = 0  # new tokens kept free in the context
    readings: tuple[Reading | None, ...] = ()  # per prompt: the reference's forward made by the choice

    def __len__(self) -> int:
        return len(self.prompts)

    def given_scores(self) -> list[tuple[torch.Tensor, Any] | None] | None:
        """Per member, the raw scores ``(1, L, V)`` and KV cache the prefill can take instead of running
        that member again: the reference choice's forward of the reference member, when the plan holds one
        prompt whose ids are exactly what that forward read. Each forward is handed out once (decoding
        writes into its cache): a plan decoded twice runs the member the second time."""
        if len(self.prompts) != 1 or not self.readings or self.readings[0] is None:
            return None
        taken = self.readings[0].take(self.reference.index, tuple(self.ids[0]))
        if taken is None:
            return None
        given: list[tuple[torch.Tensor, Any] | None] = [None] * len(self.reference.token_maps)
        given[self.reference.index] = taken
        return given

    def given_own(self, ids: Sequence[Sequence[int]]) -> list[tuple[torch.Tensor, Any] | None]:
        """Under ``alignment="own-prompt"``: per member, the reference choice's forward ``(scores (1, n, V_k),
        cache)`` when it read exactly ``ids[k]`` (the member's own ids of the prompt), else None. Handed out
        once, as :meth:`given_scores`."""
        if len(self.prompts) != 1 or not self.readings or self.readings[0] is None:
            return [None] * len(ids)
        return [self.readings[0].take(k, tuple(own)) for k, own in enumerate(ids)]

    def given_texts(self, text: str) -> list[Any] | None:
        """Under ``alignment="prefix"``: per member, the choice's forward over its own tokens of ``text``
        (a :class:`~langchain_packllm.bytealign.TextReading`), when the plan holds one prompt and the choice
        read exactly ``text``; None otherwise. Handed out once, as :meth:`given_scores`."""
        if len(self.prompts) != 1 or not self.readings or self.readings[0] is None:
            return None
        taken = [self.readings[0].take(k, text) for k in range(len(self.reference.token_maps))]
        return taken if all(t is not None for t in taken) else None


class Reading:
    """The forwards the reference choice ran on one prompt, kept for the prefill so that a call runs each
    member over the prompt once: per member, what it read (a key: its ids, or the text) and the forward
    (``alignment="mined"``: the chosen member's raw scores ``(1, n, V)`` and KV cache; ``"prefix"``: every
    member's :class:`~langchain_packllm.bytealign.TextReading`). Per call, never shared; :meth:`take` hands
    each member's out once."""

    def __init__(self, forwards: dict[int, tuple[Any, Any]]):
        self._held = dict(forwards)  # member -> (key, forward)
        self._lock = threading.Lock()

    def take(self, index: int, key: Any) -> Any | None:
        """Member ``index``'s forward if it read ``key`` and was not taken yet; else None (the caller runs
        the forward)."""
        with self._lock:
            held = self._held.get(index)
            if held is None or held[0] != key:
                return None
            del self._held[index]
            return held[1]


class ReferencePolicy:
    """Chooses the reference member of a prompt and builds (once, thread-safely) the token maps and
    aligners a reference needs. Holds no per-call state: only caches of immutable objects."""

    def __init__(self, members: Sequence[Member], alignment: str, mix_device: torch.device):
        if alignment not in ALIGNMENTS:
            raise ValueError(
                f"alignment must be 'auto', 'mined', 'own-prompt', 'prefix' or 'none'; got {alignment!r}."
            )
        self.members = list(members)
        self.mix_device = mix_device
        mismatch = _first_vocabulary_mismatch(self.members)
        if mismatch is not None and alignment == "none":
            a, b = mismatch
            raise ValueError(
                f"Members {a!r} and {b!r} have different vocabularies and alignment='none'; use "
                "alignment='mined' to fuse them through token maps."
            )
        if alignment in ("mined", "own-prompt", "prefix"):
            self.alignment = alignment
        else:
            self.alignment = "mined" if alignment == "auto" and mismatch else "none"
        # what the references say (Reference.alignment): own-prompt reads new tokens through MinED maps
        self._mode = "mined" if self.alignment == "own-prompt" else self.alignment
        self._eos = [frozenset(m.eos_token_ids) for m in self.members]
        self._references: dict[int, Reference] = {}
        self._own: dict[int, Reference] = {}  # member index -> its own view (ReferencePolicy.own)
        self._surfaces: dict[int, Any] = {}  # member index -> its TokenizerSurfaces (immutable)
        self._lock = threading.RLock()  # guards the caches while a map is built

    # ------------------------------------------------------------------ references

    def reference(self, index: int) -> Reference:
        """The (cached) :class:`Reference` of member ``index`` (always 0 in a pack of one vocabulary)."""
        if self.alignment == "none":
            index = 0
        if not 0 <= index < len(self.members):
            raise IndexError(f"No member {index}; the pack has {len(self.members)}.")
        ref = self._references.get(index)
        if ref is None:
            with self._lock:
                ref = self._references.get(index) or self._build_reference(index)
                self._references[index] = ref
        return ref

    def _build_reference(self, index: int) -> Reference:
        member = self.members[index]
        K = len(self.members)
        byte_ids = _byte_fallback_ids(member.tokenizer)
        if self.alignment == "none":
            vocab = min(m.vocab_size for m in self.members)
            eos = frozenset().union(*self._eos)
            return Reference(
                index, member.name, member.tokenizer, vocab, eos, "none", (None,) * K, None, byte_ids
            )
        vocab = len(member.tokenizer)
        maps: list[TokenMap | None] = [None] * K
        aligners = None
        if self.alignment in ("mined", "own-prompt"):
            from langchain_packllm.alignment import MinEDMap

            ref_bos = added_bos(member.tokenizer)
            for k, other in enumerate(self.members):
                if k != index:
                    mined = MinEDMap.from_tokenizers(self.surfaces(index), self.surfaces(k))
                    approx = ~torch.as_tensor(mined.exact).to(self.mix_device)
                    ids, own_bos = mined.ids_on(other.device), added_bos(other.tokenizer)
                    if ref_bos is not None and own_bos is not None and int(ids[ref_bos]) != own_bos:
                        ids = ids.clone()
                        ids[ref_bos] = own_bos
                    lead = own_bos if ref_bos is None else None
                    hide = ref_bos if own_bos is None else None
                    shared = torch.bincount(ids, minlength=mined.dst_vocab_size)[ids]  # (V_ref,)
                    split = -torch.log(shared.double()).float() if bool((shared > 1).any()) else None
                    maps[k] = TokenMap(ids, approx, lead=lead, hide=hide, split=split)
        else:
            from langchain_packllm.bytealign import PrefixAligner

            aligners = tuple(PrefixAligner(m.tokenizer, member.tokenizer) for m in self.members)
        return Reference(index, member.name, member.tokenizer, vocab, self._eos[index], self._mode, tuple(maps),
                         aligners, byte_ids, own_prompt=self.alignment == "own-prompt")  # fmt: skip

    def surfaces(self, index: int):
        """Member ``index``'s :class:`~langchain_packllm.alignment.TokenizerSurfaces`, computed once and
        shared by every map that reads or writes its vocabulary."""
        found = self._surfaces.get(index)
        if found is None:
            from langchain_packllm.alignment import tokenizer_surfaces

            with self._lock:
                found = self._surfaces.get(index) or tokenizer_surfaces(self.members[index].tokenizer)
                self._surfaces[index] = found
        return found

    def prepare(self, progress: bool = True) -> None:
        """Build (or load from the disk cache) what every possible reference needs, now: with MinED, the
        ``K * (K - 1)`` directed maps (each build searches on all cores); nothing for a shared vocabulary."""
        if self.alignment == "none":
            self.reference(0)
            return
        from tqdm.auto import tqdm

        with tqdm(
            range(len(self.members)),
            desc=f"{self.alignment} alignment",
            unit="ref",
            disable=not progress,
            delay=1.0,
        ) as bar:
            for index in bar:
                bar.set_postfix_str(self.members[index].name)
                self.reference(index)

    # ------------------------------------------------------------------ the choice

    def choose(self, text: str) -> tuple[Reference, tuple[float, ...] | None]:
        """The reference for a prompt, and each member's bits per byte on it (None without alignment)."""
        ref, bpb, _ = self.choose_and_read(text)
        return ref, bpb

    def choose_and_read(
        self, text: str, read: Reader | None = None
    ) -> tuple[Reference, tuple[float, ...] | None, Reading | None]:
        """:meth:`choose`, keeping the forwards for the prefill (see :meth:`plan`): with MinED, each member
        runs through ``read`` (``read(k, ids) -> (scores (1, n, V), cache)``) and the chosen member's forward
        is kept; with prefix alignment every member reads its own tokens of the text as it will while
        decoding (``bytealign.read_text``), the bits per byte come from those forwards, and all are kept."""
        if self.alignment == "none":
            return self.reference(0), None, None
        if self.alignment == "prefix" and text:
            from langchain_packllm import bytealign

            encs = [
                bytealign.encode_text(m.tokenizer, text, self.surfaces(k)) for k, m in enumerate(self.members)
            ]
            if all(m.max_length is None or len(e.ids) <= m.max_length for m, e in zip(self.members, encs)):
                readings = [
                    bytealign.read_text(m.model, e, self.surfaces(k).vocab_size, use_cache=read is not None)
                    for k, (m, e) in enumerate(zip(self.members, encs))
                ]
                bpb = tuple(bytealign.bits_per_byte_of(readings))
                kept = Reading({k: (text, r) for k, r in enumerate(readings)}) if read is not None else None
                return self.reference(_lowest(bpb)), bpb, kept
        forwards: dict[int, tuple[Any, Any]] = {}
        forward = None
        keep_all = self.alignment == "own-prompt"  # every member's forward is its prompt reading
        if read is not None and self.alignment in ("mined", "own-prompt"):

            def forward(k: int, ids: list[int]) -> torch.Tensor:
                scores, cache = read(k, ids)
                forwards[k] = (tuple(ids), (scores, cache))
                return scores[0]

        values: list[float] = []
        for value in iter_bits_per_byte(self.members, text, forward):
            values.append(value)
            if not keep_all:  # MinED keeps only the best forward so far: at most two are held at once
                best = _lowest(values)
                for k in [k for k in forwards if k != best]:
                    del forwards[k]
        bpb = tuple(values)
        index = _lowest(bpb)
        kept = Reading(forwards) if forwards else None  # MinED: the chosen member's forward alone
        return self.reference(index), bpb, kept

    def own(self, index: int) -> Reference:
        """Member ``index`` reading its own vocabulary with no other member (the view the reference
        choice's forward runs with): no token maps, so nothing is built. Cached."""
        ref = self._own.get(index)
        if ref is None:
            member = self.members[index]
            K = len(self.members)
            ref = Reference(index, member.name, member.tokenizer, len(member.tokenizer), self._eos[index],
                            self._mode, (None,) * K, None, _byte_fallback_ids(member.tokenizer))  # fmt: skip
            with self._lock:
                ref = self._own.setdefault(index, ref)
        return ref

    def plan(
        self,
        prompts: Sequence[str],
        reserve: int,
        max_length: int | None,
        reference: Reference | None = None,
        read: Reader | None = None,
    ) -> list[tuple[list[int], Plan]]:
        """Plans for ``prompts``: ``[(indices into prompts, plan)]``, one per reference (in order of first
        appearance); with ``reference`` given, one plan reading every prompt with it.

        ``read`` (the engine's :meth:`~langchain_packllm.scoring.Scorer.prefill_member`): for a call of one
        prompt, the choice runs each member through it and the plan keeps the chosen member's forward
        (:attr:`Plan.readings`), so the prefill does not run the reference member again. Calls of several
        prompts keep none (their rows are padded together, and K forwards per prompt would be held)."""
        if len(prompts) != 1:
            read = None
        groups: dict[int, tuple[list[int], list]] = {}
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"Prompts must be strings; prompt {i} is {type(prompt).__name__}.")
            if reference is None:
                ref, bpb, reading = self.choose_and_read(prompt, read)
            else:
                ref, bpb, reading = reference, None, None
            indices, rows = groups.setdefault(ref.index, ([], []))
            indices.append(i)
            rows.append((prompt, bpb, ref, reading))
        out = []
        for indices, rows in groups.values():
            ref = rows[0][2]
            limit = max_length - 1 if max_length is not None and ref.leads else max_length
            if ref.own_prompt:  # every member reads its own tokens: the prefill keeps the text's tail
                limit = None
            fitted = [fit(ref, ref.encode(row[0]), reserve, limit) for row in rows]
            plan = Plan(
                reference=ref,
                prompts=tuple(row[0] for row in rows),
                ids=tuple(tuple(ids) for ids, _, _ in fitted),
                truncated=tuple(t for _, t, _ in fitted),
                fallbacks=tuple(f for _, _, f in fitted),
                bits_per_byte=tuple(row[1] for row in rows),
                reserve=reserve,
                readings=tuple(row[3] for row in rows),
            )
            out.append((indices, plan))
        return out


def _lowest(bpb: Sequence[float]) -> int:
    """The member with the lowest finite bits per byte (member 0 when none is finite)."""
    finite = [(v, k) for k, v in enumerate(bpb) if math.isfinite(v)]
    return min(finite)[1] if finite else 0


def fit(
    ref: Reference, ids: list[int], reserve: int, limit: int | None
) -> tuple[list[int], bool, str | None]:
    """Make a prompt decodable: a start token if empty, its tail if it does not fit the context.

    The prompt keeps at least half the shortest member context; ``reserve`` new tokens get the rest
    (generation then stops at the context limit with ``finish_reason == "length"``).
    """
    fallback = None
    if not ids:
        ids = [ref.start_token()]
        fallback = "empty prompt: decoding from the start token with uniform weights"
    truncated = False
    if limit is not None:
        room = limit - min(reserve, limit // 2)
        if len(ids) > room:
            warnings.warn(
                f"Prompt of {len(ids)} tokens does not fit the members' context ({limit} tokens) with "
                f"max_new_tokens={reserve}; keeping its last {room} tokens.",
                stacklevel=5,
            )
            ids, truncated = ids[-room:], True
    return ids, truncated, fallback


def bits_per_byte(
    members: Sequence[Member], text: str, forward: Callable[[int, list[int]], torch.Tensor] | None = None
) -> list[float]:
    """Each member's bits per byte on ``text``, scoring its own tokenization (comparable across tokenizers,
    unlike per-token perplexity). NaN where the text has fewer than 2 tokens.

    Every member is scored on the same bytes: those after the longest first text token among the
    members (a member whose tokenizer adds no BOS cannot predict its first token, so no member's score
    includes it), from the first of its own token boundaries there. A text longer than a member's context
    is scored on its last tokens that fit (and the bytes they cover).

    ``forward(k, ids)``: member k's raw logits ``(n, V)`` on its ids (default: the model's forward)."""
    return list(iter_bits_per_byte(members, text, forward))


@torch.inference_mode()
def iter_bits_per_byte(
    members: Sequence[Member], text: str, forward: Callable[[int, list[int]], torch.Tensor] | None = None
) -> Iterator[float]:
    """:func:`bits_per_byte`, member by member (a caller keeping forwards can drop them as it goes)."""
    run = forward or (lambda k, ids: _own_logits(members[k], ids))
    encoded = [_encode_with_offsets(m.tokenizer, text) for m in members]
    firsts = [next((end for start, end in offsets if end > start), 0) for _, offsets in encoded]
    skip = max(firsts, default=0)  # bytes no member is scored on
    total = len(text.encode("utf-8"))
    for k, (m, (ids, offsets)) in enumerate(zip(members, encoded, strict=True)):
        limit = m.max_length
        logits = lambda ids, k=k: run(k, ids)  # noqa: E731
        if offsets is None or (limit is not None and len(ids) > limit):
            yield _bits_per_byte_own_span(m, text, logits)
            continue
        # the first token that starts at or after `skip` (a text token); all tokens from there are scored
        start = next((i for i, (a, b) in enumerate(offsets) if b > a and a >= skip), None)
        if start is None or start == 0:
            yield float("nan") if start is None else _bits_per_byte_own_span(m, text, logits)
            continue
        yield _bits_from(m, ids, start, total - offsets[start][0], logits)


def _encode_with_offsets(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
    """Ids with special tokens (as :func:`encode_prompt`: never BOS twice), and each token's (start, end)
    in UTF-8 bytes of ``text`` (None without a fast tokenizer)."""
    try:
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):
        return encode_prompt(tokenizer, text), None
    byte_at = [0]
    for ch in text:
        byte_at.append(byte_at[-1] + len(ch.encode("utf-8")))
    ids, offsets = list(enc["input_ids"]), [(byte_at[a], byte_at[b]) for a, b in enc["offset_mapping"]]
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:2] == [bos, bos]:  # the text (e.g. a chat template) already had BOS
        ids, offsets = ids[1:], offsets[1:]
    return ids, offsets


@dataclass(frozen=True)
class PromptTokens:
    """A member's own tokens of a prompt (``alignment="own-prompt"``) and where the text read so far ends
    after each: ``ends[j]`` is a byte offset into the prompt when token ``j`` ends at a character boundary
    that no later token starts before (the last of a run of byte-fallback pieces of one character), else
    -1. Special tokens before the text end at 0."""

    ids: tuple[int, ...]
    ends: tuple[int, ...]


def prompt_tokens(tokenizer: Any, text: str, start_token: Callable[[], int]) -> PromptTokens:
    """``tokenizer``'s reading of a prompt (:func:`encode_prompt`; ``[start_token()]`` when that is empty)
    and its token ends (see :class:`PromptTokens`). Needs a fast tokenizer (offsets)."""
    ids, offsets = _encode_with_offsets(tokenizer, text)
    if offsets is None:
        raise ValueError(
            f"alignment='own-prompt' needs fast tokenizers (token offsets); "
            f"{getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)!r} has none. Use alignment='mined'."
        )
    if not ids:
        return PromptTokens((int(start_token()),), (0,))
    ends = []
    for j, (_, end) in enumerate(offsets):
        following = offsets[j + 1][0] if j + 1 < len(offsets) else None
        ends.append(end if following is None or following >= end else -1)
    return PromptTokens(tuple(int(i) for i in ids), tuple(ends))


def common_rows(tokens: Sequence[PromptTokens], ref: int) -> tuple[list[int], list[list[int]]]:
    """The prompt positions every member has read up to (``alignment="own-prompt"``): the reference
    positions ``i`` (each with a next token to predict) where the text read so far ends at the same byte
    for every member, and per member the index of its row there (its last token ending at that byte).
    Returns ``(positions, rows)`` with ``rows[ref] == positions``."""
    at = [{e: j for j, e in enumerate(t.ends) if e >= 0} for t in tokens]
    positions: list[int] = []
    rows: list[list[int]] = [[] for _ in tokens]
    ref_ends = tokens[ref].ends
    for i in range(len(ref_ends) - 1):
        e = ref_ends[i]
        if e < 0 or at[ref].get(e) != i:
            continue
        found = [at[k].get(e) for k in range(len(tokens))]
        if any(j is None for j in found):
            continue
        positions.append(i)
        for k, j in enumerate(found):
            rows[k].append(j)  # type: ignore[arg-type]
    return positions, rows


def _bits_per_byte_own_span(m: Member, text: str, logits: Callable[[list[int]], torch.Tensor]) -> float:
    """A member's bits per byte on its own span (every token after its first), for a text longer than its
    context (its last tokens that fit) or a tokenizer without offsets."""
    ids = list(m.tokenizer(text, add_special_tokens=True)["input_ids"])
    limit = m.max_length
    if limit is not None and len(ids) > limit:
        ids = ids[-limit:]
        covered = m.tokenizer.decode(ids, skip_special_tokens=True)
    else:
        covered = text
    first = m.tokenizer.decode(ids[:1], skip_special_tokens=True) if ids else ""
    n_bytes = len(covered.encode("utf-8")) - len(first.encode("utf-8"))
    return _bits_from(m, ids, 1, n_bytes, logits) if len(ids) >= 2 else float("nan")


def _own_logits(m: Member, ids: list[int]) -> torch.Tensor:
    return m.model(input_ids=torch.tensor([ids], device=m.device)).logits[0]


def _bits_from(
    m: Member, ids: list[int], start: int, n_bytes: int, logits: Callable[[list[int]], torch.Tensor]
) -> float:
    """Member ``m``'s bits on ``ids[start:]`` (each token predicted from those before it, ``logits(ids)``
    giving the raw ``(n, V)``) per byte of the ``n_bytes`` they cover; NaN when they cover none."""
    if n_bytes <= 0:
        return float("nan")
    rows = logits(ids)[start - 1 : -1, : len(m.tokenizer)]
    targets = torch.tensor(ids[start:], device=rows.device)[:, None]
    nll = 0.0
    for a in range(0, rows.shape[0], _NLL_ROWS):  # a few rows at a time: no (n, V) log-softmax is made
        chunk = rows[a : a + _NLL_ROWS].float()
        nll += float((torch.logsumexp(chunk, -1) - chunk.gather(-1, targets[a : a + _NLL_ROWS])[:, 0]).sum())
    return nll / math.log(2) / n_bytes


_NLL_ROWS = 16  # rows per chunk in _bits_from: 16 x 262,144 float32 logits is 16 MB


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _byte_fallback_ids(tokenizer: Any) -> frozenset[int]:
    """The ids of a tokenizer's byte-fallback tokens ``<0xNN>`` (none in a byte-level BPE)."""
    return frozenset(i for t, i in tokenizer.get_vocab().items() if len(t) == 6 and _BYTE_TOKEN.fullmatch(t))


def _first_vocabulary_mismatch(members: Sequence[Member]) -> tuple[str, str] | None:
    ref = members[0]
    ref_vocab = ref.tokenizer.get_vocab()
    for other in members[1:]:
        if other.tokenizer.get_vocab() != ref_vocab:
            return ref.name, other.name
    return None
