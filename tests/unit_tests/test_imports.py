import langchain_packllm

EXPECTED = [
    "ChatPackLLM",
    "FusionEngine",
    "FusionOutput",
    "FusionReport",
    "LoglikelihoodResult",
    "Member",
    "PackLLM",
    "SamplingConfig",
    "StreamChunk",
    "WeightingConfig",
    "__version__",
    "load_member",
]


def test_all_imports() -> None:
    assert sorted(langchain_packllm.__all__) == sorted(EXPECTED)
    for name in EXPECTED:
        assert hasattr(langchain_packllm, name)


def test_the_runtime_imports_no_lab_and_no_grammar_engine() -> None:
    """``import langchain_packllm`` is the fusion only: the lab and llguidance load on demand."""
    import subprocess
    import sys

    code = (
        "import sys, langchain_packllm\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('langchain_packllm.lab', 'llguidance', "
        "'langchain_packllm.constrained', 'matplotlib', 'sklearn', 'rapidfuzz')))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
