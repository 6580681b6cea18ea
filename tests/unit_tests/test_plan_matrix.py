"""Every feature on every alignment mode, whichever member is the reference: the matrix of issue 12.

Packs of two tiny members with different tokenizers (a Metaspace BPE with byte fallback and a byte-level
BPE), in both orders, under ``alignment="mined"``, ``"own-prompt"`` and ``"prefix"``; the reference member is forced to each
member in turn (``reference`` is chosen per prompt, so the tests pin it to exercise both). Greedy decoding
with fixed weights is checked token for token against naive decoders written plainly (no cache, no
batching); constrained decoding against the same naive loop with the grammar mask applied by hand. The
member read through a MinED map computes its logits on the ids the map reads in one order and its whole
output layer in the other (``Scorer.mapped_head``).
"""

from __future__ import annotations

import asyncio
import json
import math
import threading

import jsonschema
import pytest
import torch
from langchain_core.messages import HumanMessage
from pydantic import BaseModel, Field

from langchain_packllm import ChatPackLLM, FusionEngine, PackLLM, SamplingConfig, WeightingConfig
from langchain_packllm.alignment import MinEDMap
from langchain_packllm.chat_models import fallback_template, to_chat_dicts
from langchain_packllm.members import load_member
from langchain_packllm.testing import make_tiny_model, stdlib_text, train_metaspace_tokenizer
from tests.naive import mined_cols, own_prompt_next_logprobs
from tests.unit_tests.test_engine_alignment import naive_prefix_greedy

pytestmark = pytest.mark.filterwarnings("ignore:Prompt of .* does not fit:UserWarning")

W = [0.6, 0.4]
PROMPTS = ["def main(argv):\n    return", "import os\nimport sys\n", "The value of x is"]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}},
            "required": ["city"],
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
            "properties": {"minutes": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["minutes"],
        },
    },
}


class Pick(BaseModel):
    """A choice."""

    color: bool = Field(description="yes or no")
    count: int = Field(ge=0, le=9)


@pytest.fixture(scope="module")
def metaspace_path(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("metaspace")
    tok = train_metaspace_tokenizer(stdlib_text(200_000), vocab_size=300)
    model = make_tiny_model("llama", tok, seed=5)
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return str(root)


@pytest.fixture(scope="module")
def members(module_home, metaspace_path, tiny_paths):
    """[Metaspace Llama, byte-level GPT-2], float64 on the CPU."""
    return [load_member(p, torch_dtype="float64", device="cpu") for p in (metaspace_path, tiny_paths[0])]


MODES = ("mined", "own-prompt", "prefix")
CASES = [(mode, order, ref) for mode in MODES for order in ("ms-first", "bl-first") for ref in (0, 1)]


@pytest.fixture(scope="module", params=CASES, ids=[f"{m}-{o}-ref{r}" for m, o, r in CASES])
def case(request, members):
    mode, order, ref = request.param
    pack = members if order == "ms-first" else members[::-1]
    engine = FusionEngine(pack, alignment=mode)
    # the member read through a map computes its logits on the mapped ids only in one order (Scorer.mapped_head),
    # its whole output layer gathered in the other: both against the naive decoders
    engine.scorer.mapped_head_max_fraction = 1.0 if order == "ms-first" else 0.0
    return mode, pack, ref, engine


def pinned(engine: FusionEngine, ref: int, monkeypatch) -> None:
    """Make every prompt pick member ``ref`` as its reference (the choice is per prompt)."""
    monkeypatch.setattr(
        engine.references, "choose_and_read", lambda text, read=None: (engine.reference(ref), None, None)
    )


def naive_mined(members, ref: int, weights, ids: list[int], n: int, processor=None) -> list[int]:
    """The paper's MinED recipe step by step (no cache), with an optional logits processor (a grammar mask)
    applied to the fused log-probs, as transformers does."""
    ref_tok = members[ref].tokenizer
    maps = {k: MinEDMap.from_tokenizers(ref_tok, m.tokenizer) for k, m in enumerate(members) if k != ref}
    ids, out = list(ids), []
    eos = members[ref].eos_token_ids
    with torch.no_grad():
        for _ in range(n):
            fused = 0
            for k, (w, m) in enumerate(zip(weights, members)):
                inp = ids if k == ref else [int(maps[k].ids[i]) for i in ids]
                logits = m.model(input_ids=torch.tensor([inp])).logits[0, -1].double()
                cols = logits[: len(ref_tok)] if k == ref else mined_cols(logits, maps[k])
                fused = fused + w * torch.log_softmax(cols, -1)
            if processor is not None:
                fused = processor(torch.tensor([ids]), torch.log_softmax(fused, -1)[None])[0]
            nxt = int(torch.argmax(fused))
            if nxt in eos:
                break
            out.append(nxt)
            ids.append(nxt)
    return out


def naive_own_prompt(members, ref: int, weights, prompt: str, n: int, processor=None) -> list[int]:
    """``alignment="own-prompt"`` step by step (no cache): every member reads the prompt with its own
    tokenizer (its own special tokens), then the new reference tokens, mapped by MinED for the others."""
    ref_tok = members[ref].tokenizer
    maps = {k: MinEDMap.from_tokenizers(ref_tok, m.tokenizer) for k, m in enumerate(members) if k != ref}
    own = [m.tokenizer(prompt)["input_ids"] for m in members]
    out: list[int] = []
    eos = members[ref].eos_token_ids
    with torch.no_grad():
        for _ in range(n):
            fused = 0
            for w, row in zip(weights, own_prompt_next_logprobs(members, ref, own, out, maps)):
                fused = fused + w * row
            if processor is not None:
                fused = processor(torch.tensor([own[ref] + out]), torch.log_softmax(fused, -1)[None])[0]
            nxt = int(torch.argmax(fused))
            if nxt in eos:
                break
            out.append(nxt)
    return out


def naive(mode, members, ref, prompt, n):
    if mode == "mined":
        return naive_mined(members, ref, W, members[ref].tokenizer(prompt)["input_ids"], n)
    if mode == "own-prompt":
        return naive_own_prompt(members, ref, W, prompt, n)
    return naive_prefix_greedy(members, ref, W, prompt, n)


# ---------------------------------------------------------------------------------------------- the LLM


def test_invoke_stream_batch_and_async_equal_the_naive_decoder(case, monkeypatch) -> None:
    mode, pack, ref, engine = case
    pinned(engine, ref, monkeypatch)
    llm = PackLLM(engine=engine, weighting=W, max_new_tokens=6)
    ref_tok = pack[ref].tokenizer
    for prompt in PROMPTS:
        want = naive(mode, pack, ref, prompt, 6)
        gen = llm.generate([prompt]).generations[0][0]
        decoded = ref_tok.decode(want, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert gen.text == decoded, (prompt, gen.text, decoded)
        assert gen.generation_info["reference"] == pack[ref].name
        assert gen.generation_info["completion_tokens"] == len(want)
        assert "".join(llm.stream(prompt)) == gen.text
    batch = llm.batch(PROMPTS)
    assert batch == [llm.invoke(p) for p in PROMPTS]

    async def run():
        texts = await llm.abatch(PROMPTS)
        streamed = []
        for p in PROMPTS:
            streamed.append("".join([c async for c in llm.astream(p)]))
        return texts, streamed

    texts, streamed = asyncio.run(run())
    assert texts == batch and streamed == batch


def test_stop_strings_cut_where_the_naive_text_has_them(case, monkeypatch) -> None:
    mode, pack, ref, engine = case
    pinned(engine, ref, monkeypatch)
    ref_tok = pack[ref].tokenizer
    llm = PackLLM(engine=engine, weighting=W, max_new_tokens=10)
    prompt = PROMPTS[0]
    full = ref_tok.decode(
        naive(mode, pack, ref, prompt, 10), skip_special_tokens=True, clean_up_tokenization_spaces=False
    )
    if len(full) < 3:
        pytest.skip("the naive text is too short to hold a stop string")
    stop = full[1:3]
    assert llm.invoke(prompt, stop=[stop]) == full[: full.find(stop)]
    assert "".join(llm.stream(prompt, stop=[stop])) == full[: full.find(stop)]
    assert llm.invoke(prompt, stop=stop) == full[: full.find(stop)]  # a string is one stop sequence


def test_loglikelihood_equals_the_plain_sum_or_refuses_clearly(case, monkeypatch) -> None:
    mode, pack, ref, engine = case
    pinned(engine, ref, monkeypatch)
    if mode == "prefix":
        with pytest.raises(RuntimeError, match="alignment='mined'"):
            engine.loglikelihood([("import os", "\nimport sys")], WeightingConfig(W))
        return
    tok = pack[ref].tokenizer
    ctx, cont = "import os", "\nimport sys"
    ctx_ids = tok(ctx)["input_ids"]
    ids, n_ctx = tok(ctx + cont)["input_ids"], len(ctx_ids)
    if ids[:n_ctx] != ctx_ids:  # the tokenizer merged across the boundary: the context is read alone
        ids = ctx_ids + tok(cont, add_special_tokens=False)["input_ids"]
    maps = {k: MinEDMap.from_tokenizers(tok, m.tokenizer) for k, m in enumerate(pack) if k != ref}
    total = 0.0
    with torch.no_grad():
        fused = 0
        for k, (w, m) in enumerate(zip(W, pack)):
            if mode == "own-prompt":  # its own tokens of the context, then the continuation through its map
                own = m.tokenizer(ctx)["input_ids"]
                cont_ids = ids[n_ctx:] if k == ref else [int(maps[k].ids[i]) for i in ids[n_ctx:]]
                logits = m.model(input_ids=torch.tensor([own + cont_ids])).logits[0].double()
                logits = logits[len(own) - 1 : -1]  # each row predicts the next continuation token
            else:
                inp = ids if k == ref else [int(maps[k].ids[i]) for i in ids]
                logits = m.model(input_ids=torch.tensor([inp])).logits[0].double()[n_ctx - 1 : -1]
            cols = logits[:, : len(tok)] if k == ref else mined_cols(logits, maps[k])
            fused = fused + w * torch.log_softmax(cols, -1)
        lp = torch.log_softmax(fused, -1)
        for t in range(n_ctx, len(ids)):
            total += float(lp[t - n_ctx, ids[t]])
    (res,) = engine.loglikelihood([(ctx, cont)], WeightingConfig(W))
    assert res.logprob == pytest.approx(total, rel=1e-9)
    assert res.report.reference == pack[ref].name


# ---------------------------------------------------------------------------------------------- the chat model


def _chat(engine, **kw) -> ChatPackLLM:
    return ChatPackLLM(engine=engine, weighting=W, max_tokens=8, constrained_max_tokens=60, **kw)


@pytest.mark.parametrize("choice", ["any", "get_weather", "auto", "none"])
def test_tool_calls_under_every_choice_equal_the_naive_constrained_decoder(case, monkeypatch, choice) -> None:
    mode, pack, ref, engine = case
    pinned(engine, ref, monkeypatch)
    chat = _chat(engine)
    budget = {"max_tokens": 60} if choice == "auto" else {}  # a call chosen freely must be able to close
    bound = chat.bind_tools([WEATHER, TIMER], tool_choice=choice, **budget)
    messages = [HumanMessage("What is the weather in Paris?")]
    msg = bound.invoke(messages)
    assert not msg.invalid_tool_calls, msg.invalid_tool_calls
    assert msg.response_metadata["reference"] == pack[ref].name
    if choice in ("any", "get_weather"):
        (call,) = msg.tool_calls
        assert call["name"] in ({"get_weather"} if choice == "get_weather" else {"get_weather", "timer"})
        schema = (WEATHER if call["name"] == "get_weather" else TIMER)["function"]["parameters"]
        jsonschema.validate(call["args"], schema)
    elif choice == "none":
        assert not msg.tool_calls
    streamed = list(bound.stream(messages))
    merged = streamed[0]
    for c in streamed[1:]:
        merged = merged + c
    assert merged.content == msg.content
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == [
        (c["name"], c["args"]) for c in msg.tool_calls
    ]
    if mode == "prefix" or choice == "none":
        return
    # token for token: the naive loop with the same grammar mask, on the same rendered prompt
    plan = chat._plan(messages, None, bound.kwargs)
    (proc,) = [p for p in plan.sampling.processors(None) if hasattr(p, "grammar")]
    n = plan.sampling.max_new_tokens
    if mode == "own-prompt":  # every member reads the text's tail that fits its context (the engine's cut)
        text, _ = engine._fit_text(plan.prompt, n)
        want = naive_own_prompt(pack, ref, W, text, n, processor=proc)
    else:
        ((_, fitted),) = engine.plan([plan.prompt], n, plan.reference)
        ids = list(fitted.ids[0])  # as the engine reads it: truncated to the tiny members' context
        want = naive_mined(pack, ref, W, ids, n, processor=proc)
    text = plan.reference.decode(want).lstrip()
    if msg.tool_calls:
        data = json.loads(text)
        assert (data["name"], data["arguments"]) == (msg.tool_calls[0]["name"], msg.tool_calls[0]["args"])
    else:
        assert msg.content == text


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_structured_output_under_every_method(case, monkeypatch, method) -> None:
    mode, pack, ref, engine = case
    pinned(engine, ref, monkeypatch)
    structured = _chat(engine).with_structured_output(Pick, method=method, include_raw=True)
    out = structured.invoke("Pick one")
    assert out["parsing_error"] is None or method == "json_mode", out
    if method != "json_mode":
        assert isinstance(out["parsed"], Pick)
    elif out["raw"].response_metadata["finish_reason"] == "stop":
        assert isinstance(json.loads(out["raw"].content), dict)  # an object, whatever its keys
    assert out["raw"].response_metadata["reference"] == pack[ref].name


def test_usage_metadata_counts_the_reference_tokens(case, monkeypatch) -> None:
    mode, pack, ref, engine = case
    pinned(engine, ref, monkeypatch)
    chat = _chat(engine)
    msg = chat.invoke("Hello there")
    plan = chat._plan([HumanMessage("Hello there")], None, {})
    if mode == "prefix":  # the reference reads the text after its start token
        from langchain_packllm.bytealign import encode_text

        n_prompt = len(encode_text(plan.reference.tokenizer, plan.prompt).ids)
    else:
        n_prompt = len(plan.reference.encode(plan.prompt))
    assert msg.usage_metadata["input_tokens"] == n_prompt
    assert msg.usage_metadata["output_tokens"] == msg.response_metadata["completion_tokens"]
    assert msg.usage_metadata["total_tokens"] == n_prompt + msg.usage_metadata["output_tokens"]


# ---------------------------------------------------------------------------------------------- regressions


def test_reference_not_first_is_chosen_naturally_and_tools_still_parse(members) -> None:
    """The issue's report: a Metaspace member first, a byte-level one second, the second chosen as reference
    for the prompts; every forced call used to come back in invalid_tool_calls."""
    engine = FusionEngine(members)
    refs = {
        engine.choose_reference(fallback_template(to_chat_dicts([HumanMessage(p)])))[0].index for p in PROMPTS
    }
    chat = _chat(engine)
    for prompt in PROMPTS:
        msg = chat.bind_tools([WEATHER], tool_choice="any").invoke(prompt)
        assert msg.tool_calls and not msg.invalid_tool_calls
    assert refs, "the reference is chosen per prompt"


@pytest.mark.parametrize("order", ["ms-first", "bl-first"])
def test_structured_output_in_either_order_returns_json(members, order) -> None:
    pack = members if order == "ms-first" else members[::-1]
    chat = _chat(FusionEngine(pack))
    for prompt in ("hi", "Pick a color"):
        assert isinstance(chat.with_structured_output(Pick).invoke(prompt), Pick)
        out = chat.with_structured_output(Pick.model_json_schema(), method="json_schema").invoke(prompt)
        assert set(out) == {"color", "count"}


def test_a_prompt_longer_than_a_members_context_is_truncated_and_reported(members) -> None:
    engine = FusionEngine(members)
    long = " ".join(PROMPTS) * 60  # far beyond the 256-position tiny members
    with pytest.warns(UserWarning, match="does not fit"):
        (out,) = engine.generate([long], WeightingConfig(W), SamplingConfig(max_new_tokens=3))
    assert out.report.truncated and out.report.prompt_tokens <= engine.max_length
    assert all(math.isfinite(v) for v in out.report.bits_per_byte.values())


def test_concurrent_calls_picking_different_references_equal_the_calls_alone(members) -> None:
    engine = FusionEngine(members)
    llm = PackLLM(engine=engine, weighting="optimal", max_new_tokens=6)
    prompts = PROMPTS * 3 + ["café 東京 12345", "Hello there", "x"]
    alone = {p: llm.generate([p]).generations[0][0] for p in prompts}
    assert len({g.generation_info["reference"] for g in alone.values()}) >= 1
    results: dict[int, object] = {}
    errors = []

    def worker(i: int, prompt: str) -> None:
        try:
            if i % 2:
                results[i] = llm.generate([prompt]).generations[0][0]
            else:
                results[i] = "".join(llm.stream(prompt))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i, p)) for i, p in enumerate(prompts[:8])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and not any(t.is_alive() for t in threads)
    for i, p in enumerate(prompts[:8]):
        got = results[i]
        if i % 2:
            assert (
                got.text == alone[p].text
                and got.generation_info["weights"] == alone[p].generation_info["weights"]
            )
        else:
            assert got == alone[p].text


def test_many_async_streams_and_an_abandoned_stream_never_deadlock(members) -> None:
    """More concurrent astreams than the default executor has workers, and a stream left unfinished,
    all finish (bounded time) with the outputs of the calls run alone."""
    engine = FusionEngine(members)
    llm = PackLLM(engine=engine, weighting=W, max_new_tokens=4)
    prompts = [PROMPTS[i % len(PROMPTS)] + f" {i}" for i in range(12)]
    alone = [llm.invoke(p) for p in prompts]
    abandoned = llm.stream(prompts[0])
    next(abandoned)  # started, never finished
    assert llm.invoke(prompts[1]) == alone[1]  # the same thread goes on

    async def collect(p: str) -> str:
        return "".join([c async for c in llm.astream(p)])

    async def run():
        return await asyncio.wait_for(asyncio.gather(*(collect(p) for p in prompts)), timeout=300)

    assert asyncio.run(run()) == alone
    abandoned.close()


def test_streamed_text_equals_invoke_with_a_byte_fallback_reference(members, monkeypatch) -> None:
    engine = FusionEngine(members)
    pinned(engine, 0, monkeypatch)  # the Metaspace tokenizer with byte fallback
    llm = PackLLM(engine=engine, weighting=[1.0, 0.0], max_new_tokens=24, temperature=1.0, seed=3)
    for prompt in ("café 東京", "naïve ", "日本語のテキスト", "x"):
        assert "".join(llm.stream(prompt)) == llm.invoke(prompt)


# ---------------------------------------------------------------------------------------------- per-call settings


def test_per_call_settings_are_validated_like_the_fields(members) -> None:
    llm = PackLLM(engine=FusionEngine(members), weighting=W, max_new_tokens=3)
    assert isinstance(llm.invoke("import os", temperature=2, seed=1), str)  # ints coerced, as in the fields
    assert isinstance(llm.invoke("import os", repetition_penalty=2), str)
    assert llm.invoke("import os", max_new_tokens="2") == llm.invoke("import os", max_new_tokens=2)
    with pytest.raises(TypeError, match="top_pp") as err:
        llm.invoke("import os", top_pp=0.5)
    assert "top_p" in str(err.value)
    for bad in ({"temperature": float("nan")}, {"temperature": float("inf")}, {"top_p": float("nan")}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            llm.invoke("import os", **bad)
    for bad in ({"max_new_tokens": 2.5}, {"seed": "abc"}, {"max_new_tokens": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            llm.invoke("import os", **bad)
    with pytest.raises(ValueError, match="stop"):
        llm.invoke("import os", stop=[None])
    with pytest.raises(ValueError, match="temperature"):
        PackLLM(engine=llm.engine, temperature=float("nan"))
    with pytest.raises(TypeError, match="temperature"):
        SamplingConfig(temperature="hot")
    with pytest.raises(ValueError, match="finite"):
        SamplingConfig(temperature=float("inf"))
    assert SamplingConfig(stop="ab").stop == ("ab",)


def test_engine_close_ends_its_threads_and_is_a_context_manager(members) -> None:
    before = {t for t in threading.enumerate() if t.name.startswith("packllm")}
    with FusionEngine(members) as engine:
        engine.scorer.use_device_groups([[0], [1]])
        assert engine.scorer.threaded
        engine.generate(["import os"], WeightingConfig(W), SamplingConfig(max_new_tokens=2))
    assert not engine.scorer.threaded
    assert {t for t in threading.enumerate() if t.name.startswith("packllm")} <= before
    # still usable after close: the members then run in turn
    assert engine.generate(["import os"], WeightingConfig(W), SamplingConfig(max_new_tokens=2))
