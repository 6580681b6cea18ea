"""Tokenizers for the expert pack, trained with the `tokenizers` library.

Three conventions, chosen to look like the tokenizers real model families ship, so that the
project's tokenizer-alignment code meets the same surface forms it will meet on the hub:

- ``bytelevel-bpe``: GPT-2 convention. Byte-level BPE, a space becomes ``Ġ`` and a newline ``Ċ``,
  special tokens ``<|endoftext|>`` style, nothing is added to an encoded text.
- ``metaspace-bpe``: Llama/SentencePiece convention. A space becomes ``▁`` (one is prepended to the
  text), characters outside the vocabulary fall back to byte tokens ``<0x0A>``, specials ``<s>``,
  ``</s>``, ``<unk>``, ``<pad>``, and ``<s>`` is prepended to every encoded text.
- ``metaspace-unigram``: SentencePiece-unigram convention (T5/Gemma-like) with byte fallback,
  specials ``<bos>``, ``<eos>``, ``<unk>``, ``<pad>``, and ``<bos>`` is prepended.

Every tokenizer is returned as a `transformers.PreTrainedTokenizerFast` with bos/eos/unk/pad set,
ready for ``save_pretrained`` and ``AutoTokenizer.from_pretrained(path)``.

Example:
    >>> tok = train_tokenizer(["def f(x):\\n    return x\\n"] * 50, kind="bytelevel-bpe", vocab_size=300)
    >>> tok.decode(tok("def f(x):")["input_ids"])
    'def f(x):'
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizerConvention:
    """Special-token strings and behaviour of one tokenizer family."""

    kind: str
    bos: str
    eos: str
    unk: str
    pad: str
    add_bos: bool  # prepend bos to every encoded text (Llama-style)


CONVENTIONS: dict[str, TokenizerConvention] = {
    "bytelevel-bpe": TokenizerConvention(
        "bytelevel-bpe", "<|startoftext|>", "<|endoftext|>", "<|unk|>", "<|pad|>", add_bos=False
    ),
    "metaspace-bpe": TokenizerConvention("metaspace-bpe", "<s>", "</s>", "<unk>", "<pad>", add_bos=True),
    "metaspace-unigram": TokenizerConvention(
        "metaspace-unigram", "<bos>", "<eos>", "<unk>", "<pad>", add_bos=True
    ),
}
TOKENIZER_KINDS: tuple[str, ...] = tuple(CONVENTIONS)

BYTE_TOKENS: list[str] = [f"<0x{b:02X}>" for b in range(256)]  # SentencePiece byte-fallback pieces
METASPACE = "\u2581"  # '▁'


def train_tokenizer(
    texts: Iterable[str],
    kind: str = "bytelevel-bpe",
    vocab_size: int = 8192,
    model_max_length: int = 512,
) -> PreTrainedTokenizerFast:
    """Train a tokenizer of the given convention on ``texts``.

    Args:
        texts: training documents (only training text: never pass held-out documents).
        kind: one of ``TOKENIZER_KINDS``.
        vocab_size: target vocabulary size, special and byte-fallback tokens included.
        model_max_length: stored in the tokenizer config (the experts' context length).
    """
    if kind not in CONVENTIONS:
        raise ValueError(f"Unknown tokenizer kind {kind!r}; choose one of {', '.join(TOKENIZER_KINDS)}.")
    conv = CONVENTIONS[kind]
    specials = [conv.unk, conv.bos, conv.eos, conv.pad]  # ids 0..3
    texts = list(texts)
    if not texts:
        raise ValueError(f"Cannot train a {kind} tokenizer on no text: the training corpus is empty.")

    if kind == "bytelevel-bpe":
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    else:
        if vocab_size <= len(specials) + 256:
            raise ValueError(
                f"vocab_size={vocab_size} is too small for {kind}: it must exceed {len(specials) + 256} "
                "(4 specials + 256 byte-fallback tokens)."
            )
        if kind == "metaspace-bpe":
            tok = Tokenizer(models.BPE(unk_token=conv.unk, byte_fallback=True, fuse_unk=True))
            trainer = trainers.BpeTrainer(
                vocab_size=vocab_size,
                min_frequency=2,
                special_tokens=specials + BYTE_TOKENS,
                show_progress=False,
            )
        else:
            tok = Tokenizer(models.Unigram())
            trainer = trainers.UnigramTrainer(
                vocab_size=vocab_size,
                special_tokens=specials + BYTE_TOKENS,
                unk_token=conv.unk,
                max_piece_length=12,
                show_progress=False,
            )
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="first")
        # Llama's decoder: '▁' -> ' ', bytes re-assembled, the prepended space stripped.
        tok.decoder = decoders.Sequence(
            [
                decoders.Replace(METASPACE, " "),
                decoders.ByteFallback(),
                decoders.Fuse(),
                decoders.Strip(" ", 1, 0),
            ]
        )
        tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
        tok = _demote_byte_tokens(tok, byte_fallback_unigram=(kind == "metaspace-unigram"))

    if conv.add_bos:
        bos_id = tok.token_to_id(conv.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{conv.bos} $A", pair=f"{conv.bos} $A {conv.bos} $B", special_tokens=[(conv.bos, bos_id)]
        )
    logger.info("Trained %s tokenizer: %d tokens on %d documents", kind, tok.get_vocab_size(), len(texts))
    return wrap_tokenizer(tok, kind, model_max_length)


def _demote_byte_tokens(tok: Tokenizer, byte_fallback_unigram: bool) -> Tokenizer:
    """Make ``<0xNN>`` ordinary vocabulary entries (as in Llama), not added special tokens.

    The trainers only put them into the vocabulary when they are passed as special tokens; left
    special, they would be split out of raw text and skipped by ``decode(skip_special_tokens=True)``.
    """
    spec = json.loads(tok.to_str())
    byte_set = set(BYTE_TOKENS)
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in byte_set]
    if byte_fallback_unigram:
        spec["model"]["byte_fallback"] = True
    return Tokenizer.from_str(json.dumps(spec))


def wrap_tokenizer(tok: Tokenizer, kind: str, model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """Wrap a raw `tokenizers.Tokenizer` of convention ``kind`` as a transformers fast tokenizer."""
    conv = CONVENTIONS[kind]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=conv.bos,
        eos_token=conv.eos,
        unk_token=conv.unk,
        pad_token=conv.pad,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def tokenizer_kind(tokenizer: PreTrainedTokenizerFast) -> str:
    """Guess the convention of a tokenizer from its special tokens (``unknown`` if none matches)."""
    for kind, conv in CONVENTIONS.items():
        if tokenizer.eos_token == conv.eos and tokenizer.bos_token == conv.bos:
            return kind
    return "unknown"


def encode_documents(tokenizer: PreTrainedTokenizerFast, docs: Sequence[str]) -> list[list[int]]:
    """Token ids of each document as the tokenizer encodes a prompt (bos if its convention adds one),
    followed by eos, so packed training streams look like ``[bos] doc eos [bos] doc eos ...``."""
    if not docs:
        return []
    ids = tokenizer(list(docs), add_special_tokens=True, verbose=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [list(x) + [eos] for x in ids]
