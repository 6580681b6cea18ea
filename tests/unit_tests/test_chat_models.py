"""ChatPackLLM: prompt rendering, metadata, streaming, constrained tool calls and structured output."""

from __future__ import annotations

import copy
import json
from typing import TypedDict

import jsonschema
import pytest
import torch
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import BaseModel, Field

from langchain_packllm import ChatPackLLM, PackLLM, SamplingConfig
from langchain_packllm.chat_models import render_prompt
from langchain_packllm.constrained import GrammarLogitsProcessor, json_schema_grammar, strict_schema
from tests.tiny_pack import tiny_pack_paths

pytestmark = pytest.mark.filterwarnings("ignore:Prompt of .* does not fit:UserWarning")


@pytest.fixture(scope="module")
def chat() -> ChatPackLLM:
    return ChatPackLLM(model_ids=tiny_pack_paths(), device="cpu", max_tokens=10, constrained_max_tokens=100)


@tool
def set_light(room: str, on: bool, level: int) -> str:
    """Switch the light of a room."""
    return "ok"


# the schema leaves nothing unbounded, so that random members always close the JSON within the budget
set_light.args_schema = None
LIGHT = {
    "type": "function",
    "function": {
        "name": "set_light",
        "description": "Switch the light of a room.",
        "parameters": {
            "type": "object",
            "properties": {
                "room": {"type": "string", "enum": ["kitchen", "hall"]},
                "on": {"type": "boolean"},
                "level": {"type": "integer", "minimum": 0, "maximum": 9},
            },
            "required": ["room", "on", "level"],
        },
    },
}
TIMER = {
    "type": "function",
    "function": {
        "name": "timer",
        "description": "Start a timer.",
        "parameters": {
            "type": "object",
            "properties": {"minutes": {"type": "integer", "minimum": 1, "maximum": 60}},
            "required": ["minutes"],
        },
    },
}
PROMPTS = ["Turn on the kitchen light", "hall off please", "Hello", "set a timer for 5 minutes", "?"]


def test_fallback_template_renders_roles_tools_and_results(chat: ChatPackLLM) -> None:
    assert not getattr(chat.engine.tokenizer, "chat_template", None)
    messages = [
        SystemMessage("Be terse."),
        HumanMessage("Kitchen light on"),
        AIMessage("", tool_calls=[{"name": "set_light", "args": {"room": "kitchen"}, "id": "c1"}]),
        ToolMessage("done", tool_call_id="c1", name="set_light"),
        ToolMessage("bad level", tool_call_id="c2", name="set_light", status="error"),
    ]
    assert render_prompt(chat.engine.tokenizer, messages, []) == (
        "System: Be terse.\n"
        "User: Kitchen light on\n"
        'Assistant: {"name": "set_light", "arguments": {"room": "kitchen"}}\n'
        "Tool (set_light): done\n"
        "Tool (set_light): Error: bad level\n"
        "Assistant:"
    )
    with_tools = render_prompt(chat.engine.tokenizer, [HumanMessage("hi")], [LIGHT])
    assert (
        with_tools.startswith("System: You can call these tools:\n") and '"name": "set_light"' in with_tools
    )
    with pytest.raises(ValueError, match="text only"):
        render_prompt(chat.engine.tokenizer, [HumanMessage([{"type": "image", "url": "x"}])], [])


def test_chat_template_is_used_when_the_tokenizer_has_one(chat: ChatPackLLM) -> None:
    tok = copy.deepcopy(chat.engine.tokenizer)
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    text = render_prompt(tok, [SystemMessage("s"), HumanMessage("hi")], [])
    assert text == "<|system|>s\n<|user|>hi\n<|assistant|>"


def test_metadata_usage_and_ls_params(chat: ChatPackLLM) -> None:
    msg = chat.invoke("Hello")
    assert isinstance(msg, AIMessage) and isinstance(msg.content, str)
    usage = msg.usage_metadata
    assert all(isinstance(usage[k], int) for k in ("input_tokens", "output_tokens", "total_tokens"))
    assert (
        usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
        and 0 < usage["output_tokens"] <= 10
    )
    meta = msg.response_metadata
    assert (
        meta["model_name"]
        == chat.model_name
        == "packllm:" + "+".join(p.split("/")[-1] for p in tiny_pack_paths())
    )
    assert sum(meta["weights"].values()) == pytest.approx(1.0) and set(meta["perplexities"]) == set(
        chat.engine.names
    )
    assert (
        meta["weighting"] == "optimal"
        and meta["fused_perplexity"] > 0
        and meta["finish_reason"] in ("stop", "length")
    )
    params = chat._get_ls_params(stop=["x"])
    assert params["ls_model_type"] == "chat" and params["ls_max_tokens"] == 10 and params["ls_stop"] == ["x"]
    with pytest.raises(ValueError, match="serves one pack"):
        chat.invoke("Hello", model="other")


def test_standard_params_are_accepted_and_max_tokens_aliases(chat: ChatPackLLM) -> None:
    other = ChatPackLLM(
        engine=chat.engine,
        temperature=0,
        max_tokens=3,
        timeout=5,
        stop=[],
        max_retries=1,
        api_key="k",
        model="m",
    )
    assert other.engine is chat.engine and other.max_new_tokens == 3 and other.model_name == "m"
    assert other.invoke("Hello").usage_metadata["output_tokens"] <= 3
    assert chat.invoke("Hello", max_tokens=2).usage_metadata["output_tokens"] <= 2
    assert PackLLM(engine=chat.engine, max_tokens=4).max_new_tokens == 4  # the shared settings


class Collector(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs) -> None:
        self.tokens.append(token)


async def test_stream_equals_invoke_at_temperature_zero(chat: ChatPackLLM) -> None:
    for prompt in ["Hello", [SystemMessage("Be kind."), HumanMessage("how are you")]]:
        invoked = chat.invoke(prompt)
        handler = Collector()
        chunks = list(chat.stream(prompt, config={"callbacks": [handler]}))
        full = chunks[0]
        for c in chunks[1:]:
            full = full + c
        assert full.content == invoked.content and "".join(handler.tokens) == invoked.content
        assert chunks[-1].chunk_position == "last" and chunks[-1].usage_metadata == invoked.usage_metadata
        assert all(not c.usage_metadata for c in chunks[:-1])
        assert full.response_metadata["weights"] == pytest.approx(invoked.response_metadata["weights"])
        chunks = [c async for c in chat.astream(prompt)]
        assert "".join(c.content for c in chunks) == invoked.content
        assert (await chat.ainvoke(prompt)).content == invoked.content


@pytest.mark.parametrize("choice", ["any", "set_light", "required"])
def test_forced_tool_calls_are_always_valid_json_for_the_schema(chat: ChatPackLLM, choice: str) -> None:
    bound = chat.bind_tools([LIGHT, TIMER], tool_choice=choice)
    for prompt in PROMPTS:
        msg = bound.invoke(prompt)
        assert msg.content == "" and not msg.invalid_tool_calls and len(msg.tool_calls) == 1
        call = msg.tool_calls[0]
        assert call["id"].startswith("call_") and call["type"] == "tool_call"
        assert call["name"] in (("set_light", "timer") if choice != "set_light" else ("set_light",))
        schema = (LIGHT if call["name"] == "set_light" else TIMER)["function"]["parameters"]
        jsonschema.validate(call["args"], schema)
        assert msg.response_metadata["finish_reason"] == "tool_calls"
    streamed = None
    for chunk in bound.stream(PROMPTS[0]):
        streamed = chunk if streamed is None else streamed + chunk
    first = bound.invoke(PROMPTS[0]).tool_calls[0]
    assert [(c["name"], c["args"]) for c in streamed.tool_calls] == [(first["name"], first["args"])]


def test_auto_tool_choice_answers_or_calls_never_malformed(chat: ChatPackLLM) -> None:
    bound = chat.bind_tools([LIGHT])
    for prompt in PROMPTS:
        msg = bound.invoke(prompt, max_tokens=48)
        assert not msg.invalid_tool_calls or msg.response_metadata["finish_reason"] == "length"
        if msg.tool_calls:
            jsonschema.validate(msg.tool_calls[0]["args"], LIGHT["function"]["parameters"])
        else:
            assert isinstance(msg.content, str) and not msg.content.startswith("{")
    assert chat.bind_tools([LIGHT], tool_choice="none").invoke("Hello").tool_calls == []
    with pytest.raises(ValueError, match="names no bound tool"):
        chat.bind_tools([LIGHT], tool_choice="nope")


class Pick(BaseModel):
    """A choice."""

    color: str = Field(json_schema_extra={"enum": ["red", "green", "blue"]})
    count: int = Field(ge=0, le=20)
    sure: bool


class PickDict(TypedDict):
    color: bool
    count: int


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_structured_output_returns_valid_objects(chat: ChatPackLLM, method: str) -> None:
    structured = chat.with_structured_output(Pick, method=method)
    for prompt in PROMPTS[:3]:
        pick = structured.invoke(prompt)
        assert isinstance(pick, Pick) and pick.color in ("red", "green", "blue") and 0 <= pick.count <= 20
    raw = chat.with_structured_output(Pick, method=method, include_raw=True).invoke("Hello")
    assert (
        isinstance(raw["parsed"], Pick) and raw["parsing_error"] is None and isinstance(raw["raw"], AIMessage)
    )
    as_dict = chat.with_structured_output(
        {
            "title": "pick",
            "description": "A choice.",
            "type": "object",
            "properties": {"n": {"type": "integer", "maximum": 99}},
            "required": ["n"],
        },
        method=method,
    ).invoke("Hello")
    assert isinstance(as_dict, dict) and set(as_dict) == {"n"} and isinstance(as_dict["n"], int)


def test_structured_output_typed_dict_and_stream(chat: ChatPackLLM) -> None:
    structured = chat.with_structured_output(PickDict)
    out = structured.invoke("Hello")
    assert set(out) == {"color", "count"} and isinstance(out["color"], bool)
    assert list(structured.stream("Hello"))[-1] == out


def test_grammar_processor_matches_only_generated_tokens_of_left_padded_rows(chat: ChatPackLLM) -> None:
    engine = chat.engine
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    proc = GrammarLogitsProcessor.for_reference(
        json_schema_grammar(strict_schema(schema)), engine.reference(0)
    )
    tok = engine.tokenizer
    # two prompts of different lengths, left-padded; their text is not JSON and must not reach the grammar
    short, long = tok("no")["input_ids"], tok("certainly not JSON } ] at all")["input_ids"]
    ids, _ = engine.scorer.pad(engine.reference(0), [short, long])
    scores = torch.zeros(2, engine.vocab_size)
    masked = proc(ids, scores)
    allowed = [tok.decode([i]) for i in torch.nonzero(masked[0] > float("-inf")).flatten().tolist()]
    assert proc.errors() == [None, None] and allowed and all(a.startswith("{") for a in allowed)
    brace = tok('{"', add_special_tokens=False)["input_ids"]
    step = torch.cat([ids, torch.tensor([[brace[0]], [brace[0]]])], dim=1)
    proc(step, scores)
    assert proc.errors() == [None, None] and proc._consumed == [1, 1]
    proc(ids[:1], scores[:1])  # a new, narrower call starts a new generation
    assert proc._consumed == [0] and proc.errors() == [None]
    # through the engine: a batch of prompts of different lengths, every row valid JSON for the schema
    outputs = engine.generate(
        ["no", "certainly not JSON } ] at all"],
        sampling=SamplingConfig(max_new_tokens=24, logits_processors=(proc,)),
    )
    for out in outputs:
        assert out.finish_reason == "stop"
        jsonschema.validate(json.loads(out.text), schema)


def test_sampling_config_applies_extra_processors_after_the_penalty_and_before_temperature() -> None:
    class Marker:
        def __call__(self, input_ids, scores):
            return scores

    marker = Marker()
    procs = SamplingConfig(
        temperature=0.5, top_k=3, repetition_penalty=1.2, logits_processors=[marker]
    ).processors()
    names = [type(p).__name__ for p in procs]
    assert names == [
        "RepetitionPenaltyLogitsProcessor",
        "Marker",
        "TemperatureLogitsWarper",
        "TopKLogitsWarper",
    ]
    assert SamplingConfig().processors() == [] and SamplingConfig(
        logits_processors=(marker,)
    ).processors() == [marker]


def test_plain_template_answers_stop_at_the_next_role_line(chat: ChatPackLLM) -> None:
    from langchain_packllm.chat_models import FALLBACK_STOPS

    plan = chat._plan([HumanMessage("Hello")], ["END"], {})
    assert plan.sampling.stop == ("END", *FALLBACK_STOPS)
    forced = chat._plan([HumanMessage("Hello")], None, {"tools": [LIGHT], "tool_choice": "any"})
    assert forced.sampling.stop == ()  # a constrained call must be able to close its JSON
    reply = chat.invoke("Hello", max_tokens=24)
    assert not any(s in reply.content for s in FALLBACK_STOPS)
