"""Shared fixtures: tiny members made locally, saved, and loaded back through the real from_pretrained path."""

from __future__ import annotations

import os

import pytest
import torch
from transformers.utils import logging as hf_logging

from langchain_packllm.members import load_member
from langchain_packllm.testing import make_tiny_model, make_tiny_pack, stdlib_text, train_metaspace_tokenizer

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory) -> list[str]:
    """Three tiny random members (GPT-2, Llama, Qwen2) sharing one trained byte-level BPE tokenizer."""
    return make_tiny_pack(tmp_path_factory.mktemp("pack"), archs=("gpt2", "llama", "qwen2"))


@pytest.fixture(scope="session")
def mixed_paths(tmp_path_factory, tiny_paths) -> list[str]:
    """Two members of different vocabularies (MinED alignment): the byte-level BPE GPT-2 member of the
    tiny pack and a Metaspace BPE Llama member."""
    root = tmp_path_factory.mktemp("mixed")
    tok = train_metaspace_tokenizer(stdlib_text(200_000), vocab_size=300)
    model = make_tiny_model("llama", tok, seed=5)
    model.save_pretrained(root / "llama-sp")
    tok.save_pretrained(root / "llama-sp")
    return [tiny_paths[0], str(root / "llama-sp")]


@pytest.fixture(scope="module")
def mixed64(mixed_paths, module_home):
    """The mixed pair loaded in float64 on the CPU, its token maps under the module's own home."""
    return [load_member(p, torch_dtype="float64", device="cpu") for p in mixed_paths]


@pytest.fixture(scope="module")
def module_home(tmp_path_factory):
    """A fresh ``$PACKLLM_HOME`` for one test module: the token maps and caches its members build stay out
    of the user's home and out of other modules'."""
    mp = pytest.MonkeyPatch()
    mp.setenv("PACKLLM_HOME", str(tmp_path_factory.mktemp("packllm-home")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def real_pack_home(tmp_path_factory) -> str:
    """The $PACKLLM_HOME that the real-pack tests convert the GGUF members into, once per session:
    ``$PACKLLM_TEST_HOME`` when set (then reused across sessions), else a fresh temporary folder."""
    return os.environ.get("PACKLLM_TEST_HOME") or str(tmp_path_factory.mktemp("real-home"))
