"""The members' forwards: prefill into one score buffer, cached decode steps, devices and buffers.

:class:`Scorer` runs members on reference token ids (a :class:`~langchain_packllm.reference.Reference`
says how each member reads them) and writes their logits over the reference vocabulary. It keeps only what
is safe to share between concurrent calls: the members' output-layer shortcut (checked once), one
prompt-score buffer kept for the next call on a CPU, one worker thread per device (when members sit on
several devices), and a lock per member so that each member runs one forward at a time (calls interleave
forward by forward; no lock is held between two forwards).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from langchain_packllm.members import Member, cache_kwargs, new_cache
from langchain_packllm.reference import Reference

# On a CPU the engine keeps the (K, B, L, V) prompt-score buffer of a call for the next one when it holds at
# most this many bytes (Scorer.empty_cache frees it). A fresh buffer of that size is above glibc's mmap
# threshold, so each call would fault its pages in anew: 20 ms per 65 MB here, a fifth of toy members'
# prefill. On CUDA the caching allocator already reuses memory.
KEEP_BUFFER_BYTES = 256 << 20

# A member of another vocabulary is read through its MinED map: of its V output rows only the U distinct
# ones the map reads are ever used. When U is at most this fraction of V, the member's logits are computed
# on those U rows only (Scorer.mapped_head: a copy of them, U x H, made once per member and map), so its
# output layer costs U/V of its own. On the real pack Gemma 3 read by SmolLM2 uses 47,026 of 262,144 rows
# (18%), by Qwen2.5 101,272 (39%); Qwen2.5 read by SmolLM2 40,849 of 151,936 (27%). Qwen2.5 read by Gemma 3
# (67%) measured no faster with a copy of its rows than whole (benchmarks/mapped_head_real.py), so copies
# of more than half the rows are not made.
MAPPED_HEAD_MAX_FRACTION = 0.5


@dataclass
class PrefillScores:
    """One forward per member over a left-padded batch of reference ids.

    ``scores`` is ``(K, B, L, V)`` raw logits (at least float32) on the mix device, from
    :meth:`Scorer.score_buffer` (give it back with :meth:`Scorer.recycle`); ``last`` is a copy of the last
    position ``(K, B, V)``; ``caches`` the members' KV caches (None without ``use_cache``)."""

    scores: torch.Tensor
    input_ids: torch.Tensor  # (B, L) on the mix device
    attention_mask: torch.Tensor  # (B, L) on the mix device
    padded: bool  # whether some row is padded (then forwards take the mask and position ids)
    caches: list[Any]  # per member: its KV cache (members.new_cache) or None
    last: torch.Tensor
    views: list[StartView | None] | None = None  # per member: how its start differs from the reference's


@dataclass(frozen=True)
class StartView:
    """How member k's input starts differently from the reference ids (see ``TokenMap.lead``/``hide``).

    ``lead``: the member reads its own BOS before every row (its cache holds one more position). ``hidden``
    ``(B,)`` bool: rows whose first reference id (a BOS) the member does not read; ``first`` ``(B,)``: the
    column of each row's first id in the left-padded batch."""

    lead: int | None
    hidden: torch.Tensor | None
    first: torch.Tensor

    def mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The member's attention mask from the reference's ``(B, L')`` one (prompt columns first)."""
        if self.hidden is not None:
            mask = mask.clone()
            rows = self.hidden.nonzero()[:, 0]
            mask[rows, self.first[rows]] = 0
        if self.lead is not None:
            mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        return mask

    def positions(self, positions: torch.Tensor) -> torch.Tensor:
        """The member's position ids from the reference's (one column per decode step)."""
        if self.hidden is not None:
            positions = positions - self.hidden.to(positions)[:, None]
        if self.lead is not None:
            positions = positions + 1
        return positions


@dataclass(frozen=True)
class MappedHead:
    """Member k's output layer on the member ids one token map reads (see :meth:`Scorer.mapped_head`):
    ``base(x).last_hidden_state @ weight.T + bias`` gives the logits of the ``U`` distinct ids,
    ``columns`` ``(V_ref,)`` places them on the reference vocabulary (``ids[r] = distinct[columns[r]]``)."""

    token_map: Any  # the TokenMap it was built for (kept so that the key's id stays this map's)
    base: torch.nn.Module
    weight: torch.Tensor  # (U, H), contiguous
    bias: torch.Tensor | None
    columns: torch.Tensor  # (V_ref,) long, on the member's device


@dataclass(frozen=True)
class LinearHead:
    base: torch.nn.Module  # the model without its output layer: ``base(...).last_hidden_state``
    weight: torch.Tensor  # (V, H)
    bias: torch.Tensor | None


class Scorer:
    """Forwards of a pack's members (see the module docstring)."""

    def __init__(self, members: Sequence[Member], mix_device: torch.device):
        self.members = list(members)
        self.mix_device = mix_device
        # Read once: these lookups walk the model or its config and cost tens of microseconds each.
        self.devices = [m.device for m in self.members]
        self.scores_dtype = torch.float32  # the prompt scores' dtype: at least float32
        for m in self.members:
            self.scores_dtype = torch.promote_types(self.scores_dtype, m.model.dtype)
        self._heads: dict[int, LinearHead | None] = {}
        self._mapped_heads: dict[tuple[int, int], MappedHead | None] = {}  # (k, id(token map)) -> head
        # set before the first call (heads already built keep their choice); 0 turns mapped heads off
        self.mapped_head_max_fraction = MAPPED_HEAD_MAX_FRACTION
        self._heads_lock = threading.Lock()
        self._member_locks = [threading.Lock() for _ in self.members]
        self._spare: torch.Tensor | None = None  # the last prompt-score buffer, kept on the CPU
        self._spare_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self.use_device_groups(device_groups(self.members))

    def use_device_groups(self, groups: list[list[int]]) -> None:
        """Run the members of each group in turn and the groups concurrently, one thread each (by default
        one group per device; the benchmarks and tests force other groupings)."""
        self.close()
        self.groups = groups
        if len(groups) > 1:
            self._pool = ThreadPoolExecutor(len(groups), thread_name_prefix="packllm")

    @property
    def threaded(self) -> bool:
        """Whether members on different devices run their forwards concurrently (one thread per device)."""
        return self._pool is not None

    def close(self) -> None:
        """End the per-device worker threads (a later call runs the members in turn)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    # ------------------------------------------------------------------ buffers

    def empty_cache(self) -> None:
        """Free the prompt-score buffer kept between calls on the CPU."""
        with self._spare_lock:
            self._spare = None

    def score_buffer(self, shape: tuple[int, ...]) -> torch.Tensor:
        """An uninitialised ``shape`` tensor for prompt scores: the kept buffer when it is large enough."""
        numel = math.prod(shape)
        with self._spare_lock:
            spare, self._spare = self._spare, None
        if spare is None or spare.numel() < numel:
            del spare  # freed before the new one is made
            spare = torch.empty(numel, dtype=self.scores_dtype, device=self.mix_device)
        return spare[:numel].view(shape)

    def recycle(self, scores: torch.Tensor) -> None:
        """Keep the buffer behind ``scores`` (from :meth:`score_buffer`; no view of it may be used after
        this) for the next call, on a CPU and up to ``KEEP_BUFFER_BYTES``."""
        flat = scores if scores._base is None else scores._base
        if flat.device.type == "cpu" and flat.numel() * flat.element_size() <= KEEP_BUFFER_BYTES:
            with self._spare_lock:
                if self._spare is None or self._spare.numel() < flat.numel():
                    self._spare = flat

    # ------------------------------------------------------------------ forwards

    @torch.inference_mode()
    def logits(
        self,
        ref: Reference,
        k: int,
        input_ids,
        attention_mask,
        position_ids,
        cache,
        *,
        hidden: bool = False,
        lead: int | None = None,
    ) -> torch.Tensor:
        """Member k's forward on reference token ids: its logits over the reference vocabulary ``(B, L, V)``,
        on its own device and in its own dtype. A member of another vocabulary reads and writes through its
        MinED token map. ``hidden=True`` runs the base model only and returns its last hidden state
        ``(B, L, H)`` (see :meth:`linear_head`). ``lead``: a member token id put before every row (after
        the map), whose output column is returned too."""
        member = self.members[k]
        dev = self.devices[k]
        ref_ids, input_ids = input_ids, input_ids.to(dev)
        token_map = ref.token_maps[k]
        if token_map is not None:
            input_ids = token_map.ids[input_ids]  # reference ids -> member ids
        if lead is not None:
            input_ids = torch.cat([torch.full_like(input_ids[:, :1], lead), input_ids], dim=1)
        head = self.linear_head(k) if hidden else None
        mapped = self.mapped_head(ref, k) if token_map is not None and not hidden else None
        module = head.base if hidden else member.model if mapped is None else mapped.base
        try:
            with self._member_locks[k]:
                out = module(
                    input_ids=input_ids,
                    attention_mask=None if attention_mask is None else attention_mask.to(dev),
                    position_ids=None if position_ids is None else position_ids.to(dev),
                    use_cache=cache is not None,
                    **cache_kwargs(module, cache),
                )
        except TypeError:
            if mapped is None:
                raise
            # a base model that does not take these arguments (raised before it runs): the model's own forward
            self.disable_linear_head(k)
            return self.logits(ref, k, ref_ids, attention_mask, position_ids, cache, lead=lead)
        if hidden:
            return out.last_hidden_state
        if token_map is None:
            return out.logits[..., : ref.vocab_size]
        if mapped is not None:  # the logits of the mapped ids only, placed on the reference vocabulary
            h = out.last_hidden_state
            logits = take_columns(torch.nn.functional.linear(h, mapped.weight, mapped.bias), mapped.columns)
        else:
            logits = take_columns(out.logits, token_map.ids)  # member logits -> reference vocabulary
        if token_map.split is not None:  # a member token read by n reference tokens: 1/n each
            logits = logits + token_map.split.to(logits.dtype)
        return logits

    def linear_head(self, k: int) -> LinearHead | None:
        """Member k's output layer when its logits are exactly ``base(x).last_hidden_state @ W.T + b`` (the
        shape of every ``*ForCausalLM`` without logit scaling or soft-capping), checked once against the
        model's own forward on a few tokens; else None. Then the prefill writes the prompt's logits straight
        into the score buffer (one matrix product) instead of copying the model's own ``(B, L, V)`` output."""
        if k not in self._heads:
            with self._heads_lock:
                if k not in self._heads:
                    self._heads[k] = _linear_head(self.members[k])
        return self._heads[k]

    def disable_linear_head(self, k: int) -> None:
        with self._heads_lock:
            self._heads[k] = None
            for key in [key for key in self._mapped_heads if key[0] == k]:
                self._mapped_heads[key] = None

    def mapped_head(self, ref: Reference, k: int) -> MappedHead | None:
        """Member k's output layer restricted to the distinct member ids that ``ref``'s token map for it
        reads, when it has a :meth:`linear_head` and those ids are at most ``mapped_head_max_fraction``
        (:data:`MAPPED_HEAD_MAX_FRACTION`) of its vocabulary; else None (its full logits are gathered). Built
        once per member and token map (a copy of U of its V output rows: U x H more memory) and shared by
        every call; the logits it gives are the model's own on those ids, up to the rounding of a matrix
        product of another width."""
        token_map = ref.token_maps[k]
        if token_map is None:
            return None
        key = (k, id(token_map))
        if key in self._mapped_heads:
            return self._mapped_heads[key]
        head = self.linear_head(k)  # takes the lock itself
        with self._heads_lock:
            if key not in self._mapped_heads:
                self._mapped_heads[key] = _mapped_head(head, token_map, self.mapped_head_max_fraction)
            return self._mapped_heads[key]

    def run_members(
        self, fn: Callable[[int], torch.Tensor | None], active: Sequence[int] | None = None
    ) -> list[torch.Tensor | None]:
        """``[fn(k) for k in members]`` (``None`` for members not in ``active``, when given); with members on
        several devices, one thread per device."""
        K = len(self.members)
        wanted = range(K) if active is None else sorted(set(active))
        out: list[torch.Tensor | None] = [None] * K
        pool = self._pool
        if pool is None:
            for k in wanted:
                out[k] = fn(k)
            return out

        def run_group(group: list[int]) -> list[torch.Tensor | None]:
            with torch.inference_mode():
                return [fn(k) for k in group]

        groups = [[k for k in g if k in wanted] for g in self.groups]
        futures = [(group, pool.submit(run_group, group)) for group in groups if group]
        for group, future in futures:
            for k, value in zip(group, future.result()):
                out[k] = value
        return out

    def step(
        self,
        ref: Reference,
        next_ids,
        mask,
        positions,
        caches,
        active: Sequence[int],
        views: Sequence[StartView | None] | None = None,
    ) -> list[torch.Tensor | None]:
        """One cached decode step of the ``active`` members: their raw next-token logits ``(B, V)`` on their
        own devices (``None`` for the others, whose weight is 0 in every row: their forward is skipped, and
        their cache falls behind; :meth:`read` brings it up to date). ``views``: the prefill's
        :class:`StartView` per member (a member that read its own BOS or skipped the reference's gets its
        own mask and positions)."""
        return [
            None if x is None else x[:, -1]
            for x in self.read(ref, next_ids, mask, positions, caches, active, views)
        ]

    def read(
        self,
        ref: Reference,
        ids,
        mask,
        positions,
        caches,
        members: Sequence[int],
        views: Sequence[StartView | None] | None = None,
    ) -> list[torch.Tensor | None]:
        """Cached forwards of ``members`` over ``n`` new reference ids ``(B, n)`` at once (``n`` decode steps
        in one forward): each one's raw logits ``(B, n, V)`` on its own device, ``None`` for the others.
        ``mask`` is the whole attention mask so far (``(B, L')``, its last ``n`` columns those of ``ids``)
        and ``positions`` the ids' positions ``(B, n)``, both None when no row is padded."""

        def one(k: int) -> torch.Tensor:
            view = views[k] if views is not None else None
            if view is None or mask is None:
                return self.logits(ref, k, ids, mask, positions, caches[k])
            return self.logits(ref, k, ids, view.mask(mask), view.positions(positions), caches[k])

        return self.run_members(one, members)

    def pad(self, ref: Reference, batch: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-pad reference ids: ``(B, L)`` ids and attention mask on the mix device."""
        L = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), L), ref.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), L), dtype=torch.long)
        for b, ids in enumerate(batch):
            input_ids[b, L - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
            mask[b, L - len(ids) :] = 1
        return input_ids.to(self.mix_device), mask.to(self.mix_device)

    def prefill(
        self,
        ref: Reference,
        batch: Sequence[Sequence[int]],
        *,
        use_cache: bool,
        given: Sequence[tuple[torch.Tensor, Any] | None] | None = None,
    ) -> PrefillScores:
        """One forward per member over the left-padded batch (see :class:`PrefillScores`).

        Members' logits are written member by member into one buffer so that no member's logits are held
        twice. The weight solve works on raw logits (they give the same fused distribution as log-probs),
        so the prompt positions are never log-softmaxed. ``-inf`` logits are raised to the dtype's lowest
        finite value, so that a member with weight 0 contributes 0, not NaN, to the mix. A batch without
        padding (e.g. one prompt) is run without attention mask and position ids, as a member alone is.

        ``given[k]``: member k's ``(scores (1, L, V), cache)`` from :meth:`prefill_member` on this very
        row (one prompt), copied in instead of running it again (the reference choice's forward, see
        :meth:`~langchain_packllm.reference.Plan.given_scores`).
        """
        input_ids, mask = self.pad(ref, batch)
        padded = is_padded(batch)
        positions = (mask.cumsum(-1) - 1).clamp(min=0) if padded else None
        K, (B, L) = len(self.members), input_ids.shape
        scores = self.score_buffer((K, B, L, ref.vocab_size))
        given = list(given or ()) + [None] * (K - len(given or ()))
        for k, held in enumerate(given):
            if held is not None:
                if B != 1 or held[0].shape[:2] != (1, L) or ref.token_maps[k] is not None:
                    raise ValueError(
                        f"given scores of member {k} do not fit this prefill (one row of {L} ids)"
                    )
                scores[k].copy_(held[0][..., : ref.vocab_size])
        caches = [
            None if not use_cache else new_cache(m.model) if held is None else held[1]
            for m, held in zip(self.members, given, strict=True)
        ]
        run_mask = mask if padded else None
        views = [self._start_view(ref, k, batch, L) for k in range(K)]
        run = [k for k in range(K) if given[k] is None]
        self.run_members(
            lambda k: self._prefill_member(
                ref, k, scores[k], input_ids, run_mask, positions, caches[k], views[k]
            ),
            run,
        )
        last = scores[:, :, -1].clone()  # (K, B, V): the buffer is given back after the solve
        return PrefillScores(scores, input_ids, mask, padded, caches, last, views)

    def prefill_member(
        self, ref: Reference, k: int, ids: Sequence[int], *, use_cache: bool = True
    ) -> tuple[torch.Tensor, Any]:
        """Member k alone on one row of ``ids`` (its own vocabulary when ``ref`` is its own view): its raw
        scores ``(1, n, V)`` in a new tensor and its KV cache (None without ``use_cache``), computed as
        :meth:`prefill` computes that member's row, so that :meth:`prefill` can take them as ``given``."""
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=self.mix_device)
        scores = torch.empty((1, len(ids), ref.vocab_size), dtype=self.scores_dtype, device=self.mix_device)
        cache = new_cache(self.members[k].model) if use_cache else None
        self._prefill_member(ref, k, scores, input_ids, None, None, cache, None)
        return scores, cache

    def prefill_own(
        self,
        ref: Reference,
        ids: Sequence[int],
        forwards: Sequence[tuple[torch.Tensor, Any]],
        rows: Sequence[Sequence[int]],
    ) -> PrefillScores:
        """``alignment="own-prompt"``: one prompt that every member read with its own tokens
        (``forwards[k]``: :meth:`prefill_member`'s scores ``(1, n_k, V_k)`` and cache on its own view), as
        the prefill of the reference ids ``ids``. ``scores`` ``(K, 1, T, V)`` holds each member's rows
        ``rows[k]`` (the positions every member read up to, :func:`~langchain_packllm.reference.common_rows`)
        on the reference vocabulary (read through its MinED map, as :meth:`logits` reads a decode step);
        ``last`` each member's last row, from which decoding continues on its own cache."""
        K, V = len(self.members), ref.vocab_size
        T = len(rows[ref.index])
        scores = self.score_buffer((K, 1, T, V))
        last = torch.empty((K, 1, V), dtype=self.scores_dtype, device=self.mix_device)
        for k, ((own, _), at) in enumerate(zip(forwards, rows, strict=True)):
            own = own[0]  # (n_k, V_k)
            token_map = ref.token_maps[k]
            cols = None if token_map is None else token_map.ids.to(own.device)
            # runs of consecutive rows, copied (or gathered: take_columns) straight into the buffer: no
            # temporary of the selected rows (index_select along rows is also 10x slower on a CPU)
            for i, j, n in _runs(at):
                out = scores[k, 0, i : i + n]
                if cols is None:
                    out.copy_(own[j : j + n, :V])
                else:
                    torch.gather(own[j : j + n], -1, cols.expand(n, cols.numel()), out=out)
            last[k, 0] = own[-1, :V] if cols is None else own[-1, cols]
            if token_map is not None and token_map.split is not None:  # read by n reference tokens: 1/n each
                scores[k, 0] += token_map.split.to(scores)
                last[k, 0] += token_map.split.to(last)
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=self.mix_device)
        caches = [cache for _, cache in forwards]
        return PrefillScores(scores, input_ids, torch.ones_like(input_ids), False, caches, last, None)

    def _start_view(self, ref: Reference, k: int, batch: Sequence[Sequence[int]], L: int) -> StartView | None:
        token_map = ref.token_maps[k]
        if token_map is None or (token_map.lead is None and token_map.hide is None):
            return None
        hidden = None
        if token_map.hide is not None:
            flags = [len(ids) >= 2 and ids[0] == token_map.hide for ids in batch]
            if any(flags):
                hidden = torch.tensor(flags, device=self.mix_device)
        if token_map.lead is None and hidden is None:
            return None
        first = torch.tensor([L - len(ids) for ids in batch], device=self.mix_device)
        return StartView(token_map.lead, hidden, first)

    def _member_prefill(self, ref, k, input_ids, mask, positions, cache, view: StartView | None):
        """Member k's prompt logits ``(B, L, V_ref)`` aligned with the reference columns: its own BOS put
        before the rows (and its column dropped from the output) or the reference's BOS masked out (its
        column zero: no prediction of the first token)."""
        if view is None:
            return self.logits(ref, k, input_ids, mask, positions, cache)
        if mask is None and view.hidden is not None:  # one unpadded row: the member reads it without BOS
            logits = self.logits(ref, k, input_ids[:, 1:], None, None, cache, lead=view.lead)
            if view.lead is not None:
                logits = logits[:, 1:]
            return torch.cat([torch.zeros_like(logits[:, :1]), logits], dim=1)
        if mask is not None:
            mask = view.mask(mask)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.logits(ref, k, input_ids, mask, positions, cache, lead=view.lead)
        if view.lead is not None:
            logits = logits[:, 1:]
        if view.hidden is not None:
            rows = view.hidden.nonzero()[:, 0]
            logits = logits.clone()
            logits[rows.to(logits.device), view.first[rows].to(logits.device)] = 0
        return logits

    def _prefill_member(
        self, ref: Reference, k: int, out: torch.Tensor, input_ids, mask, positions, cache, view=None
    ) -> None:
        """Member k's forward over the batch, its logits written into ``out`` ``(B, L, V)`` (a slice of the
        score buffer): through :meth:`linear_head` when it applies (one matrix product into ``out``), else
        the model's own logits copied in."""
        lowest = torch.finfo(out.dtype).min
        head = self.linear_head(k) if ref.token_maps[k] is None else None
        if head is None:
            logits = self._member_prefill(ref, k, input_ids, mask, positions, cache, view)
            if logits.dtype == out.dtype and logits.device == out.device:
                torch.clamp(logits, min=lowest, out=out)
            else:
                out.copy_(logits).clamp_min_(lowest)
            return
        try:
            h = self.logits(ref, k, input_ids, mask, positions, cache, hidden=True).flatten(0, 1)  # (B*L, H)
        except TypeError:  # a base model that does not take these arguments: the model's own forward
            self.disable_linear_head(k)
            return self._prefill_member(ref, k, out, input_ids, mask, positions, cache, view)
        weight = head.weight[: ref.vocab_size]
        bias = None if head.bias is None else head.bias[: ref.vocab_size]
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


def _runs(index: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(position in index, first value, length)`` of each run of consecutive values in ``index``."""
    runs: list[tuple[int, int, int]] = []
    for i, j in enumerate(index):
        if runs and runs[-1][1] + runs[-1][2] == j:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((i, j, 1))
    return runs


def take_columns(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``x[..., ids]``: columns of the last dimension, as ``torch.gather`` over an expanded index (on a CPU
    about 5x faster than ``index_select`` along the last dimension: a (244, 262144) block to 151,936
    columns in 0.09 s against 0.48 s)."""
    return torch.gather(x, -1, ids.expand(*x.shape[:-1], ids.numel()))


def last_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """Next-token log-probs ``(B, V)`` of the last position, at least float32, on the logits' device."""
    last = logits[:, -1]
    return torch.log_softmax(last.to(torch.promote_types(last.dtype, torch.float32)), dim=-1)


@torch.inference_mode()
def _linear_head(member: Member) -> LinearHead | None:
    """See :meth:`Scorer.linear_head`: the check runs the model and its base on four tokens."""
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
    return LinearHead(base, head.weight, head.bias)


def _mapped_head(head: LinearHead | None, token_map, max_fraction: float) -> MappedHead | None:
    if head is None:
        return None
    distinct, columns = torch.unique(token_map.ids, return_inverse=True)
    if distinct.numel() > max_fraction * head.weight.shape[0]:
        return None
    distinct = distinct.to(head.weight.device)
    with torch.no_grad():
        weight = head.weight.index_select(0, distinct).contiguous()
        bias = None if head.bias is None else head.bias.index_select(0, distinct).contiguous()
    return MappedHead(token_map, head.base, weight, bias, columns.to(token_map.ids.device))


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


def is_padded(batch: Sequence[Sequence[int]]) -> bool:
    """Whether left-padding a batch of token-id lists pads any row (their lengths differ)."""
    return len({len(ids) for ids in batch}) > 1


def device_groups(members: Sequence[Member]) -> list[list[int]]:
    """Member indices grouped by device, accelerators first (their work queues while the CPU computes)."""
    groups: dict[torch.device, list[int]] = {}
    for k, m in enumerate(members):
        groups.setdefault(m.device, []).append(k)
    return sorted(groups.values(), key=lambda g: members[g[0]].device.type == "cpu")
