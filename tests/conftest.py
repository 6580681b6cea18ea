"""Shared fixtures: tiny members made locally, saved, and loaded back through the real from_pretrained path."""

from __future__ import annotations

import os

import pytest
import torch
from transformers.utils import logging as hf_logging

from langchain_packllm.testing import make_tiny_pack

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory) -> list[str]:
    """Three tiny random members (GPT-2, Llama, Qwen2) sharing one trained byte-level BPE tokenizer."""
    return make_tiny_pack(tmp_path_factory.mktemp("pack"), archs=("gpt2", "llama", "qwen2"))


@pytest.fixture(scope="session")
def real_pack_home(tmp_path_factory) -> str:
    """The $PACKLLM_HOME that the real-pack tests convert the GGUF members into, once per session:
    ``$PACKLLM_TEST_HOME`` when set (then reused across sessions), else a fresh temporary folder."""
    return os.environ.get("PACKLLM_TEST_HOME") or str(tmp_path_factory.mktemp("real-home"))
