"""Tests of the expert pack builder (`langchain_packllm.lab.pack`): corpora, tokenizers, training, cache.

The builds here are tiny and use only text present on every machine: the Python standard library
(`pycode`) and a user corpus of the language reference's help topics, written by the test.
Debian-packaged domains are tested when installed and skipped (with the apt-get command) when not.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from langchain_packllm.lab.pack import (
    CorpusUnavailableError,
    PackManifest,
    build_pack,
    default_pack_dir,
    load_pack,
)
from langchain_packllm.lab.pack import corpora as corpora_mod
from langchain_packllm.lab.pack.cli import add_pack_commands
from langchain_packllm.lab.pack.corpora import (
    chunk_text,
    load_domain,
    load_user_corpus,
    parse_corpus_spec,
    split_corpus,
)
from langchain_packllm.lab.pack.tokenizers import TOKENIZER_KINDS, train_tokenizer
from langchain_packllm.lab.pack.train import (
    ExpertRecipe,
    TrainConfig,
    evaluate,
    lr_at,
    make_model,
    pack_tokens,
    train_expert,
)


def write_reference_corpus(directory: Path) -> str:
    """A user corpus of real English prose present with every Python: the language reference topics
    that ``help()`` shows (``pydoc_data.topics``), one file per topic. Returns a glob for it."""
    from pydoc_data.topics import topics

    directory.mkdir(parents=True, exist_ok=True)
    for name, text in topics.items():
        (directory / f"{name}.txt").write_text(text)
    return str(directory / "*.txt")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and one thread is stable on a busy machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def docs_glob(tmp_path_factory) -> str:
    return write_reference_corpus(tmp_path_factory.mktemp("reference"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("packllm-cache")


@pytest.fixture(scope="module")
def shared_pack(cache_dir, docs_glob) -> PackManifest:
    return build_pack("tiny", "shared", corpora={"docs": docs_glob}, cache_dir=cache_dir, domains=["pycode"])


@pytest.fixture(scope="module")
def mixed_pack(cache_dir, docs_glob) -> PackManifest:
    return build_pack("tiny", "mixed", corpora={"docs": docs_glob}, cache_dir=cache_dir, domains=["pycode"])


# ----------------------------------------------------------------------------------------------------
# Corpora and split


def test_split_is_deterministic_and_heldout_is_never_trained_on():
    sources = load_domain("pycode", max_sources=60, seed=0)
    assert len(sources) >= 50
    a = split_corpus("pycode", sources, n_heldout=5, min_heldout_chars=300, heldout_max_chars=800, seed=0)
    b = split_corpus("pycode", sources, n_heldout=5, min_heldout_chars=300, heldout_max_chars=800, seed=0)
    c = split_corpus("pycode", sources, n_heldout=5, min_heldout_chars=300, heldout_max_chars=800, seed=1)
    assert a.heldout == b.heldout and a.train == b.train
    assert a.heldout != c.heldout
    assert len(a.heldout) == 5
    assert all(len(d) <= 800 for d in a.heldout)
    train_text = "\n".join(a.train)
    for doc in a.heldout:  # no held-out text (not even a long line of it) appears in training text
        assert doc not in train_text
        long_lines = [
            ln for ln in doc.splitlines() if len(ln) > 60 and ln.strip().startswith(("def ", "class "))
        ]
        for line in long_lines:
            assert line not in train_text, line


def test_split_caps_heldout_at_ten_percent_and_needs_two_documents():
    docs = [f"document number {i} " * 30 for i in range(30)]
    split = split_corpus("x", docs, n_heldout=100, min_heldout_chars=10)
    assert len(split.heldout) == 3 and len(split.train) == 27
    with pytest.raises(ValueError, match="at least 2"):
        split_corpus("x", ["only one document, long enough to count" * 3])


def test_chunk_text_respects_max_chars_and_keeps_the_text():
    text = "\n\n".join(f"paragraph {i} " + "word " * (i * 7 % 50) for i in range(80)) + "\n" + "x" * 2500
    pieces = chunk_text(text, 600)
    assert len(pieces) > 5
    assert all(len(p) <= 600 for p in pieces)
    squash = lambda s: "".join(s.split())  # noqa: E731
    assert squash("".join(pieces)) == squash(text)


def test_user_corpus_files_globs_and_big_files(tmp_path):
    (tmp_path / "a.txt").write_text("alpha " * 20)
    (tmp_path / "b.md").write_text("beta " * 20)
    (tmp_path / "bin.dat").write_bytes(b"\x00\x01\x02binary")
    big = "\n\n".join(f"Paragraph {i}: " + "text " * 40 for i in range(200))
    (tmp_path / "big.txt").write_text(big)
    docs = load_user_corpus("mine", str(tmp_path / "*.txt"), max_chars=1000)
    assert len(docs) > 20  # big.txt was split on blank lines
    assert sum("alpha" in d for d in docs) == 1
    assert not any("beta" in d for d in docs)  # not matched by the glob
    assert all(len(d) <= 1001 for d in docs)
    whole_dir = load_user_corpus("mine", tmp_path)
    assert any("beta" in d for d in whole_dir) and not any("binary" in d for d in whole_dir)
    assert parse_corpus_spec("legal=~/x/*.txt") == ("legal", "~/x/*.txt")
    for bad in ("noequals", "=path", "bad name=path"):
        with pytest.raises(ValueError, match="NAME=PATH_OR_GLOB|Bad corpus name"):
            parse_corpus_spec(bad)
    with pytest.raises(FileNotFoundError, match="no files match"):
        load_user_corpus("none", str(tmp_path / "*.nothing"))


def test_missing_debian_corpus_names_the_apt_command(monkeypatch, tmp_path):
    monkeypatch.setattr(corpora_mod, "FOLDOC_DICT", tmp_path / "missing" / "foldoc.dict.dz")
    with pytest.raises(CorpusUnavailableError, match=r"apt-get install -y dict-foldoc"):
        load_domain("foldoc")
    with pytest.raises(CorpusUnavailableError, match=r"apt-get install -y dict-foldoc"):
        build_pack("tiny", domains=["foldoc"], cache_dir=tmp_path / "cache")

    calls = []

    class Installed(Exception):
        pass

    def fake_install(packages):
        calls.append(sorted(packages))
        raise Installed

    monkeypatch.setattr(corpora_mod, "install_packages", fake_install)
    with pytest.raises(Installed):
        build_pack("tiny", domains=["foldoc"], cache_dir=tmp_path / "cache", install=True)
    assert calls == [["dict-foldoc"]]


def _installed(path: str) -> bool:
    return bool([p for p in Path("/").glob(path.lstrip("/"))])


@pytest.mark.parametrize(
    ("domain", "probe", "package"),
    [
        ("foldoc", "/usr/share/dictd/foldoc.dict.dz", "dict-foldoc"),
        ("manpages", "/usr/share/man/man2/open.2*", "manpages-dev"),
        ("pydocs", "/usr/share/doc/python3*/html/_sources", "python3-doc"),
        ("fortunes", "/usr/share/games/fortunes/fortunes", "fortunes"),
    ],
)
def test_debian_domains_when_installed(domain, probe, package):
    if not _installed(probe):
        pytest.skip(f"{domain}: {probe} not installed (apt-get install -y {package})")
    docs = load_domain(domain, max_sources=12, seed=0)
    assert 8 <= len(docs) <= 12
    assert all(isinstance(d, str) and len(d) > 20 for d in docs)
    assert docs == load_domain(domain, max_sources=12, seed=0)
    if domain == "foldoc":
        assert all("\n\n" in d and not d.startswith(" ") for d in docs)
    if domain == "manpages":
        assert sum("NAME" in d for d in docs) >= len(docs) - 1 and not any("\x08" in d for d in docs)
    if domain == "fortunes":
        assert not any(line.strip() == "%" for d in docs for line in d.splitlines())


# ----------------------------------------------------------------------------------------------------
# Tokenizers


TEXTS = [
    "def f(x):\n    return x + 1  # add one\n",
    "Hello world.\n\nA second   paragraph with  spaces, tabs\tand ünïcödé ☃ 漢字.",
]


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_tokenizer_round_trip_after_save_and_autotokenizer_load(kind, tmp_path):
    sample = load_domain("pycode", max_sources=15) + TEXTS * 5
    tok = train_tokenizer(sample, kind, vocab_size=800, model_max_length=128)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == len(tok) <= 800
    assert {loaded.bos_token, loaded.eos_token, loaded.pad_token, loaded.unk_token} == {
        tok.bos_token,
        tok.eos_token,
        tok.pad_token,
        tok.unk_token,
    } and len({loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id, loaded.unk_token_id}) == 4
    for text in TEXTS:
        ids = loaded(text)["input_ids"]
        assert ids == tok(text)["input_ids"]
        assert loaded.decode(ids, skip_special_tokens=True) == text
        assert (ids[0] == loaded.bos_token_id) == (kind != "bytelevel-bpe")  # Llama-style conventions add bos
    vocab = loaded.get_vocab()
    tokens = loaded.convert_ids_to_tokens(loaded("return x + 1")["input_ids"])
    if kind == "bytelevel-bpe":
        assert any(t.startswith("\u0120") for t in tokens) and "<0x0A>" not in vocab
    else:
        assert any(t.startswith("\u2581") for t in tokens)
        assert all(f"<0x{b:02X}>" in vocab for b in (0x0A, 0xE2, 0xFF))  # byte fallback pieces
        unseen = loaded.convert_ids_to_tokens(loaded("ℵ")["input_ids"])  # not in training text
        assert unseen[-3:] == ["<0xE2>", "<0x84>", "<0xB5>"], unseen  # -> its UTF-8 bytes
        assert loaded.decode(loaded("x ℵ y")["input_ids"], skip_special_tokens=True) == "x ℵ y"


# ----------------------------------------------------------------------------------------------------
# Training


def test_training_lowers_loss_and_stops_on_time_budget():
    docs = load_domain("pycode", max_sources=20)
    tok = train_tokenizer(docs, "metaspace-bpe", vocab_size=600, model_max_length=64)
    stream = pack_tokens(tok, docs, max_tokens=40_000)
    assert stream.dtype == torch.long and len(stream) == 40_000
    assert (stream == tok.eos_token_id).sum() >= 1 and stream[0] == tok.bos_token_id
    model = make_model(ExpertRecipe("qwen2", 48, 1, 2, 1, 128, 64), tok, seed=0)
    before = evaluate(model, tok, docs[:3], 64)
    result = train_expert(model, stream, TrainConfig(batch_size=8, max_steps=60, time_budget_s=60))
    after = evaluate(model, tok, docs[:3], 64)
    assert result.steps == 60 and result.train_tokens == 60 * 8 * 64
    assert after.loss < before.loss - 1.0, (before.loss, after.loss)
    assert abs(before.loss - math.log(len(tok))) < 0.5  # random init is near uniform
    assert after.bpb < before.bpb
    slow = train_expert(model, stream, TrainConfig(batch_size=8, max_steps=10**6, time_budget_s=0.5))
    assert 1 <= slow.steps < 10**6 and slow.seconds < 5
    cfg = TrainConfig(learning_rate=1.0, warmup=0.1, min_lr_ratio=0.1)
    assert lr_at(0.05, cfg) == pytest.approx(0.5) and lr_at(0.1, cfg) == pytest.approx(1.0)
    assert lr_at(1.0, cfg) == pytest.approx(0.1)


# ----------------------------------------------------------------------------------------------------
# Builder, manifest, cache


def test_tiny_shared_pack(shared_pack, cache_dir):
    m = shared_pack
    assert m.size == "tiny" and m.variant == "shared"
    assert m.expert_names == ["pycode", "docs"] and m.domain_names == ["pycode", "docs"]
    assert Path(m.root) == default_pack_dir(
        "tiny", "shared", cache_dir, ["pycode"], m.build_config["corpora"]
    )
    assert m.tokenizer_path and (Path(m.tokenizer_path) / "tokenizer.json").exists()
    assert {e.model_type for e in m.experts} == {"gpt_neox", "llama"}
    assert len({e.vocab_size for e in m.experts}) == 1
    for e in m.experts:
        assert 50_000 < e.params < 1_000_000 and e.train_steps > 0 and e.train_tokens > 0
        info = json.loads((Path(e.path) / "packllm.json").read_text())
        assert info["domain"] == e.domain and info["params"] == e.params
        assert info["train_loss"] == e.train_loss and info["heldout_loss"] == e.heldout_loss
    # held-out and training documents are stored and disjoint
    for d in m.domains:
        held, train = m.heldout_documents(d.name), m.train_documents(d.name)
        assert len(held) == d.n_heldout >= 2 and len(train) == d.n_train > len(held)
        assert not set(held) & set(train)
        assert d.source == ("builtin" if d.name == "pycode" else m.build_config["corpora"]["docs"])
    # every expert is best on its own domain
    loss = m.heldout_eval["loss"]
    for d in m.domain_names:
        others = [loss[e][d] for e in m.expert_names if e != d]
        assert loss[d][d] < min(others), (d, loss)
    # the manifest round-trips through JSON
    again = PackManifest.load(m.root)
    assert again == m
    assert json.loads((Path(m.root) / "manifest.json").read_text())["experts"][0]["path"] == "experts/pycode"


def test_experts_load_back_through_auto_classes(shared_pack):
    for e in shared_pack.experts:
        model = AutoModelForCausalLM.from_pretrained(e.path)
        tok = AutoTokenizer.from_pretrained(e.path)
        assert type(model).__name__ == e.architecture
        assert model.config.vocab_size == len(tok) == e.vocab_size
        assert model.config.eos_token_id == tok.eos_token_id
        ids = tok("import os\n", return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            logits = model(ids).logits  # (1, T, V)
        assert logits.shape == (1, ids.shape[1], e.vocab_size) and torch.isfinite(logits).all()
        # the saved weights are the trained ones: the held-out loss is reproduced
        docs = shared_pack.heldout_documents(e.domain)
        assert evaluate(model, tok, docs, e.context_length).loss == pytest.approx(e.heldout_loss, abs=2e-3)
        out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
        assert out.shape[1] == ids.shape[1] + 5


def test_tiny_mixed_pack_has_different_tokenizers(mixed_pack, shared_pack):
    m = mixed_pack
    assert m.tokenizer_path is None and Path(m.root) != Path(shared_pack.root)
    kinds = {e.name: e.tokenizer_kind for e in m.experts}
    assert kinds == {"pycode": "bytelevel-bpe", "docs": "metaspace-bpe"}
    toks = {e.name: AutoTokenizer.from_pretrained(e.path) for e in m.experts}
    assert toks["pycode"].eos_token == "<|endoftext|>" and toks["docs"].eos_token == "</s>"
    assert len(toks["pycode"]) != len(toks["docs"])
    bpb = m.heldout_eval["bpb"]  # bits per byte: comparable across tokenizers
    for d in m.domain_names:
        assert bpb[d][d] < min(bpb[e][d] for e in m.expert_names if e != d), bpb


def test_second_build_reuses_the_pack(shared_pack, cache_dir, docs_glob):
    weights = Path(shared_pack.expert("pycode").path) / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    again = build_pack("tiny", "shared", corpora={"docs": docs_glob}, cache_dir=cache_dir, domains=["pycode"])
    assert again == shared_pack
    # threads and the time budget are resources, not part of the pack's identity
    again = build_pack(
        "tiny", "shared", {"docs": docs_glob}, cache_dir, domains=["pycode"], threads=2, time_budget_s=1
    )
    assert again == shared_pack
    assert weights.stat().st_mtime_ns == mtime
    assert load_pack("tiny", "shared", cache_dir, ["pycode"], {"docs": docs_glob}) == shared_pack


def test_half_built_pack_is_rebuilt(tmp_path):
    first = build_pack("tiny", "shared", cache_dir=tmp_path, domains=["pycode"])
    root = Path(first.root)
    weights = root / "experts" / "pycode" / "model.safetensors"
    (root / "manifest.json").unlink()  # as if the build died before the manifest was written
    (root / "junk-from-a-crash").write_text("x")
    os.utime(weights, ns=(0, 0))
    with pytest.raises(FileNotFoundError, match="packllm pack build --tiny"):
        load_pack("tiny", "shared", tmp_path, ["pycode"])
    rebuilt = build_pack("tiny", "shared", cache_dir=tmp_path, domains=["pycode"])
    assert (root / "manifest.json").exists() and not (root / "junk-from-a-crash").exists()
    assert weights.stat().st_mtime_ns > 0
    assert rebuilt.heldout_documents("pycode") == first.heldout_documents("pycode")  # same split
    shutil.rmtree(root)


def test_load_pack_without_build_says_how_to_build(tmp_path):
    with pytest.raises(FileNotFoundError, match="packllm pack build --variant mixed"):
        load_pack("default", "mixed", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="Unknown pack size"):
        build_pack("huge", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="Unknown domain"):
        build_pack("tiny", domains=["klingon"], cache_dir=tmp_path)


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("PACKLLM_HOME", str(tmp_path / "home"))
    assert default_pack_dir("tiny", "mixed") == tmp_path / "home" / "packs" / "tiny-mixed"
    monkeypatch.delenv("PACKLLM_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_pack_dir() == tmp_path / "xdg" / "packllm" / "packs" / "default-shared"
    assert default_pack_dir("tiny", seed=1).name.startswith("tiny-shared-")


def test_cli_build_and_info(shared_pack, cache_dir, docs_glob, capsys):
    import argparse

    parser = argparse.ArgumentParser(prog="packllm")
    add_pack_commands(parser.add_subparsers(dest="command", required=True))
    common = ["--tiny", "--domains", "pycode", "--corpus", f"docs={docs_glob}", "--cache-dir", str(cache_dir)]
    args = parser.parse_args(["pack", "build", *common])
    assert args.func(args) == 0  # reuses the fixture's pack
    out = capsys.readouterr().out
    assert "pycode" in out and "docs" in out and "GPTNeoXForCausalLM" in out
    args = parser.parse_args(["pack", "info", "--verify", *common])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "verified pycode: AutoModelForCausalLM -> GPTNeoXForCausalLM" in out and "verified docs" in out
    args = parser.parse_args(["pack", "info", "--json", *common])
    assert args.func(args) == 0
    info = json.loads(capsys.readouterr().out)
    assert [e["name"] for e in info["experts"]] == ["pycode", "docs"]
    args = parser.parse_args(["pack", "info", "--variant", "mixed", "--cache-dir", str(cache_dir / "nope")])
    assert args.func(args) == 1
    assert "packllm pack build --variant mixed" in capsys.readouterr().out
