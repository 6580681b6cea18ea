"""Every member reads a prompt with its own beginning-of-text convention, whatever the reference's.

A Llama-style member whose tokenizer adds ``<s>`` (like Gemma and Llama) and a GPT-2-style member that adds
none (like SmolLM2 and Qwen), with different vocabularies. With the BOS-less member as the reference, the
other still reads its ``<s>`` first; with the BOS member as the reference, the other never reads that
``<s>`` (mapped by role onto some token of its own, it would cripple it) and has no prediction for the
first text token, which the weights' objective then leaves out for every member. Checked against naive
forwards and a naive greedy decoder written plainly here (no cache, one prompt at a time).
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import processors

from langchain_packllm import FusionEngine, SamplingConfig, WeightingConfig
from langchain_packllm.alignment import MinEDMap
from langchain_packllm.members import load_member
from langchain_packllm.reference import added_bos
from langchain_packllm.testing import make_tiny_model, stdlib_text, train_metaspace_tokenizer
from tests.naive import mined_cols, plain_bits_per_byte

PROMPTS = ["def main(argv):\n    return", "import os\n", "The value of x is"]


@pytest.fixture(scope="module")
def members(tmp_path_factory, tiny_paths, module_home):
    """[GPT-2 member without BOS, Llama member whose tokenizer adds <s>] in float64."""
    root = tmp_path_factory.mktemp("bos")
    tok = train_metaspace_tokenizer(stdlib_text(200_000), vocab_size=300)
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    model = make_tiny_model("llama", tok, seed=7)
    model.save_pretrained(root / "llama-bos")
    tok.save_pretrained(root / "llama-bos")
    out = [
        load_member(p, torch_dtype="float64", device="cpu") for p in (tiny_paths[0], str(root / "llama-bos"))
    ]
    assert added_bos(out[1].tokenizer) == bos and added_bos(out[0].tokenizer) is None
    return out


def own_ids(member, ref_tok, ref_ids: list[int], token_map: MinEDMap) -> list[int]:
    """What a member reads for reference ids: mapped ids, its own BOS first when it adds one, never the
    reference's BOS when it adds none."""
    ref_bos = added_bos(ref_tok)
    mine = added_bos(member.tokenizer)
    body = ref_ids[1:] if ref_bos is not None else ref_ids
    return ([mine] if mine is not None else []) + [int(token_map.ids[i]) for i in body]


def naive_greedy(members, ref: int, weights, prompt: str, n: int) -> list[int]:
    ref_tok = members[ref].tokenizer
    maps = {k: MinEDMap.from_tokenizers(ref_tok, m.tokenizer) for k, m in enumerate(members) if k != ref}
    ids = list(ref_tok(prompt)["input_ids"])
    out = []
    with torch.no_grad():
        for _ in range(n):
            fused = 0
            for k, (w, m) in enumerate(zip(weights, members, strict=True)):
                if k == ref:
                    logits = m.model(input_ids=torch.tensor([ids])).logits[0, -1, : len(ref_tok)]
                else:
                    inp = own_ids(m, ref_tok, ids, maps[k])
                    logits = mined_cols(m.model(input_ids=torch.tensor([inp])).logits[0, -1], maps[k])
                fused = fused + w * torch.log_softmax(logits.double(), -1)
            nxt = int(torch.argmax(fused))
            if nxt == ref_tok.eos_token_id:
                break
            out.append(nxt)
            ids.append(nxt)
    return out


def test_maps_record_each_members_convention(members) -> None:
    engine = FusionEngine(members)
    gpt2_ref, llama_ref = engine.reference(0), engine.reference(1)
    bos = members[1].tokenizer.bos_token_id
    assert gpt2_ref.token_maps[1].lead == bos and gpt2_ref.token_maps[1].hide is None
    assert llama_ref.token_maps[0].hide == bos and llama_ref.token_maps[0].lead is None
    assert gpt2_ref.leads and not gpt2_ref.hides and llama_ref.hides and not llama_ref.leads


@pytest.mark.parametrize("padded", [False, True])
def test_prompt_scores_equal_each_member_on_its_own_convention(members, padded: bool) -> None:
    engine = FusionEngine(members)
    for ref in (0, 1):
        reference = engine.reference(ref)
        other = 1 - ref
        token_map = MinEDMap.from_tokenizers(members[ref].tokenizer, members[other].tokenizer)
        batch = [reference.encode(p) for p in (PROMPTS if padded else PROMPTS[:1])]
        pre = engine.score(batch, reference)
        L = pre.input_ids.shape[1]
        for b, ids in enumerate(batch):
            first = L - len(ids)
            got = pre.scores[other, b, first:]  # (n, V_ref)
            inp = own_ids(members[other], members[ref].tokenizer, ids, token_map)
            with torch.no_grad():
                want = mined_cols(members[other].model(input_ids=torch.tensor([inp])).logits[0], token_map)
            if ref == 0:  # the Llama member read <s> first: its output there is dropped
                torch.testing.assert_close(got, want[1:].to(got), rtol=1e-7, atol=1e-7)
            else:  # the GPT-2 member never read <s>: no prediction of the first text token
                assert torch.all(got[0] == 0)
                torch.testing.assert_close(got[1:], want.to(got), rtol=1e-7, atol=1e-7)
        engine.scorer.recycle(pre.scores)


@pytest.mark.parametrize("ref", [0, 1])
def test_greedy_decode_equals_naive_decoder(members, ref: int) -> None:
    engine = FusionEngine(members)
    w = [0.5, 0.5]
    for prompt in PROMPTS:
        out = engine.generate(
            [prompt], WeightingConfig(w), SamplingConfig(max_new_tokens=8), reference=engine.reference(ref)
        )[0]
        assert out.token_ids == naive_greedy(members, ref, w, prompt, 8), (ref, prompt)


@pytest.mark.parametrize("ref", [0, 1])
def test_batch_equals_one_by_one(members, ref: int) -> None:
    engine = FusionEngine(members)
    reference = engine.reference(ref)
    cfg, sampling = WeightingConfig("optimal"), SamplingConfig(max_new_tokens=6)
    batch = engine.generate(PROMPTS, cfg, sampling, reference=reference)
    for prompt, out in zip(PROMPTS, batch, strict=True):
        alone = engine.generate([prompt], cfg, sampling, reference=reference)[0]
        assert out.token_ids == alone.token_ids
        for name in engine.names:
            assert out.report.weights[name] == pytest.approx(alone.report.weights[name], abs=1e-6)


def test_objective_leaves_out_the_token_one_member_cannot_predict(members) -> None:
    engine = FusionEngine(members)
    reference = engine.reference(1)  # adds <s>; the GPT-2 member reads none
    prompt = PROMPTS[0]
    report = engine.report(prompt, WeightingConfig("uniform"), reference=reference)
    ids = reference.encode(prompt)
    token_map = MinEDMap.from_tokenizers(members[1].tokenizer, members[0].tokenizer)
    with torch.no_grad():
        llama = torch.log_softmax(members[1].model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        inp = own_ids(members[0], members[1].tokenizer, ids, token_map)
        gpt2 = mined_cols(members[0].model(input_ids=torch.tensor([inp])).logits[0], token_map)
        gpt2 = torch.log_softmax(gpt2.double(), -1)
    targets = torch.tensor(ids[2:])
    want_llama = torch.exp(-llama[1:-1].gather(-1, targets[:, None]).mean())
    want_gpt2 = torch.exp(-gpt2[:-1].gather(-1, targets[:, None]).mean())  # gpt2 row j predicts ids[j + 2]
    assert report.perplexities[members[1].name] == pytest.approx(float(want_llama), rel=1e-6)
    assert report.perplexities[members[0].name] == pytest.approx(float(want_gpt2), rel=1e-6)


def test_reference_choice_scores_every_member_on_the_same_bytes(members) -> None:
    """The BOS member could predict the first word, the other cannot: neither is scored on it."""
    engine = FusionEngine(members)
    for text in PROMPTS:
        want = plain_bits_per_byte(members, text)
        _, got = engine.choose_reference(text)
        assert list(got) == pytest.approx(want, rel=1e-6)
