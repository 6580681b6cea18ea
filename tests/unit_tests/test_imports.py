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
