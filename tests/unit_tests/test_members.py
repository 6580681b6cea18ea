"""Loading members: the tokenizer a model was saved with is the one it gets back."""

from __future__ import annotations

import os

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from langchain_packllm.members import load_member

TEXT = "Tokenize this:  two spaces,\ttab\nnew line, café 東京 12345 def f(x): return x**2"


def test_saved_tokenizer_wins_over_architecture_default(tiny_paths) -> None:
    qwen = next(p for p in tiny_paths if "qwen2" in os.path.basename(p))
    saved = PreTrainedTokenizerFast(tokenizer_file=os.path.join(qwen, "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(qwen)
    # transformers rebuilds a qwen2 tokenizer's pre-tokenizer: the bug this guards against
    assert auto(TEXT)["input_ids"] != saved(TEXT)["input_ids"]
    member = load_member(qwen, device="cpu")
    assert member.tokenizer(TEXT)["input_ids"] == saved(TEXT)["input_ids"]
    assert member.tokenizer.eos_token == auto.eos_token and member.tokenizer.pad_token == auto.pad_token


def test_unaffected_tokenizers_are_kept(tiny_paths) -> None:
    gpt2 = next(p for p in tiny_paths if "gpt2" in os.path.basename(p))
    member = load_member(gpt2, device="cpu")
    assert type(member.tokenizer) is type(AutoTokenizer.from_pretrained(gpt2))
