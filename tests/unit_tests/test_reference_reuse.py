"""The reference choice's forward is the reference member's prefill: a call of one prompt on a mixed pack
runs the chosen member over the prompt once, not twice.

To choose the reference, every member scores its own tokenization of the prompt (bits per byte). The
chosen member then reads exactly those ids as the reference, so the plan keeps that forward (its scores
and KV cache) and the prefill copies it in. Shown here on packs of two BOS conventions, with the chosen
reference first and not first: the scores are bitwise those of a call given that reference (which runs
no choice), the tokens equal a naive decoder written plainly here, and counting the tokens each member's
embedding reads shows one prompt forward fewer for the reference member.
"""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import processors

from langchain_packllm import FusionEngine, SamplingConfig, WeightingConfig
from langchain_packllm.members import load_member
from langchain_packllm.reference import added_bos
from langchain_packllm.testing import make_tiny_model, stdlib_text, train_metaspace_tokenizer
from tests.naive import EmbeddedTokens, plain_bits_per_byte
from tests.unit_tests.test_bos_conventions import naive_greedy

PROMPTS = ["def main(argv):\n    return", "import os\n", "The value of x is", "print(", " the of and"]


@pytest.fixture(scope="module")
def packs(tmp_path_factory, tiny_paths, mixed_paths, module_home):
    """Two mixed pairs in float64: [GPT-2 (no BOS), Llama (Metaspace, no BOS)] and [GPT-2, Llama whose
    tokenizer adds <s>]."""
    root = tmp_path_factory.mktemp("reuse")
    tok = train_metaspace_tokenizer(stdlib_text(200_000), vocab_size=300)
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    model = make_tiny_model("llama", tok, seed=11)
    model.save_pretrained(root / "llama-bos")
    tok.save_pretrained(root / "llama-bos")
    load = lambda p: load_member(p, torch_dtype="float64", device="cpu")  # noqa: E731
    plain = [load(p) for p in mixed_paths]
    with_bos = [load(tiny_paths[0]), load(str(root / "llama-bos"))]
    assert added_bos(with_bos[1].tokenizer) == bos
    return {"plain": plain, "bos": with_bos}


def chosen(members, prompt: str) -> int:
    bpb = plain_bits_per_byte(members, prompt)
    return min(range(len(bpb)), key=lambda k: bpb[k])


@pytest.mark.parametrize("pack", ["plain", "bos"])
def test_reference_member_runs_the_prompt_once_and_outputs_are_unchanged(packs, pack: str) -> None:
    members = packs[pack]
    engine = FusionEngine(members)
    engine.prepare_alignment(progress=False)
    sampling = SamplingConfig(max_new_tokens=6)
    engine.generate(PROMPTS[:1], sampling=sampling)  # once-per-engine checks (the output layer's) run here
    refs_seen = set()
    counter = EmbeddedTokens(members)
    try:
        for prompt in PROMPTS:
            ref = chosen(members, prompt)
            refs_seen.add(ref)
            reference = engine.reference(ref)
            counter.take()
            given = engine.generate([prompt], WeightingConfig("optimal"), sampling, reference=reference)[0]
            without_choice = counter.take()
            out = engine.generate([prompt], WeightingConfig("optimal"), sampling)[0]
            with_choice = counter.take()
            assert out.report.reference == members[ref].name
            # bitwise the same call: the copied-in forward is the one the prefill would have run
            assert out.token_ids == given.token_ids
            assert out.report.weights == given.report.weights
            assert out.report.perplexities == given.report.perplexities
            w = [out.report.weights[m.name] for m in members]
            assert out.token_ids == naive_greedy(members, ref, w, prompt, 6), (pack, prompt)
            # the choice read every member's own tokens once; the reference member's was not run again
            own = [len(m.tokenizer(prompt)["input_ids"]) for m in members]
            for k in range(len(members)):
                extra = with_choice[k] - without_choice[k]
                assert extra == (0 if k == ref else own[k]), (pack, prompt, k, with_choice, without_choice)
    finally:
        counter.close()
    assert refs_seen == {0, 1}, "the prompts should choose each member as the reference"


def test_a_plan_decoded_twice_reruns_the_member_the_second_time(packs) -> None:
    members = packs["plain"]
    engine = FusionEngine(members)
    prompt = next(p for p in PROMPTS if chosen(members, p) == 1)  # the reference is not member 0
    ((_, plan),) = engine.plan([prompt], reserve=4)
    assert plan.reference.index == 1 and plan.readings[0] is not None
    weighting, sampling = WeightingConfig("optimal"), SamplingConfig(max_new_tokens=4)
    first = list(engine.decode_steps(plan, weighting, sampling))[-1]
    assert plan.given_scores() is None  # handed out once: its cache now holds the decoded tokens
    second = list(engine.decode_steps(plan, weighting, sampling))[-1]
    assert first[0][0].ids == second[0][0].ids
    assert first[1][0].weights == second[1][0].weights


def test_no_reading_is_kept_for_several_prompts_or_changed_ids(packs) -> None:
    members = packs["bos"]
    engine = FusionEngine(members)
    for _, plan in engine.plan(PROMPTS, reserve=4):
        assert all(r is None for r in plan.readings)
    ((_, plan),) = engine.plan([""], reserve=4)  # the empty prompt starts from a start token: other ids
    assert plan.given_scores() is None
    ((_, plan),) = engine.plan([PROMPTS[0]], reserve=4, reference=engine.reference(0))
    assert plan.readings == (None,)  # no choice was made


def test_streams_and_reports_take_the_reading_too(packs) -> None:
    members = packs["bos"]
    engine = FusionEngine(members)
    prompt = next(p for p in PROMPTS if chosen(members, p) == 1)
    reference = engine.reference(1)
    want = engine.generate([prompt], WeightingConfig("optimal"), SamplingConfig(max_new_tokens=5))[0]
    chunks = list(engine.stream(prompt, WeightingConfig("optimal"), SamplingConfig(max_new_tokens=5)))
    assert "".join(c.text for c in chunks) == want.text
    assert chunks[-1].output.token_ids == want.token_ids
    got = engine.report(prompt, WeightingConfig("optimal"))
    alone = engine.report(prompt, WeightingConfig("optimal"), reference=reference)
    assert got.weights == alone.weights and got.reference == alone.reference


# ---------------------------------------------------------------------------------------------- prefix


def naive_text_bits_per_byte(members, text: str) -> list[float]:
    """Bits per byte of each member on what it reads under prefix alignment (``encode_text``: a start
    token first), all scored on the bytes after the longest first text token, written plainly."""
    from langchain_packllm.bytealign import encode_text

    encs = [encode_text(m.tokenizer, text) for m in members]
    starts = [[max(0, a - len(e.lead)) for a in e.starts[e.n_special :]] for e in encs]
    total = len(text.encode("utf-8"))
    skip = max(s[1] if len(s) > 1 else total for s in starts)
    out = []
    for m, e, s in zip(members, encs, starts, strict=True):
        first = next(i for i, a in enumerate(s) if a >= skip)
        j = e.n_special + first
        with torch.no_grad():
            lp = torch.log_softmax(m.model(input_ids=torch.tensor([e.ids])).logits[0].double(), -1)
        nll = -sum(float(lp[i - 1, e.ids[i]]) for i in range(j, len(e.ids)))
        out.append(nll / math.log(2) / (total - s[first]))
    return out


@pytest.mark.parametrize("pack", ["plain", "bos"])
def test_prefix_reads_the_prompt_once_per_member(packs, pack: str) -> None:
    """Under prefix alignment the choice, the weights' rows and decoding share one forward per member."""
    from langchain_packllm.bytealign import encode_text
    from tests.unit_tests.test_engine_alignment import naive_prefix_greedy

    members = packs[pack]
    engine = FusionEngine(members, alignment="prefix")
    sampling = SamplingConfig(max_new_tokens=5)
    engine.generate(PROMPTS[:1], sampling=sampling)
    counter = EmbeddedTokens(members)
    refs_seen = set()
    try:
        for prompt in PROMPTS[:4]:
            want_bpb = naive_text_bits_per_byte(members, prompt)
            ref = min(range(len(members)), key=lambda k: want_bpb[k])
            refs_seen.add(ref)
            counter.take()
            out = engine.generate([prompt], WeightingConfig([0.5, 0.5]), sampling)[0]
            counts = counter.take()
            assert out.report.reference == members[ref].name
            assert list(out.report.bits_per_byte.values()) == pytest.approx(want_bpb, rel=1e-9)
            assert out.token_ids == naive_prefix_greedy(members, ref, [0.5, 0.5], prompt, 5), (pack, prompt)
            # the choice added no forward: the call given that reference (no choice) reads as much
            counter.take()
            given = engine.generate(
                [prompt], WeightingConfig([0.5, 0.5]), sampling, reference=engine.reference(ref)
            )[0]
            assert counter.take() == counts and given.token_ids == out.token_ids
            # and a report (the choice, the rows of the weights) reads each member's own tokens once
            engine.report(prompt, WeightingConfig("optimal"))
            assert counter.take() == [len(encode_text(m.tokenizer, prompt).ids) for m in members]
            # several prompts: the choice's forwards are not kept; outputs are the same
            twice = engine.generate([prompt, prompt], WeightingConfig([0.5, 0.5]), sampling)
            assert [o.token_ids for o in twice] == [out.token_ids] * 2
    finally:
        counter.close()
    assert refs_seen == {0, 1}
