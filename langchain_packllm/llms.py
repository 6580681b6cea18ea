"""``PackLLM``: a LangChain ``LLM`` over a :class:`~langchain_packllm.engine.FusionEngine`.

The adapter is thin: pydantic fields for the settings, LangChain's callbacks and streaming contract, and
nothing else. Generation, weights and scoring live in the engine.

Example::

    >>> from langchain_core.prompts import PromptTemplate
    >>> from langchain_packllm import PackLLM
    >>> llm = PackLLM.from_model_ids(["./experts/code", "./experts/docs"], max_new_tokens=32)
    >>> chain = PromptTemplate.from_template("Question: {q}\\nAnswer:") | llm
    >>> chain.invoke({"q": "What does fork() return?"})
    >>> llm.fusion_report("Question: What does fork() return?\\nAnswer:").weights
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models.llms import LLM
from langchain_core.outputs import Generation, GenerationChunk, LLMResult
from langchain_core.runnables.config import run_in_executor

from langchain_packllm.adapters import PackSettings, astream_in_executor, report_info


class PackLLM(PackSettings, LLM):
    """Several causal LMs answering as one (Pack of LLMs, Mavromatis et al. 2024).

    For each prompt every member scores the prompt, the weights that minimise the fused model's prompt
    perplexity are solved (``weighting``), and decoding samples from ``softmax(sum_k w_k * logits_k)``.
    Every generation's ``generation_info`` carries the weights and perplexities.

    Build one with :meth:`from_model_ids` (hub ids or local paths) or :meth:`from_models` (loaded models).
    The fields (``weighting``, ``max_new_tokens``, ``temperature``, ...) are those of
    :class:`~langchain_packllm.adapters.PackSettings`.
    """

    # ------------------------------------------------------------------ LangChain plumbing

    @property
    def _llm_type(self) -> str:
        return "packllm"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return self._pack_params()

    def _call(self, prompt: str, stop: list[str] | None = None, run_manager=None, **kwargs: Any) -> str:
        return self._generate([prompt], stop, run_manager, **kwargs).generations[0][0].text

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        weighting, sampling = self._settings(stop, kwargs)
        outputs = self.engine.generate(prompts, weighting, sampling)
        return LLMResult(
            generations=[[Generation(text=o.text, generation_info=report_info(o))] for o in outputs],
            llm_output={"members": self.engine.names, "weighting": weighting.name},
        )

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        return await run_in_executor(None, self._generate, prompts, stop, None, **kwargs)

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        weighting, sampling = self._settings(stop, kwargs)
        for piece in self.engine.stream(prompt, weighting, sampling):
            info = None if piece.output is None else report_info(piece.output)
            if not piece.text and info is None:
                continue
            chunk = GenerationChunk(text=piece.text, generation_info=info)
            if run_manager is not None and piece.text:
                run_manager.on_llm_new_token(piece.text, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        async for chunk in astream_in_executor(self._stream(prompt, stop, None, **kwargs), run_manager):
            yield chunk

    # ------------------------------------------------------------------ tokens and diagnostics

    def loglikelihood(self, context: str, continuation: str, **kwargs: Any) -> float:
        """Natural-log likelihood of ``continuation`` after ``context`` under the fused model, weights chosen
        from the context (lm-evaluation-harness semantics)."""
        weighting = self._settings(None, kwargs)[0]
        return self.engine.loglikelihood([(context, continuation)], weighting)[0].logprob
