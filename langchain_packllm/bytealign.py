"""Prefix alignment: every member reads its OWN tokenization of the text; its next-token distributions are
moved onto the reference vocabulary by string prefix (an alternative to the paper's MinED, section 3.4).

MinED (``alignment="mined"``) feeds other members the reference token ids mapped to the textually closest
ids of their own vocabulary (inputs they never saw in training) and gathers their logits back (mass lost
and double counted). Here each member keeps its exact input, and its probability mass is moved, not read:

1. **Boundary** (a member token starts exactly where the next reference token starts): the member's
   distribution goes through :class:`~langchain_packllm.alignment.PrefixMap` (member -> reference): each
   member token gives its mass to the longest reference token that its surface starts with.
2. **Inside a member token** (the reference boundary ``c`` falls inside a member token spanning
   ``[a, b)``, ``u = text[a:c]``): the member's distribution at ``a`` is conditioned on ``u``: among member
   tokens whose surface starts with ``u`` and is longer, strip ``u`` and give each remainder's mass to the
   longest reference token it starts with; renormalise over those tokens (:meth:`PrefixAligner.conditional`).
3. **Decoding** (:class:`MemberTextState`): the member re-encodes a tail of the growing text, crops its KV
   cache to the longest common prefix with what it was fed, forwards the new suffix, and mixes "its last
   token is complete" with "its last token still grows" (the two-level rule, :meth:`MemberTextState.logprobs`).

Every mapped row is a distribution over the reference vocabulary (it sums to 1) or, when the member can say
nothing at that point, a constant row (it abstains: Eq. 1's log-softmax ignores a constant). Reference
tokens no member token reaches get ``-inf``; :func:`smooth_logprobs` makes them finite before the weighted
sum of Eq. 1 (see docs/ALIGNMENT.md, "Prefix mode", for the approximations and the measured comparison).

Example (scoring a text; ``member_lp`` is the member's forward on its own ids)::

    >>> aligner = PrefixAligner(member_tok, ref_tok)
    >>> ref, mem = encode_text(ref_tok, text), encode_text(member_tok, text)
    >>> member_lp = torch.log_softmax(model(torch.tensor([mem.ids])).logits[0], -1)  # (n_m, V_m)
    >>> lp = prefix_logprobs(aligner, ref, mem, member_lp)  # (T_ref, V_ref), row i predicts ref token i
"""

from __future__ import annotations

import bisect
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from langchain_packllm.alignment import (
    PrefixMap,
    TokenizerSurfaces,
    _canonical_targets,
    _map_special,
    tokenizer_surfaces,
)
from langchain_packllm.members import cache_kwargs, new_cache

# Default smoothing of mapped member log-probs before Eq. 1 (see smooth_logprobs and docs/ALIGNMENT.md).
DEFAULT_EPSILON = 1e-4
# A split by the reference's prior over at least this many (row, consistent pair) entries runs as sparse
# matrix products (PrefixAligner._split_sparse): a prompt's boundary rows on real vocabularies are ~1e8.
SPARSE_SPLIT_MIN_WORK = 1 << 22


# --------------------------------------------------------------------------------------------------------
# 1. A text as one tokenizer reads it: ids and byte spans
# --------------------------------------------------------------------------------------------------------


@dataclass
class EncodedText:
    """One tokenizer's reading of a text: ids (leading special tokens first) and where each token starts.

    Offsets are in the tokenizer's **stream**: ``lead + text.encode()``, where ``lead`` is what the tokenizer
    adds in front of the text (``b" "`` for a SentencePiece/Metaspace tokenizer that prepends ``▁``).
    """

    ids: list[int]  # (n,) n_special leading specials, then the text tokens
    starts: list[int]  # (n,) stream offset where each token starts (0 for the leading specials)
    n_special: int  # leading specials (>= 1: the start token that predicts the first text token)
    lead: bytes  # bytes the tokenizer put before the text
    stream: bytes  # lead + the text's UTF-8

    @property
    def n_text(self) -> int:
        return len(self.ids) - self.n_special


def _start_ids(tokenizer: Any) -> list[int]:
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return [int(tid)]
    raise ValueError(
        f"Tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has neither a BOS nor an EOS token to predict the "
        "first text token from; give it one (tokenizer.add_special_tokens({'bos_token': ...}))."
    )


def encode_text(tokenizer: Any, text: str, surfaces: TokenizerSurfaces | None = None) -> EncodedText:
    """Encode ``text`` with ``tokenizer``: a start token (the tokenizer's own leading specials, else its BOS,
    else its EOS) and the text tokens with their byte offsets, read from the token surfaces.

    Raises ``ValueError`` if the tokens do not spell the text byte for byte (a normalizer that lowercases or
    NFKC-folds, or ``<unk>`` tokens): prefix alignment needs tokens that concatenate to the text.
    """
    surfaces = surfaces or tokenizer_surfaces(tokenizer)
    ids = [int(i) for i in tokenizer(text, add_special_tokens=True)["input_ids"]]
    n_special = 0
    while n_special < len(ids) and surfaces.surfaces[ids[n_special]] is None:
        n_special += 1
    while len(ids) > n_special and surfaces.surfaces[ids[-1]] is None:
        ids.pop()  # a trailing EOS added by a post-processor: not part of the text
    if n_special == 0:
        ids = _start_ids(tokenizer) + ids
        n_special = 1
    starts = [0] * n_special
    pos = 0
    for tid in ids[n_special:]:
        piece = surfaces.surfaces[tid]
        if piece is None:
            raise ValueError(
                f"Token id {tid} inside the text is special or unknown ({surfaces.tokens[tid]!r}); prefix "
                "alignment needs tokens that spell the text. Use alignment='mined' for this tokenizer."
            )
        starts.append(pos)
        pos += len(piece)
    stream = b"".join(surfaces.surfaces[t] for t in ids[n_special:])  # type: ignore[misc]
    data = text.encode("utf-8")
    if not stream.endswith(data):
        raise ValueError(
            f"The tokens of {getattr(tokenizer, 'name_or_path', 'this tokenizer')!r} do not spell the text "
            "(its normalizer changes the text, or it produced <unk>); prefix alignment needs a tokenizer "
            "whose token surfaces concatenate to the text. Use alignment='mined' for it."
        )
    return EncodedText(ids, starts, n_special, stream[: len(stream) - len(data)], stream)


@dataclass
class TextReading:
    """A member's forward over its own tokens of a text (``encode_text``): the encoding, its next-token
    log-probs ``(n, V_m)`` (row ``j`` predicts ``enc.ids[j + 1]``) and its KV cache over ``enc.ids`` (None
    without one). The reference choice, the prefix prefill's rows and the decoding state
    (:meth:`MemberTextState.resume`) all read this one forward."""

    enc: EncodedText
    logprobs: torch.Tensor
    cache: Any = None


def _forward_logprobs(model: Any, ids: list[int], start: int, cache: Any, vocab_size: int) -> torch.Tensor:
    """The model's log-probs ``(s, V_m)`` after each of ``ids[start:]`` (positions ``start..``), appended to
    ``cache`` (None: no cache). At least float32."""
    device = model.get_input_embeddings().weight.device
    suffix = torch.tensor([ids[start:]], device=device)  # (1, s)
    positions = torch.arange(start, len(ids), device=device)[None]  # (1, s)
    with torch.inference_mode():
        out = model(
            input_ids=suffix,
            position_ids=positions,
            use_cache=cache is not None,
            **(cache_kwargs(model, cache) if cache is not None else {}),
        )
    logits = out.logits[0, :, :vocab_size]  # (s, V_m): drop a padded embedding's tail
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def read_text(model: Any, enc: EncodedText, vocab_size: int, use_cache: bool = True) -> TextReading:
    """One forward of ``model`` over ``enc.ids`` (its own tokens of a text, ``vocab_size`` its tokenizer's
    width: ``TokenizerSurfaces.vocab_size``): a :class:`TextReading`, with a KV cache when ``use_cache``."""
    cache = new_cache(model) if use_cache else None
    return TextReading(enc, _forward_logprobs(model, enc.ids, 0, cache, vocab_size), cache)


def read_members(
    members: list[Any], text: str, surfaces: list[TokenizerSurfaces], use_cache: bool = True
) -> list[TextReading]:
    """Every member's :func:`read_text` of its own tokens of ``text`` (``surfaces[k]``: member k's)."""
    return [
        read_text(m.model, encode_text(m.tokenizer, text, s), s.vocab_size, use_cache)
        for m, s in zip(members, surfaces, strict=True)
    ]


def bits_per_byte_of(readings: list[TextReading]) -> list[float]:
    """Each member's bits per byte on a text from its :class:`TextReading`, every member scored on the same
    bytes: those after the longest first text token among the members, from the first of its own token
    boundaries there (as ``reference.bits_per_byte``). NaN where no token starts there."""
    spans = [[max(0, a - len(r.enc.lead)) for a in r.enc.starts[r.enc.n_special :]] for r in readings]
    total = len(readings[0].enc.stream) - len(readings[0].enc.lead)
    skip = max((ts[1] if len(ts) > 1 else total) for ts in spans)
    out = []
    for r, ts in zip(readings, spans, strict=True):
        first = next((i for i, a in enumerate(ts) if a >= skip and a < total), None)
        if first is None:
            out.append(float("nan"))
            continue
        j = r.enc.n_special + first  # the first scored token; row j - 1 predicts it
        targets = torch.tensor(r.enc.ids[j:], device=r.logprobs.device)
        nll = -r.logprobs[j - 1 : -1].gather(-1, targets[:, None]).double().sum()  # the targets' rows only
        out.append(float(nll) / math.log(2) / (total - ts[first]))
    return out


# --------------------------------------------------------------------------------------------------------
# 2. Moving a member's distribution onto the reference vocabulary
# --------------------------------------------------------------------------------------------------------


def _scatter_logsumexp(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """``out[b, j] = logsumexp(values[b, i] for i with index[i] == j)``, ``-inf`` where none:
    ``(B, n), (n,) -> (B, size)``. Each group is shifted by its own max, so nothing underflows."""
    idx = index.to(values.device).expand_as(values)  # (B, n)
    group_max = values.new_full((values.shape[0], size), float("-inf"))
    group_max = group_max.scatter_reduce(1, idx, values, reduce="amax")  # (B, size)
    shift = torch.where(torch.isfinite(group_max), group_max, torch.zeros_like(group_max))
    sums = torch.zeros_like(shift).scatter_add_(1, idx, torch.exp(values - shift.gather(1, idx)))
    return torch.log(sums) + shift


class PrefixAligner:
    """Moves one member's next-token distributions onto the reference vocabulary (one per pair of tokenizers).

    Args:
        member_tokenizer: the member's Hugging Face tokenizer (or its :class:`TokenizerSurfaces`).
        reference_tokenizer: the reference's.
        cache_dir, use_cache: for the :class:`PrefixMap` disk cache (as ``PrefixMap.from_tokenizers``).

    ``identity`` is True when both tokenizers are the same (same fingerprint): rows pass through unchanged.
    Conditional maps are built on first use per (partial text ``u``, pending reference bytes) and cached.
    """

    def __init__(
        self,
        member_tokenizer: Any,
        reference_tokenizer: Any,
        cache_dir: str | Path | None = None,
        use_cache: bool = True,
    ):
        self.member = tokenizer_surfaces(member_tokenizer)
        self.reference = tokenizer_surfaces(reference_tokenizer)
        self.identity = self.member.fingerprint == self.reference.fingerprint
        self.ref_vocab_size = self.reference.vocab_size
        self.member_vocab_size = self.member.vocab_size
        self.prefix_map = (
            None
            if self.identity
            else PrefixMap.from_tokenizers(
                self.member, self.reference, cache_dir=cache_dir, use_cache=use_cache
            )
        )
        pairs = sorted((s, i) for i, s in enumerate(self.member.surfaces) if s)
        self._sorted_surfaces = [s for s, _ in pairs]  # member surfaces in byte order: a prefix is a range
        self._sorted_ids = [i for _, i in pairs]
        self._ref_targets = _canonical_targets(self.reference)  # ref surface -> ref id
        self._ref_sorted = sorted(self._ref_targets)
        self._ref_longest = max(map(len, self._ref_targets), default=0)
        self._fallback_ref = _map_special(-1, self.reference, self.reference)[0]
        self._conditional: dict[tuple[bytes, bytes], tuple[torch.Tensor, torch.Tensor]] = {}
        self._pairs: dict[tuple[bytes, bytes], tuple[torch.Tensor, torch.Tensor]] = {}
        self._sparse: dict[tuple[bytes, bytes, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def ref_token_for(self, data: bytes) -> int:
        """The reference token that text starting with ``data`` begins with: the longest reference surface
        that is a prefix of ``data`` (else the first one extending it, else the reference unk/eos)."""
        for length in range(min(len(data), self._ref_longest), 0, -1):
            hit = self._ref_targets.get(data[:length])
            if hit is not None:
                return hit
        pos = bisect.bisect_left(self._ref_sorted, data)
        if pos < len(self._ref_sorted) and self._ref_sorted[pos].startswith(data):
            return self._ref_targets[self._ref_sorted[pos]]
        return self._fallback_ref

    def conditional(self, partial: bytes, pending: bytes = b"") -> tuple[torch.Tensor, torch.Tensor]:
        """``(member_ids (n,), ref_ids (n,))``: the member tokens that are consistent with having read
        ``partial`` of their surface, and the reference token each one's remainder starts with.

        A member token counts when its surface starts with ``partial`` and is longer (the remainder is not
        empty); its remainder ``surface[len(partial):]`` goes to :meth:`ref_token_for` of
        ``pending + remainder``, where ``pending`` holds reference bytes not in the text (the reference's
        ``lead`` at the very start). With ``partial == b""`` special tokens map by role too.
        """
        key = (partial, pending)
        hit = self._conditional.get(key)
        if hit is not None:
            return hit
        lo = bisect.bisect_left(self._sorted_surfaces, partial)
        member_ids, ref_ids = [], []
        for pos in range(lo, len(self._sorted_surfaces)):
            surface = self._sorted_surfaces[pos]
            if not surface.startswith(partial):
                break
            if len(surface) == len(partial):
                continue  # the remainder is empty: "boundary at c", not covered here
            member_ids.append(self._sorted_ids[pos])
            ref_ids.append(self.ref_token_for(pending + surface[len(partial) :]))
        if not partial:
            for tid, surface in enumerate(self.member.surfaces):
                if not surface:  # special (or unassigned, or empty): by role, as the prefix map does
                    member_ids.append(tid)
                    ref_ids.append(_map_special(tid, self.member, self.reference)[0])
        result = torch.tensor(member_ids, dtype=torch.long), torch.tensor(ref_ids, dtype=torch.long)
        self._conditional[key] = result
        return result

    def consistent_refs(self, data: bytes) -> list[int]:
        """Every reference token that text starting with ``data`` may begin with: those that are a prefix of
        ``data`` and those that extend it (else :meth:`ref_token_for`)."""
        found = [
            hit
            for length in range(1, min(len(data), self._ref_longest) + 1)
            if (hit := self._ref_targets.get(data[:length])) is not None
        ]
        pos = bisect.bisect_right(self._ref_sorted, data)  # strictly longer surfaces that extend data
        while pos < len(self._ref_sorted) and self._ref_sorted[pos].startswith(data):
            found.append(self._ref_targets[self._ref_sorted[pos]])
            pos += 1
        return found or [self.ref_token_for(data)]

    def consistent_pairs(self, partial: bytes, pending: bytes = b"") -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows (nnz,), ref_ids (nnz,))``: for the j-th member token of :meth:`conditional`, every reference
        token consistent with its remainder (:meth:`consistent_refs`); specials pair with their role
        counterpart only. Cached per (partial, pending)."""
        key = (partial, pending)
        hit = self._pairs.get(key)
        if hit is not None:
            return hit
        member_ids, ref_ids = self.conditional(partial, pending)
        rows, refs = [], []
        for j, (tid, longest) in enumerate(zip(member_ids.tolist(), ref_ids.tolist())):
            surface = self.member.surfaces[tid]
            consistent = [longest] if not surface else self.consistent_refs(pending + surface[len(partial) :])
            rows += [j] * len(consistent)
            refs += consistent
        result = torch.tensor(rows, dtype=torch.long), torch.tensor(refs, dtype=torch.long)
        self._pairs[key] = result
        return result

    def _split_by_prior(
        self, picked: torch.Tensor, partial: bytes, pending: bytes, prior: torch.Tensor
    ) -> torch.Tensor:
        """``picked`` ``(B, n)``: log-mass of the member tokens of :meth:`conditional`; each token's mass is
        split over its consistent reference tokens in proportion to ``prior`` ``(B, V_ref)``: ``(B, V_ref)``.

        ``out[r] = prior[r] + log sum_{j: r consistent with j} exp(picked[j] - log Z[j])`` with
        ``Z[j] = sum_{r consistent with j} exp(prior[r])``. Large cases (a boundary: every member token,
        about a million consistent pairs on real vocabularies) run as two sparse matrix products in
        probability space, each side shifted by its row maximum (:meth:`_split_sparse`); the rest, and any
        row where a member token's every consistent reference token underflows, gather pair by pair."""
        rows, refs = self.consistent_pairs(partial, pending)
        if rows.numel() * prior.shape[0] >= SPARSE_SPLIT_MIN_WORK:
            out = self._split_sparse(picked, partial, pending, prior)
            if out is not None:
                return out
        rows, refs = rows.to(picked.device), refs.to(picked.device)
        prior_pairs = prior[:, : self.ref_vocab_size].clamp_min(-1e4).index_select(-1, refs)  # (B, nnz)
        log_z = _scatter_logsumexp(prior_pairs, rows, picked.shape[1])  # (B, n): prior mass per member token
        shares = picked.index_select(-1, rows) + prior_pairs - log_z.index_select(-1, rows)  # (B, nnz)
        return _scatter_logsumexp(shares, refs, self.ref_vocab_size)

    def _consistency(
        self, partial: bytes, pending: bytes, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The 0/1 matrix of :meth:`consistent_pairs` as sparse CSR ``(n, V_ref)`` and its transpose, on
        ``device`` in ``dtype`` (cached per key, device and dtype)."""
        key = (partial, pending, f"{device}/{dtype}")
        hit = self._sparse.get(key)
        if hit is None:
            rows, refs = self.consistent_pairs(partial, pending)
            n = int(self.conditional(partial, pending)[0].numel())
            ones = torch.ones(rows.numel(), dtype=dtype)
            coo = torch.sparse_coo_tensor(
                torch.stack([rows, refs]), ones, (n, self.ref_vocab_size), check_invariants=True
            ).coalesce()
            with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
                warnings.simplefilter("ignore", UserWarning)
                forward = coo.to_sparse_csr()
                backward = coo.t().coalesce().to_sparse_csr()
            hit = (forward.to(device), backward.to(device))
            self._sparse[key] = hit
        return hit

    def _split_sparse(
        self, picked: torch.Tensor, partial: bytes, pending: bytes, prior: torch.Tensor
    ) -> torch.Tensor | None:
        """:meth:`_split_by_prior` as ``Z = A exp(prior)`` and ``S = A^T exp(picked - log Z)`` with the 0/1
        consistency matrix ``A``; None when some member token's ``Z`` underflows (the caller then gathers)."""
        dtype = torch.promote_types(picked.dtype, prior.dtype)
        forward, backward = self._consistency(partial, pending, picked.device, dtype)
        # columns are rows of the batch (V_ref, B) and (n, B): the sparse products read and write contiguously
        p = prior[:, : self.ref_vocab_size].to(dtype).clamp_min(-1e4).T.contiguous()  # (V_ref, B)
        p_max = p.amax(0, keepdim=True)  # (1, B)
        z = torch.sparse.mm(forward, torch.exp(p - p_max))  # (n, B)
        if not bool((z > 0).all()):
            return None
        a = picked.to(dtype).T - z.log_().add_(p_max)  # (n, B): each member token's mass over its Z
        a_max = a.amax(0, keepdim=True)
        a_max = torch.where(torch.isfinite(a_max), a_max, torch.zeros_like(a_max))
        total = torch.sparse.mm(backward, a.sub_(a_max).exp_())  # (V_ref, B)
        return total.log_().add_(p).add_(a_max).T.contiguous().to(picked.dtype)

    def map_boundary(self, member_logprobs: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        """At a boundary: ``(B, V_m) -> (B, V_ref)`` through the prefix map (mass preserved; identity when
        the tokenizers are the same). With ``prior`` (the reference's own log-probs here, ``(B, V_ref)``),
        each member token's mass is split over every consistent reference token instead (see
        :meth:`map_conditional`)."""
        if self.identity:
            return member_logprobs[:, : self.ref_vocab_size]
        if prior is not None:
            member_ids, _ = self.conditional(b"")
            picked = member_logprobs.index_select(-1, member_ids.to(member_logprobs.device))
            return self._split_by_prior(picked, b"", b"", prior)
        return self.prefix_map.map_logprobs(member_logprobs)

    def map_conditional(
        self,
        member_logprobs: torch.Tensor,
        partial: bytes,
        pending: bytes = b"",
        prior: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Inside a member token: ``(B, V_m) -> (B, V_ref)``, the member's distribution at the token's start
        conditioned on its surface starting with ``partial`` (renormalised over those tokens). A constant
        row (the member abstains) where no member token extends ``partial``.

        Without ``prior`` each remainder's mass goes to the longest reference token it starts with. With
        ``prior`` (the reference's own log-probs at this position, ``(B, V_ref)``) it is split over every
        reference token consistent with the remainder (a prefix of it, or an extension of it) in proportion
        to the prior: the member says how the text goes on, the reference says how its tokens cut it.
        """
        if not partial and not pending:
            return self.map_boundary(member_logprobs, prior)
        member_ids, ref_ids = self.conditional(partial, pending)
        if member_ids.numel() == 0:
            return self.abstain(member_logprobs.shape[0], member_logprobs)
        picked = member_logprobs[:, : self.member_vocab_size].index_select(
            -1, member_ids.to(member_logprobs.device)
        )
        picked = torch.log_softmax(picked, dim=-1)  # (B, n): renormalised over the consistent tokens
        if prior is not None:
            return self._split_by_prior(picked, partial, pending, prior)
        return _scatter_logsumexp(picked, ref_ids, self.ref_vocab_size)

    def map_two_level(
        self,
        before: torch.Tensor,
        after: torch.Tensor,
        last: int,
        partial: bytes,
        prior: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The member just read a token ``last`` with surface ``partial`` that may still grow.

        ``before`` ``(B, V_m)`` is its distribution at that token's start, ``after`` ``(B, V_m)`` the one
        after it. Mix "``last`` is complete" (mass ``before[last]``, then ``after`` mapped at a boundary) with
        "the token is longer" (every member token extending ``partial``, conditioned as in
        :meth:`map_conditional`), renormalised over both: ``(B, V_ref)``. ``prior`` as in
        :meth:`map_conditional`.
        """
        member_ids, ref_ids = self.conditional(partial)
        dev = before.device
        complete = before[:, last : last + 1] + self.map_boundary(
            after, prior
        )  # (B, V_ref), mass before[last]
        if member_ids.numel() == 0:
            return torch.log_softmax(complete, dim=-1)
        longer = before[:, : self.member_vocab_size].index_select(-1, member_ids.to(dev))  # (B, n)
        if prior is not None:
            grown = self._split_by_prior(longer, partial, b"", prior)  # (B, V_ref), mass sum(longer)
        else:
            grown = _scatter_logsumexp(longer, ref_ids, self.ref_vocab_size)  # (B, V_ref), mass sum(longer)
        return torch.log_softmax(torch.logaddexp(complete, grown), dim=-1)

    def abstain(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        """A constant row ``(B, V_ref)`` (uniform): the member has no opinion here."""
        return like.new_full((batch, self.ref_vocab_size), -math.log(self.ref_vocab_size))


# --------------------------------------------------------------------------------------------------------
# 3. Scoring a text at every reference position (one member forward over its own tokens)
# --------------------------------------------------------------------------------------------------------


def _member_position(ref: EncodedText, member: EncodedText, i: int) -> tuple[int, bytes]:
    """Where reference text token ``i`` starts, in the member's stream, and the reference bytes pending there.

    At the very start, a reference that adds a ``lead`` (``▁``) has bytes that are not in the text: when the
    member adds the same lead, both streams line up; otherwise the member stands at the text's start and the
    reference's remaining lead bytes are ``pending`` (prepended to every member remainder)."""
    p = ref.starts[ref.n_special + i]
    lead_r, lead_m = len(ref.lead), len(member.lead)
    if p >= lead_r:
        return p - lead_r + lead_m, b""
    if ref.lead == member.lead:
        return p, b""
    return lead_m, ref.lead[p:]


def prefix_logprobs(
    aligner: PrefixAligner,
    ref: EncodedText,
    member: EncodedText,
    member_logprobs: torch.Tensor,
    prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """Member m's log-probabilities of each next reference token, at every reference text position.

    Args:
        aligner: ``PrefixAligner(member_tokenizer, reference_tokenizer)``.
        ref: ``encode_text(reference_tokenizer, text)``.
        member: ``encode_text(member_tokenizer, text)`` (the same text).
        member_logprobs: ``(n_m, V_m)`` log-softmax of the member's forward over ``member.ids``: row ``j``
            predicts ``member.ids[j + 1]``.
        prior: optional ``(T_ref, V_ref)``, the reference member's own log-probs at the same rows: split
            each member token's mass over every consistent reference token in proportion to it (see
            :meth:`PrefixAligner.map_conditional`); None: all of it to the longest reference prefix.

    Returns:
        ``(T_ref, V_ref)`` with ``T_ref = ref.n_text``: row ``i`` is the member's distribution of reference
        text token ``i`` (``ref.ids[ref.n_special + i]``) given the text before it. With a single start token
        this is the engine's convention (row ``j`` of ``logprobs[:, :-1]`` predicts ``ids[j + 1]``).
        Identical tokenizers give the member's own rows exactly.
    """
    if aligner.identity and member.ids == ref.ids:
        return member_logprobs[ref.n_special - 1 : len(ref.ids) - 1, : aligner.ref_vocab_size]
    if member.stream[len(member.lead) :] != ref.stream[len(ref.lead) :]:
        raise ValueError("prefix_logprobs: `ref` and `member` encode different texts; encode the same text.")
    n_ref = ref.n_text
    out = member_logprobs.new_empty((n_ref, aligner.ref_vocab_size))
    text_starts = member.starts[member.n_special :]
    boundary_rows, boundary_src = [], []
    for i in range(n_ref):
        q, pending = _member_position(ref, member, i)
        k = bisect.bisect_right(text_starts, q) - 1  # member text token containing stream offset q
        if k < 0:  # q before the member's first token cannot happen (q >= lead_m >= first start == 0)
            k = 0
        token = member.n_special + k
        row = member_logprobs[token - 1 : token]  # (1, V_m): the distribution at the token's start
        partial = member.stream[member.starts[token] : q]
        if not partial and not pending:
            boundary_rows.append(i)
            boundary_src.append(token - 1)
        else:
            row_prior = None if prior is None else prior[i : i + 1]
            out[i] = aligner.map_conditional(row, partial, pending, row_prior)[0]
    if boundary_rows:  # one batched call for every boundary position
        # rows by advanced indexing: index_select along the rows of a (n, V) block is 10x slower on a CPU
        src = member_logprobs[torch.tensor(boundary_src, device=member_logprobs.device)]
        rows = torch.tensor(boundary_rows, device=out.device)
        out[rows] = aligner.map_boundary(src, None if prior is None else prior[rows])
    return out


def reference_logprobs(
    members: list[Any],
    ref: int,
    text: str,
    aligners: dict[int, PrefixAligner] | None = None,
    use_prior: bool = True,
    readings: list[TextReading] | None = None,
) -> tuple[torch.Tensor, EncodedText]:
    """Every member's log-probs of each next reference token of ``text``, each member reading its own tokens.

    Args:
        members: objects with ``.model`` and ``.tokenizer`` (``langchain_packllm.members.Member``).
        ref: index of the reference member (its tokenizer defines the rows and the vocabulary).
        text: the prompt (or a whole document, for evaluation).
        aligners: ``{k: PrefixAligner(members[k].tokenizer, members[ref].tokenizer)}``, built if missing
            (keep them: their conditional maps are cached inside).
        use_prior: split member mass by the reference's own rows (:meth:`PrefixAligner.map_conditional`).
        readings: each member's :func:`read_text` of ``text`` already run (then no forward is run here).

    Returns:
        ``(logprobs (K, T_ref, V_ref), ref_encoding)``: row ``i`` predicts ``ref_encoding.ids[n_special + i]``;
        member ``ref``'s rows are its own log-softmax. Not smoothed: apply :func:`smooth_logprobs` before Eq. 1.
    """
    aligners = aligners if aligners is not None else {}
    for k, m in enumerate(members):
        if k not in aligners:
            aligners[k] = PrefixAligner(m.tokenizer, members[ref].tokenizer)
    if readings is None:
        readings = read_members(
            members, text, [aligners[k].member for k in range(len(members))], use_cache=False
        )
    encs = [r.enc for r in readings]
    rows = [r.logprobs[:, : aligners[k].member_vocab_size] for k, r in enumerate(readings)]
    r_enc = encs[ref]
    prior = rows[ref][r_enc.n_special - 1 : -1] if use_prior else None  # (T_ref, V_ref)
    out = []
    for k in range(len(members)):
        k_prior = None if prior is None or k == ref else prior.to(rows[k].device)
        out.append(prefix_logprobs(aligners[k], r_enc, encs[k], rows[k], k_prior).to(rows[ref].device))
    return torch.stack(out), r_enc


def smooth_logprobs(logprobs: torch.Tensor, epsilon: float = DEFAULT_EPSILON) -> torch.Tensor:
    """``log((1 - eps) p + eps / V)``: every entry finite, rows still normalised.

    A reference token that a member's mass never reaches has ``-inf``; in Eq. 1 (``sum_k w_k log p_k``) one
    such member with ``w_k > 0`` would veto the token for the whole pack. Mixing in ``eps`` of the uniform
    distribution caps that veto at ``w_k * log(eps / V)`` (see docs/ALIGNMENT.md for the measured choice).
    """
    V = logprobs.shape[-1]
    floor = math.log(epsilon / V)
    return torch.logaddexp(logprobs + math.log1p(-epsilon), torch.full_like(logprobs, floor))


# --------------------------------------------------------------------------------------------------------
# 4. Decoding: a member following the growing text with its own tokens and a KV cache
# --------------------------------------------------------------------------------------------------------


def _complete_utf8_length(data: bytes) -> int:
    """Length of the longest prefix of ``data`` that does not end inside a UTF-8 character."""
    n = len(data)
    for back in range(1, min(4, n) + 1):
        byte = data[n - back]
        if byte & 0xC0 != 0x80:  # a lead byte (or ASCII): does its character fit?
            need = 1 if byte < 0x80 else 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4
            return n if back >= need else n - back
    return n


@dataclass
class MemberTextState:
    """One member decoding alongside the reference: its own tokens of the text so far and its KV cache.

    Args:
        model: the member's causal LM.
        tokenizer: its tokenizer.
        aligner: ``PrefixAligner(tokenizer, reference_tokenizer)``.
        window: how many of the member's last tokens are re-encoded with each new piece of text.

    ``start(prompt)`` and each ``append(reference_bytes)`` return the member's next-token log-probs on the
    reference vocabulary, ``(1, V_ref)``. Bytes that end inside a UTF-8 character are held back until the
    character is complete; meanwhile the member's distribution is conditioned on them (a partial token).
    """

    model: Any
    tokenizer: Any
    aligner: PrefixAligner
    window: int = 8
    data: bytes = b""  # the complete text so far (UTF-8)
    held: bytes = b""  # trailing bytes of an incomplete character
    enc: EncodedText | None = None  # the member's tokens of `data` (what the cache holds)
    cache: Any = None  # the KV cache over enc.ids (members.new_cache: a DynamicCache in process)
    rows: dict[int, torch.Tensor] = field(default_factory=dict)  # position -> (V_m,) log-probs after it
    forwarded_tokens: int = 0  # tokens fed to the model so far (prefill + every step)

    def start(self, prompt: str, prior: torch.Tensor | None = None) -> torch.Tensor:
        """Prefill on the prompt; returns ``(1, V_ref)``."""
        self.data, self.held, self.enc, self.cache, self.rows = b"", b"", None, None, {}
        return self.append(prompt.encode("utf-8"), prior)

    def resume(self, prompt: str, reading: TextReading, prior: torch.Tensor | None = None) -> torch.Tensor:
        """As :meth:`start`, from the prompt's forward already run (:func:`read_text` of ``encode_text`` of
        exactly ``prompt``, with its cache): the same state, no forward. Returns ``(1, V_ref)``."""
        n = len(reading.enc.ids)
        if reading.cache is None or reading.logprobs.shape[0] != n:
            raise ValueError("resume needs a TextReading of the whole prompt with its KV cache")
        self.data, self.held, self.enc, self.cache = prompt.encode("utf-8"), b"", reading.enc, reading.cache
        self.rows = {p: reading.logprobs[p] for p in (n - 2, n - 1) if p >= 0}
        self.forwarded_tokens += n
        return self.logprobs(prior)

    def append(self, piece: bytes, prior: torch.Tensor | None = None) -> torch.Tensor:
        """Add the bytes of the reference token just sampled; returns the next ``(1, V_ref)`` log-probs.
        ``prior``: the reference member's own next-token log-probs ``(1, V_ref)`` after the same text
        (see :meth:`PrefixAligner.map_conditional`)."""
        pending = self.held + piece
        cut = _complete_utf8_length(pending)
        complete, self.held = pending[:cut], pending[cut:]
        # Bytes that can never form a character (a sampled continuation byte with no lead, say) are kept as
        # U+FFFD, as the reference's own decode shows them, so the text stays valid UTF-8 for re-encoding.
        complete = complete.decode("utf-8", "replace").encode("utf-8")
        if complete or self.enc is None:
            self.data += complete
            self._sync(self._reencode())
        return self.logprobs(prior)

    def logprobs(self, prior: torch.Tensor | None = None) -> torch.Tensor:
        """The member's next reference token given ``data + held``: ``(1, V_ref)``.

        With held bytes: the distribution after the text, conditioned on the held bytes (a partial token).
        Otherwise the two-level rule on the member's last token ``x`` (surface ``u``): "``x`` is complete"
        (``p(x)`` times the distribution after it, prefix-mapped) plus "the token at ``x``'s place is longer"
        (tokens extending ``u``, remainders mapped), renormalised. The text's start, or a last token that is
        special, is a plain boundary.
        """
        enc = self.enc
        n = len(enc.ids)
        after = self.rows[n - 1][None]  # (1, V_m)
        if self.held:
            return self.aligner.map_conditional(after, self.held, prior=prior)
        if n - 1 < enc.n_special or self.aligner.identity:
            return self.aligner.map_boundary(after, prior)
        before = self.rows[n - 2][None]
        partial = enc.stream[enc.starts[n - 1] :]
        return self.aligner.map_two_level(before, after, enc.ids[n - 1], partial, prior)

    # ---------------------------------------------------------------- internals

    def _reencode(self) -> EncodedText:
        """The member's tokens of ``data``: the kept head of the old tokens + a re-encoded tail window.

        The window starts at one of the last ``window`` tokens, moved back to a token that starts with
        whitespace (a pre-tokenizer boundary, where encodings of a tail and of the whole text agree). If the
        tokenizer adds a lead to the window (Metaspace ``▁``), or no such token exists, the whole text is
        re-encoded.
        """
        text = self.data.decode("utf-8")
        old = self.enc
        if old is None or old.n_text <= self.window:
            return encode_text(self.tokenizer, text, self.aligner.member)
        surfaces = self.aligner.member.surfaces
        for k in range(
            len(old.ids) - self.window, max(old.n_special, len(old.ids) - 4 * self.window) - 1, -1
        ):
            if k <= old.n_special or not surfaces[old.ids[k]][:1].isspace():
                continue
            at = old.starts[k] - len(old.lead)  # text byte offset of token k
            tail = encode_text(self.tokenizer, self.data[at:].decode("utf-8"), self.aligner.member)
            if tail.lead:
                break
            ids = old.ids[:k] + tail.ids[tail.n_special :]
            starts = old.starts[:k] + [old.starts[k] + s for s in tail.starts[tail.n_special :]]
            return EncodedText(ids, starts, old.n_special, old.lead, old.lead + self.data)
        return encode_text(self.tokenizer, text, self.aligner.member)

    def _sync(self, new: EncodedText) -> None:
        """Crop the cache to the common prefix of the fed ids and ``new.ids``; forward the new suffix.

        Keeps the rows at the last two positions available (the two-level rule needs the distribution
        before the last token), re-feeding one more token when that row is gone.
        """
        old_ids = self.enc.ids if self.enc is not None else []
        n = len(new.ids)
        keep = 0  # rows and cache entries before `keep` depend only on ids they share with `new`
        while keep < min(len(old_ids), n) and old_ids[keep] == new.ids[keep]:
            keep += 1
        for needed in (n - 2, n - 1):
            if 0 <= needed < keep and needed not in self.rows:
                keep = needed  # that row was dropped: recompute it
        for pos in [p for p in self.rows if p >= keep]:
            del self.rows[pos]
        if self.cache is None or keep == 0:
            self.cache, keep, self.rows = new_cache(self.model), 0, {}
        elif self.cache.get_seq_length() > keep:
            self.cache.crop(keep - self.cache.get_seq_length())  # a negative count: drop that many entries
        self.enc = new
        if keep == n:
            return  # `new` is a prefix of what was fed: nothing to forward
        logprobs = _forward_logprobs(self.model, new.ids, keep, self.cache, self.aligner.member_vocab_size)
        for j in range(logprobs.shape[0]):
            self.rows[keep + j] = logprobs[j]
        for pos in [p for p in self.rows if p < n - 2]:
            del self.rows[pos]  # only the last positions are ever needed again
        self.forwarded_tokens += n - keep


__all__ = [
    "DEFAULT_EPSILON",
    "EncodedText",
    "MemberTextState",
    "PrefixAligner",
    "TextReading",
    "bits_per_byte_of",
    "encode_text",
    "prefix_logprobs",
    "read_members",
    "read_text",
    "reference_logprobs",
    "smooth_logprobs",
]
