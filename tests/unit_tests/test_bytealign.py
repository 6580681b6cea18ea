"""Prefix alignment (``langchain_packllm.bytealign``): members read their own tokens; distributions are moved
onto the reference vocabulary by string prefix."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from langchain_packllm.bytealign import (
    MemberTextState,
    PrefixAligner,
    encode_text,
    prefix_logprobs,
    smooth_logprobs,
)
from langchain_packllm.testing import (
    make_tiny_model,
    stdlib_text,
    train_bytelevel_tokenizer,
    train_metaspace_tokenizer,
)

TEXTS = [
    "def main(argv):\n    return argv[0]  # café\n",
    "import os\nclass Handler(object):\n    pass",
    "  x = {'naïve': 1, 'π': 3.14}\n",
]


@pytest.fixture(scope="module")
def toks(module_home):
    text = stdlib_text(120_000)
    return {"bl": train_bytelevel_tokenizer(text, 400), "sp": train_metaspace_tokenizer(text, 300)}


@pytest.fixture(scope="module")
def models_(toks):
    return {name: make_tiny_model("gpt2", tok, seed=i).double() for i, (name, tok) in enumerate(toks.items())}


def own_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.double(), -1)  # (n, V)


def plain_tok(vocab_words: list[str], merges: list[tuple[str, str]]) -> PreTrainedTokenizerFast:
    """A BPE tokenizer with no pre-tokenizer: its tokens are their own text (convention ``plain``)."""
    vocab = {"<s>": 0, "</s>": 1}
    for w in vocab_words:
        vocab.setdefault(w, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


# ---------------------------------------------------------------------------------------------- scoring


def test_identical_tokenizers_give_own_logprobs(toks, models_) -> None:
    tok, model = toks["bl"], models_["bl"]
    aligner = PrefixAligner(tok, tok)
    assert aligner.identity
    for text in TEXTS:
        enc = encode_text(tok, text)
        lp = own_logprobs(model, enc.ids)
        mapped = prefix_logprobs(aligner, enc, enc, lp)
        assert mapped.shape == (enc.n_text, len(tok))
        torch.testing.assert_close(mapped, lp[:-1], rtol=0, atol=0)


@pytest.mark.parametrize("with_prior", [False, True])
@pytest.mark.parametrize(("member", "ref"), [("bl", "sp"), ("sp", "bl")])
def test_mapped_rows_are_distributions(toks, models_, member: str, ref: str, with_prior: bool) -> None:
    aligner = PrefixAligner(toks[member], toks[ref])
    for text in TEXTS:
        m_enc, r_enc = encode_text(toks[member], text), encode_text(toks[ref], text)
        prior = own_logprobs(models_[ref], r_enc.ids)[:-1] if with_prior else None
        lp = prefix_logprobs(aligner, r_enc, m_enc, own_logprobs(models_[member], m_enc.ids), prior)
        assert lp.shape == (r_enc.n_text, len(toks[ref]))
        total = torch.logsumexp(lp, dim=-1)  # (T_ref,)
        torch.testing.assert_close(total, torch.zeros_like(total), rtol=0, atol=1e-5)
        smoothed = smooth_logprobs(lp)
        assert torch.isfinite(smoothed).all()
        torch.testing.assert_close(torch.logsumexp(smoothed, -1), torch.zeros_like(total), rtol=0, atol=1e-5)


def test_metaspace_lead_is_found(toks) -> None:
    enc = encode_text(toks["sp"], "def f")
    assert enc.lead == b" " and enc.stream == b" def f"
    assert encode_text(toks["sp"], " def f").lead == b""
    assert encode_text(toks["bl"], "def f").lead == b""


def test_reference_boundary_inside_member_token_conditions_on_the_partial_text() -> None:
    # member reads "abc" as one token; the reference reads "ab" + "c": the boundary before "c" is inside it
    member = plain_tok(
        ["a", "b", "c", "d", "ab", "abc", "abd", "abcd"], [("a", "b"), ("ab", "c"), ("ab", "d"), ("abc", "d")]
    )
    ref = plain_tok(["a", "b", "c", "d", "ab", "cd"], [("a", "b"), ("c", "d")])
    m_enc, r_enc = encode_text(member, "abc"), encode_text(ref, "abc")
    m_surf = [member.convert_ids_to_tokens(i) for i in m_enc.ids]
    r_surf = [ref.convert_ids_to_tokens(i) for i in r_enc.ids]
    assert m_surf == ["<s>", "abc"] and r_surf == ["<s>", "ab", "c"]
    V_m = len(member)
    probs = torch.full((V_m,), 0.01, dtype=torch.float64)
    mv, rv = member.get_vocab(), ref.get_vocab()
    probs[mv["abc"]], probs[mv["abd"]], probs[mv["abcd"]], probs[mv["ab"]] = 0.3, 0.2, 0.1, 0.25
    probs /= probs.sum()
    member_lp = torch.stack([probs.log(), torch.full((V_m,), -float(V_m)).log_softmax(-1)])  # (2, V_m)
    lp = prefix_logprobs(PrefixAligner(member, ref, use_cache=False), r_enc, m_enc, member_lp).exp()
    # row 0 (start of text, a boundary): "abc", "abd", "abcd" and "ab" all start with ref "ab"
    assert float(lp[0, rv["ab"]]) == pytest.approx(
        float(probs[[mv[t] for t in ("ab", "abc", "abd", "abcd")]].sum())
    )
    # row 1 (after "ab", inside member "abc"): condition on tokens extending "ab": abc -> "c", abd -> "d",
    # abcd -> "cd" (the longest reference prefix of the remainder); "ab" itself (empty remainder) is dropped
    z = 0.3 + 0.2 + 0.1
    assert float(lp[1, rv["c"]]) == pytest.approx(0.3 / z)
    assert float(lp[1, rv["d"]]) == pytest.approx(0.2 / z)
    assert float(lp[1, rv["cd"]]) == pytest.approx(0.1 / z)
    assert float(lp[1].sum()) == pytest.approx(1.0)


def test_prior_splits_a_member_token_over_consistent_reference_tokens() -> None:
    member = plain_tok(
        ["a", "b", "c", "d", "ab", "abc", "abd", "abcd"], [("a", "b"), ("ab", "c"), ("ab", "d"), ("abc", "d")]
    )
    ref = plain_tok(["a", "b", "c", "d", "ab", "cd"], [("a", "b"), ("c", "d")])
    m_enc, r_enc = encode_text(member, "abc"), encode_text(ref, "abc")
    mv, rv = member.get_vocab(), ref.get_vocab()
    probs = torch.full((len(member),), 1e-9, dtype=torch.float64)
    probs[mv["abc"]], probs[mv["abd"]], probs[mv["abcd"]] = 0.3, 0.2, 0.1
    member_lp = torch.stack([(probs / probs.sum()).log(), torch.zeros(len(member))]).log_softmax(-1)
    prior = torch.full((2, len(ref)), 1e-12, dtype=torch.float64)
    prior[1, rv["c"]], prior[1, rv["cd"]], prior[1, rv["d"]] = 0.5, 0.25, 0.25
    prior[0, rv["a"]], prior[0, rv["ab"]] = 0.2, 0.6
    lp = prefix_logprobs(PrefixAligner(member, ref, use_cache=False), r_enc, m_enc, member_lp, prior.log())
    lp = lp.exp()
    # row 0: "abc" may be read by the reference as "a..." or "ab...": split 0.2 : 0.6 (the prior)
    assert float(lp[0, rv["ab"]]) == pytest.approx(0.75, abs=1e-6)
    assert float(lp[0, rv["a"]]) == pytest.approx(0.25, abs=1e-6)
    # row 1: remainders "c" and "cd" are each consistent with ref "c" and "cd" (split 2 : 1); "d" with "d"
    assert float(lp[1, rv["c"]]) == pytest.approx(0.4 / 0.6 * 2 / 3)
    assert float(lp[1, rv["cd"]]) == pytest.approx(0.4 / 0.6 / 3)
    assert float(lp[1, rv["d"]]) == pytest.approx(0.2 / 0.6)


def test_eos_mass_goes_to_reference_eos(toks) -> None:
    aligner = PrefixAligner(toks["bl"], toks["sp"])
    V_m = len(toks["bl"])
    lp = torch.full((1, V_m), -30.0, dtype=torch.float64)
    lp[0, toks["bl"].eos_token_id] = 0.0
    mapped = aligner.map_boundary(torch.log_softmax(lp, -1))
    assert int(mapped.argmax()) == toks["sp"].eos_token_id


# ---------------------------------------------------------------------------------------------- decoding


def recomputed(state: MemberTextState, prior=None) -> torch.Tensor:
    """What ``state.logprobs()`` must be, from one forward without a cache over the member's ids."""
    enc, aligner = state.enc, state.aligner
    rows = own_logprobs(state.model, enc.ids)
    n = len(enc.ids)
    if state.held:
        return aligner.map_conditional(rows[n - 1 : n], state.held, prior=prior)
    if n - 1 < enc.n_special:
        return aligner.map_boundary(rows[n - 1 : n], prior)
    partial = enc.stream[enc.starts[n - 1] :]
    return aligner.map_two_level(rows[n - 2 : n - 1], rows[n - 1 : n], enc.ids[n - 1], partial, prior)


@pytest.mark.parametrize("with_prior", [False, True])
@pytest.mark.parametrize(("member", "ref"), [("bl", "sp"), ("sp", "bl")])
def test_cached_decoding_equals_recomputation(toks, models_, member: str, ref: str, with_prior: bool) -> None:
    aligner = PrefixAligner(toks[member], toks[ref])
    ref_surfaces = aligner.reference.surfaces
    for text in TEXTS:
        state = MemberTextState(models_[member], toks[member], aligner, window=4)
        r_enc = encode_text(toks[ref], text)
        ref_rows = own_logprobs(models_[ref], r_enc.ids) if with_prior else None  # the reference's own
        k = r_enc.n_special + 4  # the prompt: the reference's first 4 tokens
        prior = None if ref_rows is None else ref_rows[k - 1 : k]
        out = state.start(r_enc.stream[len(r_enc.lead) : r_enc.starts[k]].decode(), prior)
        torch.testing.assert_close(out, recomputed(state, prior), rtol=0, atol=1e-5)
        for j in range(k, len(r_enc.ids)):  # the rest, as if the reference had sampled it
            prior = None if ref_rows is None or j + 1 == len(r_enc.ids) else ref_rows[j : j + 1]
            out = state.append(ref_surfaces[r_enc.ids[j]], prior)
            assert torch.logsumexp(out, -1).item() == pytest.approx(0.0, abs=1e-5)
            torch.testing.assert_close(out, recomputed(state, prior), rtol=0, atol=1e-5)
        assert state.data + state.held == text.encode()
        # the tail windows agree with a full encode, and the cache was used (no re-prefill per step)
        assert state.enc.ids == encode_text(toks[member], text).ids
        assert state.forwarded_tokens < 2 * len(state.enc.ids)


def test_incomplete_utf8_is_held_back(toks, models_) -> None:
    aligner = PrefixAligner(toks["sp"], toks["bl"])
    state = MemberTextState(models_["sp"], toks["sp"], aligner)
    state.start("x = '")
    out = state.append("é".encode()[:1])
    assert state.held == b"\xc3" and state.data == b"x = '"
    assert torch.logsumexp(out, -1).item() == pytest.approx(0.0, abs=1e-5)
    state.append("é".encode()[1:])
    assert state.held == b"" and state.data == "x = 'é".encode()


def test_bytes_that_can_never_form_a_character_become_replacement_chars(toks, models_) -> None:
    aligner = PrefixAligner(toks["sp"], toks["bl"])
    state = MemberTextState(models_["sp"], toks["sp"], aligner)
    state.start("x = '")
    out = state.append(b"\xcc")  # a lead byte: held back, it may still become a character
    assert state.held == b"\xcc"
    out = state.append(b"a")  # it did not: kept as U+FFFD, the text stays valid UTF-8
    assert state.held == b"" and state.data == "x = '\ufffda".encode()
    assert torch.logsumexp(out, -1).item() == pytest.approx(0.0, abs=1e-5)
    assert state.enc.ids == encode_text(toks["sp"], "x = '\ufffda").ids


def test_reference_logprobs_stacks_every_member_on_the_reference_rows(toks, models_) -> None:
    from types import SimpleNamespace

    from langchain_packllm.bytealign import reference_logprobs

    members = [SimpleNamespace(model=models_[n], tokenizer=toks[n]) for n in ("bl", "sp")]
    text = TEXTS[0]
    lp, r_enc = reference_logprobs(members, 1, text)
    assert r_enc.ids == encode_text(toks["sp"], text).ids
    assert lp.shape == (2, r_enc.n_text, len(toks["sp"]))
    own = own_logprobs(models_["sp"], r_enc.ids)[:-1].to(lp.dtype)
    torch.testing.assert_close(lp[1], own, rtol=0, atol=1e-6)  # the reference reads its own tokens
    total = torch.logsumexp(lp, -1)
    torch.testing.assert_close(total, torch.zeros_like(total), rtol=0, atol=1e-5)


@pytest.mark.parametrize(("member", "ref"), [("bl", "sp"), ("sp", "bl")])
def test_sparse_split_by_prior_equals_the_pair_by_pair_split(toks, models_, member, ref, monkeypatch) -> None:
    """The split of a member's mass by the reference's prior, as two sparse products (the path large
    boundary rows take), equals the pair-by-pair gather on every row of the texts; a row where some member
    token's consistent reference tokens all underflow falls back to the gather."""
    import langchain_packllm.bytealign as bytealign

    aligner = PrefixAligner(toks[member], toks[ref])
    for text in TEXTS:
        m_enc, r_enc = encode_text(toks[member], text), encode_text(toks[ref], text)
        prior = own_logprobs(models_[ref], r_enc.ids)[:-1]
        member_lp = own_logprobs(models_[member], m_enc.ids)
        monkeypatch.setattr(bytealign, "SPARSE_SPLIT_MIN_WORK", 1 << 62)
        want = prefix_logprobs(aligner, r_enc, m_enc, member_lp, prior)
        monkeypatch.setattr(bytealign, "SPARSE_SPLIT_MIN_WORK", 0)
        got = prefix_logprobs(aligner, r_enc, m_enc, member_lp, prior)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        # a prior with a single finite entry: most member tokens have no consistent mass (Z underflows)
        spiky = torch.full_like(prior[:1], float("-inf"))
        spiky[0, int(prior[0].argmax())] = 0.0
        member_row = member_lp[:1]
        sparse = aligner.map_boundary(member_row, spiky)
        monkeypatch.setattr(bytealign, "SPARSE_SPLIT_MIN_WORK", 1 << 62)
        torch.testing.assert_close(sparse, aligner.map_boundary(member_row, spiky), rtol=0, atol=0)
