"""``alignment="own-prompt"``: every member reads the prompt with its own tokens, new tokens through MinED.

The reference choice already runs every member over its own tokens of the prompt; under this mode those
forwards are the members' prompt readings (their scores and KV caches), so a call reads the prompt once per
member. The weights are solved on the positions where every member has read up to the same byte, each
member's row there read on the reference vocabulary through its MinED map. Checked here against plain
code on packs of both BOS conventions, with the reference first and not first: the report's perplexities
(the rows), the tokens (a naive decoder without cache), the embedding reads (once per member), batches
and streams, weights that follow the text, and bad input.
"""

from __future__ import annotations

import math

import pytest
import torch

from langchain_packllm import FusionEngine, SamplingConfig, WeightingConfig
from langchain_packllm import weights as W
from langchain_packllm.alignment import MinEDMap
from langchain_packllm.reference import PromptTokens, common_rows, prompt_tokens
from tests.naive import (
    EmbeddedTokens,
    mined_cols,
    own_prompt_next_logprobs,
    quadratic,
    simplex_qp_by_supports,
)
from tests.unit_tests.test_plan_matrix import naive_own_prompt
from tests.unit_tests.test_reference_reuse import chosen, packs  # noqa: F401 - fixture

PROMPTS = ["def main(argv):\n    return", "import os\n", "The value of x is", "print(", " the of and"]


def plain_ends(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """A tokenizer's ids of ``text`` and, per token, the byte where the text read so far ends (-1 when the
    next token starts before it: a piece of one character)."""
    enc = tokenizer(text, return_offsets_mapping=True)
    to_byte = [len(text[:i].encode("utf-8")) for i in range(len(text) + 1)]
    spans = [(to_byte[a], to_byte[b]) for a, b in enc["offset_mapping"]]
    ends = [e if j + 1 == len(spans) or spans[j + 1][0] >= e else -1 for j, (_, e) in enumerate(spans)]
    return list(enc["input_ids"]), ends


def naive_rows(members, ref: int, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(K, T, V_ref)`` log-probs and ``(T,)`` targets: each member's row where every member has read up to
    the same byte (its last token ending there), on the reference vocabulary; plain loops, no cache."""
    readings = [plain_ends(m.tokenizer, prompt) for m in members]
    ref_ids, ref_ends = readings[ref]
    ref_tok = members[ref].tokenizer
    maps = {k: MinEDMap.from_tokenizers(ref_tok, m.tokenizer) for k, m in enumerate(members) if k != ref}
    with torch.no_grad():
        logits = [
            m.model(input_ids=torch.tensor([r[0]])).logits[0].double() for m, r in zip(members, readings)
        ]
    rows: list[list[torch.Tensor]] = [[] for _ in members]
    targets = []
    for i in range(len(ref_ids) - 1):
        e = ref_ends[i]
        if e < 0 or e in ref_ends[i + 1 :]:
            continue
        found = []
        for _, ends in readings:
            js = [j for j, x in enumerate(ends) if x == e]
            found.append(js[-1] if js else None)
        if None in found:
            continue
        targets.append(ref_ids[i + 1])
        for k, j in enumerate(found):
            row = logits[k][j]
            row = row[: len(ref_tok)] if k == ref else mined_cols(row, maps[k])
            rows[k].append(torch.log_softmax(row, -1))
    if not targets:
        return torch.zeros(len(members), 0, len(ref_tok), dtype=torch.float64), torch.zeros(
            0, dtype=torch.long
        )
    return torch.stack([torch.stack(r) for r in rows]), torch.tensor(targets)


def naive_report(members, ref: int, prompt: str, weights: list[float]) -> tuple[list[float], float]:
    """Each member's perplexity on :func:`naive_rows`, and the fused one with ``weights``."""
    lp, y = naive_rows(members, ref, prompt)
    if not len(y):
        return [math.nan] * len(members), math.nan
    ppl = [math.exp(-float(lp[k].gather(-1, y[:, None]).mean())) for k in range(len(members))]
    fused = torch.log_softmax(torch.einsum("k,ktv->tv", torch.tensor(weights, dtype=lp.dtype), lp), -1)
    return ppl, math.exp(-float(fused.gather(-1, y[:, None]).mean()))


def naive_online_own(members, ref: int, prompt: str, n: int, every: int):
    """Greedy decoding with the weights re-solved every ``every`` tokens (as ``test_online``'s naive decoder:
    each position's quadratic kept, minimised over the simplex by trying every support), the prompt's
    positions those of :func:`naive_rows`."""
    lp, y = naive_rows(members, ref, prompt)
    w = W.solve("optimal", lp, y)
    terms = [(*quadratic(lp[:, i], int(y[i]), w), w) for i in range(len(y))]
    ref_tok = members[ref].tokenizer
    maps = {k: MinEDMap.from_tokenizers(ref_tok, m.tokenizer) for k, m in enumerate(members) if k != ref}
    own = [m.tokenizer(prompt)["input_ids"] for m in members]
    out, used = [], []
    for t in range(n):
        last = own_prompt_next_logprobs(members, ref, own, out, maps)
        nxt = int(torch.argmax(w @ last))
        used.append(w)
        if nxt in members[ref].eos_token_ids:
            break
        terms.append((*quadratic(last, nxt, w), w))
        out.append(nxt)
        if (t + 1) % every == 0:
            w = simplex_qp_by_supports(terms)
    return out, used


@pytest.mark.parametrize("pack", ["plain", "bos"])
def test_a_call_reads_the_prompt_once_per_member_and_equals_the_naive_decoder(packs, pack: str) -> None:  # noqa: F811
    members = packs[pack]
    engine = FusionEngine(members, alignment="own-prompt")
    assert engine.alignment == "own-prompt"
    sampling = SamplingConfig(max_new_tokens=6)
    engine.generate(PROMPTS[:1], sampling=sampling)  # once-per-engine checks (the output layer's) run here
    refs_seen = set()
    counter = EmbeddedTokens(members)
    try:
        for prompt in PROMPTS:
            ref = chosen(members, prompt)
            refs_seen.add(ref)
            counter.take()
            out = engine.generate([prompt], WeightingConfig("optimal"), sampling)[0]
            reads = counter.take()
            assert out.report.reference == members[ref].name
            w = [out.report.weights[m.name] for m in members]
            assert out.token_ids == naive_own_prompt(members, ref, w, prompt, 6), (pack, prompt)
            # each member read its own tokens of the prompt once (the choice's forward), then one token
            # per new token but the last
            own = [len(m.tokenizer(prompt)["input_ids"]) for m in members]
            steps = max(len(out.token_ids) - 1, 0) if out.finish_reason == "length" else len(out.token_ids)
            for k in range(len(members)):  # a member at weight 0 skips the steps
                assert reads[k] == own[k] + steps * (w[k] > 0), (pack, prompt, k, reads, own)
            # a call given its reference (no choice) runs the same forwards: the same output
            given = engine.generate(
                [prompt], WeightingConfig("optimal"), sampling, reference=engine.reference(ref)
            )
            assert given[0].token_ids == out.token_ids and given[0].report.weights == out.report.weights
            # the rows the weights were solved on: each member's perplexity there, plainly
            ppl, fused_ppl = naive_report(members, ref, prompt, w)
            if math.isnan(fused_ppl):  # no byte every member's tokens end at (but the text's end)
                assert out.report.fallback.startswith("no prompt position"), out.report
                assert all(math.isnan(v) for v in out.report.perplexities.values())
                continue
            for m, want in zip(members, ppl):
                assert out.report.perplexities[m.name] == pytest.approx(want, rel=1e-6), (pack, prompt)
            assert out.report.fused_perplexity == pytest.approx(fused_ppl, rel=1e-6)
    finally:
        counter.close()
    assert refs_seen == {0, 1}, "the prompts should choose each member as the reference"


@pytest.mark.parametrize("pack", ["plain", "bos"])
@pytest.mark.parametrize("ref", [0, 1])
def test_fixed_weights_batches_and_streams_equal_the_naive_decoder(packs, pack: str, ref: int) -> None:  # noqa: F811
    members = packs[pack]
    engine = FusionEngine(members, alignment="own-prompt")
    fixed = WeightingConfig([0.35, 0.65])
    sampling = SamplingConfig(max_new_tokens=5)
    reference = engine.reference(ref)
    outs = engine.generate(PROMPTS, fixed, sampling, reference=reference)
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == naive_own_prompt(members, ref, [0.35, 0.65], prompt, 5), (pack, ref, prompt)
        streamed = list(engine.stream(prompt, fixed, sampling, reference=reference))
        assert "".join(c.text for c in streamed) == out.text
    # the batch is decoded prompt by prompt: each output is the prompt's alone
    alone = [engine.generate([p], fixed, sampling, reference=reference)[0] for p in PROMPTS]
    assert [o.token_ids for o in outs] == [o.token_ids for o in alone]


@pytest.mark.parametrize("pack", ["plain", "bos"])
def test_a_batch_reads_each_prompt_once_per_member(packs, pack: str) -> None:  # noqa: F811
    members = packs[pack]
    engine = FusionEngine(members, alignment="own-prompt")
    sampling = SamplingConfig(max_new_tokens=4)
    engine.generate(PROMPTS[:1], sampling=sampling)  # once-per-engine checks (the output layer's) run here
    alone = [engine.generate([p], WeightingConfig("optimal"), sampling)[0] for p in PROMPTS]
    counter = EmbeddedTokens(members)
    try:
        batch = engine.generate(PROMPTS, WeightingConfig("optimal"), sampling)
        reads = counter.take()
    finally:
        counter.close()
    assert [o.token_ids for o in batch] == [o.token_ids for o in alone]
    assert {o.report.reference for o in batch} == {m.name for m in members}
    for k, m in enumerate(members):
        want = 0
        for prompt, out in zip(PROMPTS, batch):
            steps = len(out.token_ids) - 1 if out.finish_reason == "length" else len(out.token_ids)
            want += len(m.tokenizer(prompt)["input_ids"]) + steps * (out.report.weights[m.name] > 0)
        assert reads[k] == want, (pack, k, reads)


@pytest.mark.parametrize("ref", [0, 1])
def test_weights_that_follow_the_text_equal_the_naive_re_solves(packs, ref: int) -> None:  # noqa: F811
    members = packs["bos"]
    engine = FusionEngine(members, alignment="own-prompt")
    config = WeightingConfig("optimal", reweight_every=2)
    for prompt in PROMPTS[:3]:
        reference = engine.reference(ref)
        out = engine.generate([prompt], config, SamplingConfig(max_new_tokens=7), reference=reference)[0]
        want, used = naive_online_own(members, ref, prompt, 7, 2)
        assert out.token_ids == want, (ref, prompt)
        traj, n_prompt = out.report.trajectory, out.report.prompt_tokens
        assert len(traj) > 1
        for position, weights in traj:
            t = position - n_prompt
            if t < len(used):
                assert list(weights.values()) == pytest.approx(used[t].tolist(), abs=1e-6), (ref, prompt, t)


def test_common_rows_keep_only_bytes_every_member_has_read_up_to() -> None:
    ref = PromptTokens((1, 10, 11, 12), (0, 3, 5, 9))
    other = PromptTokens((20, 21, 22), (3, -1, 9))  # ends inside a character at its second token
    positions, rows = common_rows([ref, other], 0)
    assert positions == [1] and rows == [[1], [0]]  # the BOS has no partner; byte 5 is not a boundary
    positions, rows = common_rows([other, ref], 1)
    assert positions == [1] and rows == [[0], [1]]


class _NoOffsets:
    """A tokenizer without offsets (a slow tokenizer)."""

    bos_token_id = None
    name_or_path = "slow"

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
        if return_offsets_mapping:
            raise NotImplementedError
        return {"input_ids": [1, 2]}


def test_a_tokenizer_without_offsets_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="own-prompt.*slow.*alignment='mined'"):
        prompt_tokens(_NoOffsets(), "some text", lambda: 0)


def test_empty_and_long_prompts(packs) -> None:  # noqa: F811
    members = packs["plain"]
    engine = FusionEngine(members, alignment="own-prompt")
    out = engine.generate([""], WeightingConfig("optimal"), SamplingConfig(max_new_tokens=3))[0]
    assert out.report.fallback and out.report.weights == pytest.approx({m.name: 0.5 for m in members})
    long = " ".join(PROMPTS) * 60  # beyond the tiny members' 256 positions
    with pytest.warns(UserWarning, match="does not fit"):
        out = engine.generate([long], WeightingConfig("optimal"), SamplingConfig(max_new_tokens=3))[0]
    assert out.report.truncated and out.report.prompt_tokens <= engine.max_length
    assert len(out.token_ids) == 3
