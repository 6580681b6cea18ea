"""Tiny members saved once per test process, for tests whose parameters are properties, not fixtures
(LangChain's standard tests build the chat model from ``chat_model_params``)."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile

from langchain_packllm.testing import make_tiny_pack


@functools.cache
def tiny_pack_paths() -> list[str]:
    """Three tiny random members (GPT-2, Llama, Qwen2) sharing one byte-level BPE tokenizer; removed at exit."""
    directory = tempfile.mkdtemp(prefix="packllm-tiny-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return make_tiny_pack(directory, archs=("gpt2", "llama", "qwen2"))
