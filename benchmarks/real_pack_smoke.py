"""Smoke run of the engine on real members, in the issue-12 configuration that used to fail: Gemma 3 first,
SmolLM2 second and the reference (pinned). Usage: PACKLLM_GGUF_DIR=DIR python benchmarks/real_pack_smoke.py
(DIR holds smollm2-135m-instruct.gguf and gemma-3-270m.gguf, see `packllm pack real`)."""

import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from langchain_packllm import ChatPackLLM, FusionEngine, PackLLM
from langchain_packllm.members import Member

torch.set_num_threads(2)
t0 = time.time()
D = "/work/ggufs/files"


def load(name, file):
    tok = AutoTokenizer.from_pretrained(D, gguf_file=file)
    model = AutoModelForCausalLM.from_pretrained(D, gguf_file=file, dtype=torch.float32).eval()
    return Member(name, model, tok)


smol = load("smollm2", "smollm2-135m-instruct.gguf")
print("smol loaded", round(time.time() - t0), flush=True)
gemma = load("gemma3", "gemma-3-270m.gguf")
print("gemma loaded", round(time.time() - t0), flush=True)
engine = FusionEngine([gemma, smol])
ref = engine.reference(1)  # SmolLM2, not first
print("map built", round(time.time() - t0), "approx", int(ref.token_maps[0].approx.sum()), flush=True)
engine.references.choose = lambda text: (ref, None)  # pin the reference to SmolLM2 (the failing case)
llm = PackLLM(engine=engine, max_new_tokens=12)
t = time.time()
out = llm.generate(["The capital of France is"]).generations[0][0]
print(
    "invoke",
    repr(out.text),
    {k: round(v, 3) for k, v in out.generation_info["weights"].items()},
    out.generation_info["reference"],
    round(time.time() - t, 1),
    "s",
    flush=True,
)
print("stream == invoke:", "".join(llm.stream("The capital of France is")) == out.text, flush=True)
chat = ChatPackLLM(engine=engine, max_tokens=40, constrained_max_tokens=60)
weather = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
t = time.time()
msg = chat.bind_tools([weather], tool_choice="any").invoke("What is the weather in Paris?")
print(
    "tools any:",
    msg.tool_calls,
    msg.invalid_tool_calls,
    msg.response_metadata["reference"],
    round(time.time() - t, 1),
    "s",
    flush=True,
)
from pydantic import BaseModel


class City(BaseModel):
    name: str
    country: str


t = time.time()
city = chat.with_structured_output(City).invoke("Name a city in Japan.")
print("structured:", city, round(time.time() - t, 1), "s", flush=True)
print("chat:", chat.invoke("Say hello in French.").content, flush=True)
print("total", round(time.time() - t0), "s")
