"""Vocabulary alignment: surfaces, MinED maps, prefix maps and their disk cache.

Tokenizers are made here with the `tokenizers` library (hand-written vocabularies where the test needs an
exact answer, small ones trained on Python's stdlib source where it needs a realistic one).
"""

from __future__ import annotations

import doctest
import logging
import os
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from langchain_packllm import alignment
from langchain_packllm.alignment import (
    Convention,
    MinEDMap,
    PrefixMap,
    default_cache_dir,
    detect_convention,
    map_logits_mined,
    normalize_token,
    token_bytes,
    tokenizer_surfaces,
)

BYTE_CHARS = bytes_to_unicode()  # byte -> GPT-2 char, the reference implementation


# ---------------------------------------------------------------------------------------------- helpers


def byte_level_tok(extra: list[str], specials: dict[str, str] | None = None) -> PreTrainedTokenizerFast:
    """GPT-2 style: the 256 byte chars, then ``extra`` (already spelled with Ġ/Ċ), then specials."""
    vocab = {ch: i for i, ch in enumerate(BYTE_CHARS[b] for b in range(256))}
    for token in extra:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


def llama2_tok(pieces: list[str], pre_tokenizer: bool = False) -> PreTrainedTokenizerFast:
    """Llama-2 style: <unk>, <s>, </s>, <0x00>..<0xFF> byte fallback, then ``pieces`` (spelled with ▁)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    if pre_tokenizer:  # newer Mistral-style: a Metaspace pre-tokenizer and decoder
        backend.pre_tokenizer = pre_tokenizers.Metaspace()
        backend.decoder = decoders.Metaspace()
    else:  # Llama-2 style: normalizer replaces spaces, decoder undoes it
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def wordpiece_tok(words: list[str]) -> PreTrainedTokenizerFast:
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def word_tok(words: list[str], **specials: str) -> PreTrainedTokenizerFast:
    """Plain word-level tokenizer: the vocabulary is ``words`` in order, then the special tokens."""
    vocab = {w: i for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=specials.get("unk_token")))
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


def stdlib_text(n_chars: int = 400_000) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="ignore")
        chunks.append(text)
        total += len(text)
        if total >= n_chars:
            break
    return chunks


@pytest.fixture(scope="module")
def trained_byte_level() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1200,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(stdlib_text() + ["héllo wörld ∑ 日本語"], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )


@pytest.fixture(scope="module")
def trained_metaspace() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=900, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    backend.train_from_iterator(stdlib_text(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def token_id(tok: PreTrainedTokenizerFast, token: str) -> int:
    return tok.get_vocab()[token]


# ---------------------------------------------------------------------------------------------- surfaces


def test_byte_level_surfaces() -> None:
    assert normalize_token("Ġhello", "byte_level") == " hello"
    assert normalize_token("ĊĊ", "byte_level") == "\n\n"
    assert normalize_token("ĉ", "byte_level") == "\t"
    assert token_bytes("Ã©", "byte_level") == "é".encode()
    assert normalize_token("Ã©", "byte_level") == "é"
    assert token_bytes("Ã", "byte_level") == b"\xc3"  # half a UTF-8 char...
    assert normalize_token("Ã", "byte_level") == "\udcc3"  # ...kept distinct from any real char
    # Chars outside the alphabet (a hand-added token stored verbatim) are their own UTF-8.
    assert token_bytes("Ġ日本", "byte_level") == " 日本".encode()
    assert token_bytes("a\x80", "byte_level") == b"a\xc2\x80"  # U+0080 is not in the alphabet
    # The whole alphabet, against transformers' own bytes_to_unicode.
    for byte, char in BYTE_CHARS.items():
        assert token_bytes(char, Convention.BYTE_LEVEL) == bytes([byte])


def test_metaspace_byte_fallback_and_wordpiece_surfaces() -> None:
    assert normalize_token("▁the", "metaspace") == " the"
    assert normalize_token("▁▁", "metaspace") == "  "
    assert token_bytes("<0x0A>", "metaspace") == b"\n"
    assert token_bytes("<0xC3>", "metaspace") == b"\xc3"
    assert token_bytes("<0x0A>", "metaspace", byte_fallback=False) == b"<0x0A>"
    assert token_bytes("a<0x0A>", "metaspace") == b"a<0x0A>"  # only a whole token is a byte
    assert normalize_token("##ing", "wordpiece") == "ing"
    assert normalize_token("the", "wordpiece") == " the"
    assert normalize_token("Ġx▁", "plain") == "Ġx▁"


def test_detect_convention() -> None:
    assert detect_convention(byte_level_tok([]))[0] is Convention.BYTE_LEVEL
    llama = detect_convention(llama2_tok(["▁the"]))
    assert llama[:2] == (Convention.METASPACE, True)
    assert detect_convention(llama2_tok(["▁the"], pre_tokenizer=True))[0] is Convention.METASPACE
    assert detect_convention(wordpiece_tok(["the", "##s"]))[0] is Convention.WORDPIECE
    assert detect_convention(word_tok(["a", "b"], unk_token="a"))[0] is Convention.PLAIN


def test_trained_byte_level_surfaces_match_decode(trained_byte_level) -> None:
    """Every token whose bytes are whole UTF-8 decodes (through the real tokenizer) to its surface."""
    surfaces = tokenizer_surfaces(trained_byte_level)
    checked = 0
    for i, surface in enumerate(surfaces.surfaces):
        if surface is None:
            continue
        try:
            text = surface.decode("utf-8")
        except UnicodeDecodeError:
            continue
        assert trained_byte_level.decode([i]) == text
        checked += 1
    assert checked > 1000
    assert surfaces.surfaces[token_id(trained_byte_level, "Ġ")] == b" "


def test_added_tokens_are_verbatim_text_and_change_the_fingerprint() -> None:
    tok = byte_level_tok(["Ġthe"])
    before = tokenizer_surfaces(tok)
    tok.add_tokens(["new word"])  # stored as plain text, not in the byte alphabet
    after = tokenizer_surfaces(tok)
    assert after.surfaces[token_id(tok, "new word")] == b"new word"
    assert after.fingerprint != before.fingerprint


def test_llama_surfaces_and_specials() -> None:
    tok = llama2_tok(["▁the", "é", "A"])
    surfaces = tokenizer_surfaces(tok)
    assert surfaces.surfaces[token_id(tok, "▁the")] == b" the"
    assert surfaces.surfaces[3 + 0x0A] == b"\n"
    assert surfaces.surfaces[0] is None and surfaces.surfaces[1] is None  # specials have no text
    assert surfaces.role_to_id == {"eos": 2, "bos": 1, "unk": 0}


# ---------------------------------------------------------------------------------------------- MinED maps


def test_identical_tokenizers_give_identity_map(trained_byte_level) -> None:
    m = MinEDMap.from_tokenizers(trained_byte_level, trained_byte_level, use_cache=False)
    assert m.ids.dtype == np.int64
    assert np.array_equal(m.ids, np.arange(len(trained_byte_level)))
    assert m.exact.all() and m.n_exact == len(trained_byte_level) and m.exact_fraction == 1.0


def test_near_misses_follow_edit_distance_then_prefix_then_id() -> None:
    src = word_tok(["<unk>", "get", "cat", "dogs"], unk_token="<unk>")
    dst = word_tok(["<unk>", "cap", "gel", "ge", "gets", "cab", "dog", "cog"], unk_token="<unk>")
    m = MinEDMap.from_tokenizers(src, dst, use_cache=False)
    # "get": "gel", "ge", "gets" are all 1 edit away; "gets" shares the longest prefix.
    assert m.ids[1] == token_id(dst, "gets")
    # "cat": "cap" and "cab" are 1 edit away with the same prefix "ca"; the lower id wins.
    assert m.ids[2] == token_id(dst, "cap")
    assert m.ids[3] == token_id(dst, "dog")
    assert m.exact.tolist() == [True, False, False, False]


def test_cross_convention_exact_matches() -> None:
    gpt2 = byte_level_tok(["Ġthe", "Ġcat", "Ã©", "Ġthere"])
    llama = llama2_tok(["▁the", "▁cat", "é", "A", "▁ther"])
    m = MinEDMap.from_tokenizers(gpt2, llama, use_cache=False)
    assert m.ids[token_id(gpt2, "Ġthe")] == token_id(llama, "▁the")
    assert m.ids[token_id(gpt2, "Ã©")] == token_id(llama, "é")
    assert m.ids[token_id(gpt2, BYTE_CHARS[0x0A])] == 3 + 0x0A  # "Ċ" -> "<0x0A>"
    assert m.ids[token_id(gpt2, "A")] == token_id(llama, "A")  # the real "A" beats "<0x41>"
    assert m.ids[token_id(gpt2, "Ġthere")] == token_id(llama, "▁ther")
    assert not m.exact[token_id(gpt2, "Ġthere")] and m.exact[token_id(gpt2, "Ġthe")]
    assert m.exact[token_id(gpt2, BYTE_CHARS[0xC3])]  # half of "é": the byte-fallback token <0xC3>
    assert m.ids[token_id(gpt2, BYTE_CHARS[0xC3])] == 3 + 0xC3


def test_special_tokens_map_by_role_never_to_text() -> None:
    gpt2 = byte_level_tok(["Ġthe", "</s>", "<s>"])  # "</s>" and "<s>" here are ordinary text tokens
    llama = llama2_tok(["▁the", "</", "s>"])
    eot = token_id(gpt2, "<|endoftext|>")
    forward = MinEDMap.from_tokenizers(gpt2, llama, use_cache=False)
    assert forward.ids[eot] == 2 and forward.exact[eot]  # bos/eos/unk <|endoftext|> -> eos </s>
    llama_specials = {0, 1, 2}
    regular = [i for i in range(len(gpt2)) if i != eot]
    assert not llama_specials & set(forward.ids[regular].tolist())  # text never lands on a special
    backward = MinEDMap.from_tokenizers(llama, gpt2, use_cache=False)
    assert backward.ids[:3].tolist() == [eot, eot, eot]  # <unk>, <s>, </s> all play a role eot plays
    assert eot not in set(backward.ids[3:].tolist())


def test_role_less_specials_match_content_else_unk() -> None:
    src = word_tok(["<unk>", "a", "<|im_start|>", "<|tool|>"], unk_token="<unk>")
    src.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|tool|>"]})
    dst = word_tok(["b", "<unk>", "a", "<|im_start|>"], unk_token="<unk>")
    dst.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    m = MinEDMap.from_tokenizers(src, dst, use_cache=False)
    assert m.ids[2] == 3 and m.exact[2]  # same content on both sides
    assert m.ids[3] == 1 and not m.exact[3]  # no counterpart: dst unk, flagged inexact
    assert m.ids[1] == 2 and m.ids[0] == 1


def test_map_ids_and_map_logits_mined() -> None:
    ref = word_tok(["<unk>", "get", "the", "dog"], unk_token="<unk>")
    member = word_tok(["<unk>", "the", "gets", "do", "zzz"], unk_token="<unk>")
    ref_to_member = MinEDMap.from_tokenizers(ref, member, use_cache=False)
    assert ref_to_member.map_ids(torch.tensor([[1, 2, 3]])).tolist() == [[2, 1, 3]]
    member_logits = torch.arange(2 * 6, dtype=torch.float32).reshape(2, 6)  # (B, V_member + 1 padded)
    ref_logits = map_logits_mined(member_logits, ref_to_member)  # (B, V_ref)
    assert ref_logits.shape == (2, 4)
    assert ref_logits.tolist() == [[0.0, 2.0, 1.0, 3.0], [6.0, 8.0, 7.0, 9.0]]
    with pytest.raises(ValueError, match="member's tokenizer has 5 tokens"):
        map_logits_mined(member_logits[:, :4], ref_to_member)


# ---------------------------------------------------------------------------------------------- disk cache


def test_cache_reused_then_rebuilt_for_a_changed_tokenizer(
    tmp_path, monkeypatch, trained_byte_level, trained_metaspace
) -> None:
    first = MinEDMap.from_tokenizers(trained_byte_level, trained_metaspace, cache_dir=tmp_path)
    files = list(tmp_path.glob("mined-*.npz"))
    assert not first.from_cache and len(files) == 1
    mtime = files[0].stat().st_mtime_ns

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt although a valid cache file exists")

    monkeypatch.setattr(alignment, "_build_mined", no_build)
    second = MinEDMap.from_tokenizers(trained_byte_level, trained_metaspace, cache_dir=tmp_path)
    assert second.from_cache and second.key == first.key
    assert np.array_equal(second.ids, first.ids) and np.array_equal(second.exact, first.exact)
    assert files[0].stat().st_mtime_ns == mtime
    monkeypatch.undo()

    changed = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(trained_metaspace.backend_tokenizer.to_str()),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )
    changed.add_tokens(["zzqy"])
    third = MinEDMap.from_tokenizers(trained_byte_level, changed, cache_dir=tmp_path)
    assert third.key != first.key and not third.from_cache
    assert len(list(tmp_path.glob("mined-*.npz"))) == 2
    assert third.dst_vocab_size == first.dst_vocab_size + 1


@pytest.mark.parametrize("damage", ["truncate", "flip", "edited", "stale"])
def test_damaged_cache_is_rebuilt_not_trusted(tmp_path, caplog, damage) -> None:
    src = byte_level_tok(["Ġthe", "Ġcat"])
    dst = llama2_tok(["▁the", "▁ca"])
    built = MinEDMap.from_tokenizers(src, dst, cache_dir=tmp_path)
    (path,) = tmp_path.glob("mined-*.npz")
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":  # corrupt the stored ids (zip CRC or our checksum must catch it)
        pos = data.index(b"\x93NUMPY") + 200
        path.write_bytes(data[:pos] + bytes([data[pos] ^ 0xFF]) + data[pos + 1 :])
    elif damage == "edited":  # a well-formed zip whose ids no longer match the header's checksum
        with np.load(path) as archive:
            arrays = {name: archive[name] for name in archive.files}
        arrays["ids"][len(arrays["ids"]) // 2] += 1
        with path.open("wb") as f:
            np.savez(f, **arrays)
    else:  # a well-formed file built for another pair, sitting under this pair's name
        other = tmp_path / "other"
        MinEDMap.from_tokenizers(src, llama2_tok(["▁the", "▁cat"]), cache_dir=other)
        (other_path,) = other.glob("mined-*.npz")
        other_path.replace(path)
    with caplog.at_level(logging.WARNING, logger="langchain_packllm.alignment"):
        again = MinEDMap.from_tokenizers(src, dst, cache_dir=tmp_path)
    assert not again.from_cache
    assert "rebuilding" in caplog.text
    assert np.array_equal(again.ids, built.ids)
    assert MinEDMap.from_tokenizers(src, dst, cache_dir=tmp_path).from_cache  # the rewrite is good


def test_default_cache_dir_precedence(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PACKLLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "home" / "alignment"
    monkeypatch.delenv("PACKLLM_HOME")
    assert default_cache_dir() == tmp_path / "xdg" / "packllm" / "alignment"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path(os.path.expanduser("~")) / ".cache" / "packllm" / "alignment"


# ---------------------------------------------------------------------------------------------- prefix maps


def test_prefix_rule_longest_prefix_and_specials() -> None:
    gpt2 = byte_level_tok(["Ġthe", "Ġthere", "Ġt", "Ġcat"])
    llama = llama2_tok(["▁the", "▁t", "▁", "▁cats"])
    m = PrefixMap.from_tokenizers(gpt2, llama, use_cache=False)
    assert m.dst_index[token_id(gpt2, "Ġthere")] == token_id(llama, "▁the")  # longest dst prefix
    assert m.dst_index[token_id(gpt2, "Ġthe")] == token_id(llama, "▁the") and m.whole[token_id(gpt2, "Ġthe")]
    assert m.dst_index[token_id(gpt2, "Ġcat")] == token_id(llama, "▁")  # not "▁cats": it goes further
    assert m.dst_index[token_id(gpt2, "<|endoftext|>")] == 2


def test_prefix_map_preserves_mass(trained_byte_level, trained_metaspace, tmp_path) -> None:
    torch.manual_seed(0)
    for src, dst in [(trained_byte_level, trained_metaspace), (trained_metaspace, trained_byte_level)]:
        m = PrefixMap.from_tokenizers(src, dst, cache_dir=tmp_path)
        logits = 3 * torch.randn(4, len(src) + 3)  # (B, V_src + padding a model might have)
        logprobs = logits[:, : len(src)].log_softmax(-1)
        mapped = m.map_logprobs(logprobs)  # (B, V_dst)
        assert mapped.shape == (4, len(dst))
        assert torch.allclose(mapped.exp().sum(-1), torch.ones(4), atol=1e-5)
        # Against a plain scatter-add of the same rule.
        expected = torch.zeros(4, len(dst)).index_add_(1, torch.as_tensor(m.dst_index), logprobs.exp())
        assert torch.allclose(mapped.exp(), expected, atol=1e-6)
        receives = np.zeros(len(dst), dtype=bool)
        receives[m.dst_index] = True
        assert torch.isneginf(mapped[:, ~torch.as_tensor(receives)]).all()
        dense = m.matrix().to_dense()  # (V_src, V_dst)
        assert torch.equal(dense.sum(1), torch.ones(len(src)))
        assert PrefixMap.from_tokenizers(src, dst, cache_dir=tmp_path).from_cache


def test_prefix_map_in_log_space_survives_tiny_logprobs() -> None:
    m = PrefixMap(np.array([0, 0, 1]), np.array([True, False, True]), dst_vocab_size=2)
    logprobs = torch.tensor([[-1000.0, -1001.0, -2000.0]])  # would underflow as plain probabilities
    mapped = m.map_logprobs(logprobs)
    assert torch.allclose(mapped, torch.tensor([[-1000.0 + float(np.log1p(np.exp(-1.0))), -2000.0]]))


def test_module_docstring_examples_run() -> None:
    result = doctest.testmod(alignment, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 15 and result.failed == 0


# ------------------------------------------------------------------------- the fast nearest-token search


def naive_nearest(queries: list[str], choices: list[str]) -> list[int]:
    """MinED's rule written plainly: every query against every choice; minimum Levenshtein distance, then
    the longest common prefix over the first 32 chars, then the lowest index."""
    from rapidfuzz.distance import Levenshtein

    def shared_prefix(a: str, b: str) -> int:
        n = 0
        for x, y in zip(a[:32], b[:32], strict=False):
            if x != y:
                break
            n += 1
        return n

    out = []
    for q in queries:
        keys = [(Levenshtein.distance(q, c), -shared_prefix(q, c), j) for j, c in enumerate(choices)]
        out.append(min(keys)[2])
    return out


def random_words(rng: np.random.Generator, n: int, alphabet: str, max_len: int) -> list[str]:
    words = {"".join(rng.choice(list(alphabet), size=rng.integers(1, max_len + 1))) for _ in range(n)}
    return sorted(words, key=lambda w: rng.random())


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("seed", range(4))
def test_fast_search_equals_exhaustive_on_random_vocabularies(seed: int, threads: int) -> None:
    rng = np.random.default_rng(seed)
    # few letters and short words: many equal distances, so every tie-break is exercised
    alphabet = ["ab ", "abcde ", "aé東Ж1 ", "xyz\n\t"][seed]
    choices = random_words(rng, 400, alphabet, 7)
    queries = [w for w in random_words(rng, 300, alphabet + "Q", 9) if w not in set(choices)]
    got = alignment._nearest_by_edit_distance(queries, choices, "test", threads=threads)
    assert got.tolist() == naive_nearest(queries, choices)


def test_fast_search_handles_many_ties_and_long_prefixes() -> None:
    # 100 choices at the same distance from every query (more than the per-row tie limit), and prefixes
    # longer than the 32 chars the tie-break looks at
    choices = [f"z{i:03d}" for i in range(100)] + ["a" * 40 + "b", "a" * 40 + "c", "a" * 35]
    queries = ["q", "qq", "qqqq", "a" * 40 + "d", "a" * 33, "z1", "z10"]
    got = alignment._nearest_by_edit_distance(queries, choices, "test", threads=2)
    assert got.tolist() == naive_nearest(queries, choices)


def test_fast_mined_map_equals_exhaustive_on_trained_tokenizers(trained_byte_level, trained_metaspace):
    for src, dst in [(trained_byte_level, trained_metaspace), (trained_metaspace, trained_byte_level)]:
        s, d = tokenizer_surfaces(src), tokenizer_surfaces(dst)
        ids, exact = alignment._build_mined(s, d)
        targets = alignment._canonical_targets(d)
        choice_ids = sorted(targets.values())
        choices = [d.surfaces[i].decode("utf-8", "surrogateescape") for i in choice_ids]
        approximate = [i for i, b in enumerate(s.surfaces) if b is not None and b not in targets]
        assert len(approximate) > 20  # the two vocabularies differ enough for the search to matter
        queries = [s.surfaces[i].decode("utf-8", "surrogateescape") for i in approximate]
        assert ids[approximate].tolist() == [choice_ids[j] for j in naive_nearest(queries, choices)]
        assert not exact[approximate].any()


@pytest.mark.parametrize(("budget", "max_length"), [(0, 24), (4, 3), (256, 24), (10**9, 24)])
@pytest.mark.parametrize("seed", range(3))
def test_neighbourhood_index_and_seeds_keep_the_exhaustive_answer(monkeypatch, seed, budget, max_length):
    # the index settles queries within distance 2 (all of them when nothing is over budget), leaves the
    # rest to the scan seeded with what it found, and the substring seeds and tie bounds prune the scan:
    # whatever the split, the answer is the all-pairs one (duplicate choices: the lower index)
    monkeypatch.setattr(alignment, "_INDEX_BUDGET", budget)
    monkeypatch.setattr(alignment, "_INDEX_MAX_LENGTH", max_length)
    rng = np.random.default_rng(100 + seed)
    alphabet = ["abc ", "abcdefgh", "aé東Ж😀\udc80 "][seed]
    choices = random_words(rng, 500, alphabet, 8)
    choices += choices[:20]
    queries = [w for w in random_words(rng, 400, alphabet + "Q", 11) if w not in set(choices)]
    search = alignment._NearestSearch(queries, choices)
    got = search.run(2, "test")
    assert got.tolist() == naive_nearest(queries, choices)
    lengths = np.array([len(q) for q in queries])
    if budget == 0:
        assert not search.done.any()
    if budget == 10**9:  # settled: exactly the queries within 2 of a choice (and short enough)
        assert search.done.any() and not search.done.all()
        assert (search.done == ((search.best <= 2) & (lengths <= max_length))).all()


def test_scan_skips_blocks_that_can_only_tie_and_lose() -> None:
    # queries in a script the choices barely have: their best distance ties with many ASCII blocks, where
    # the prefix bound (the query's first char, the classes of its leading chars) and the lowest index
    # decide; the answers must still be the all-pairs ones
    rng = np.random.default_rng(7)
    choices = random_words(rng, 600, "abcdefg ", 6) + [" ", " ж", "ж", "жa", "a ж"]
    choices = sorted(set(choices), key=lambda w: rng.random())
    queries = ["жжжж", " жжж", " жкл", "клмн", "a клм", " a жк", "жaaa", "ж", "кж ", "abcdefgжж"]
    got = alignment._nearest_by_edit_distance(queries, choices, "test", threads=1)
    assert got.tolist() == naive_nearest(queries, choices)
