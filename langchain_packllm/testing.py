"""Tiny random-weight members for tests, examples and benchmarks (no model hub needed).

``make_tiny_pack(dir, archs=("gpt2", "llama"))`` trains a small byte-level BPE tokenizer with the
``tokenizers`` library on text from the Python standard library, builds one randomly initialised causal LM
per architecture from a transformers config, and saves each with ``save_pretrained`` so that it loads back
through ``AutoModelForCausalLM.from_pretrained(path)``.
"""

from __future__ import annotations

import json
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PreTrainedTokenizerFast,
)

SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def stdlib_text(max_chars: int = 400_000) -> str:
    """Real text that every Python install has: the standard library's own source."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="ignore")
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "\n".join(parts)


def train_bytelevel_tokenizer(text: str, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE tokenizer trained on ``text``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = text.splitlines(keepends=True)
    tok.train_from_iterator([lines[i : i + 200] for i in range(0, len(lines), 200)], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIALS)


def train_metaspace_tokenizer(text: str, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A Llama/SentencePiece-style BPE tokenizer (``▁`` for spaces, byte fallback) trained on ``text``."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token=SPECIALS["unk_token"]))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size + 256,
        special_tokens=list(SPECIALS.values()) + byte_tokens,
        show_progress=False,
    )
    lines = text.splitlines(keepends=True)
    tok.train_from_iterator([lines[i : i + 200] for i in range(0, len(lines), 200)], trainer=trainer)
    # The trainer only keeps <0xNN> in the vocabulary as special tokens; make them ordinary entries (as in
    # Llama) so that decode(skip_special_tokens=True) keeps the bytes.
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in set(byte_tokens)]
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), **SPECIALS)


# Llama-shaped decoders (grouped-query attention) share their sizes.
_LLAMA_LIKE = dict(
    num_hidden_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
)

ARCH_CONFIGS = {
    "gpt2": dict(model_type="gpt2", n_layer=2, n_embd=64, n_head=4, n_positions=256),
    "llama": dict(model_type="llama", max_position_embeddings=256, **_LLAMA_LIKE),
    "qwen2": dict(model_type="qwen2", max_position_embeddings=256, **_LLAMA_LIKE),
    # More architectures, for tests that must hold across model families (e.g. the engine's prefill).
    "mistral": dict(model_type="mistral", **_LLAMA_LIKE),
    "cohere": dict(model_type="cohere", logit_scale=0.5, **_LLAMA_LIKE),  # scales its logits after the head
    "gemma2": dict(model_type="gemma2", **_LLAMA_LIKE),  # soft-caps its logits after the head
    "phi": dict(
        model_type="phi", num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128
    ),
    "gpt_neox": dict(
        model_type="gpt_neox",
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        intermediate_size=128,
    ),
    "opt": dict(
        model_type="opt",
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        ffn_dim=128,
        word_embed_proj_dim=32,
    ),
    "falcon": dict(model_type="falcon", num_hidden_layers=2, hidden_size=64, num_attention_heads=4),
    "gpt_bigcode": dict(model_type="gpt_bigcode", n_layer=2, n_embd=64, n_head=4),
    "bloom": dict(model_type="bloom", n_layer=2, hidden_size=64, n_head=4),
}


def make_tiny_model(arch: str, tokenizer: PreTrainedTokenizerFast, seed: int = 0, init_scale: float = 0.5):
    """A random causal LM of the named architecture over ``tokenizer``'s vocabulary.

    ``init_scale`` widens the initialisation so that the random models have peaked, distinct distributions
    (as trained experts do) rather than near-uniform ones.
    """
    spec = dict(ARCH_CONFIGS[arch])
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=init_scale,
        tie_word_embeddings=False,
        **spec,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def make_tiny_pack(
    directory: str | Path,
    archs: Sequence[str] = ("gpt2", "llama"),
    vocab_size: int = 512,
    seed: int = 0,
) -> list[str]:
    """Save one tiny member per architecture under ``directory``; returns their paths."""
    directory = Path(directory)
    tokenizer = train_bytelevel_tokenizer(stdlib_text(), vocab_size)
    paths = []
    for i, arch in enumerate(archs):
        path = directory / f"{arch}-{i}"
        model = make_tiny_model(arch, tokenizer, seed=seed + i)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(str(path))
    return paths


def make_tiny_gguf(
    path: str | Path,
    arch: str = "llama",
    vocab_size: int = 320,
    hidden: int = 32,
    layers: int = 1,
    seed: int = 0,
    quantized: bool = True,
) -> str:
    """Write a tiny random llama-layout GGUF file (byte-level BPE tokenizer, ``<|endoftext|>`` and
    ``<|im_end|>`` as control tokens, a chat template; matrices stored as Q8_0 blocks when ``quantized``) with the ``gguf`` package.

    ``arch`` is the ``general.architecture`` written: pass one transformers cannot read from GGUF to test
    that error. Returns the path.
    """
    import gguf
    import numpy as np

    tok = train_bytelevel_tokenizer(stdlib_text(60_000), vocab_size)
    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab] + ["<|endoftext|>", "<|im_end|>"]
    specials = set(SPECIALS.values()) | {"<|endoftext|>", "<|im_end|>"}
    types = [gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    ids = {t: i for i, t in enumerate(tokens)}
    n_vocab, heads, kv_heads, ffn = len(tokens), 2, 1, 2 * hidden
    head_dim = hidden // heads

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-gguf")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quantized else gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(ids[SPECIALS["bos_token"]])
    w.add_eos_token_id(ids[SPECIALS["eos_token"]])
    w.add_pad_token_id(ids[SPECIALS["pad_token"]])
    w.add_unk_token_id(ids[SPECIALS["unk_token"]])
    w.add_add_bos_token(False)
    w.add_chat_template(
        "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )
    rng = np.random.default_rng(seed)

    def add(name: str, *shape: int, matrix: bool = True) -> None:
        value = (rng.standard_normal(shape) * (0.5 if matrix else 0.1) + (0 if matrix else 1)).astype(
            np.float32
        )
        if matrix and quantized:
            q = gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, value)

    add("token_embd.weight", n_vocab, hidden)
    for i in range(layers):
        add(f"blk.{i}.attn_norm.weight", hidden, matrix=False)
        add(f"blk.{i}.attn_q.weight", hidden, hidden)
        add(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        add(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        add(f"blk.{i}.attn_output.weight", hidden, hidden)
        add(f"blk.{i}.ffn_norm.weight", hidden, matrix=False)
        add(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        add(f"blk.{i}.ffn_up.weight", ffn, hidden)
        add(f"blk.{i}.ffn_down.weight", hidden, ffn)
    add("output_norm.weight", hidden, matrix=False)
    add("output.weight", n_vocab, hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)
