"""``ChatPackLLM``: a LangChain chat model over a :class:`~langchain_packllm.engine.FusionEngine`.

Messages become one prompt through the reference member's chat template (or a plain fallback template,
below); the pack then answers it as :class:`~langchain_packllm.PackLLM` does: weights solved on the prompt,
decoding from the fused distribution. Tool calls and structured output are produced under constrained
decoding (:mod:`langchain_packllm.constrained`): the fused scores are masked so that only JSON valid for
the schema can come out.

Fallback template, used when the tokenizer has no chat template::

    System: You are terse.
    User: What is 2 + 3?
    Assistant: {"name": "add", "arguments": {"a": 2, "b": 3}}
    Tool (add): 5
    Assistant:

Example::

    >>> from langchain_packllm import ChatPackLLM
    >>> chat = ChatPackLLM.from_model_ids(["./experts/code", "./experts/docs"], max_tokens=64)
    >>> chat.invoke("What does fork() return?").response_metadata["weights"]
    >>> chat.bind_tools([get_weather], tool_choice="any").invoke("Weather in Paris?").tool_calls
"""

from __future__ import annotations

import dataclasses
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from operator import itemgetter
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import LanguageModelInput
from langchain_core.language_models.chat_models import BaseChatModel, LangSmithParams
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.tool import invalid_tool_call, tool_call, tool_call_chunk
from langchain_core.output_parsers import JsonOutputKeyToolsParser, JsonOutputParser, PydanticToolsParser
from langchain_core.output_parsers.pydantic import PydanticOutputParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.runnables.config import run_in_executor
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import Field, SecretStr, model_validator

from langchain_packllm.adapters import PackSettings, astream_in_executor, report_info
from langchain_packllm.config import FusionOutput, SamplingConfig, WeightingConfig
from langchain_packllm.reference import Reference

logger = logging.getLogger(__name__)

_ROLES = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}
_FORCE_CHOICES = ("any", "required")


class ChatPackLLM(PackSettings, BaseChatModel):
    """Several causal LMs answering as one chat model (Pack of LLMs, Mavromatis et al. 2024).

    Takes the fields of :class:`~langchain_packllm.PackLLM` (``weighting``, ``max_new_tokens`` alias
    ``max_tokens``, ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``, ``seed``, ``stop``) and the
    same constructors (``from_model_ids``, ``from_models``, or ``model_ids=`` / ``engine=``). Every answer's
    ``response_metadata`` holds the fusion report (weights, perplexities, fused perplexity, weighting), the
    ``model_name`` and the ``finish_reason``; ``usage_metadata`` counts prompt and generated tokens.

    Tools (``bind_tools``) and ``with_structured_output`` decode under a JSON-schema constraint:
    ``tool_choice="any"`` / ``"required"`` / a tool name force exactly one well-formed call; ``"auto"`` (the
    default) lets the first character choose between a plain answer and a call (an answer starting with
    ``{`` is a call), and reads a call written in a chat model's own format (``<tool_call>{...}</tool_call>``
    or a fenced json block), validated against the tool's schema (see
    :func:`~langchain_packllm.constrained.text_tool_calls`); ``"none"`` decodes freely.
    """

    model_name: str | None = Field(default=None, alias="model")
    """Name reported as ``response_metadata["model_name"]`` (default: ``packllm:`` + the member names)."""
    constrained_max_tokens: int = 256
    """Least token budget of a tool call or structured output (JSON must close within it); ``max_tokens``
    still bounds plain answers."""
    streaming: bool = False
    """Whether ``invoke`` streams internally (LangChain convention)."""
    timeout: float | None = None
    """Accepted for compatibility with hosted chat models; unused (the members run in this process)."""
    max_retries: int | None = None
    """Accepted for compatibility with hosted chat models; unused."""
    api_key: SecretStr | None = Field(default=None, exclude=True, repr=False)
    """Accepted for compatibility with hosted chat models; unused."""

    @model_validator(mode="after")
    def _default_model_name(self) -> ChatPackLLM:
        if not self.model_name:
            self.model_name = "packllm:" + "+".join(n.rstrip("/\\").split("/")[-1] for n in self.engine.names)
        if self.constrained_max_tokens < 1:
            raise ValueError(f"constrained_max_tokens must be >= 1; got {self.constrained_max_tokens}.")
        return self

    # ------------------------------------------------------------------ LangChain plumbing

    @property
    def _llm_type(self) -> str:
        return "packllm-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, **self._pack_params()}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="packllm",
            ls_model_name=kwargs.get("model") or self.model_name,
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_tokens", kwargs.get("max_new_tokens", self.max_new_tokens)),
        )
        stops = list(self.stop or []) + list(stop or [])
        if stops:
            params["ls_stop"] = stops
        return params

    # ------------------------------------------------------------------ tools and structured output

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: dict | str | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools. ``tool_choice``: ``"auto"`` / None (answer or call), ``"any"`` / ``"required"`` /
        True (one call to any tool), a tool name or ``{"function": {"name": ...}}`` (a call to that tool),
        ``"none"`` (no call). Calls are produced under a JSON-schema constraint, so they always parse."""
        formatted = [convert_to_openai_tool(t) for t in tools]
        names = [t["function"]["name"] for t in formatted]
        choice = _normalise_tool_choice(tool_choice)
        if choice not in (None, "auto", "none", "any") and choice not in names:
            raise ValueError(f"tool_choice {tool_choice!r} names no bound tool; the tools are {names}.")
        return super().bind(tools=formatted, tool_choice=choice, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type,
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict | Any]:
        """Answers parsed into ``schema`` (a pydantic class, TypedDict, JSON schema or OpenAI tool dict).

        ``method="json_schema"`` (default) decodes the answer under the schema itself;
        ``"function_calling"`` forces a call of a tool named after the schema; ``"json_mode"`` only forces a
        JSON object. ``strict`` is accepted for compatibility: decoding is always constrained.
        """
        if kwargs:
            raise ValueError(f"Received unsupported arguments {kwargs}")
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        ls_format = {"kwargs": {"method": method}, "schema": schema}
        if method == "function_calling":
            tool = convert_to_openai_tool(schema)
            llm = self.bind_tools(
                [tool], tool_choice=tool["function"]["name"], ls_structured_output_format=ls_format
            )
            parser: Runnable = (
                PydanticToolsParser(tools=[schema], first_tool_only=True)
                if is_pydantic
                else JsonOutputKeyToolsParser(key_name=tool["function"]["name"], first_tool_only=True)
            )
        elif method in ("json_schema", "json_mode"):
            kind = "json_schema" if method == "json_schema" else "json_object"
            llm = self.bind(
                response_format={"type": kind, "schema": convert_to_json_schema(schema)},
                ls_structured_output_format=ls_format,
            )
            parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()
        else:
            raise ValueError(
                f"method must be 'json_schema', 'function_calling' or 'json_mode'; got {method!r}."
            )
        if not include_raw:
            return llm | parser
        parser_assign = RunnablePassthrough.assign(
            parsed=itemgetter("raw") | parser, parsing_error=lambda _: None
        )
        parser_none = RunnablePassthrough.assign(parsed=lambda _: None)
        with_fallback = parser_assign.with_fallbacks([parser_none], exception_key="parsing_error")
        return RunnableMap(raw=llm) | with_fallback

    # ------------------------------------------------------------------ one call

    def _plan(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]) -> _Plan:
        """Everything one call decides, in order: the reference member (chosen on the conversation as plain
        text, before anything is rendered), then the prompt in that member's chat template, the decoding
        constraint over its vocabulary, and the validated settings."""
        kwargs = dict(kwargs)
        model = kwargs.pop("model", None)
        if model and model != self.model_name:
            raise ValueError(
                f"ChatPackLLM {self.model_name!r} serves one pack; got model={model!r}. Build another "
                "ChatPackLLM for other members."
            )
        tools = list(kwargs.pop("tools", None) or [])
        choice = _normalise_tool_choice(kwargs.pop("tool_choice", None))
        response_format = kwargs.pop("response_format", None)
        kwargs.pop("ls_structured_output_format", None)
        reference, bpb = self.engine.choose_reference(fallback_template(to_chat_dicts(messages)))
        mode, grammar, instructions = "text", None, None
        if response_format is not None or (tools and choice != "none"):
            # llguidance is imported only when a call is constrained
            from langchain_packllm.constrained import (
                json_schema_grammar,
                strict_schema,
                text_or_call_grammar,
                tool_call_schema,
            )
        if response_format is not None:
            schema, described = _response_schema(response_format)
            mode, grammar = "json", json_schema_grammar(strict_schema(schema))
            instructions = "Answer with only a JSON object valid for this JSON schema:\n" + json.dumps(
                described
            )
        elif tools and choice != "none":
            chosen = (
                tools
                if choice in (None, "auto", "any")
                else [t for t in tools if t["function"]["name"] == choice]
            )
            if not chosen:
                names = [t["function"]["name"] for t in tools]
                raise ValueError(f"tool_choice {choice!r} names no bound tool; the tools are {names}.")
            schema = tool_call_schema(chosen)
            if choice in (None, "auto"):
                mode, grammar = "auto", text_or_call_grammar(schema)
            else:
                mode, grammar = "call", json_schema_grammar(schema)
        prompt = render_prompt(reference.tokenizer, messages, tools, instructions)
        processors = ()
        if grammar is not None:
            from langchain_packllm.constrained import GrammarLogitsProcessor

            processors = (GrammarLogitsProcessor.for_reference(grammar, reference),)
        weighting, sampling = self._settings(stop, kwargs, processors)
        call_budget = None
        if mode in ("call", "json"):  # JSON must be able to close: a floor on the budget, no stop strings
            budget = max(sampling.max_new_tokens, self.constrained_max_tokens)
            sampling = dataclasses.replace(sampling, max_new_tokens=budget, stop=())
        elif mode == "auto" and self.constrained_max_tokens > sampling.max_new_tokens and reference.eos_ids:
            # the same floor once a call has started: plain text still ends at max_tokens
            from langchain_packllm.constrained import AutoCallBudget

            call_budget = AutoCallBudget(reference, sampling.max_new_tokens)
            sampling = dataclasses.replace(
                sampling,
                max_new_tokens=self.constrained_max_tokens,
                logits_processors=(*sampling.logits_processors, call_budget),
            )
        elif not getattr(reference.tokenizer, "chat_template", None):
            # the plain template's turns end where the next role line begins (a base model writes them on)
            extra = tuple(s for s in FALLBACK_STOPS if s not in sampling.stop)
            sampling = dataclasses.replace(sampling, stop=(*sampling.stop, *extra))
        names = {t["function"]["name"] for t in tools}
        return _Plan(prompt, mode, names, weighting, sampling, reference, bpb, tools, call_budget)

    def _message(self, output: FusionOutput, plan: _Plan) -> AIMessage:
        text = output.text.lstrip()
        calls, invalid = [], []
        if plan.mode == "call" or (plan.mode == "auto" and text.startswith("{")):
            call = _parse_call(text, plan.tool_names, output.finish_reason)
            (calls if call["type"] == "tool_call" else invalid).append(call)
            text = ""
        elif plan.mode == "auto":  # a call in the member's own format: <tool_call>{...}, fenced JSON
            from langchain_packllm.constrained import ll_tokenizer, text_tool_calls

            ref = plan.reference
            ll_tok = ll_tokenizer(ref.tokenizer, ref.vocab_size, sorted(ref.eos_ids))
            found, text = text_tool_calls(text, plan.tools, ll_tok, output.finish_reason)
            for c in found:
                call_id = f"call_{uuid.uuid4().hex[:24]}"
                if c.error is None:
                    calls.append(tool_call(name=c.name, args=c.args, id=call_id))
                else:
                    invalid.append(invalid_tool_call(name=c.name, args=c.raw, id=call_id, error=c.error))
        if plan.call_budget is not None and plan.call_budget.cut.get(0):
            output = dataclasses.replace(output, finish_reason="length")  # ended at max_tokens
        return AIMessage(
            content=text,
            tool_calls=calls,
            invalid_tool_calls=invalid,
            usage_metadata=_usage(output),
            response_metadata=self._metadata(output, calls, plan),
        )

    def _metadata(self, output: FusionOutput, calls: list, plan: _Plan) -> dict[str, Any]:
        info = report_info(output)
        if info.get("bits_per_byte") is None and plan.bits_per_byte is not None:
            # the reference was chosen here, on the conversation as plain text (the engine was given it)
            info["bits_per_byte"] = dict(zip(self.engine.names, plan.bits_per_byte))
        if calls and output.finish_reason == "stop":
            info["finish_reason"] = "tool_calls"
        return {"model_name": self.model_name, "model_provider": "packllm", **info}

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        plan = self._plan(messages, stop, kwargs)
        output = self.engine.generate([plan.prompt], plan.weighting, plan.sampling, reference=plan.reference)[
            0
        ]
        message = self._message(output, plan)
        info = {"finish_reason": message.response_metadata["finish_reason"]}
        return ChatResult(
            generations=[ChatGeneration(message=message, generation_info=info)],
            llm_output={"model_name": self.model_name, "members": self.engine.names},
        )

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return await run_in_executor(None, self._generate, messages, stop, None, **kwargs)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        """Text streams as it is decoded (leading whitespace dropped, as ``invoke`` does); a tool call is
        held back and comes whole in the last chunk, which also carries the usage and the report."""
        plan = self._plan(messages, stop, kwargs)
        held = ""  # text not yet shown: leading blanks, or a whole tool call
        started = False  # whether plain text has begun streaming
        emitted = 0  # "auto": how much of the answer's text has been shown (never a call written in it)
        for piece in self.engine.stream(plan.prompt, plan.weighting, plan.sampling, reference=plan.reference):
            if piece.output is not None:
                break
            if plan.mode == "auto":
                from langchain_packllm.constrained import streamable_length

                held += piece.text
                head = held.lstrip()
                safe = streamable_length(head)
                text, emitted = head[emitted:safe], max(emitted, safe)
            elif started:
                text = piece.text
            else:
                held += piece.text
                head = held.lstrip()
                if not head or plan.mode == "call" or (plan.mode == "auto" and head.startswith("{")):
                    continue
                started, text, held = True, head, ""
            if not text:
                continue
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=text))
            if run_manager is not None:
                run_manager.on_llm_new_token(text, chunk=chunk)
            yield chunk
        output = piece.output
        message = self._message(output, plan)
        if plan.mode == "auto":  # the content the message ends with, less what was shown
            rest = message.content[emitted:]
        else:
            rest = piece.text if started else (held + piece.text).lstrip()
            if message.tool_calls or message.invalid_tool_calls:
                rest = ""
        chunks = [
            tool_call_chunk(
                name=c["name"], args=json.dumps(c["args"], ensure_ascii=False), id=c["id"], index=i
            )
            for i, c in enumerate(message.tool_calls)
        ] + [
            tool_call_chunk(name=c["name"], args=c["args"], id=c["id"], index=len(message.tool_calls) + i)
            for i, c in enumerate(message.invalid_tool_calls)
        ]
        last = AIMessageChunk(
            content=rest,
            tool_call_chunks=chunks,
            usage_metadata=message.usage_metadata,
            response_metadata=message.response_metadata,
            chunk_position="last",
        )
        chunk = ChatGenerationChunk(
            message=last, generation_info={"finish_reason": message.response_metadata["finish_reason"]}
        )
        if run_manager is not None and rest:
            run_manager.on_llm_new_token(rest, chunk=chunk)
        yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        async for chunk in astream_in_executor(self._stream(messages, stop, None, **kwargs), run_manager):
            yield chunk


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What one chat call decodes: the prompt (in the reference member's template), the constraint mode,
    the bound tools' names, the configs, the reference member (chosen before rendering) and the bits per
    byte it was chosen by (mixed vocabularies)."""

    prompt: str
    mode: str  # "text", "auto" (answer or call), "call" (a forced call) or "json" (structured output)
    tool_names: set[str]
    weighting: WeightingConfig
    sampling: SamplingConfig
    reference: Reference
    bits_per_byte: tuple[float, ...] | None = None  # each member's, on the text the reference was chosen on
    tools: tuple[dict[str, Any], ...] | list = ()  # the bound tools (OpenAI dicts)
    call_budget: Any = None  # "auto": the AutoCallBudget processor (which rows it ended at max_tokens)


# ---------------------------------------------------------------------- tool choice, schemas, parsing


def _normalise_tool_choice(choice: Any) -> str | None:
    """None, "auto", "none", "any" (for "any" / "required" / True) or a tool name."""
    if choice is None or choice is False:
        return None if choice is None else "none"
    if choice is True or choice in _FORCE_CHOICES:
        return "any"
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") or choice.get("name")
        if not name:
            raise ValueError(f"tool_choice dict must name a function; got {choice!r}.")
        return name
    if isinstance(choice, str):
        return choice
    raise ValueError(f"Unsupported tool_choice {choice!r}; use 'auto', 'any', 'none' or a tool name.")


def _response_schema(response_format: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The schema to decode under and the one to describe in the prompt, from a ``response_format``:
    ``{"type": "json_schema", "schema": ...}`` (OpenAI's ``"json_schema": {"schema": ...}`` too),
    ``{"type": "json_object"}`` (any object; an optional ``"schema"`` is only described), a pydantic class or
    a schema dict."""
    if isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema"):
        inner = response_format.get("schema") or response_format.get("json_schema") or {"type": "object"}
        inner = inner.get("schema", inner)
        if response_format["type"] == "json_object":
            return {"type": "object"}, inner
        return inner, inner
    schema = convert_to_json_schema(response_format)
    return schema, schema


def _parse_call(text: str, tool_names: set[str], finish_reason: str) -> dict[str, Any]:
    """A tool call (or an invalid one, with the reason) from ``{"name": ..., "arguments": {...}}`` text."""
    call_id = f"call_{uuid.uuid4().hex[:24]}"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        why = "ran out of tokens (raise max_tokens)" if finish_reason == "length" else str(err)
        return invalid_tool_call(name=None, args=text, id=call_id, error=f"Tool call is not JSON: {why}")
    name, args = (data.get("name"), data.get("arguments")) if isinstance(data, dict) else (None, None)
    if name not in tool_names or not isinstance(args, dict):
        return invalid_tool_call(name=name, args=text, id=call_id, error="Not a call of a bound tool.")
    return tool_call(name=name, args=args, id=call_id)


def _usage(output: FusionOutput) -> dict[str, int]:
    prompt, generated = int(output.report.prompt_tokens), len(output.token_ids)
    return {"input_tokens": prompt, "output_tokens": generated, "total_tokens": prompt + generated}


# ---------------------------------------------------------------------- messages -> prompt


def _text_of(content: str | list) -> str:
    """The text of a message's content; non-text blocks (images, audio, files) are refused."""
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
            continue
        kind = block.get("type")
        if kind == "text":
            parts.append(block.get("text", ""))
        elif kind == "tool_result":  # Anthropic-style tool results inside a human message
            parts.append("Tool result: " + _text_of(block.get("content") or ""))
        elif kind in ("tool_use", "tool_call", "reasoning", "thinking"):
            continue  # tool calls travel in AIMessage.tool_calls; reasoning is not replayed
        else:
            raise ValueError(
                f"ChatPackLLM takes text only; got a {kind!r} content block. Pass text, or describe the "
                "image/audio/file in words."
            )
    return "\n".join(p for p in parts if p)


def _call_json(call: dict[str, Any]) -> str:
    return json.dumps({"name": call["name"], "arguments": call["args"]}, ensure_ascii=False)


def to_chat_dicts(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """LangChain messages as Hugging Face chat-template messages (``role``, ``content``, ``tool_calls``)."""
    out = []
    for m in messages:
        if isinstance(m, SystemMessage):
            out.append({"role": "system", "content": _text_of(m.content)})
        elif isinstance(m, HumanMessage):
            out.append({"role": "user", "content": _text_of(m.content)})
        elif isinstance(m, AIMessage):
            entry: dict[str, Any] = {"role": "assistant", "content": _text_of(m.content)}
            if m.tool_calls:
                entry["tool_calls"] = [
                    {
                        "id": c["id"],
                        "type": "function",
                        "function": {"name": c["name"], "arguments": c["args"]},
                    }
                    for c in m.tool_calls
                ]
            out.append(entry)
        elif isinstance(m, ToolMessage):
            content = _text_of(m.content)
            if m.status == "error":
                content = f"Error: {content}"
            out.append({"role": "tool", "content": content, "name": m.name, "tool_call_id": m.tool_call_id})
        elif isinstance(m, ChatMessage):
            out.append({"role": m.role, "content": _text_of(m.content)})
        else:
            raise ValueError(f"Unsupported message type {type(m).__name__}.")
    return out


def tools_instructions(tools: list[dict[str, Any]]) -> str:
    """How the prompt describes the bound tools when the chat template does not."""
    lines = ["You can call these tools:"]
    for t in tools:
        fn = t["function"]
        lines.append(json.dumps({k: fn[k] for k in ("name", "description", "parameters") if k in fn}))
    lines.append(
        'To call a tool, answer with only a JSON object {"name": <tool name>, "arguments": {...}}; '
        "otherwise answer in plain text."
    )
    return "\n".join(lines)


# Where an answer in the plain template ends: the next role line (added to a call's stop sequences).
FALLBACK_STOPS: tuple[str, ...] = ("\nUser:", "\nAssistant:", "\nSystem:", "\nTool (")


def fallback_template(chat: list[dict[str, Any]]) -> str:
    """The plain template: one ``Role: content`` line per message, then ``Assistant:``. Tool calls are
    written as the JSON the model is asked to produce; tool results as ``Tool (name): content``."""
    lines = []
    for m in chat:
        role = m["role"]
        if role == "assistant" and m.get("tool_calls"):
            calls = [
                _call_json({"name": c["function"]["name"], "args": c["function"]["arguments"]})
                for c in m["tool_calls"]
            ]
            text = "\n".join([m["content"], *calls] if m["content"] else calls)
            lines.append(f"Assistant: {text}")
        elif role == "tool":
            lines.append(f"Tool ({m.get('name') or m.get('tool_call_id')}): {m['content']}")
        else:
            lines.append(f"{_ROLES.get(role, role.capitalize())}: {m['content']}")
    lines.append("Assistant:")
    return "\n".join(lines)


def render_prompt(
    tokenizer, messages: Sequence[BaseMessage], tools: list[dict[str, Any]], instructions: str | None = None
) -> str:
    """The prompt text of a conversation: the tokenizer's chat template when it has one (with the tools
    when the template takes them), else :func:`fallback_template`. ``instructions`` (and the tools, when the
    template does not render them) go into a system message."""
    chat = to_chat_dicts(messages)
    template = getattr(tokenizer, "chat_template", None)
    native_tools = bool(template and tools and "tools" in str(template))
    extra = [tools_instructions(tools)] if tools and not native_tools else []
    extra += [instructions] if instructions else []
    if extra:
        note = "\n\n".join(extra)
        if chat and chat[0]["role"] == "system":
            chat[0] = {**chat[0], "content": f"{chat[0]['content']}\n\n{note}"}
        else:
            chat.insert(0, {"role": "system", "content": note})
    if template:
        try:
            return tokenizer.apply_chat_template(
                chat, tools=tools if native_tools else None, add_generation_prompt=True, tokenize=False
            )
        except Exception as err:  # a template that refuses a role (system, tool) or a message order
            logger.warning("Chat template failed (%s); using the plain fallback template.", err)
    return fallback_template(chat)
