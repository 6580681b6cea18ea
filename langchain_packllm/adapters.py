"""What the LangChain adapters (:class:`~langchain_packllm.PackLLM`, :class:`~langchain_packllm.ChatPackLLM`)
share: the settings fields, building the engine's configs, loading, and the report as a plain dict.

``PackSettings`` is a pydantic mixin placed before the LangChain base class::

    class PackLLM(PackSettings, LLM): ...
    class ChatPackLLM(PackSettings, BaseChatModel): ...
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Annotated, Any

import torch
from langchain_core.runnables.config import run_in_executor
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from langchain_packllm import weights as weights_lib
from langchain_packllm.config import FusionOutput, FusionReport, SamplingConfig, WeightingConfig
from langchain_packllm.engine import FusionEngine
from langchain_packllm.members import Member, load_member
from langchain_packllm.online import check_online

_LOADER_ARGS = (
    "device", "torch_dtype", "model_kwargs", "tokenizer_kwargs", "names", "backend", "member_resources",
    "ray_address",
)  # fmt: skip
BACKENDS = ("inprocess", "ray")


def load_engine(
    model_ids: Sequence[str],
    *,
    device: str | torch.device | None = None,
    torch_dtype: str | torch.dtype | None = None,
    model_kwargs: dict[str, Any] | None = None,
    tokenizer_kwargs: dict[str, Any] | None = None,
    names: Sequence[str] | None = None,
    alignment: str = "auto",
    backend: str = "inprocess",
    member_resources: Sequence[dict[str, Any]] | None = None,
    ray_address: str | None = None,
) -> FusionEngine:
    """A :class:`FusionEngine` over members loaded (or taken from the process cache) by id or path.
    ``backend="ray"``: each member in its own Ray actor placed by ``member_resources[k]`` on the cluster
    at ``ray_address`` (see :mod:`langchain_packllm.ray_backend`)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}.")
    if backend == "ray":
        from langchain_packllm.ray_backend import load_ray_engine

        return load_ray_engine(
            model_ids, member_resources=member_resources, ray_address=ray_address, device=device,
            torch_dtype=torch_dtype, model_kwargs=model_kwargs, tokenizer_kwargs=tokenizer_kwargs,
            names=names, alignment=alignment,
        )  # fmt: skip
    if member_resources is not None or ray_address is not None:
        raise ValueError("member_resources and ray_address apply to backend='ray' only.")
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
    call, firing the async run manager's token callback for each chunk with text. The engine holds no lock
    between chunks, so any number of these run at once whatever the executor's size."""
    done = object()
    while True:
        chunk = await run_in_executor(None, next, iterator, done)
        if chunk is done:
            break
        if run_manager is not None and chunk.text:
            await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
        yield chunk


def report_info(output: FusionOutput) -> dict[str, Any]:
    """The fusion report of one generation as a JSON-friendly dict (``generation_info`` / metadata):
    every report field, the completion's token count and the finish reason."""
    return output.info()


# The settings a call may override, beside ``stop`` (which LangChain passes on its own).
CALL_SETTINGS = (
    "weighting", "tau", "grid_step", "reweight_every", "max_new_tokens", "max_tokens", "temperature", "top_k", "top_p",
    "repetition_penalty", "seed",
)  # fmt: skip

NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class DecodingSettings(BaseModel):
    """The weighting and decoding settings, validated and coerced the same way in the constructor and per
    call (``llm.invoke(prompt, temperature=0.7)``)."""

    model_config = ConfigDict(protected_namespaces=(), arbitrary_types_allowed=True)

    weighting: str | list[float] = "optimal"
    """optimal | greedy | grid | sim | uniform | top1, or one fixed weight per member (summing to 1)."""
    tau: PositiveFloat = 1.0
    """Temperature of the ``sim`` weighting (Eq. 4)."""
    grid_step: PositiveFloat = 0.05
    """Grid step of the ``greedy`` and ``grid`` weightings."""
    reweight_every: Annotated[int, Field(ge=1)] | None = None
    """Re-solve the weights every this many tokens on all the text so far (prompt plus answer); None solves
    them once, on the prompt. With ``optimal``, ``sim`` or ``top1``. The report's ``trajectory`` lists them."""
    max_new_tokens: Annotated[int, Field(ge=0)] = 256
    """Most tokens to generate per prompt (alias: ``max_tokens``)."""
    temperature: NonNegativeFloat = 0.0
    """Sampling temperature; 0 means greedy decoding."""
    top_k: Annotated[int, Field(ge=1)] | None = None
    """Keep the k most likely tokens when sampling."""
    top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] | None = None
    """Nucleus sampling mass when sampling."""
    repetition_penalty: PositiveFloat | None = None
    """Penalty (> 1 discourages) on tokens already in the text."""
    seed: int | None = None
    """Seed of the sampler, for reproducible sampling."""
    stop: list[str] | None = None
    """Default stop sequences; the output is cut before the first one. A string is one stop sequence."""

    @field_validator("weighting")
    @classmethod
    def _valid_weighting(cls, value: str | list[float]) -> str | list[float]:
        weights_lib.check_strategy(value)
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _online_weighting(self) -> DecodingSettings:
        check_online(self.weighting, self.reweight_every)
        return self


_SETTING_NAMES = tuple(DecodingSettings.model_fields)


class PackSettings(DecodingSettings):
    """The pack and its weighting and decoding settings, shared by the LLM and the chat model.

    Build one with ``from_model_ids`` (hub ids or local paths), ``from_models`` (loaded models), or directly
    with ``engine=`` or ``model_ids=`` (plus the loader arguments ``device``, ``torch_dtype``,
    ``model_kwargs``, ``tokenizer_kwargs``, ``names``). ``max_tokens`` is accepted as an alias of
    ``max_new_tokens``, in the constructor and per call.
    """

    engine: FusionEngine = Field(exclude=True, repr=False)
    """The fusion engine holding the members (shared, never copied, by derived instances)."""
    model_ids: list[str] | None = None
    """The ids or paths the members were loaded from, if loaded by id."""

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

    @model_validator(mode="after")
    def _check_settings(self) -> PackSettings:
        self._settings(None, {})
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
        backend: str = "inprocess",
        member_resources: Sequence[dict[str, Any]] | None = None,
        ray_address: str | None = None,
        **fields: Any,
    ):
        """Load each member with ``AutoModelForCausalLM`` / ``AutoTokenizer`` from a hub id or local path.

        ``backend="ray"`` loads each member in its own Ray actor, placed by ``member_resources[k]`` (e.g.
        ``{"num_gpus": 1}``) on the cluster at ``ray_address`` (None: the running one, else a local one);
        ``close()`` on the engine ends the actors (see :mod:`langchain_packllm.ray_backend`).

        ``trust_remote_code`` stays False unless given in ``model_kwargs`` / ``tokenizer_kwargs``. Loaded
        models are cached per process, so building another instance over them is instant. ``alignment``
        ("auto", "mined", "own-prompt", "prefix", "none") says how members with different tokenizers are
        fused (see FusionEngine).
        """
        engine = load_engine(
            model_ids,
            device=device,
            torch_dtype=torch_dtype,
            model_kwargs=model_kwargs,
            tokenizer_kwargs=tokenizer_kwargs,
            names=names,
            alignment=alignment,
            backend=backend,
            member_resources=member_resources,
            ray_address=ray_address,
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
            "reweight_every": self.reweight_every,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "repetition_penalty": self.repetition_penalty,
            "seed": self.seed,
        }

    def _settings(
        self, stop: list[str] | str | None, kwargs: dict[str, Any], logits_processors: tuple = ()
    ) -> tuple[WeightingConfig, SamplingConfig]:
        """One call's configs: the fields, overridden by ``kwargs``, validated and coerced exactly as the
        constructor's fields are (``max_tokens`` is an alias of ``max_new_tokens``). An unknown setting
        raises ``TypeError`` naming it and listing the accepted ones; a bad value raises ``ValueError``
        naming it. ``stop`` adds to the default stop sequences (a string is one stop sequence)."""
        unknown = sorted(set(kwargs) - set(CALL_SETTINGS))
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unknown setting(s) {unknown}; a call accepts "
                f"{', '.join(CALL_SETTINGS)} and stop."
            )
        values = {name: getattr(self, name) for name in _SETTING_NAMES}
        overrides = dict(kwargs)
        max_tokens = overrides.pop("max_tokens", None)
        if max_tokens is not None:
            overrides.setdefault("max_new_tokens", max_tokens)
        values.update(overrides)
        values["stop"] = stop
        try:
            checked = DecodingSettings.model_validate(values)
        except ValidationError as err:
            raise ValueError(f"Invalid setting for {type(self).__name__}: {err}") from None
        if not isinstance(checked.weighting, str):
            weights_lib.check_fixed(checked.weighting, len(self.engine.members))
        weighting = WeightingConfig(
            weighting=checked.weighting,
            tau=checked.tau,
            grid_step=checked.grid_step,
            reweight_every=checked.reweight_every,
        )
        sampling = SamplingConfig(
            max_new_tokens=checked.max_new_tokens,
            temperature=checked.temperature,
            top_k=checked.top_k,
            top_p=checked.top_p,
            repetition_penalty=checked.repetition_penalty,
            seed=checked.seed,
            stop=tuple(self.stop or ()) + tuple(checked.stop or ()),
            logits_processors=logits_processors,
        )
        return weighting, sampling

    # ------------------------------------------------------------------ tokens and diagnostics

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids under the first member's tokenizer, the pack's when members share a vocabulary (no
        download of a GPT-2 tokenizer). In a pack of mixed vocabularies a call may read its prompt with
        another member's tokenizer; ``usage_metadata`` and the report count those."""
        return self.engine.encode(text)

    def get_num_tokens(self, text: str) -> int:
        return len(self.get_token_ids(text))

    def fusion_report(self, prompt: str, **kwargs: Any) -> FusionReport:
        """Weights, perplexities and timing the pack would use for ``prompt`` (no generation).

        Keyword arguments override ``weighting``, ``tau``, ``grid_step`` and ``reweight_every`` for this
        call.
        """
        return self.engine.report(prompt, self._settings(None, kwargs)[0])
