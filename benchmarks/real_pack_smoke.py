"""Smoke run of the engine on real members, in the configuration issue 12 reported broken: Gemma 3 first,
SmolLM2 second and the reference (pinned). Invoke, stream, a forced tool call and structured output.

Usage: ``PACKLLM_GGUF_DIR=DIR python benchmarks/real_pack_smoke.py``, where DIR holds
``smollm2-135m-instruct.gguf`` and ``gemma-3-270m.gguf`` (the real pack's files).
"""

from __future__ import annotations

import os
import time

import torch
from pydantic import BaseModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from langchain_packllm import ChatPackLLM, FusionEngine, PackLLM
from langchain_packllm.members import Member

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


class City(BaseModel):
    name: str
    country: str


def load(folder: str, name: str, file: str) -> Member:
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32).eval()
    return Member(name, model, tok)


def main() -> None:
    torch.set_num_threads(2)
    folder = os.environ.get("PACKLLM_GGUF_DIR", "gguf")
    start = time.time()
    smol = load(folder, "smollm2", "smollm2-135m-instruct.gguf")
    gemma = load(folder, "gemma3", "gemma-3-270m.gguf")
    engine = FusionEngine([gemma, smol])
    ref = engine.reference(1)  # SmolLM2, not first
    print(f"loaded and mapped in {time.time() - start:.0f} s", flush=True)
    engine.references.choose_and_read = lambda text, read=None: (ref, None, None)  # pin the reference
    llm = PackLLM(engine=engine, max_new_tokens=12)
    out = llm.generate(["The capital of France is"]).generations[0][0]
    weights = {k: round(v, 3) for k, v in out.generation_info["weights"].items()}
    print("invoke:", repr(out.text), weights, "reference", out.generation_info["reference"], flush=True)
    print("stream == invoke:", "".join(llm.stream("The capital of France is")) == out.text, flush=True)
    chat = ChatPackLLM(engine=engine, max_tokens=40, constrained_max_tokens=60)
    msg = chat.bind_tools([WEATHER], tool_choice="any").invoke("What is the weather in Paris?")
    print("tools any:", msg.tool_calls, "invalid:", msg.invalid_tool_calls, flush=True)
    print("structured:", chat.with_structured_output(City).invoke("Name a city in Japan."), flush=True)
    print(f"total {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
