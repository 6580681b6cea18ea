"""Packs whose members have different tokenizers: MinED alignment in the engine (paper section 3.4),
checked against a naive aligned decoder written plainly here."""

from __future__ import annotations

import math

import pytest
import torch

from langchain_packllm import FusionEngine, PackLLM, SamplingConfig, WeightingConfig
from langchain_packllm.alignment import MinEDMap
from langchain_packllm.members import load_member
from langchain_packllm.testing import (
    stdlib_text,
)
from tests.naive import mined_cols, plain_bits_per_byte


def naive_mined_greedy(members, ref: int, weights, prompt: str, n: int) -> list[int]:
    """The paper's recipe, step by step: reference tokens, MinED-mapped inputs, logits gathered back onto
    the reference vocabulary, log-softmax, weighted sum, argmax. No cache."""
    ref_tok = members[ref].tokenizer
    maps = {k: MinEDMap.from_tokenizers(ref_tok, m.tokenizer) for k, m in enumerate(members) if k != ref}
    ids = list(ref_tok(prompt)["input_ids"])
    out = []
    with torch.no_grad():
        for _ in range(n):
            fused = 0
            for k, (w, m) in enumerate(zip(weights, members)):
                inp = ids if k == ref else [int(maps[k].ids[i]) for i in ids]
                logits = m.model(input_ids=torch.tensor([inp])).logits[0, -1].double()
                cols = logits[: len(ref_tok)] if k == ref else mined_cols(logits, maps[k])
                fused = fused + w * torch.log_softmax(cols, -1)
            nxt = int(torch.argmax(fused))
            if nxt == ref_tok.eos_token_id:
                break
            out.append(nxt)
            ids.append(nxt)
    return out


PROMPTS = ["def main(argv):\n    return", "import os\nimport sys\n", "The value of x is"]


def test_mixed_pack_generates_with_reports(mixed64) -> None:
    engine = FusionEngine(mixed64)
    assert engine.alignment == "mined"
    outs = engine.generate(PROMPTS, WeightingConfig("optimal"), SamplingConfig(max_new_tokens=8))
    for prompt, out in zip(PROMPTS, outs):
        rep = out.report
        assert rep.reference in engine.names
        assert sum(rep.weights.values()) == pytest.approx(1.0)
        assert set(rep.bits_per_byte) == set(engine.names)
        for name, want in zip(engine.names, plain_bits_per_byte(mixed64, prompt), strict=True):
            assert rep.bits_per_byte[name] == pytest.approx(want, rel=1e-6)
        assert rep.reference == min(rep.bits_per_byte, key=rep.bits_per_byte.get)
        assert 0 <= rep.approx_tokens <= rep.prompt_tokens
        assert isinstance(out.text, str) and len(out.token_ids) > 0
        ref_tok = mixed64[engine.names.index(rep.reference)].tokenizer
        assert out.text == ref_tok.decode(
            out.token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )


@pytest.mark.parametrize("ref", [0, 1])
def test_mined_decode_equals_naive_recipe(mixed64, ref: int) -> None:
    engine = FusionEngine(mixed64)
    w = [0.6, 0.4]
    for prompt in PROMPTS:
        out = engine.generate(
            [prompt], WeightingConfig(w), SamplingConfig(max_new_tokens=8), reference=engine.reference(ref)
        )[0]
        assert out.report.reference == mixed64[ref].name
        assert out.token_ids == naive_mined_greedy(mixed64, ref, w, prompt, 8), (ref, prompt)


def test_batch_of_mixed_references_keeps_prompt_order(mixed64) -> None:
    engine = FusionEngine(mixed64)
    batch = engine.generate(PROMPTS, WeightingConfig([0.5, 0.5]), SamplingConfig(max_new_tokens=6))
    for prompt, out in zip(PROMPTS, batch):
        alone = engine.generate([prompt], WeightingConfig([0.5, 0.5]), SamplingConfig(max_new_tokens=6))[0]
        assert out.token_ids == alone.token_ids and out.report.reference == alone.report.reference
        chunks = list(engine.stream(prompt, WeightingConfig([0.5, 0.5]), SamplingConfig(max_new_tokens=6)))
        assert "".join(c.text for c in chunks) == alone.text


def test_identical_tokenizers_through_alignment_equal_shared_path(tiny_paths) -> None:
    members = [load_member(p, torch_dtype="float64", device="cpu") for p in tiny_paths]
    shared = FusionEngine(members)
    aligned = FusionEngine(members, alignment="mined")
    assert shared.alignment == "none" and aligned.alignment == "mined"
    for k in (1, 2):
        token_map = aligned.reference(0).token_maps[k]
        assert torch.equal(token_map.ids, torch.arange(len(members[0].tokenizer)))
        assert not token_map.approx.any()
    a = shared.generate(PROMPTS, WeightingConfig("optimal"), SamplingConfig(max_new_tokens=8))
    b = aligned.generate(PROMPTS, WeightingConfig("optimal"), SamplingConfig(max_new_tokens=8))
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        assert list(x.report.weights.values()) == pytest.approx(list(y.report.weights.values()), abs=1e-9)
        assert y.report.approx_tokens == 0


def test_alignment_none_refuses_mixed_vocabularies(mixed_paths) -> None:
    members = [load_member(p, device="cpu") for p in mixed_paths]
    with pytest.raises(ValueError, match="different vocabularies"):
        FusionEngine(members, alignment="none")
    llm = PackLLM.from_model_ids(mixed_paths, device="cpu", max_new_tokens=4)
    info = llm.generate(["import os"]).generations[0][0].generation_info
    assert info["reference"] in llm.engine.names and "approx_tokens" in info
    assert llm.loglikelihood("import os\nimport", " sys") < 0


def test_byte_level_evaluation_of_a_mixed_pack(mixed_paths) -> None:
    from langchain_packllm.lab.evaluation import evaluate_lm_bytes

    members = [load_member(p, name=f"m{i}", device="cpu") for i, p in enumerate(mixed_paths)]
    engine = FusionEngine(members)
    text = stdlib_text(20_000)[5_000:6_500]
    result = evaluate_lm_bytes(engine, {"code": [text]}, methods=("uniform", "optimal"), progress=False)
    assert result.metric == "bpb" and result.docs["code"] == 1
    # a single member's row is its own tokenization of the rest, in bits per byte
    offsets = members[0].tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)[
        "offset_mapping"
    ]
    offsets = offsets[: engine.max_length // 2]
    n_p = min(32, int(0.2 * len(offsets)))
    cut, end = offsets[n_p - 1][1], offsets[-1][1]
    text = text[:end]
    for k, m in enumerate(members):
        # the whole text encoded once; tokens starting before the cut are the prompt
        enc = m.tokenizer(text, return_offsets_mapping=True)
        ids, offs = enc["input_ids"], enc["offset_mapping"]
        n_prompt = sum(1 for i, (a, _) in zip(ids, offs) if i in m.tokenizer.all_special_ids or a < cut)
        x = torch.tensor([ids])
        with torch.no_grad():
            lp = torch.log_softmax(m.model(input_ids=x).logits[0, :-1].double(), -1)
        nll = -float(lp[n_prompt - 1 :].gather(-1, x[0, n_prompt:, None]).sum())
        expected = nll / math.log(2) / len(text[offs[n_prompt][0] :].encode())
        assert result.score(1, f"m{k}", "code") == pytest.approx(expected, rel=1e-4)
    assert math.isfinite(result.score(2, "optimal", "code"))
    assert "best-single" in result.markdown()


def naive_prefix_greedy(members, ref: int, weights, prompt: str, n: int) -> list[int]:
    """alignment='prefix' recomputed from scratch at every step: the reference (no cache) on its ids, and
    every other member re-reading the whole text so far with a fresh text state."""
    from langchain_packllm import bytealign

    ref_tok = members[ref].tokenizer
    enc = bytealign.encode_text(ref_tok, prompt)
    ids, text_bytes, out = list(enc.ids), b"", []
    aligners = {k: bytealign.PrefixAligner(m.tokenizer, ref_tok) for k, m in enumerate(members)}
    with torch.no_grad():
        for _ in range(n):
            logits = members[ref].model(input_ids=torch.tensor([ids])).logits[0, -1, : len(ref_tok)]
            prior = torch.log_softmax(logits.double(), -1)[None]
            fused = 0
            for k, (w, m) in enumerate(zip(weights, members)):
                if k == ref:
                    row = prior
                else:
                    state = bytealign.MemberTextState(m.model, m.tokenizer, aligners[k])
                    state.start(prompt, prior=prior if not text_bytes else None)
                    row = state.append(text_bytes, prior=prior) if text_bytes else state.logprobs(prior)
                fused = fused + w * bytealign.smooth_logprobs(row.double())
            nxt = int(torch.argmax(fused))
            if nxt == ref_tok.eos_token_id:
                break
            out.append(nxt)
            ids.append(nxt)
            text_bytes += aligners[ref].reference.surfaces[nxt] or b""
    return out


def test_prefix_alignment_decode_equals_recomputation(mixed64) -> None:
    engine = FusionEngine(mixed64, alignment="prefix")
    w = [0.5, 0.5]
    for prompt in PROMPTS[:2]:
        out = engine.generate([prompt], WeightingConfig(w), SamplingConfig(max_new_tokens=6))[0]
        ref = engine.names.index(out.report.reference)
        assert out.token_ids == naive_prefix_greedy(mixed64, ref, w, prompt, 6), prompt
        chunks = list(engine.stream(prompt, WeightingConfig(w), SamplingConfig(max_new_tokens=6)))
        assert "".join(c.text for c in chunks) == out.text


def test_prefix_alignment_reports_and_refuses_scoring(mixed64) -> None:
    engine = FusionEngine(mixed64, alignment="prefix")
    report = engine.report(PROMPTS[0], WeightingConfig("optimal"))
    assert report.reference in engine.names and sum(report.weights.values()) == pytest.approx(1.0)
    assert all(math.isfinite(p) for p in report.perplexities.values())
    outs = engine.generate(PROMPTS, WeightingConfig("optimal"), SamplingConfig(max_new_tokens=4))
    assert [o.report.reference for o in outs] and all(len(o.token_ids) <= 4 for o in outs)
    with pytest.raises(RuntimeError, match="alignment='mined'"):
        engine.loglikelihood([("import os", " sys")])
