"""PackLLM inside LangChain: chains, streaming, batching, async, callbacks, reports."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import PromptTemplate
from langchain_core.runnables import ConfigurableField

from langchain_packllm import PackLLM


@pytest.fixture(scope="module")
def llm(tiny_paths) -> PackLLM:
    return PackLLM.from_model_ids(tiny_paths, device="cpu", max_new_tokens=12)


class TokenCollector(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.ended = 0

    def on_llm_new_token(self, token: str, **kwargs) -> None:
        self.tokens.append(token)

    def on_llm_end(self, response, **kwargs) -> None:
        self.ended += 1


class AsyncTokenCollector(AsyncCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    async def on_llm_new_token(self, token: str, **kwargs) -> None:
        self.tokens.append(token)


PROMPT = PromptTemplate.from_template("def {name}(argv):\n    return")


def test_chain_invoke_stream_batch_agree(llm: PackLLM) -> None:
    chain = PROMPT | llm | StrOutputParser()
    text = chain.invoke({"name": "main"})
    assert isinstance(text, str) and text
    streamed = list(chain.stream({"name": "main"}))
    assert len(streamed) > 1 and "".join(streamed) == text
    batch = chain.batch([{"name": "main"}, {"name": "parse_args_and_run"}])
    assert batch[0] == text


def test_generation_info_carries_the_report(llm: PackLLM) -> None:
    result = llm.generate(["import os", "class A:"])
    assert len(result.generations) == 2
    for gen in result.generations:
        info = gen[0].generation_info
        assert set(info["weights"]) == set(llm.engine.names)
        assert sum(info["weights"].values()) == pytest.approx(1.0)
        assert set(info["perplexities"]) == set(llm.engine.names)
        assert info["weighting"] == "optimal" and info["fused_perplexity"] > 0
    report = llm.fusion_report("import os")
    assert report.weights == pytest.approx(result.generations[0][0].generation_info["weights"], abs=1e-3)


def test_stream_report_on_final_chunk_only(llm: PackLLM) -> None:
    chunks = list(llm._stream("import os"))
    assert all(c.generation_info is None for c in chunks[:-1])
    assert "weights" in chunks[-1].generation_info


def test_callbacks_receive_streamed_tokens(llm: PackLLM) -> None:
    handler = TokenCollector()
    text = "".join(llm.stream("import os", config={"callbacks": [handler]}))
    assert handler.tokens and "".join(handler.tokens) == text
    assert handler.ended == 1


async def test_async_paths(llm: PackLLM) -> None:
    text = llm.invoke("import os")
    assert await llm.ainvoke("import os") == text
    handler = AsyncTokenCollector()
    pieces = [c async for c in llm.astream("import os", config={"callbacks": [handler]})]
    assert "".join(pieces) == text and "".join(handler.tokens) == text
    assert (await llm.abatch(["import os", "x = 1"]))[0] == text
    result = await llm.agenerate(["import os"])
    assert result.generations[0][0].generation_info["weights"]


def test_stop_sequences(llm: PackLLM) -> None:
    full = llm.invoke("import os", max_new_tokens=20)
    stop = full[4:6]
    cut = llm.invoke("import os", stop=[stop], max_new_tokens=20)
    assert cut == full[: full.find(stop)]
    assert "".join(llm.stream("import os", stop=[stop], max_new_tokens=20)) == cut


def test_concurrent_threadpool_calls_do_not_interfere(llm: PackLLM) -> None:
    prompts = ["import os", "class A:", "def f(x):", "x = [1, 2"] * 2
    expected = [llm.invoke(p) for p in prompts]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(llm.invoke, prompts))
    assert got == expected
    assert llm.batch(prompts, config={"max_concurrency": 4}) == expected


def test_configurable_fields_reuse_the_engine(llm: PackLLM) -> None:
    configurable = llm.configurable_fields(
        weighting=ConfigurableField(id="weighting"), max_new_tokens=ConfigurableField(id="max_new_tokens")
    )
    out = configurable.with_config(configurable={"weighting": "uniform", "max_new_tokens": 3}).invoke(
        "import os", config={"callbacks": []}
    )
    assert isinstance(out, str)
    gen = llm.model_copy(update={"weighting": "uniform"}).generate(["import os"]).generations[0][0]
    assert gen.generation_info["weighting"] == "uniform"


def test_identity_and_tokens(llm: PackLLM, tiny_paths) -> None:
    params = llm._identifying_params
    assert params["members"] == tiny_paths and params["weighting"] == "optimal"
    assert llm._llm_type == "packllm"
    assert llm.get_num_tokens("import os") == len(llm.engine.encode("import os")) > 0
    again = PackLLM.from_model_ids(tiny_paths, device="cpu")
    assert again.engine.members[0].model is llm.engine.members[0].model  # process cache, no reload


def test_from_models_and_loglikelihood(llm: PackLLM) -> None:
    members = llm.engine.members
    other = PackLLM.from_models(
        [m.model for m in members], members[0].tokenizer, names=["a", "b", "c"], weighting=[0.2, 0.3, 0.5]
    )
    gen = other.generate(["import os"]).generations[0][0]
    assert gen.generation_info["weights"] == pytest.approx({"a": 0.2, "b": 0.3, "c": 0.5})
    good = llm.loglikelihood("import os\nimport", " sys")
    assert good < 0
    with pytest.raises(ValueError, match="3 members"):
        PackLLM.from_models([m.model for m in members], members[0].tokenizer, weighting=[0.5, 0.5])
