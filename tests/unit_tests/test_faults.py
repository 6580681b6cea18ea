"""Fault injection on the disk side and at the edges: caches that cannot be written or are damaged, corrupt
packs and converted members, path traversal through user-given names, non-finite logits, an unreachable
hub, and memory held by the member cache.

Unwritable folders are simulated by :func:`read_only`, which makes every write under a folder fail with
``EROFS`` (so the checks hold when the tests run as root, as CI does); one check also uses a real
``chmod`` when not root.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import errno
import gc
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pytest

from langchain_packllm import PackLLM, alignment, members, paths
from langchain_packllm.alignment import MinEDMap
from langchain_packllm.config import SamplingConfig, WeightingConfig
from langchain_packllm.engine import FusionEngine
from langchain_packllm.lab.pack import PackCorruptError, build_pack, load_pack, verify_pack
from langchain_packllm.lab.pack import builder as builder_mod
from langchain_packllm.lab.pack.cli import add_pack_commands
from langchain_packllm.members import Member, clear_member_cache, load_member
from langchain_packllm.testing import (
    make_tiny_model,
    stdlib_text,
    train_bytelevel_tokenizer,
    train_metaspace_tokenizer,
)

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def read_only(*folders: str | os.PathLike):
    """Every write under ``folders`` (creating, opening for writing, renaming, removing) fails with EROFS."""
    roots = [os.path.realpath(f) for f in folders]

    def blocked(path) -> bool:
        if isinstance(path, int):
            return False
        try:
            real = os.path.realpath(os.fsdecode(os.fspath(path)))
        except TypeError:
            return False
        return any(real == r or real.startswith(r + os.sep) for r in roots)

    def refuse(path):
        raise OSError(errno.EROFS, "Read-only file system", os.fsdecode(os.fspath(path)))

    real_open, real_os_open = builtins.open, os.open
    saved = {name: getattr(os, name) for name in ("mkdir", "replace", "rename", "unlink", "remove", "rmdir")}

    def guarded(name):
        def call(path, *args, **kwargs):
            if blocked(path) or (name in ("replace", "rename") and args and blocked(args[0])):
                refuse(path)
            return saved[name](path, *args, **kwargs)

        return call

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and blocked(path):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def open_(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and blocked(file):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        for name in saved:
            mp.setattr(os, name, guarded(name))
        mp.setattr(os, "open", os_open)
        mp.setattr(builtins, "open", open_)
        mp.setattr(io, "open", open_)
        yield


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch, tmp_path):
    """A fresh $PACKLLM_HOME and fallback per test; no warning, in-memory map or probe carried over."""
    monkeypatch.setenv("PACKLLM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(paths.FALLBACK_ENV, raising=False)
    monkeypatch.setattr(paths, "_WARNED", set())
    monkeypatch.setattr(paths, "_TEMP_HOME", [])
    monkeypatch.setattr(alignment, "_IN_MEMORY", {})
    monkeypatch.setattr(members, "_HUB_PROBES", {})
    yield


@pytest.fixture(scope="module")
def tokenizers():
    text = stdlib_text(60_000)
    return train_bytelevel_tokenizer(text, 300), train_metaspace_tokenizer(text, 200)


@pytest.fixture(scope="module")
def mixed_paths(tmp_path_factory, tokenizers) -> list[str]:
    """Two tiny members with different tokenizers (GPT-2 byte-level, Llama metaspace), saved."""
    out = []
    for arch, tok in zip(("gpt2", "llama"), tokenizers):
        path = tmp_path_factory.mktemp(arch)
        make_tiny_model(arch, tok).save_pretrained(path)
        tok.save_pretrained(path)
        out.append(str(path))
    return out


def warnings_about(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and text in r.getMessage()]


# ---------------------------------------------------------------------------------------------- 1. alignment


DAMAGES = ["truncated", "empty", "flipped", "garbage", "wrong-shape", "out-of-range", "stale", "pickle"]


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_alignment_cache_is_rebuilt_identically(tmp_path, tokenizers, damage, caplog) -> None:
    src, dst = tokenizers
    built = MinEDMap.from_tokenizers(src, dst, cache_dir=tmp_path)
    (path,) = tmp_path.glob("mined-*.npz")
    data = path.read_bytes()
    with np.load(path) as archive:
        arrays = {name: archive[name] for name in archive.files}
    marker = tmp_path / "pickle-ran"
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "flipped":
        pos = data.index(b"\x93NUMPY") + 300
        path.write_bytes(data[:pos] + bytes([data[pos] ^ 0x55]) + data[pos + 1 :])
    elif damage == "garbage":
        path.write_bytes(os.urandom(len(data)))
    elif damage in ("wrong-shape", "out-of-range"):
        ids = arrays["ids"][:-1] if damage == "wrong-shape" else arrays["ids"].copy()
        if damage == "out-of-range":
            ids[3] = len(dst) + 10_000
        meta = json.loads(str(arrays["meta"]))
        meta["sha256"] = alignment._checksum({"ids": ids, "exact": arrays["exact"][: len(ids)]})
        with path.open(
            "wb"
        ) as f:  # a well-formed file, its checksum right: only the checks on values catch it
            np.savez(f, meta=np.array(json.dumps(meta)), ids=ids, exact=arrays["exact"][: len(ids)])
    elif damage == "stale":
        meta = json.loads(str(arrays["meta"]))
        meta["key"] = "0" * 64
        with path.open("wb") as f:
            np.savez(f, **{**arrays, "meta": np.array(json.dumps(meta))})
    else:  # an object array: loading it would unpickle, and the payload would create `marker`

        class Payload:
            def __reduce__(self):
                return (Path.touch, (marker,))

        with path.open("wb") as f:
            np.savez(f, meta=arrays["meta"], ids=np.array([Payload()], dtype=object), exact=arrays["exact"])
    with caplog.at_level(logging.WARNING):
        again = MinEDMap.from_tokenizers(src, dst, cache_dir=tmp_path)
    assert not again.from_cache and "rebuilding" in caplog.text
    assert np.array_equal(again.ids, built.ids) and np.array_equal(again.exact, built.exact)
    assert not marker.exists()
    assert MinEDMap.from_tokenizers(src, dst, cache_dir=tmp_path).from_cache  # rewritten, and sound


def test_an_unwritable_alignment_cache_warns_once_and_keeps_maps_in_memory(tmp_path, tokenizers, caplog):
    src, dst = tokenizers
    expected = MinEDMap.from_tokenizers(src, dst, use_cache=False)
    folder = tmp_path / "ro"
    with read_only(folder), caplog.at_level(logging.WARNING):
        first = MinEDMap.from_tokenizers(src, dst, cache_dir=folder)
        second = MinEDMap.from_tokenizers(src, dst, cache_dir=folder)
        back = MinEDMap.from_tokenizers(dst, src, cache_dir=folder)
    assert np.array_equal(first.ids, expected.ids) and np.array_equal(second.ids, expected.ids)
    assert second.from_cache  # from memory: not built twice
    assert back.src_vocab_size == len(dst)
    (message,) = warnings_about(caplog, "Cannot write the alignment cache")
    assert str(folder) in message and "PACKLLM_HOME" in message
    assert not folder.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permissions (read_only() covers it)")
def test_a_chmod_read_only_alignment_cache_keeps_maps_in_memory(tmp_path, tokenizers, caplog):
    src, dst = tokenizers
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with caplog.at_level(logging.WARNING):
            got = MinEDMap.from_tokenizers(src, dst, cache_dir=folder)
        assert np.array_equal(got.ids, MinEDMap.from_tokenizers(src, dst, use_cache=False).ids)
        assert warnings_about(caplog, "Cannot write the alignment cache")
    finally:
        folder.chmod(0o700)


def test_an_alignment_cache_path_that_is_a_directory_is_named_not_raised(tmp_path, tokenizers, caplog):
    src, dst = tokenizers
    built = MinEDMap.from_tokenizers(src, dst, cache_dir=tmp_path)
    (path,) = tmp_path.glob("mined-*.npz")
    path.unlink()
    path.mkdir()
    with caplog.at_level(logging.WARNING):
        again = MinEDMap.from_tokenizers(src, dst, cache_dir=tmp_path)
        MinEDMap.from_tokenizers(src, dst, cache_dir=tmp_path)
    assert np.array_equal(again.ids, built.ids)
    (message,) = warnings_about(caplog, "not a file")
    assert str(path) in message and "rm -r" in message


def test_a_mixed_pack_works_with_a_read_only_home(mixed_paths, tmp_path, caplog) -> None:
    """The issue's case: the token maps are built, the cache write fails, and every call still succeeds."""
    home = Path(os.environ["PACKLLM_HOME"])
    with read_only(home), caplog.at_level(logging.WARNING):
        llm = PackLLM.from_model_ids(mixed_paths, device="cpu", max_new_tokens=3)
        texts = [llm.invoke("def main(argv):"), llm.invoke("import os\n")]
        again = PackLLM.from_model_ids(mixed_paths, device="cpu", max_new_tokens=3)
        assert again.invoke("def main(argv):") == texts[0]
    assert all(isinstance(t, str) for t in texts)
    assert len(warnings_about(caplog, "Cannot write the alignment cache")) == 1
    assert not home.exists()


# ---------------------------------------------------------------------------------------------- 1-2. GGUF


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> str:
    pytest.importorskip("gguf")
    from langchain_packllm.testing import make_tiny_gguf

    return make_tiny_gguf(tmp_path_factory.mktemp("gguf") / "Tiny.Q8_0.gguf")


def test_a_gguf_member_with_a_read_only_home_converts_into_the_fallback(
    tiny_gguf, tmp_path, monkeypatch, caplog
):
    from langchain_packllm import gguf as gguf_mod

    home = Path(os.environ["PACKLLM_HOME"])
    monkeypatch.setenv(paths.FALLBACK_ENV, str(tmp_path / "fallback"))
    monkeypatch.setattr(gguf_mod, "_DIGESTS", {})
    clear_member_cache()
    with read_only(home), caplog.at_level(logging.WARNING):
        first = gguf_mod.convert_gguf(tiny_gguf)
        again = gguf_mod.convert_gguf(tiny_gguf)
        member = load_member(tiny_gguf, device="cpu")
    assert first.converted and not again.converted
    assert first.path == tmp_path / "fallback" / "models" / first.sha256 == Path(member.extra["converted"])
    (message,) = warnings_about(caplog, "Cannot write")
    assert str(home / "models") in message and paths.FALLBACK_ENV in message
    assert not home.exists()
    del member
    clear_member_cache()


def test_a_corrupt_converted_member_is_converted_again(tiny_gguf, monkeypatch, caplog) -> None:
    from langchain_packllm import gguf as gguf_mod

    monkeypatch.setattr(gguf_mod, "_DIGESTS", {})
    first = gguf_mod.convert_gguf(tiny_gguf)
    weights = first.path / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size // 2)
    with caplog.at_level(logging.WARNING):
        again = gguf_mod.convert_gguf(tiny_gguf)
    assert again.converted and str(first.path) in caplog.text
    assert gguf_mod.verify_converted(again.path, again.sha256, full=True) is None


def test_a_sha256_that_is_not_one_never_names_a_folder(tiny_gguf) -> None:
    from langchain_packllm import gguf as gguf_mod

    for bad in ("../../../../tmp/x", "a" * 63 + "/", "A" * 64):
        with pytest.raises(ValueError, match="sha256"):
            gguf_mod.convert_gguf(tiny_gguf, sha256=bad)
        with pytest.raises(ValueError, match="sha256"):
            gguf_mod.converted_dir(bad)


# ---------------------------------------------------------------------------------------------- 2-3. packs


@pytest.fixture(scope="module")
def notes(tmp_path_factory) -> str:
    """A small user corpus: real prose (the language reference's help topics), one file per topic."""
    from pydoc_data.topics import topics

    folder = tmp_path_factory.mktemp("notes")
    for name, text in list(topics.items())[:40]:
        (folder / f"{name}.txt").write_text(text)
    return str(folder / "*.txt")


def tiny_build(cache_dir, notes, **kwargs):
    return build_pack(
        "tiny", corpora={"notes": notes}, domains=[], cache_dir=cache_dir, time_budget_s=0.3, **kwargs
    )


def run_cli(*argv: str) -> int:
    import argparse

    parser = argparse.ArgumentParser()
    add_pack_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    return args.func(args)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_corrupt_expert_is_reported_by_verify_and_rebuilt_by_build(tmp_path, notes, damage, capsys, caplog):
    cache = tmp_path / "cache"
    manifest = tiny_build(cache, notes)
    weights = Path(manifest.expert("notes").path) / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 3])
    else:  # same size, a byte deep in the tensors flipped (loads fine: only the sha256 can tell)
        pos = len(data) - 100
        weights.write_bytes(data[:pos] + bytes([data[pos] ^ 0x01]) + data[pos + 1 :])
    argv = [
        "pack",
        "info",
        "--tiny",
        "--domains",
        "",
        "--corpus",
        f"notes={notes}",
        "--cache-dir",
        str(cache),
    ]
    if damage == "truncate":  # found at once from the size: load_pack itself refuses it
        with pytest.raises(PackCorruptError, match="packllm pack build"):
            load_pack("tiny", cache_dir=cache, domains=[], corpora={"notes": notes})
    assert run_cli(*argv[:2], "--verify", *argv[2:]) == 1
    err = capsys.readouterr().err
    assert str(weights) in err and "packllm pack build --tiny" in err and f"--cache-dir {cache}" in err
    with pytest.raises(PackCorruptError, match="model.safetensors"):
        verify_pack(manifest)
    with caplog.at_level(logging.WARNING):
        rebuilt = tiny_build(cache, notes)
    assert "corrupt" in caplog.text
    assert verify_pack(rebuilt) == {"notes": rebuilt.expert("notes").architecture}
    assert run_cli(*argv[:2], "--verify", *argv[2:]) == 0


@pytest.mark.parametrize("name", ["../../../../x", "a/b", "..", ".hidden", "", "x\\..\\y", "/abs"])
def test_a_corpus_name_cannot_write_outside_the_cache(tmp_path, notes, name) -> None:
    cache = tmp_path / "deep" / "er" / "cache"
    with pytest.raises(ValueError, match="corpus name"):
        build_pack("tiny", corpora={name: notes}, domains=[], cache_dir=cache, time_budget_s=0.3)
    assert not (tmp_path / "x").exists()
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_inside_refuses_paths_that_leave_the_root(tmp_path) -> None:
    assert paths.inside(tmp_path, "data", "a") == tmp_path / "data" / "a"
    for parts in (("..", "x"), ("data", "../../x"), ("/etc",)):
        with pytest.raises(ValueError, match="outside"):
            paths.inside(tmp_path, *parts)


def test_a_pack_with_a_read_only_home_is_reused_there_or_built_in_the_fallback(tmp_path, notes, caplog):
    home = Path(os.environ["PACKLLM_HOME"])
    built = tiny_build(None, notes)
    with read_only(home):  # a finished pack in a read-only home: reused, nothing written
        assert tiny_build(None, notes) == built
        assert load_pack("tiny", domains=[], corpora={"notes": notes}) == built
    fallback = tmp_path / "fallback"
    with read_only(home), caplog.at_level(logging.WARNING):
        os.environ[paths.FALLBACK_ENV] = str(fallback)
        try:
            other = tiny_build(None, notes, seed=1)
            assert load_pack("tiny", domains=[], corpora={"notes": notes}, seed=1) == other
        finally:
            del os.environ[paths.FALLBACK_ENV]
    assert Path(other.root).parent == fallback / "packs"
    assert len(warnings_about(caplog, "Cannot write")) == 1
    assert verify_pack(other)


KILLER = """
import os, signal, sys
from langchain_packllm.lab.pack import builder, manifest, train
point = sys.argv[2]
def die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)
if point == "data":
    def half_written(path, docs):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text('{"text": "half')
        die()
    builder.corpora.write_jsonl = half_written
elif point == "expert":
    real = train.save_expert
    def half(model, tok, path, info):
        model.save_pretrained(path)
        die()
    builder.save_expert = half
elif point == "manifest":
    real_replace = os.replace
    def replace(src, dst, *a, **k):
        if str(dst).endswith("manifest.json"):
            die()
        return real_replace(src, dst, *a, **k)
    os.replace = replace
builder.build_pack("tiny", corpora={"notes": sys.argv[3]}, domains=[], cache_dir=sys.argv[1], time_budget_s=0.3)
print("not killed")
"""


def test_kill_9_at_any_point_of_a_pack_build_recovers_on_rerun(tmp_path, notes) -> None:
    """Killed while writing the data, while saving an expert, and just before the manifest lands (the three
    run at once, each in its own cache); every rerun builds a sound pack."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    points = ("data", "expert", "manifest")
    procs = {
        point: subprocess.Popen(
            [sys.executable, "-c", KILLER, str(tmp_path / point), point, notes],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for point in points
    }
    for point, proc in procs.items():
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == -signal.SIGKILL, (point, err.decode()[-2000:])
        assert (tmp_path / point / "packs").is_dir()
        with pytest.raises(FileNotFoundError):  # a half-built pack is never taken for a finished one
            load_pack("tiny", cache_dir=tmp_path / point, domains=[], corpora={"notes": notes})
        assert verify_pack(tiny_build(tmp_path / point, notes))


def test_two_builds_at_once_serialise_on_the_lock(tmp_path, notes, monkeypatch) -> None:
    spans, real = [], builder_mod._build

    def timed(*args, **kwargs):
        start = time.monotonic()
        try:
            return real(*args, **kwargs)
        finally:
            spans.append((start, time.monotonic()))

    monkeypatch.setattr(builder_mod, "_build", timed)
    results = [None, None]

    def build(i):
        results[i] = tiny_build(tmp_path / "cache", notes)

    threads = [threading.Thread(target=build, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(spans) == 1  # one built it; the other waited on the lock, then reused it
    assert results[0] == results[1] and verify_pack(results[0])


# ---------------------------------------------------------------------------------------------- 4. logits


@pytest.fixture(scope="module")
def shared_members(tmp_path_factory, tokenizers):
    tok = tokenizers[0]
    out = []
    for i, arch in enumerate(("gpt2", "llama")):
        path = tmp_path_factory.mktemp(f"shared-{arch}")
        make_tiny_model(arch, tok, seed=i).save_pretrained(path)
        tok.save_pretrained(path)
        out.append(load_member(str(path), device="cpu"))
    return out


@pytest.mark.parametrize("where", ["prompt", "decode"])
@pytest.mark.parametrize("value", [float("nan"), float("-inf"), float("inf")])
@pytest.mark.parametrize("weighting", ["optimal", "fixed"])
def test_non_finite_logits_of_any_kind_raise_naming_the_member(shared_members, where, value, weighting):
    bad = copy.deepcopy(shared_members[1].model)

    def poison(module, args, output):
        if where == "prompt" or output.shape[1] == 1:
            output[...] = value  # every token: NaN, -inf or +inf
        return output

    bad.get_output_embeddings().register_forward_hook(poison)
    engine = FusionEngine([shared_members[0], Member("broken", bad, shared_members[1].tokenizer)])
    config = WeightingConfig(weighting=[0.5, 0.5] if weighting == "fixed" else "optimal")
    for temperature in (0.0, 0.8):
        with pytest.raises(FloatingPointError, match=r"'broken' produced non-finite logits"):
            engine.generate(
                ["import os\n"], config, SamplingConfig(max_new_tokens=3, temperature=temperature)
            )


# ---------------------------------------------------------------------------------------------- 5. the hub


def test_an_unknown_hub_id_fails_at_once_when_the_hub_is_unreachable(monkeypatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    for model_id in ("no-such-model-here", "no-such-org/no-such-model"):
        start = time.monotonic()
        with pytest.raises(OSError) as info:
            load_member(model_id, device="cpu")
        assert time.monotonic() - start < members.HUB_PROBE_SECONDS + 2
        text = str(info.value)
        assert repr(model_id) in text and "unreachable" in text and "127.0.0.1:9" in text
        assert "local folder" in text and ".gguf" in text


def test_hf_hub_offline_fails_at_once_and_says_so(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(OSError, match="HF_HUB_OFFLINE is set") as info:
        load_member("no-such-org/no-such-model", device="cpu")
    assert time.monotonic() - start < 2 and "local folder" in str(info.value)


def test_a_reachable_hub_is_asked_as_before(monkeypatch) -> None:
    """Online, a hub id goes to from_pretrained as given (no local_files_only), and ``org/name`` is a hub id."""
    seen = []

    def fake(source, **kwargs):
        seen.append((source, kwargs))
        raise OSError("404")

    monkeypatch.setattr(members, "hub_unreachable", lambda: None)
    monkeypatch.setattr(members.AutoTokenizer, "from_pretrained", fake)
    with pytest.raises(OSError, match="network if it is a hub id"):
        load_member("some-org/some-model", device="cpu")
    assert seen == [("some-org/some-model", {"trust_remote_code": False})]


def test_a_folder_that_is_not_a_model_says_what_is_missing(tmp_path) -> None:
    (tmp_path / "readme.txt").write_text("not a model")
    with pytest.raises(FileNotFoundError, match="no config.json") as info:
        load_member(str(tmp_path), device="cpu")
    assert "sentencepiece" not in str(info.value)


# ---------------------------------------------------------------------------------------------- 6. memory


def test_the_member_cache_shares_while_alive_and_forgets_when_freed(shared_members, tmp_path, tokenizers):
    path = tmp_path / "m"
    make_tiny_model("gpt2", tokenizers[0]).save_pretrained(path)
    tokenizers[0].save_pretrained(path)
    first = load_member(str(path), device="cpu")
    second = load_member(str(path), device="cpu", name="again")
    assert second.model is first.model and second.name == "again"
    gone = weakref.ref(first.model)
    del first, second
    gc.collect()
    assert gone() is None  # the cache alone does not keep a model
    third = load_member(str(path), device="cpu")
    clear_member_cache()
    assert load_member(str(path), device="cpu").model is not third.model


MEMORY = """
import gc, json, os, sys
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from langchain_packllm import PackLLM

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

small, big = sys.argv[1], sys.argv[2]
cfg = AutoConfig.from_pretrained(small)
cfg.update(dict(hidden_size=1024, intermediate_size=2048, num_hidden_layers=5, num_attention_heads=8,
                num_key_value_heads=4, head_dim=128))
with torch.device("meta"):
    shape = AutoModelForCausalLM.from_config(cfg)
from safetensors.torch import save_file
save_file({k: torch.full(v.shape, 0.01) for k, v in shape.state_dict().items()}, big + "/model.safetensors")
cfg.save_pretrained(big)
del shape
warm = PackLLM.from_model_ids([small], device="cpu", max_new_tokens=2)  # imports, kernels, allocator
warm.invoke("def f(x):")
del warm
gc.collect()
base = rss()
llm = PackLLM.from_model_ids([big], device="cpu", max_new_tokens=2)
llm.invoke("def f(x):")
loaded = rss()
del llm
gc.collect()
print(json.dumps({"base": base, "loaded": loaded, "after": rss()}))
"""


def test_a_pack_that_is_gone_frees_its_members(tmp_path, mixed_paths) -> None:
    """Resident memory after ``del llm`` returns within 10% of its level before the pack was loaded."""
    small = mixed_paths[1]
    big = tmp_path / "big"
    big.mkdir()
    for f in Path(small).iterdir():
        if "token" in f.name:
            (big / f.name).write_bytes(f.read_bytes())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY, small, str(big)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    mem = json.loads(proc.stdout.strip().splitlines()[-1])
    assert mem["loaded"] - mem["base"] > 150, mem  # the member was big enough to see
    assert mem["after"] <= 1.10 * mem["base"], mem
