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

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import torch
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models.llms import LLM
from langchain_core.outputs import Generation, GenerationChunk, LLMResult
from langchain_core.runnables.config import run_in_executor
from pydantic import ConfigDict, Field, field_validator, model_validator
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from langchain_packllm import weights as weights_lib
from langchain_packllm.engine import FusionEngine, FusionOutput, FusionReport, SamplingConfig, WeightingConfig
from langchain_packllm.members import Member, load_member


class PackLLM(LLM):
    """Several causal LMs answering as one (Pack of LLMs, Mavromatis et al. 2024).

    For each prompt every member scores the prompt, the weights that minimise the fused model's prompt
    perplexity are solved (``weighting``), and decoding samples from ``softmax(sum_k w_k * logits_k)``.
    Every generation's ``generation_info`` carries the weights and perplexities.

    Build one with :meth:`from_model_ids` (hub ids or local paths) or :meth:`from_models` (loaded models).
    """

    model_config = ConfigDict(protected_namespaces=())

    engine: FusionEngine = Field(exclude=True, repr=False)
    """The fusion engine holding the members (shared, never copied, by derived instances)."""
    model_ids: list[str] | None = None
    """The ids or paths the members were loaded from, if loaded by :meth:`from_model_ids`."""
    weighting: str | list[float] = "optimal"
    """optimal | greedy | grid | sim | uniform | top1, or one fixed weight per member (summing to 1)."""
    tau: float = 1.0
    """Temperature of the ``sim`` weighting (Eq. 4)."""
    grid_step: float = 0.05
    """Grid step of the ``greedy`` and ``grid`` weightings."""
    max_new_tokens: int = 256
    """Most tokens to generate per prompt."""
    temperature: float = 0.0
    """Sampling temperature; 0 means greedy decoding."""
    top_k: int | None = None
    """Keep the k most likely tokens when sampling."""
    top_p: float | None = None
    """Nucleus sampling mass when sampling."""
    repetition_penalty: float | None = None
    """Penalty (> 1 discourages) on tokens already in the text."""
    seed: int | None = None
    """Seed of the sampler, for reproducible sampling."""
    stop: list[str] | None = None
    """Default stop sequences; the output is cut before the first one."""

    @field_validator("weighting")
    @classmethod
    def _valid_weighting(cls, value: str | list[float]) -> str | list[float]:
        weights_lib.check_strategy(value)
        return value

    @model_validator(mode="after")
    def _check(self) -> PackLLM:
        if not isinstance(self.weighting, str):
            weights_lib.check_fixed(self.weighting, len(self.engine.members))
        self._weighting_config()
        self._sampling_config(None)
        return self

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_model_ids(
        cls,
        model_ids: Sequence[str],
        *,
        weighting: str | list[float] = "optimal",
        device: str | torch.device | None = None,
        torch_dtype: str | torch.dtype | None = None,
        model_kwargs: dict[str, Any] | None = None,
        tokenizer_kwargs: dict[str, Any] | None = None,
        names: Sequence[str] | None = None,
        alignment: str = "auto",
        **fields: Any,
    ) -> PackLLM:
        """Load each member with ``AutoModelForCausalLM`` / ``AutoTokenizer`` from a hub id or local path.

        ``trust_remote_code`` stays False unless given in ``model_kwargs`` / ``tokenizer_kwargs``. Loaded
        models are cached per process, so building another ``PackLLM`` over them is instant.
        """
        if isinstance(model_ids, str):
            raise TypeError("model_ids must be a list of ids or paths, not a single string.")
        model_ids = list(model_ids)
        if not model_ids:
            raise ValueError("A pack needs at least one member; model_ids is empty.")
        if names is not None and len(names) != len(model_ids):
            raise ValueError(f"Got {len(names)} names for {len(model_ids)} model ids.")
        members = [
            load_member(
                mid,
                name=None if names is None else names[i],
                device=device,
                torch_dtype=torch_dtype,
                model_kwargs=model_kwargs,
                tokenizer_kwargs=tokenizer_kwargs,
            )
            for i, mid in enumerate(model_ids)
        ]
        engine = FusionEngine(members, alignment=alignment)
        return cls(engine=engine, model_ids=model_ids, weighting=weighting, **fields)

    @classmethod
    def from_models(
        cls,
        models: Sequence[PreTrainedModel],
        tokenizers: Sequence[PreTrainedTokenizerBase] | PreTrainedTokenizerBase,
        names: Sequence[str] | None = None,
        alignment: str = "auto",
        **fields: Any,
    ) -> PackLLM:
        """Members the caller already loaded. One tokenizer may be given for all of them."""
        models = list(models)
        if not models:
            raise ValueError("A pack needs at least one member; models is empty.")
        if isinstance(tokenizers, PreTrainedTokenizerBase):
            tokenizers = [tokenizers] * len(models)
        tokenizers = list(tokenizers)
        if len(tokenizers) != len(models):
            raise ValueError(f"Got {len(tokenizers)} tokenizers for {len(models)} models.")
        if names is None:
            names = [getattr(m, "name_or_path", "") or f"member{i}" for i, m in enumerate(models)]
            if len(set(names)) != len(names):
                names = [f"{n or 'member'}#{i}" for i, n in enumerate(names)]
        if len(names) != len(models):
            raise ValueError(f"Got {len(names)} names for {len(models)} models.")
        for m in models:
            m.eval()
        members = [Member(n, m, t) for n, m, t in zip(names, models, tokenizers)]
        return cls(engine=FusionEngine(members, alignment=alignment), **fields)

    # ------------------------------------------------------------------ LangChain plumbing

    @property
    def _llm_type(self) -> str:
        return "packllm"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "members": self.engine.names,
            "weighting": self.weighting,
            "tau": self.tau,
            "grid_step": self.grid_step,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "repetition_penalty": self.repetition_penalty,
            "seed": self.seed,
        }

    def _weighting_config(self, **kwargs: Any) -> WeightingConfig:
        return WeightingConfig(
            weighting=kwargs.get("weighting", self.weighting),
            tau=kwargs.get("tau", self.tau),
            grid_step=kwargs.get("grid_step", self.grid_step),
        )

    def _sampling_config(self, stop: list[str] | None, **kwargs: Any) -> SamplingConfig:
        stops = list(self.stop or []) + list(stop or [])
        return SamplingConfig(
            max_new_tokens=kwargs.get("max_new_tokens", self.max_new_tokens),
            temperature=kwargs.get("temperature", self.temperature),
            top_k=kwargs.get("top_k", self.top_k),
            top_p=kwargs.get("top_p", self.top_p),
            repetition_penalty=kwargs.get("repetition_penalty", self.repetition_penalty),
            seed=kwargs.get("seed", self.seed),
            stop=tuple(stops),
        )

    @staticmethod
    def _info(output: FusionOutput) -> dict[str, Any]:
        report = output.report
        return {
            "weights": report.weights,
            "perplexities": report.perplexities,
            "fused_perplexity": report.fused_perplexity,
            "weighting": report.weighting,
            "order": report.order,
            "prompt_tokens": report.prompt_tokens,
            "completion_tokens": len(output.token_ids),
            "finish_reason": output.finish_reason,
            "fallback": report.fallback,
            "truncated": report.truncated,
            "reference": report.reference,
            "approx_tokens": report.approx_tokens,
        }

    def _call(self, prompt: str, stop: list[str] | None = None, run_manager=None, **kwargs: Any) -> str:
        return self._generate([prompt], stop, run_manager, **kwargs).generations[0][0].text

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        outputs = self.engine.generate(
            prompts, self._weighting_config(**kwargs), self._sampling_config(stop, **kwargs)
        )
        return LLMResult(
            generations=[[Generation(text=o.text, generation_info=self._info(o))] for o in outputs],
            llm_output={"members": self.engine.names, "weighting": self._weighting_config(**kwargs).name},
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
        for piece in self.engine.stream(
            prompt, self._weighting_config(**kwargs), self._sampling_config(stop, **kwargs)
        ):
            info = None if piece.output is None else self._info(piece.output)
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
        iterator = self._stream(prompt, stop, None, **kwargs)
        done = object()
        while True:
            chunk = await run_in_executor(None, next, iterator, done)
            if chunk is done:
                break
            if run_manager is not None and chunk.text:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    # ------------------------------------------------------------------ tokens and diagnostics

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids under the pack's reference tokenizer (no download of a GPT-2 tokenizer)."""
        return self.engine.encode(text)

    def get_num_tokens(self, text: str) -> int:
        return len(self.get_token_ids(text))

    def fusion_report(self, prompt: str, **kwargs: Any) -> FusionReport:
        """Weights, perplexities and timing the pack would use for ``prompt`` (no generation).

        Keyword arguments override ``weighting``, ``tau`` and ``grid_step`` for this call.
        """
        return self.engine.report(prompt, self._weighting_config(**kwargs))

    def loglikelihood(self, context: str, continuation: str, **kwargs: Any) -> float:
        """Natural-log likelihood of ``continuation`` after ``context`` under the fused model, weights chosen
        from the context (lm-evaluation-harness semantics)."""
        return self.engine.loglikelihood([(context, continuation)], self._weighting_config(**kwargs))[
            0
        ].logprob
