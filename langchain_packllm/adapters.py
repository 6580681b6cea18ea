"""What the LangChain adapters (:class:`~langchain_packllm.PackLLM`, :class:`~langchain_packllm.ChatPackLLM`)
share: the settings fields, building the engine's configs, loading, and the report as a plain dict.

``PackSettings`` is a pydantic mixin placed before the LangChain base class::

    class PackLLM(PackSettings, LLM): ...
    class ChatPackLLM(PackSettings, BaseChatModel): ...
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import torch
from langchain_core.runnables.config import run_in_executor
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from langchain_packllm import weights as weights_lib
from langchain_packllm.engine import FusionEngine, FusionOutput, FusionReport, SamplingConfig, WeightingConfig
from langchain_packllm.members import Member, load_member

_LOADER_ARGS = ("device", "torch_dtype", "model_kwargs", "tokenizer_kwargs", "names")


def load_engine(
    model_ids: Sequence[str],
    *,
    device: str | torch.device | None = None,
    torch_dtype: str | torch.dtype | None = None,
    model_kwargs: dict[str, Any] | None = None,
    tokenizer_kwargs: dict[str, Any] | None = None,
    names: Sequence[str] | None = None,
    alignment: str = "auto",
) -> FusionEngine:
    """A :class:`FusionEngine` over members loaded (or taken from the process cache) by id or path."""
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
    return FusionEngine(members, alignment=alignment)


async def astream_in_executor(iterator: Iterator[Any], run_manager: Any) -> AsyncIterator[Any]:
    """Drive a synchronous chunk iterator (the engine's stream) from async code, one ``next`` per executor
    call, firing the async run manager's token callback for each chunk with text."""
    done = object()
    while True:
        chunk = await run_in_executor(None, next, iterator, done)
        if chunk is done:
            break
        if run_manager is not None and chunk.text:
            await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
        yield chunk


def report_info(output: FusionOutput) -> dict[str, Any]:
    """The fusion report of one generation as a JSON-friendly dict (``generation_info`` / metadata)."""
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


class PackSettings(BaseModel):
    """The pack and its weighting and decoding settings, shared by the LLM and the chat model.

    Build one with ``from_model_ids`` (hub ids or local paths), ``from_models`` (loaded models), or directly
    with ``engine=`` or ``model_ids=`` (plus the loader arguments ``device``, ``torch_dtype``,
    ``model_kwargs``, ``tokenizer_kwargs``, ``names``). ``max_tokens`` is accepted as an alias of
    ``max_new_tokens``, in the constructor and per call.
    """

    model_config = ConfigDict(protected_namespaces=(), arbitrary_types_allowed=True)

    engine: FusionEngine = Field(exclude=True, repr=False)
    """The fusion engine holding the members (shared, never copied, by derived instances)."""
    model_ids: list[str] | None = None
    """The ids or paths the members were loaded from, if loaded by id."""
    weighting: str | list[float] = "optimal"
    """optimal | greedy | grid | sim | uniform | top1, or one fixed weight per member (summing to 1)."""
    tau: float = 1.0
    """Temperature of the ``sim`` weighting (Eq. 4)."""
    grid_step: float = 0.05
    """Grid step of the ``greedy`` and ``grid`` weightings."""
    max_new_tokens: int = 256
    """Most tokens to generate per prompt (alias: ``max_tokens``)."""
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

    @model_validator(mode="before")
    @classmethod
    def _load_and_alias(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        values = dict(values)
        if "max_tokens" in values:
            max_tokens = values.pop("max_tokens")
            if max_tokens is not None:
                values.setdefault("max_new_tokens", max_tokens)
        loader = {k: values.pop(k) for k in _LOADER_ARGS if k in values}
        if values.get("engine") is None:
            if not values.get("model_ids"):
                raise ValueError(
                    f"{cls.__name__} needs members: pass model_ids=[...] (hub ids or paths) or engine=, or use "
                    f"{cls.__name__}.from_model_ids / from_models."
                )
            values["engine"] = load_engine(values["model_ids"], **loader)
        return values

    @field_validator("weighting")
    @classmethod
    def _valid_weighting(cls, value: str | list[float]) -> str | list[float]:
        weights_lib.check_strategy(value)
        return value

    @model_validator(mode="after")
    def _check_settings(self) -> PackSettings:
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
    ):
        """Load each member with ``AutoModelForCausalLM`` / ``AutoTokenizer`` from a hub id or local path.

        ``trust_remote_code`` stays False unless given in ``model_kwargs`` / ``tokenizer_kwargs``. Loaded
        models are cached per process, so building another instance over them is instant. ``alignment``
        ("auto", "mined", "prefix", "none") says how members with different tokenizers are fused (see
        FusionEngine).
        """
        engine = load_engine(
            model_ids,
            device=device,
            torch_dtype=torch_dtype,
            model_kwargs=model_kwargs,
            tokenizer_kwargs=tokenizer_kwargs,
            names=names,
            alignment=alignment,
        )
        return cls(engine=engine, model_ids=list(model_ids), weighting=weighting, **fields)

    @classmethod
    def from_models(
        cls,
        models: Sequence[PreTrainedModel],
        tokenizers: Sequence[PreTrainedTokenizerBase] | PreTrainedTokenizerBase,
        names: Sequence[str] | None = None,
        alignment: str = "auto",
        **fields: Any,
    ):
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

    # ------------------------------------------------------------------ configs

    def _pack_params(self) -> dict[str, Any]:
        """The settings that identify this pack (``_identifying_params``, cache keys)."""
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

    def _sampling_config(
        self, stop: list[str] | None, logits_processors: tuple = (), **kwargs: Any
    ) -> SamplingConfig:
        stops = list(self.stop or []) + list(stop or [])
        max_new_tokens = kwargs.get("max_new_tokens", kwargs.get("max_tokens"))
        return SamplingConfig(
            max_new_tokens=self.max_new_tokens if max_new_tokens is None else max_new_tokens,
            temperature=kwargs.get("temperature", self.temperature),
            top_k=kwargs.get("top_k", self.top_k),
            top_p=kwargs.get("top_p", self.top_p),
            repetition_penalty=kwargs.get("repetition_penalty", self.repetition_penalty),
            seed=kwargs.get("seed", self.seed),
            stop=tuple(stops),
            logits_processors=logits_processors,
        )

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
