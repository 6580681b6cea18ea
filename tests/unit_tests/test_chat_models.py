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
from langchain_packllm.config import FusionOutput, StreamChunk
from langchain_packllm.constrained import (
    AutoCallBudget,
    GrammarLogitsProcessor,
    call_is_open,
    json_schema_grammar,
    ll_tokenizer,
    streamable_length,
    strict_schema,
    text_tool_calls,
)
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


# ---------------------------------------------------------------------- calls in the members' own formats

CALL = {"name": "set_light", "arguments": {"room": "hall", "on": True, "level": 3}}


def _ll(chat: ChatPackLLM):
    ref = chat.engine.reference(0)
    return ll_tokenizer(ref.tokenizer, ref.vocab_size, sorted(ref.eos_ids))


@pytest.mark.parametrize(
    ("text", "content"),
    [
        (f"<tool_call>\n{json.dumps(CALL)}\n</tool_call>", ""),  # Qwen2.5 / Hermes
        (f"Sure.\n```json\n{json.dumps(CALL, indent=2)}\n```\nDone.", "Sure.\n\nDone."),  # fenced, pretty
        (f"```\n{json.dumps(CALL)}\n```", ""),  # a fence without a language
        ('<tool_call>{"name": "set_light", "arguments": "{\\"room\\": \\"hall\\", \\"on\\": true, '
         '\\"level\\": 3}"}</tool_call>', ""),  # arguments as a JSON string (OpenAI style)
        (f'<tool_call>{json.dumps({"name": "set_light", "parameters": CALL["arguments"]})}', ""),  # unclosed
    ],
)  # fmt: skip
def test_text_tool_calls_reads_tagged_and_fenced_calls(chat: ChatPackLLM, text: str, content: str) -> None:
    calls, rest = text_tool_calls(text, [LIGHT, TIMER], _ll(chat))
    assert [(c.name, c.args, c.error) for c in calls] == [("set_light", CALL["arguments"], None)]
    assert rest == content


@pytest.mark.parametrize(
    "text",
    [
        'Here is JSON:\n```json\n{"room": "hall"}\n```',  # fenced JSON that is not a call
        "```python\nprint({'name': 1})\n```",  # code
        'I would call {"name": "set_light", "arguments": {}} here',  # no opener: prose
        "no call at all",
    ],
)
def test_text_that_is_not_a_call_stays_text(chat: ChatPackLLM, text: str) -> None:
    assert text_tool_calls(text, [LIGHT], _ll(chat)) == ([], text)


@pytest.mark.parametrize(
    ("text", "finish_reason", "error"),
    [
        ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>', "stop",
         "Not a call of a bound tool: 'get_weather'"),
        ('<tool_call>{"name": "set_light", "arguments": {"room": "attic", "on": true, "level": 3}}</tool_call>',
         "stop", "do not match its parameters' schema"),
        ('```json\n{"name": "set_light", "arguments": {"room": "hall", "on": true, "level": 12}}\n```', "stop",
         "do not match its parameters' schema"),
        ('```json\n{"name": "set_light", "arguments": {"room": "hall", "on": true}}\n```', "stop",
         "do not match its parameters' schema"),  # a required argument missing
        ('<tool_call>{"name": "set_light", "arguments": {"room": "ha', "length", "ran out of tokens"),
        ('<tool_call>{"name": "set_light", "arguments": [1]}</tool_call>', "stop", "not a JSON object"),
    ],
)  # fmt: skip
def test_invalid_calls_written_as_calls_come_back_with_the_reason(
    chat: ChatPackLLM, text: str, finish_reason: str, error: str
) -> None:
    calls, rest = text_tool_calls(text, [LIGHT], _ll(chat), finish_reason)
    assert len(calls) == 1 and calls[0].error is not None and error in calls[0].error, calls
    assert rest == ""


def test_streamable_length_and_call_is_open() -> None:
    assert streamable_length('{"name"') == 0
    assert streamable_length("Sure, calling it: <tool_c") == len("Sure, calling it:")
    assert streamable_length("a <b> c") == len("a <b> c")  # a tag that cannot open a call
    assert streamable_length("Code:\n```py") == len("Code:\n```py")  # a fence that cannot open a call
    assert streamable_length("Code:\n```js") == len("Code:")  # may still be ```json
    assert streamable_length("x\n```json\n{") == 1 and streamable_length("x ") == 1
    assert call_is_open("{") and call_is_open('<tool_call>{"name": "a", "argu')
    assert call_is_open("Sure: ```json\n{") and call_is_open("Sure: <tool_")
    assert not call_is_open("plain text") and not call_is_open('<tool_call>{"a": 1}</tool_call>')
    assert not call_is_open('```json\n{"a": 1}\n```')


def _scripted(monkeypatch, chat: ChatPackLLM, text: str, finish_reason: str = "stop") -> None:
    """Make the pack write ``text`` (a real call's report, fake text), in invoke and in stream."""
    report = chat.engine.generate(["x"], sampling=SamplingConfig(max_new_tokens=1))[0].report
    ids = chat.engine.reference(0).tokenizer(text, add_special_tokens=False)["input_ids"]
    output = FusionOutput(text, ids, finish_reason, report)
    monkeypatch.setattr(chat.engine, "generate", lambda *a, **k: [output])

    def stream(*a, **k):
        for ch in text:  # one character at a time: every place a call could open is crossed
            yield StreamChunk(ch)
        yield StreamChunk("", output=output)

    monkeypatch.setattr(chat.engine, "stream", stream)


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        (f"<tool_call>\n{json.dumps(CALL)}\n</tool_call>", "", 1),
        (f"Sure.\n```json\n{json.dumps(CALL, indent=2)}\n```", "Sure.", 1),
        ("  Plain answer with ``` ticks and <b>tags</b> ", "Plain answer with ``` ticks and <b>tags</b> ", 0),
    ],
)
def test_auto_takes_the_members_own_call_format_in_invoke_and_stream(
    chat: ChatPackLLM, monkeypatch, text: str, content: str, calls: int
) -> None:
    bound = chat.bind_tools([LIGHT], tool_choice="auto")
    _scripted(monkeypatch, chat, text)
    msg = bound.invoke("Turn on the hall light")
    assert msg.content == content and not msg.invalid_tool_calls
    assert [(c["name"], c["args"]) for c in msg.tool_calls] == [("set_light", CALL["arguments"])] * calls
    assert msg.response_metadata["finish_reason"] == ("tool_calls" if calls else "stop")
    handler = Collector()
    chunks = list(bound.stream("Turn on the hall light", config={"callbacks": [handler]}))
    full = chunks[0]
    for c in chunks[1:]:
        full = full + c
    assert full.content == content and "".join(handler.tokens) == content
    assert [(c["name"], c["args"]) for c in full.tool_calls] == [
        (c["name"], c["args"]) for c in msg.tool_calls
    ]
    assert all("`" not in c.content and "<tool" not in c.content for c in chunks) or not calls


def test_auto_call_budget_ends_text_at_max_tokens_and_lets_a_started_call_run(chat: ChatPackLLM) -> None:
    ref = chat.engine.reference(0)
    tok = ref.tokenizer
    prompt = torch.tensor([tok("Hi there", add_special_tokens=False)["input_ids"]])
    V, eos = ref.vocab_size, min(ref.eos_ids)

    def run(text: str, budget: int) -> tuple[torch.Tensor, AutoCallBudget]:
        guard = AutoCallBudget(ref, budget)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        out = None
        for t in range(len(ids) + 1):  # the prompt first, then one generated token more per step
            out = guard(
                torch.cat([prompt, torch.tensor([ids[:t]], dtype=torch.long)], dim=1), torch.zeros(1, V)
            )
        return out, guard

    text = "plain words and more words here"
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    out, guard = run(text, n + 1)  # under the budget: untouched
    assert bool((out == 0).all()) and not guard.cut
    out, guard = run(text, n)  # at the budget, no call: only EOS
    assert out[0, eos] == 0 and int(torch.isfinite(out).sum()) == 1 and guard.cut == {0: True}
    started = len(tok('Calling: <tool_call>{"na', add_special_tokens=False)["input_ids"])
    out, guard = run('Calling: <tool_call>{"name": "set_light", "argu', started)  # a call has started: on
    assert bool((out == 0).all()) and not guard.cut
    out, guard = run('Calling: <tool_call>{"name": "set_light", "argu', 2)  # it started after the budget
    assert guard.cut == {0: True}
    out, guard = run('```json\n{"name": "set_light", "arguments": {"ro', 3)  # a fenced call: on
    assert bool((out == 0).all()) and not guard.cut
    out, guard = run('<tool_call>{"name": "set_light", "arguments": {}}</tool_call> and', 2)  # closed: EOS
    assert int(torch.isfinite(out).sum()) == 1 and guard.cut == {0: False}


def test_auto_floor_leaves_plain_answers_as_they_were(chat: ChatPackLLM) -> None:
    """Under "auto" the budget is constrained_max_tokens once a call has started; a plain answer still
    ends at max_tokens, with the same text, tokens and finish reason as without the floor."""
    # (a floor within the tiny members' context of 256, so that the prompt is not cut shorter to make room)
    tool = {
        "type": "function",
        "function": {"name": "f", "description": "", "parameters": {"type": "object"}},
    }
    floor = chat.model_copy(update={"constrained_max_tokens": 24}).bind_tools([tool], tool_choice="auto")
    no_floor = chat.model_copy(update={"constrained_max_tokens": 6}).bind_tools([tool], tool_choice="auto")
    compared = 0
    for prompt in PROMPTS:
        plain = no_floor.invoke(prompt, max_tokens=6)
        if plain.tool_calls or plain.invalid_tool_calls or call_is_open(plain.content):
            continue
        got = floor.invoke(prompt, max_tokens=6)
        assert not got.response_metadata["truncated"] and not plain.response_metadata["truncated"]
        assert got.content == plain.content and got.usage_metadata == plain.usage_metadata
        assert got.response_metadata["finish_reason"] == plain.response_metadata["finish_reason"]
        compared += 1
    assert compared
