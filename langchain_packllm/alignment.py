"""Vocabulary alignment between members with different tokenizers (paper section 3.4).

When the pack's members do not share a vocabulary, the reference tokenizer is the top-1 member's (Eq. 5)
and every other member is aligned to it through token maps computed once per tokenizer pair:

1. **Surfaces.** Each token id is turned into the bytes it stands for, whatever the tokenizer's spelling
   convention (GPT-2 byte-level ``Ġ``/``Ċ``, SentencePiece ``▁``, byte fallback ``<0x0A>``, WordPiece
   ``##``). Special tokens have no surface: they are matched by role (bos->bos, eos->eos, ...).
2. **MinED map** (:class:`MinEDMap`, the paper's method, after FuseLLM): every source token goes to the
   target token with the identical surface, else to the one at minimum Levenshtein distance.
   It maps reference input ids to a member's ids, and pulls a member's logits back onto the reference
   vocabulary (:func:`map_logits_mined`). It is lossy: several reference tokens may read the same member
   logit and some member tokens are never read.
3. **Prefix map** (:class:`PrefixMap`, a lossless building block): a sparse (V_src, V_dst) matrix whose rows
   sum to one; it moves a distribution over the source vocabulary onto the destination vocabulary without
   losing or double counting probability mass (:meth:`PrefixMap.map_logprobs`).

Both maps are cached on disk (:func:`default_cache_dir`), keyed by the content of both tokenizers.

Example (two toy word-level tokenizers; real ones come from ``AutoTokenizer.from_pretrained``):
    >>> import torch
    >>> from tokenizers import Tokenizer, models
    >>> from transformers import PreTrainedTokenizerFast
    >>> def toy(words):
    ...     vocab = {w: i for i, w in enumerate(["<unk>", *words])}
    ...     backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    ...     return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    >>> ref_tok, member_tok = toy(["get", "the", "dog"]), toy(["the", "gets", "do"])
    >>> ref_to_member = MinEDMap.from_tokenizers(ref_tok, member_tok, use_cache=False)
    >>> ref_to_member.ids.tolist(), ref_to_member.exact.tolist()  # "get" -> "gets", "dog" -> "do"
    ([0, 2, 1, 3], [True, False, True, False])
    >>> ref_to_member.map_ids(torch.tensor([[1, 2, 3]]))  # reference input ids -> member input ids
    tensor([[2, 1, 3]])
    >>> member_logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])  # (B, V_member)
    >>> map_logits_mined(member_logits, ref_to_member)  # (B, V_ref): the logit of each ref token's image
    tensor([[0., 2., 1., 3.]])
"""

from __future__ import annotations

import bisect
import enum
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from langchain_packllm.paths import packllm_home, warn_once

logger = logging.getLogger(__name__)

# Bump when the surface rules change: every cached map is then rebuilt (the version is in the cache key).
NORMALIZER_VERSION = 1
# Bump when a map's construction rule changes.
MINED_VERSION = 1
PREFIX_VERSION = 1

# Roles a special token can play, in the order used to pick a counterpart when a token plays several
# (GPT-2's <|endoftext|> is bos, eos and unk at once: as a prediction it means "stop", so eos comes first).
SPECIAL_ROLES: tuple[str, ...] = ("eos", "bos", "pad", "unk", "sep", "cls", "mask")


# --------------------------------------------------------------------------------------------------------
# 1. Surfaces: what text each token id stands for
# --------------------------------------------------------------------------------------------------------


class Convention(str, enum.Enum):
    """How a tokenizer spells its tokens."""

    BYTE_LEVEL = "byte_level"  # GPT-2 / Llama-3 / Qwen: every byte drawn as a printable char, "Ġ" = space
    METASPACE = "metaspace"  # SentencePiece / Llama-2 / Mistral / T5: "▁" = space, maybe <0xNN> bytes
    WORDPIECE = "wordpiece"  # BERT: "##" marks a word-internal piece, other pieces start a word
    PLAIN = "plain"  # the token string is the text (WordLevel, char-level, whitespace-split BPE)


@lru_cache(maxsize=1)
def _gpt2_unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's ``bytes_to_unicode`` table: printable char -> the byte it draws."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    byte_values, code_points = printable[:], printable[:]
    shift = 0
    for b in range(256):
        if b not in printable:  # control chars, space, NBSP, soft hyphen: moved to 256 + n
            byte_values.append(b)
            code_points.append(256 + shift)
            shift += 1
    return {chr(cp): b for b, cp in zip(byte_values, code_points, strict=True)}


@lru_cache(maxsize=1)
def _gpt2_translation() -> dict[int, str]:
    """``str.translate`` table: alphabet char -> chr(its byte); any other char below 256 -> a char above 255,
    so that ``.encode("latin-1")`` of the result succeeds exactly when every char is in the alphabet."""
    table = {ord(ch): chr(b) for ch, b in _gpt2_unicode_to_byte().items()}
    for cp in range(256):
        table.setdefault(cp, "\uffff")
    return table


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(
    token: str,
    convention: Convention | str,
    *,
    byte_fallback: bool = True,
    continuing_prefix: str = "##",
) -> bytes:
    """The bytes a (non-special) vocabulary entry stands for.

    Rules per convention:
      - ``byte_level``: each char is one byte of GPT-2's ``bytes_to_unicode`` alphabet
        (``Ġ`` -> ``b" "``, ``Ċ`` -> ``b"\\n"``, ``Ã`` -> ``b"\\xc3"``); the result may be a partial UTF-8
        sequence. A char outside the alphabet (a hand-added token stored verbatim) is taken as its own
        UTF-8 encoding.
      - ``metaspace``: ``▁`` -> space; with ``byte_fallback``, a whole token ``<0xNN>`` is the byte 0xNN.
      - ``wordpiece``: ``##ing`` -> ``b"ing"``; a word-initial piece ``the`` -> ``b" the"`` (it follows a
        space in running text, like GPT-2's ``Ġthe``).
      - ``plain``: the UTF-8 of the token (``<0xNN>`` is decoded when ``byte_fallback``).

    Example:
        >>> token_bytes("ĠhelloĊ", "byte_level")
        b' hello\\n'
        >>> token_bytes("Ã", "byte_level")  # first byte of a two-byte UTF-8 char
        b'\\xc3'
        >>> token_bytes("▁hello", "metaspace"), token_bytes("<0x0A>", "metaspace")
        (b' hello', b'\\n')
        >>> token_bytes("##ing", "wordpiece"), token_bytes("the", "wordpiece")
        (b'ing', b' the')
    """
    convention = Convention(convention)
    if convention is Convention.BYTE_LEVEL:
        try:  # fast path: every char is in the alphabet
            return token.translate(_gpt2_translation()).encode("latin-1")
        except UnicodeEncodeError:
            pass
        table = _gpt2_unicode_to_byte()
        out = bytearray()
        for ch in token:
            b = table.get(ch)
            if b is None:
                out += ch.encode("utf-8")
            else:
                out.append(b)
        return bytes(out)
    if byte_fallback and convention in (Convention.METASPACE, Convention.PLAIN):
        match = _BYTE_FALLBACK.fullmatch(token)
        if match:
            return bytes([int(match.group(1), 16)])
    if convention is Convention.METASPACE:
        return token.replace("▁", " ").encode("utf-8")
    if convention is Convention.WORDPIECE:
        if continuing_prefix and token.startswith(continuing_prefix):
            return token[len(continuing_prefix) :].encode("utf-8")
        return (" " + token).encode("utf-8")
    return token.encode("utf-8")


def normalize_token(token: str, convention: Convention | str, **kwargs: Any) -> str:
    """The decoded surface text of a vocabulary entry (see :func:`token_bytes` for the rules).

    Bytes that are not valid UTF-8 on their own (a partial multi-byte char) are kept as lone surrogates
    (``errors="surrogateescape"``), so no two different byte strings share a surface.

    Example:
        >>> normalize_token("Ġworld", "byte_level"), normalize_token("▁world", "metaspace")
        (' world', ' world')
        >>> normalize_token("Ã©", "byte_level")  # two byte-level chars, one UTF-8 char
        'é'
        >>> normalize_token("Ã", "byte_level")  # half of it
        '\\udcc3'
    """
    return token_bytes(token, convention, **kwargs).decode("utf-8", errors="surrogateescape")


def _component_types(node: Any) -> list[str]:
    """Every ``"type"`` in a tokenizer.json component, looking inside Sequence components."""
    found: list[str] = []
    if isinstance(node, dict):
        if isinstance(node.get("type"), str):
            found.append(node["type"])
        for value in node.values():
            found += _component_types(value)
    elif isinstance(node, list):
        for value in node:
            found += _component_types(value)
    return found


def _component_spec(component: Any) -> Any:
    """A backend component (pre-tokenizer, decoder, normalizer) as its tokenizer.json dict, or None."""
    return None if component is None else json.loads(component.__getstate__())


def detect_convention(tokenizer: Any) -> tuple[Convention, bool, str]:
    """(convention, byte_fallback, continuing_prefix) of a tokenizer.

    Read from the fast backend's components (pre-tokenizer, normalizer, decoder, model) when there is one;
    otherwise guessed from vocabulary statistics (share of tokens containing ``Ġ``, ``▁``, ``##``).

    Example:
        >>> detect_convention(gpt2_tokenizer)  # doctest: +SKIP
        (<Convention.BYTE_LEVEL: 'byte_level'>, False, '##')
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        model = backend.model
        pieces = [_component_spec(c) for c in (backend.pre_tokenizer, backend.decoder, backend.normalizer)]
        types = set(_component_types(pieces))
        byte_fallback = bool(getattr(model, "byte_fallback", False)) or "ByteFallback" in types
        prefix = getattr(model, "continuing_subword_prefix", None) or "##"
        if "ByteLevel" in types:
            return Convention.BYTE_LEVEL, byte_fallback, prefix
        if "Metaspace" in types or "▁" in json.dumps(pieces, ensure_ascii=False):
            return Convention.METASPACE, byte_fallback, prefix
        if type(model).__name__ == "WordPiece" or "WordPiece" in types:
            return Convention.WORDPIECE, byte_fallback, prefix
        # Fall through to statistics: e.g. a backend without pre-tokenizer/decoder but a GPT-2 vocabulary.
    vocab = list(tokenizer.get_vocab())
    n = max(len(vocab), 1)
    byte_fallback = sum(bool(_BYTE_FALLBACK.fullmatch(t)) for t in vocab) >= 128
    shares = {
        Convention.BYTE_LEVEL: sum("Ġ" in t or "Ċ" in t for t in vocab) / n,
        Convention.METASPACE: sum("▁" in t for t in vocab) / n,
        Convention.WORDPIECE: sum(t.startswith("##") for t in vocab) / n,
    }
    best = max(shares, key=shares.__getitem__)
    return (best if shares[best] >= 0.05 else Convention.PLAIN), byte_fallback, "##"


@dataclass(frozen=True)
class TokenizerSurfaces:
    """What every id of one tokenizer stands for: its bytes, or its special-token roles.

    Built by :func:`tokenizer_surfaces`; the maps below only ever look at this, so it may be computed once
    per tokenizer and reused for every pair. ``surfaces`` is computed on first use: a cache hit needs
    only the ``fingerprint``.
    """

    tokens: list[str | None]  # (V,) raw vocabulary entries; None for an id the tokenizer never assigns
    special_contents: dict[int, str]  # special id -> its content, e.g. {2: "</s>"}
    role_to_id: dict[str, int]  # e.g. {"bos": 1, "eos": 2, "unk": 0}
    verbatim: frozenset[int]  # non-special added tokens: stored as plain text whatever the convention
    convention: Convention
    byte_fallback: bool
    continuing_prefix: str
    fingerprint: str = field(repr=False)  # sha256 of everything above (+ NORMALIZER_VERSION)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @cached_property
    def surfaces(self) -> list[bytes | None]:
        """(V,) bytes of each regular token; None for specials and unassigned ids."""
        out: list[bytes | None] = [None] * self.vocab_size
        for token_id, token in enumerate(self.tokens):
            if token is None or token_id in self.special_contents:
                continue
            if token_id in self.verbatim:
                out[token_id] = token.encode("utf-8")
            else:
                out[token_id] = token_bytes(
                    token,
                    self.convention,
                    byte_fallback=self.byte_fallback,
                    continuing_prefix=self.continuing_prefix,
                )
        return out

    def roles(self, token_id: int) -> list[str]:
        """Roles of a special id in :data:`SPECIAL_ROLES` order (none for e.g. an added <|im_start|>)."""
        return [role for role in SPECIAL_ROLES if self.role_to_id.get(role) == token_id]

    def is_byte_fallback(self, token_id: int) -> bool:
        token = self.tokens[token_id]
        return bool(self.byte_fallback and token is not None and _BYTE_FALLBACK.fullmatch(token))


def tokenizer_surfaces(tokenizer: Any) -> TokenizerSurfaces:
    """Surfaces of every token id of a Hugging Face tokenizer (fast preferred; slow ones are guessed).

    Special tokens are the tokenizer's ``all_special_ids`` plus any added token flagged ``special``.
    Non-special added tokens are stored verbatim by the backend, so their surface is their UTF-8 content.

    Example:
        >>> s = tokenizer_surfaces(gpt2_tokenizer)  # doctest: +SKIP
        >>> s.surfaces[s.tokens.index("Ġthe")], s.role_to_id["eos"]  # doctest: +SKIP
        (b' the', 50256)
    """
    if isinstance(tokenizer, TokenizerSurfaces):
        return tokenizer
    if not hasattr(tokenizer, "get_vocab"):
        raise TypeError(
            f"Expected a Hugging Face tokenizer (with get_vocab()), got {type(tokenizer).__name__}; "
            "load one with transformers.AutoTokenizer.from_pretrained(...)."
        )
    convention, byte_fallback, prefix = detect_convention(tokenizer)
    vocab: dict[str, int] = tokenizer.get_vocab()
    size = max(vocab.values(), default=-1) + 1
    tokens: list[str | None] = [None] * size
    for token, token_id in vocab.items():
        tokens[token_id] = token

    special_ids = {int(i) for i in getattr(tokenizer, "all_special_ids", []) if i is not None}
    verbatim: set[int] = set()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        for added_id, added in backend.get_added_tokens_decoder().items():
            (special_ids if added.special else verbatim).add(int(added_id))
    role_to_id = {}
    for role in SPECIAL_ROLES:
        token_id = getattr(tokenizer, f"{role}_token_id", None)
        if token_id is not None and 0 <= int(token_id) < size:
            role_to_id[role] = int(token_id)
            special_ids.add(int(token_id))
    special_contents = {i: tokens[i] or "" for i in sorted(special_ids) if i < size}
    verbatim -= special_ids

    digest = hashlib.sha256()
    header = {
        "normalizer_version": NORMALIZER_VERSION,
        "convention": convention.value,
        "byte_fallback": byte_fallback,
        "continuing_prefix": prefix,
        "specials": sorted(special_contents.items()),
        "roles": sorted(role_to_id.items()),
        "verbatim": sorted(verbatim),
    }
    digest.update(json.dumps(header, ensure_ascii=False).encode("utf-8"))
    for token in tokens:  # the full vocabulary, in id order
        digest.update(b"\x00" if token is None else token.encode("utf-8", "surrogatepass") + b"\x01")
    return TokenizerSurfaces(
        tokens=tokens,
        special_contents=special_contents,
        role_to_id=role_to_id,
        verbatim=frozenset(verbatim),
        convention=convention,
        byte_fallback=byte_fallback,
        continuing_prefix=prefix,
        fingerprint=digest.hexdigest(),
    )


def _map_special(token_id: int, src: TokenizerSurfaces, dst: TokenizerSurfaces) -> tuple[int, bool]:
    """(dst id, exact) for a src special token or an unassigned src id. Never maps to a text token.

    Order: a dst special with the same role (roles tried in :data:`SPECIAL_ROLES` order) -> exact; a dst
    special with the same content (e.g. both have ``<|im_start|>``) -> exact; otherwise dst unk, else dst
    eos, else dst's lowest special id -> not exact. A dst with no special token at all is an error.
    """
    for role in src.roles(token_id):
        if role in dst.role_to_id:
            return dst.role_to_id[role], True
    content = src.special_contents.get(token_id)
    if content is not None:
        for dst_id, dst_content in dst.special_contents.items():
            if dst_content == content:
                return dst_id, True
    for role in ("unk", "eos"):
        if role in dst.role_to_id:
            return dst.role_to_id[role], False
    if dst.special_contents:
        return min(dst.special_contents), False
    raise ValueError(
        f"Cannot map special token {content!r} (id {token_id}): the destination tokenizer has no special "
        "tokens at all. Give it an unk or eos token (tokenizer.add_special_tokens({'eos_token': ...}))."
    )


def _canonical_targets(dst: TokenizerSurfaces) -> dict[bytes, int]:
    """surface -> the dst id to use for it. When several ids share a surface (Llama's ``<0x41>`` and ``A``),
    a regular token wins over a byte-fallback one, then the lower id."""
    lookup: dict[bytes, int] = {}
    for token_id, surface in enumerate(dst.surfaces):
        if not surface:
            continue
        known = lookup.get(surface)
        if known is None or (dst.is_byte_fallback(known) and not dst.is_byte_fallback(token_id)):
            lookup[surface] = token_id
    return lookup


# --------------------------------------------------------------------------------------------------------
# 2. Disk cache
# --------------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Where alignment maps are cached.

    ``$PACKLLM_HOME/alignment``, else ``$XDG_CACHE_HOME/packllm/alignment``,
    else ``~/.cache/packllm/alignment``.
    """
    return packllm_home() / "alignment"


def _cache_key(kind: str, version: int, src: TokenizerSurfaces, dst: TokenizerSurfaces) -> str:
    """sha256 of (map kind, its version, normaliser version, both tokenizers' fingerprints)."""
    payload = json.dumps([kind, version, NORMALIZER_VERSION, src.fingerprint, dst.fingerprint])
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode() + str(arrays[name].dtype).encode() + str(arrays[name].shape).encode())
        digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    return digest.hexdigest()


def _save_atomic(path: Path, key: str, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` + a header (key, checksum) to ``path`` via a temp file and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = json.dumps({"key": key, "sha256": _checksum(arrays)})
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, meta=np.array(meta), **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_IN_MEMORY: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # maps whose cache file could not be written
_IN_MEMORY_LOCK = threading.Lock()


def _save_or_keep(path: Path, key: str, arrays: dict[str, np.ndarray]) -> bool:
    """Cache ``arrays`` at ``path``; False (with one warning per folder) when it cannot be written."""
    try:
        _save_atomic(path, key, arrays)
        return True
    except OSError as err:
        warn_once(
            f"alignment-unwritable:{path.parent}",
            "Cannot write the alignment cache %s (%s: %s); token maps are kept in memory for this process. "
            "Make it writable, or set $PACKLLM_HOME to a writable folder, to keep them.",
            path.parent,
            type(err).__name__,
            err.strerror or err,
        )
        return False


def _load_checked(path: Path, key: str, expected: dict[str, tuple[tuple[int, ...], Any]]) -> dict | None:
    """The arrays cached at ``path``, or None (logged) if missing, unreadable, stale or corrupt.

    ``expected`` maps array name -> (shape, dtype).
    """
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            meta = json.loads(str(archive["meta"]))
            arrays = {name: archive[name] for name in expected}
    except Exception as exc:  # a truncated/garbled zip raises several error types; all mean "rebuild"
        reason = f"{type(exc).__name__}: {exc}"
        logger.warning("Alignment cache %s is unreadable (%s); rebuilding it.", path, reason)
        return None
    problem = None
    if meta.get("key") != key:
        problem = "it was built for other tokenizers or another version"
    for name, (shape, dtype) in expected.items():
        got = arrays[name]
        if got.dtype != np.dtype(dtype) or got.shape != shape:
            problem = f"array {name!r} is {got.dtype}{got.shape}, expected {np.dtype(dtype)}{shape}"
    if problem is None and meta.get("sha256") != _checksum(arrays):
        problem = "its checksum does not match"
    if problem:
        logger.warning("Alignment cache %s is not trusted (%s); rebuilding it.", path, problem)
        return None
    return arrays


# --------------------------------------------------------------------------------------------------------
# 3. MinED map (the paper's alignment)
# --------------------------------------------------------------------------------------------------------

_PREFIX_CAP = 32  # tie-break compares at most this many leading chars
_CDIST_BUDGET = 8_000_000  # distance-matrix cells per rapidfuzz call (uint8: 8 MB)
_MANY_TIES = 64  # rows with more minimum-distance choices than this get their prefixes from rapidfuzz
_INDEX_MAX_LENGTH = 24  # queries longer than this skip the neighbourhood index (they go to the scan)
_INDEX_BUDGET = 256  # a query whose keys match more choice keys than this is left to the scan
_HASH_BASE = np.uint64(0x9E3779B97F4A7C15)  # polynomial hash of code-point sequences, mod 2**64
_WILDCARD = np.uint64(0x110001)  # stands for a substituted char (codes are shifted by one: never equal)

# Character classes for a lower bound on edit distance: a char whose class does not occur in the other
# string must be substituted or deleted. ASCII splits into lower/upper letters, digits, space, the rest;
# other code points go by Unicode block (Latin extensions, Greek, Cyrillic, ..., CJK, Hangul, astral).
_BLOCK_STARTS = (0x80, 0x250, 0x370, 0x400, 0x530, 0x600, 0x700, 0x900, 0xE00, 0xE80, 0x1100, 0x1200,
                 0x2000, 0x3000, 0x3100, 0x4E00, 0xA000, 0xAC00, 0xD800, 0x10000)  # fmt: skip
_N_CLASSES = len(_BLOCK_STARTS) + 5


def _char_class(ch: str) -> int:
    code = ord(ch)
    if code < 0x80:
        if ch.isalpha():
            return 1 if ch.isupper() else 2
        return 3 if ch.isdigit() else 4 if ch == " " else 0
    return 4 + bisect.bisect_right(_BLOCK_STARTS, code)


def _class_index(codes: np.ndarray) -> np.ndarray:
    """``_char_class(chr(code))`` for an array of (non-negative) code points."""
    ascii_classes = np.array([_char_class(chr(c)) for c in range(128)], dtype=np.int64)
    other = 4 + np.searchsorted(np.array(_BLOCK_STARTS), codes, side="right")
    return np.where(codes < 128, ascii_classes[np.minimum(codes, 127)], other)


def _class_bits(codes: np.ndarray) -> np.ndarray:
    """``1 << _char_class(chr(code))`` for an array of (non-negative) code points."""
    return np.int64(1) << _class_index(codes)


@dataclass
class _Texts:
    """Per-string arrays the search needs: lengths, leading code points, class counts and masks."""

    texts: list[str]
    lengths: np.ndarray  # (N,) int64
    codes: np.ndarray  # (N, _PREFIX_CAP) int32 leading code points, padded with ``pad``
    counts: np.ndarray  # (N, _N_CLASSES) int32 chars per class
    masks: np.ndarray  # (N,) int64 bitmask of the classes present

    @classmethod
    def of(cls, texts: list[str], pad: int) -> _Texts:
        lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
        chars = np.frombuffer("".join(texts).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        chars = chars.astype(np.int64)
        row = np.repeat(np.arange(len(texts)), lengths)
        at = np.arange(len(chars)) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # index in its text
        counts = np.bincount(row * _N_CLASSES + _class_index(chars), minlength=len(texts) * _N_CLASSES)
        counts = counts.reshape(len(texts), _N_CLASSES).astype(np.int32)
        codes = np.full((len(texts), _PREFIX_CAP), pad, dtype=np.int32)
        head = at < _PREFIX_CAP
        codes[row[head], at[head]] = chars[head]
        bits = (counts > 0).astype(np.int64) << np.arange(_N_CLASSES, dtype=np.int64)
        return cls(texts, lengths, codes, counts, bits.sum(axis=1))


def _codes_by_length(texts: list[str], lengths: np.ndarray, max_length: int) -> dict[int, tuple]:
    """length L -> (rows, (n, L) uint64 code points + 1) for the texts of each length up to ``max_length``."""
    out = {}
    for length in np.unique(lengths):
        length = int(length)
        if length > max_length:
            continue
        rows = np.nonzero(lengths == length)[0]
        buf = "".join(texts[r] for r in rows).encode("utf-32-le", "surrogatepass")
        codes = np.frombuffer(buf, dtype=np.uint32).reshape(len(rows), length).astype(np.uint64)
        out[length] = (rows, codes + np.uint64(1))
    return out


def _hash_rows(codes: np.ndarray) -> np.ndarray:
    """(n,) uint64 hash of each row of ``codes``, seeded with the row length (wraps mod 2**64)."""
    h = np.full(len(codes), codes.shape[1], dtype=np.uint64)
    for k in range(codes.shape[1]):
        h = h * _HASH_BASE + codes[:, k]
    return h


def _variant_keys(groups: dict[int, tuple], kinds: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of each text's variants, and the row each came from. Kinds: ``full`` (the text), ``wild1``
    (one char replaced by a wildcard, each position), ``del1`` / ``del2`` (one / two chars deleted)."""
    keys, owners = [np.empty(0, np.uint64)], [np.empty(0, np.int64)]
    for length, (rows, codes) in groups.items():
        variants = []
        if "full" in kinds:
            variants.append(codes)
        if "wild1" in kinds:
            for p in range(length):
                wild = codes.copy()
                wild[:, p] = _WILDCARD
                variants.append(wild)
        if "del1" in kinds:
            variants += [np.delete(codes, p, axis=1) for p in range(length)]
        if "del2" in kinds:
            variants += [
                np.delete(codes, [p, q], axis=1) for p in range(length) for q in range(p + 1, length)
            ]
        keys += [_hash_rows(v) for v in variants]
        owners += [rows] * len(variants)
    return np.concatenate(keys), np.concatenate(owners)


def _may_match(keys: np.ndarray, owners: np.ndarray, probes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ``keys`` (and their owners) whose top 24 bits are those of some probe: a superset of the keys
    equal to a probe, found with a 2 MB bitmap instead of sorting every key."""
    seen = np.zeros(1 << 24, dtype=bool)
    seen[probes >> np.uint64(40)] = True
    keep = seen[keys >> np.uint64(40)]
    return keys[keep], owners[keep]


class _NearestSearch:
    """Exact nearest choice of every query by Levenshtein distance, with MinED's tie-breaks (longest common
    prefix over the first 32 chars, then the lowest choice index), without computing most distances.

    Choices are split into blocks of one length and one set of character classes. A query of length L
    scans the blocks of length L first, then L-1 and L+1, and so on, and stops once the length gap exceeds
    its best distance so far; a block is skipped for a query when a lower bound (the length gap; the
    query's chars in classes the block lacks; the block's classes the query lacks) exceeds that best.
    Every choice at a distance not above the final best is scanned, so the result is the exhaustive one.
    Distances come from rapidfuzz's C++ ``cdist``; query lengths are searched on ``threads`` threads.

    Before the scan, a hashed neighbourhood index settles the queries whose best distance is 1 or 2 without
    it (:meth:`_near`): every choice at distance 1 shares a key (the text with one char wildcarded, with
    one char deleted, or whole) with the query, and every choice at distance <= 2 shares a key of up to two
    deletions. A query whose keys found a choice at distance 1 (or, having none, at 2) has all the choices
    at that distance in hand, so its tie-breaks are exact; the others are scanned, seeded with the best
    choice found so far. Queries whose keys match too many choice keys (short ones) are left to the scan.
    Each scanned query is also seeded with its longest substring that is a choice (distance: the length
    gap), and a block whose bound only equals the best so far is skipped when none of its members could
    win the tie (their common prefix with the query is bounded by the query's first char and the classes
    of its leading chars; then the block's lowest index).
    """

    def __init__(self, queries: list[str], choices: list[str]):
        from rapidfuzz import process
        from rapidfuzz.distance import Levenshtein, Prefix

        self._cdist, self._distance, self._prefix = process.cdist, Levenshtein.distance, Prefix.similarity
        self._cpdist = process.cpdist
        self.q = _Texts.of(queries, pad=-1)  # -1 and -2 never match: padding ends a common prefix
        self.c = _Texts.of(choices, pad=-2)
        order = np.lexsort((np.arange(len(choices)), self.c.masks, self.c.lengths))  # ascending index last
        keys = np.stack([self.c.lengths[order], self.c.masks[order]], axis=1)
        cuts = np.r_[0, np.nonzero((keys[1:] != keys[:-1]).any(axis=1))[0] + 1, len(order)]
        self.blocks: dict[int, list[tuple[int, np.ndarray, list[str], np.ndarray]]] = {}
        for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
            idx = order[lo:hi]  # one block, ascending choice index
            firsts = np.unique(self.c.codes[idx, 0])  # the members' first chars (tie-break bound)
            block = (int(self.c.masks[idx[0]]), idx, [choices[i] for i in idx], firsts)
            self.blocks.setdefault(int(self.c.lengths[idx[0]]), []).append(block)
        self.max_length = int(self.c.lengths.max())
        # per query and k: the classes of its first k + 1 chars (past its end, a class no block has), so a
        # block can share at most as many leading chars as there are k whose classes it all has
        heads = np.where(self.q.codes >= 0, _class_bits(self.q.codes), np.int64(1) << 62)
        self.q_heads = np.bitwise_or.accumulate(heads, axis=1)
        n = len(queries)
        self.best = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)  # distance
        self.prefix = np.full(n, -1, dtype=np.int64)
        self.choice = np.full(n, -1, dtype=np.int64)
        self.done = np.zeros(n, dtype=bool)  # settled by the neighbourhood index: not scanned
        self.choices = choices

    def run(self, threads: int, progress_desc: str) -> np.ndarray:
        self._near(threads)
        lengths, sizes = np.unique(self.q.lengths[~self.done], return_counts=True)
        order = [int(L) for L in lengths[np.argsort(-sizes, kind="stable")]]  # largest groups first
        with tqdm(total=len(self.q.texts), desc=progress_desc, unit="tok", delay=2.0, leave=False) as bar:
            bar.update(int(self.done.sum()))

            def search(length: int) -> None:
                self._search_length(length)
                bar.update(int(((self.q.lengths == length) & ~self.done).sum()))

            if threads > 1 and len(order) > 1:
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(threads, thread_name_prefix="mined") as pool:
                    list(pool.map(search, order))
            else:
                for length in order:
                    search(length)
        return self.choice

    def _near(self, threads: int) -> None:
        """Settle what the neighbourhood index can (see the class docstring); seed the rest."""
        q_groups = _codes_by_length(self.q.texts, self.q.lengths, _INDEX_MAX_LENGTH)
        c_groups = _codes_by_length(self.c.texts, self.c.lengths, _INDEX_MAX_LENGTH + 2)
        todo = self.q.lengths <= _INDEX_MAX_LENGTH
        # distance <= 1: same length, one substitution (one wildcard each); one deletion from the longer
        near1 = [(("wild1",), ("wild1",)), (("del1",), ("full",)), (("full",), ("del1",))]
        near2 = [(("full", "del1", "del2"), ("full", "del1", "del2"))]  # distance <= 2: up to 2 deletions
        for limit, kinds in ((1, near1), (2, near2)):
            if todo.any():
                todo = self._settle(q_groups, c_groups, todo, limit, kinds, threads)
        self._seed_substrings(q_groups, c_groups, ~self.done, threads)

    def _settle(self, q_groups, c_groups, todo, limit, kinds, threads) -> np.ndarray:
        """Queries ``todo`` (none within ``limit - 1`` of any choice) against the choices sharing a key:
        those with one within ``limit`` are settled (all such choices share a key); returns the ones to
        look further for (the rest go to the scan, seeded with the best match found)."""
        keep = {length: (r[todo[r]], x[todo[r]]) for length, (r, x) in q_groups.items()}
        keep = {length: g for length, g in keep.items() if len(g[0])}
        matched = np.zeros(len(self.q.texts), dtype=np.int64)  # choice keys matched, per query
        spans = []
        for q_kinds, c_kinds in kinds:
            (qk, qo), (ck, co) = _variant_keys(keep, q_kinds), _variant_keys(c_groups, c_kinds)
            ck, co = _may_match(ck, co, qk)
            order = np.argsort(ck)
            ck, co = ck[order], co[order]
            order = np.argsort(qk)  # sorted needles: searchsorted runs through memory once
            qk, qo = qk[order], qo[order]
            lo, hi = np.searchsorted(ck, qk, "left"), np.searchsorted(ck, qk, "right")
            matched += np.bincount(qo, weights=hi - lo, minlength=len(matched)).astype(np.int64)
            spans.append((qo, lo, hi, co))
        within = todo & (matched <= _INDEX_BUDGET)  # the others go to the scan as they are
        pq, pc = [], []
        for qo, lo, hi, co in spans:
            sel = within[qo] & (hi > lo)
            qo, lo, n = qo[sel], lo[sel], (hi - lo)[sel]
            pq.append(np.repeat(qo, n))
            pc.append(co[np.repeat(lo - np.cumsum(n) + n, n) + np.arange(n.sum())])
        found = self._offer_pairs(np.concatenate(pq), np.concatenate(pc), 2 * limit, threads)
        settled = within & (found <= limit)  # every choice at that distance was among the matches
        self.done |= settled
        return within & ~settled  # none within ``limit``: the next stage looks further

    def _seed_substrings(self, q_groups, c_groups, todo, threads) -> None:
        """Seed each query ``todo`` with its longest substring that is a choice (at distance exactly the
        length gap): the scan then skips, from the start, the blocks no better than that."""
        ck, co = _variant_keys(c_groups, ("full",))
        if not len(ck):
            return
        order = np.argsort(ck)
        ck, co = ck[order], co[order]
        pq, pc, span = [np.empty(0, np.int64)], [np.empty(0, np.int64)], [np.empty(0, np.int64)]
        with np.errstate(over="ignore"):  # hashes wrap mod 2**64
            for length, (rows, codes) in q_groups.items():
                rows, codes = rows[todo[rows]], codes[todo[rows]]
                if not len(rows) or length < 2:
                    continue
                heads = np.zeros((len(rows), length + 1), dtype=np.uint64)  # hashes of the prefixes
                for k in range(length):
                    heads[:, k + 1] = heads[:, k] * _HASH_BASE + codes[:, k]
                for m in range(1, length):  # substring length
                    power = _HASH_BASE ** np.uint64(m)
                    for i in range(length - m + 1):
                        key = np.uint64(m) * power + (heads[:, i + m] - heads[:, i] * power)  # _hash_rows
                        at = np.minimum(np.searchsorted(ck, key), len(ck) - 1)
                        hit = ck[at] == key
                        pq.append(rows[hit]), pc.append(co[at[hit]]), span.append(np.full(hit.sum(), m))
        pq, pc, span = np.concatenate(pq), np.concatenate(pc), np.concatenate(span)
        order = np.lexsort((-span, pq))  # per query, the longest first
        first = order[np.r_[True, pq[order][1:] != pq[order][:-1]]] if len(order) else order
        self._offer_pairs(pq[first], pc[first], None, threads)

    def _offer_pairs(self, pq, pc, cutoff, threads) -> np.ndarray:
        """Distances of the (query, choice) pairs; each query is offered its best pair (the lowest distance
        up to ``cutoff``, then the longest prefix, then the lowest index). Returns (Q,) the minimum found
        (int64 max where none; above ``cutoff``: ``cutoff + 1``)."""
        found = np.full(len(self.q.texts), np.iinfo(np.int64).max, dtype=np.int64)
        if not len(pq):
            return found
        qs, cs = [self.q.texts[i] for i in pq], [self.choices[j] for j in pc]
        dist = self._cpdist(qs, cs, scorer=self._distance, workers=threads, score_cutoff=cutoff,
                            dtype=np.int64)  # fmt: skip
        np.minimum.at(found, pq, dist)
        at_min = np.nonzero(dist == found[pq])[0]
        if cutoff is not None:
            at_min = at_min[dist[at_min] <= cutoff]  # a true distance (above the cutoff: not)
        pq, pc = pq[at_min], pc[at_min]
        prefix = self._cpdist([qs[k] for k in at_min], [cs[k] for k in at_min], scorer=self._prefix,
                              workers=threads, dtype=np.int64)  # fmt: skip
        prefix = np.minimum(prefix, _PREFIX_CAP)
        order = np.lexsort((pc, -prefix, pq))
        first = order[np.r_[True, pq[order][1:] != pq[order][:-1]]] if len(order) else order
        self._offer(pq[first], found[pq[first]], prefix[first], pc[first])
        return found

    def _search_length(self, length: int) -> None:
        group = np.nonzero((self.q.lengths == length) & ~self.done)[0]
        bits = np.int64(1) << np.arange(_N_CLASSES, dtype=np.int64)
        gap = 0
        while length - gap >= 0 or length + gap <= self.max_length:
            active = group[self.best[group] >= gap]
            if not len(active):
                return
            counts = self.q.counts[active].astype(np.int64)
            absent = (counts == 0).astype(np.int64)
            first = self.q.codes[active, 0]
            for size in sorted({length - gap, length + gap}):
                for mask, idx, strs, firsts in self.blocks.get(size, ()):
                    has = (mask & bits) != 0  # (C,) classes the block has
                    lacking = counts @ ~has  # query chars in classes the block lacks
                    extra = absent @ has  # block classes the query lacks
                    bound = np.maximum(np.maximum(lacking, extra), gap)
                    best = self.best[active]
                    scan = bound < best
                    tie = np.nonzero(bound == best)[0]
                    if len(tie):
                        # at bound == best a member can only tie: it wins on a longer prefix (none is
                        # longer than 0 when no member starts with the query's first char, nor than the
                        # query's leading chars whose classes the block has), else on a lower index
                        rows = active[tie]
                        fits = ((self.q_heads[rows] & ~mask) == 0).sum(axis=1)
                        at = np.minimum(np.searchsorted(firsts, first[tie]), len(firsts) - 1)
                        prefix = np.where(firsts[at] == first[tie], fits, 0)
                        held = self.prefix[rows]
                        scan[tie] = (prefix > held) | ((prefix == held) & (idx[0] < self.choice[rows]))
                    rows = active[scan]
                    if len(rows):
                        self._scan(rows, idx, strs)
            gap += 1

    def _scan(self, rows: np.ndarray, idx: np.ndarray, strs: list[str]) -> None:
        step = max(1, _CDIST_BUDGET // len(idx))
        for start in range(0, len(rows), step):
            r = rows[start : start + step]
            cutoff = int(min(self.best[r].max(), 254))
            queries = [self.q.texts[i] for i in r]
            dist = self._cdist(queries, strs, scorer=self._distance, workers=1, dtype=np.uint8,
                               score_cutoff=cutoff)  # fmt: skip  # (r, block); above cutoff -> cutoff + 1
            low = dist.min(axis=1)
            useful = low.astype(np.int64) <= self.best[r]
            if not useful.all():
                r, dist, low = r[useful], dist[useful], low[useful]
                queries = [q for q, u in zip(queries, useful, strict=True) if u]
                if not len(r):
                    continue
            col = idx[dist.argmin(axis=1)]  # the lowest-index choice at the minimum
            prefix = np.zeros(len(r), dtype=np.int64)
            tie = dist == low[:, None]
            many = tie.sum(axis=1) > _MANY_TIES
            if many.any():  # prefixes of the whole row from rapidfuzz, the best tie by argmin
                sub = [q for q, m in zip(queries, many, strict=True) if m]
                shared = self._cdist(sub, strs, scorer=self._prefix, workers=1, dtype=np.uint8)
                np.minimum(shared, _PREFIX_CAP, out=shared)
                rank = np.where(tie[many], _PREFIX_CAP - shared, 255).astype(np.uint8)
                best_col = rank.argmin(axis=1)
                col[many] = idx[best_col]
                prefix[many] = shared[np.arange(len(best_col)), best_col]
                tie[many] = False
            self._longest_prefix(r, *np.nonzero(tie), idx, col, prefix)
            self._offer(r, low.astype(np.int64), prefix, col)

    def _offer(self, r: np.ndarray, low: np.ndarray, prefix: np.ndarray, col: np.ndarray) -> None:
        """Keep, per query ``r``, the better of its best so far and (distance, prefix, choice) offered."""
        d, p, c = self.best[r], self.prefix[r], self.choice[r]
        better = (low < d) | ((low == d) & ((prefix > p) | ((prefix == p) & (col < c))))
        won = r[better]
        self.best[won], self.prefix[won], self.choice[won] = low[better], prefix[better], col[better]

    def _longest_prefix(self, r, rows, cols, idx, col, prefix) -> None:
        """For tie pairs ``(rows, cols)`` (row-major, so ascending index within a row): per row, the tie
        with the longest common prefix (lowest index first), written into ``col``/``prefix`` when >= 1."""
        qq, cc = r[rows], idx[cols]
        same = self.q.codes[qq, 0] == self.c.codes[cc, 0]
        rows, qq, cc = rows[same], qq[same], cc[same]
        depth = 1
        while len(rows):
            if depth < _PREFIX_CAP:
                ok = self.q.codes[qq, depth] == self.c.codes[cc, depth]
            else:
                ok = np.zeros(len(rows), dtype=bool)
            goes_on = np.zeros(len(r), dtype=bool)
            goes_on[rows[ok]] = True
            ends = ~goes_on[rows]  # every tie of this row stops matching here: its prefix is ``depth``
            if ends.any():
                er, ec = rows[ends], cc[ends]
                first = np.ones(len(er), dtype=bool)
                first[1:] = er[1:] != er[:-1]
                col[er[first]], prefix[er[first]] = ec[first], depth
            keep = ok & ~ends
            rows, qq, cc = rows[keep], qq[keep], cc[keep]
            depth += 1


def _nearest_by_edit_distance(
    queries: list[str], choices: list[str], progress_desc: str, threads: int | None = None
) -> np.ndarray:
    """(Q,) index into ``choices`` of each query's nearest choice by Levenshtein distance.

    Ties: longest common prefix (first 32 chars), then the lowest index. Exact: equal to comparing every
    query with every choice (see :class:`_NearestSearch` for how most pairs are skipped).
    """
    try:
        import rapidfuzz  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "Building a MinED map needs rapidfuzz: pip install 'langchain-packllm[align]'."
        ) from exc
    if not queries:
        return np.empty(0, dtype=np.int64)
    threads = threads or min(os.cpu_count() or 1, 8)
    return _NearestSearch(queries, choices).run(threads, progress_desc)


@dataclass
class MinEDMap:
    """Minimum-edit-distance token map from a source vocabulary to a destination vocabulary.

    ``ids[s]`` is the destination id for source id ``s``: the regular destination token with the same
    surface if there is one (``exact[s]``), else the one at minimum Levenshtein distance between the
    normalised surfaces (ties: longer common prefix, then lower id). Special tokens map by role
    (see :func:`_map_special`) and never to text; regular tokens never map to specials.

    For the paper's use, build it with src = the reference tokenizer and dst = a member's:
    :meth:`map_ids` turns reference input ids into the member's, and :func:`map_logits_mined` pulls the
    member's logits back onto the reference vocabulary.

    Example:
        >>> ref_to_member = MinEDMap.from_tokenizers(ref_tok, member_tok)  # doctest: +SKIP
        >>> ref_to_member.ids.shape, ref_to_member.exact_fraction  # doctest: +SKIP
        ((32000,), 0.71)
    """

    ids: np.ndarray  # (V_src,) int64 destination id of each source id
    exact: np.ndarray  # (V_src,) bool: surface (or special role) matched exactly
    dst_vocab_size: int
    key: str = ""
    from_cache: bool = False
    build_seconds: float = 0.0
    _device_ids: dict = field(default_factory=dict, repr=False)

    @property
    def src_vocab_size(self) -> int:
        return len(self.ids)

    @property
    def n_exact(self) -> int:
        return int(self.exact.sum())

    @property
    def exact_fraction(self) -> float:
        return self.n_exact / max(len(self.ids), 1)

    def ids_on(self, device: torch.device | str) -> torch.Tensor:
        """The map as an int64 tensor on ``device`` (copied once per device)."""
        return _int64_on(self._device_ids, self.ids, device)

    def map_ids(self, src_ids: torch.Tensor) -> torch.Tensor:
        """Source token ids (any shape) -> destination token ids (same shape)."""
        return self.ids_on(src_ids.device)[src_ids]

    @classmethod
    def from_tokenizers(
        cls,
        src_tokenizer: Any,
        dst_tokenizer: Any,
        cache_dir: str | Path | None = None,
        use_cache: bool = True,
    ) -> MinEDMap:
        """Load the (src -> dst) map from the disk cache, or build and cache it.

        Args:
            src_tokenizer: Hugging Face tokenizer (or :class:`TokenizerSurfaces`) whose ids are mapped.
            dst_tokenizer: the one they are mapped to.
            cache_dir: directory for the cache file; default :func:`default_cache_dir`.
            use_cache: False to always build and never read or write the cache.
        """
        src, dst = tokenizer_surfaces(src_tokenizer), tokenizer_surfaces(dst_tokenizer)
        (ids, exact), key, seconds, hit = _cached_map(
            "mined", MINED_VERSION, src, dst, ("ids", "exact"), _build_mined, cache_dir, use_cache
        )
        return cls(ids, exact, dst.vocab_size, key=key, from_cache=hit, build_seconds=seconds)


def _int64_on(copies: dict, array: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """``array`` as an int64 tensor on ``device``, made once per device and kept in ``copies``."""
    device = torch.device(device)
    if device not in copies:
        copies[device] = torch.as_tensor(array, dtype=torch.long, device=device)
    return copies[device]


def _cached_map(
    kind: str,
    version: int,
    src: TokenizerSurfaces,
    dst: TokenizerSurfaces,
    names: tuple[str, str],
    build,
    cache_dir: str | Path | None,
    use_cache: bool,
) -> tuple[tuple[np.ndarray, np.ndarray], str, float, bool]:
    """Load a (src -> dst) map from the checked disk cache, or build it with ``build(src, dst)`` and cache it.

    A map is two ``(V_src,)`` arrays named ``names``: destination ids (int64, checked to lie in
    ``[0, V_dst)``) and a boolean flag. Returns ``((ids, flags), key, build_seconds, from_cache)``.
    """
    key = _cache_key(kind, version, src, dst)
    path = Path(cache_dir or default_cache_dir()) / f"{kind}-{key[:40]}.npz"
    ids_name, flag_name = names
    blocked = False  # the cache path is taken by something that is not a file: build in memory
    if use_cache:
        with _IN_MEMORY_LOCK:
            kept = _IN_MEMORY.get(key)
        if kept is not None:
            return kept, key, 0.0, True
        blocked = path.exists() and not path.is_file()
        if blocked:
            warn_once(
                f"alignment-blocked:{path}",
                "Alignment cache path %s is not a file (a directory?); the map is kept in memory. Remove it "
                "(rm -r '%s') to cache the map again.",
                path,
                path,
            )
        else:
            expected = {ids_name: ((src.vocab_size,), np.int64), flag_name: ((src.vocab_size,), np.bool_)}
            cached = _load_checked(path, key, expected)
            if cached is not None and _ids_in_range(cached[ids_name], dst.vocab_size, path):
                return (cached[ids_name], cached[flag_name]), key, 0.0, True
    started = time.perf_counter()
    ids, flags = build(src, dst)
    seconds = time.perf_counter() - started
    logger.info(
        "Built %s map %d -> %d tokens in %.1f s: %.1f%% %s (%s).",
        kind, src.vocab_size, dst.vocab_size, seconds, 100 * flags.mean(), flag_name, path.name,
    )  # fmt: skip
    if use_cache and (blocked or not _save_or_keep(path, key, {ids_name: ids, flag_name: flags})):
        with _IN_MEMORY_LOCK:
            _IN_MEMORY[key] = (ids, flags)
    return (ids, flags), key, seconds, False


def _ids_in_range(ids: np.ndarray, size: int, path: Path) -> bool:
    if len(ids) and (ids.min() < 0 or ids.max() >= size):
        logger.warning("Alignment cache %s holds ids outside [0, %d); rebuilding it.", path, size)
        return False
    return True


def _build_mined(src: TokenizerSurfaces, dst: TokenizerSurfaces) -> tuple[np.ndarray, np.ndarray]:
    """(ids, exact), each (V_src,): exact surface matches first, edit distance for the rest."""
    ids = np.empty(src.vocab_size, dtype=np.int64)
    exact = np.zeros(src.vocab_size, dtype=bool)
    targets = _canonical_targets(dst)
    remainder: dict[bytes, list[int]] = {}  # surface -> src ids still unmatched (deduplicated queries)
    for token_id, surface in enumerate(src.surfaces):
        if surface is None:  # special or unassigned id
            ids[token_id], exact[token_id] = _map_special(token_id, src, dst)
        elif surface in targets:
            ids[token_id], exact[token_id] = targets[surface], True
        else:
            remainder.setdefault(surface, []).append(token_id)
    if remainder:
        if not targets:
            raise ValueError("The destination tokenizer has no regular (non-special) tokens to map onto.")
        choice_ids = np.array(sorted(targets.values()), dtype=np.int64)  # ascending id: ties -> lower id
        choices = [dst.surfaces[i].decode("utf-8", "surrogateescape") for i in choice_ids]
        queries = [s.decode("utf-8", "surrogateescape") for s in remainder]
        nearest = choice_ids[_nearest_by_edit_distance(queries, choices, "MinED map")]
        for token_ids, dst_id in zip(remainder.values(), nearest, strict=True):
            ids[token_ids] = dst_id
    return ids, exact


def map_logits_mined(member_logits: torch.Tensor, ref_to_member: MinEDMap) -> torch.Tensor:
    """A member's logits over its vocabulary -> logits over the reference vocabulary (paper section 3.4).

    For each reference token ``r`` the result holds the member's logit for its MinED image
    ``ref_to_member.ids[r]``: a gather, ``(..., V_member) -> (..., V_ref)``. Several reference tokens may
    read the same member logit, so re-normalise (``log_softmax``) after fusing, as Eq. 1 does anyway.
    Extra trailing logits (a model whose embedding is padded beyond its tokenizer) are never read.

    Example: see the module docstring.
    """
    if member_logits.shape[-1] < ref_to_member.dst_vocab_size:
        raise ValueError(
            f"member_logits has {member_logits.shape[-1]} entries in its last dim, but the member's "
            f"tokenizer has {ref_to_member.dst_vocab_size} tokens; pass the member's full logits, and build "
            "the map as MinEDMap.from_tokenizers(reference_tokenizer, member_tokenizer)."
        )
    return member_logits.index_select(-1, ref_to_member.ids_on(member_logits.device))  # (..., V_ref)


# --------------------------------------------------------------------------------------------------------
# 4. Prefix map: move a distribution between vocabularies without losing mass
# --------------------------------------------------------------------------------------------------------


def _build_prefix_assignment(src: TokenizerSurfaces, dst: TokenizerSurfaces) -> tuple[np.ndarray, np.ndarray]:
    """(dst_index, whole), each (V_src,): the dst token that receives each src token's mass.

    Rule, for a src token with surface ``b``:
      1. special (or unassigned) -> its counterpart by role (:func:`_map_special`);
      2. else the **longest** dst surface that is a prefix of ``b`` (the dst token the continuation ``b``
         starts with under greedy longest-match); ``whole`` marks the case where that is all of ``b``;
      3. else (``b`` starts with a byte/char dst lacks) the lexicographically first dst surface that
         extends ``b``; else dst unk (or eos, see :func:`_map_special`).
    Every src token goes to exactly one dst token, so each row of the matrix has one 1.
    """
    targets = _canonical_targets(dst)
    by_text = sorted(targets)  # dst surfaces in byte order, for rule 3
    longest = max(map(len, targets), default=0)
    dst_index = np.empty(src.vocab_size, dtype=np.int64)
    whole = np.zeros(src.vocab_size, dtype=bool)
    for token_id, surface in enumerate(src.surfaces):
        if not surface:
            dst_index[token_id], whole[token_id] = _map_special(token_id, src, dst)
            continue
        for length in range(min(len(surface), longest), 0, -1):  # rule 2
            hit = targets.get(surface[:length])
            if hit is not None:
                dst_index[token_id], whole[token_id] = hit, length == len(surface)
                break
        else:
            pos = bisect.bisect_left(by_text, surface)  # rule 3
            if pos < len(by_text) and by_text[pos].startswith(surface):
                dst_index[token_id] = targets[by_text[pos]]
            else:
                dst_index[token_id], _ = _map_special(-1, src, dst)
    return dst_index, whole


@dataclass
class PrefixMap:
    """A mass-preserving map of distributions from a source vocabulary onto a destination vocabulary.

    ``matrix()`` is a sparse (V_src, V_dst) matrix with rows summing to one; a distribution ``p`` over the
    source vocabulary becomes ``q = p @ matrix`` over the destination vocabulary, so ``sum(q) == sum(p)``:
    no mass is lost and none is counted twice. The current rule (:func:`_build_prefix_assignment`) gives
    each source token's whole mass to the longest destination token that its surface starts with, e.g.
    src ``" there"`` -> dst ``" the"`` when dst has no ``" there"``. With one 1 per row the products are
    index operations (``dst_index``); a rule that splits a token's mass over several destination tokens
    would keep the same contract with a sparse matmul.

    Typical use: ``PrefixMap.from_tokenizers(member_tok, ref_tok).map_logprobs(member_logprobs)``.

    Example (src tokens " the", " there", " a"; dst tokens " the", " a": " there" starts with " the"):
        >>> import numpy as np, torch
        >>> member_to_ref = PrefixMap(np.array([0, 0, 1]), np.array([True, False, True]), dst_vocab_size=2)
        >>> member_logprobs = torch.tensor([[0.5, 0.2, 0.3]]).log()  # (B, V_src)
        >>> member_to_ref.map_logprobs(member_logprobs).exp()  # (B, V_dst)
        tensor([[0.7000, 0.3000]])
    """

    dst_index: np.ndarray  # (V_src,) int64: the dst token each src token's mass goes to
    whole: np.ndarray  # (V_src,) bool: that dst token's surface is the src token's whole surface
    dst_vocab_size: int
    key: str = ""
    from_cache: bool = False
    build_seconds: float = 0.0
    _device_index: dict = field(default_factory=dict, repr=False)

    @property
    def src_vocab_size(self) -> int:
        return len(self.dst_index)

    @property
    def whole_fraction(self) -> float:
        return float(self.whole.mean()) if len(self.whole) else 0.0

    def matrix(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The map as a sparse COO matrix, (V_src, V_dst), one 1 per row (rows sum to one)."""
        rows = torch.arange(self.src_vocab_size)  # (V_src,)
        cols = torch.as_tensor(self.dst_index, dtype=torch.long)  # (V_src,)
        values = torch.ones(self.src_vocab_size, dtype=dtype)
        shape = (self.src_vocab_size, self.dst_vocab_size)
        matrix = torch.sparse_coo_tensor(torch.stack([rows, cols]), values, shape, check_invariants=True)
        return matrix.to(device)

    def index_on(self, device: torch.device | str) -> torch.Tensor:
        """``dst_index`` as an int64 tensor on ``device`` (copied once per device)."""
        return _int64_on(self._device_index, self.dst_index, device)

    def map_probs(self, src_probs: torch.Tensor) -> torch.Tensor:
        """(B, V_src) probabilities -> (B, V_dst) probabilities with the same row sums: ``p @ matrix``.

        Each row of the matrix holds a single 1, so the product is a scatter-add over ``dst_index``.
        """
        src_probs = self._check_width(src_probs)  # (B, V_src)
        dst_probs = src_probs.new_zeros(src_probs.shape[0], self.dst_vocab_size)  # (B, V_dst)
        return dst_probs.index_add_(1, self.index_on(src_probs.device), src_probs)

    def map_logprobs(self, src_logprobs: torch.Tensor) -> torch.Tensor:
        """(B, V_src) log-probabilities -> (B, V_dst) log-probabilities, as ``log(exp(x) @ matrix)``.

        Computed as a log-sum-exp per destination token (each group shifted by its own max), so a token
        1000 nats below the row's best is kept, not underflowed to -inf. A destination token that receives
        no source token gets -inf: fusing code that adds log-probs must decide what that means (see
        docs/ALIGNMENT.md). The output is normalised exactly when the input is; nothing renormalises.
        """
        src_logprobs = self._check_width(src_logprobs)  # (B, V_src)
        index = self.index_on(src_logprobs.device).expand_as(src_logprobs)  # (B, V_src)
        group_max = src_logprobs.new_full((src_logprobs.shape[0], self.dst_vocab_size), float("-inf"))
        group_max = group_max.scatter_reduce(1, index, src_logprobs, reduce="amax")  # (B, V_dst)
        shift = torch.where(torch.isfinite(group_max), group_max, torch.zeros_like(group_max))  # (B, V_dst)
        shifted = torch.exp(src_logprobs - shift.gather(1, index))  # (B, V_src), each <= 1
        sums = torch.zeros_like(shift).index_add_(1, index[0], shifted)  # (B, V_dst)
        return torch.log(sums) + shift

    def _check_width(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            raise ValueError(f"Expected a (batch, vocab) tensor, got shape {tuple(x.shape)}; reshape to 2-D.")
        if x.shape[-1] < self.src_vocab_size:
            raise ValueError(
                f"Got {x.shape[-1]} source-vocabulary entries, the map expects {self.src_vocab_size}; "
                "build the map from the tokenizer of the model these scores come from."
            )
        return x[:, : self.src_vocab_size]  # drop a model's padded, tokenizer-less tail

    @classmethod
    def from_tokenizers(
        cls,
        src_tokenizer: Any,
        dst_tokenizer: Any,
        cache_dir: str | Path | None = None,
        use_cache: bool = True,
    ) -> PrefixMap:
        """Load the (src -> dst) prefix map from the disk cache, or build and cache it
        (arguments as :meth:`MinEDMap.from_tokenizers`)."""
        src, dst = tokenizer_surfaces(src_tokenizer), tokenizer_surfaces(dst_tokenizer)
        (dst_index, whole), key, seconds, hit = _cached_map(
            "prefix", PREFIX_VERSION, src, dst, ("dst_index", "whole"), _build_prefix_assignment,
            cache_dir, use_cache,
        )  # fmt: skip
        return cls(dst_index, whole, dst.vocab_size, key=key, from_cache=hit, build_seconds=seconds)


__all__ = [
    "SPECIAL_ROLES",
    "Convention",
    "MinEDMap",
    "PrefixMap",
    "TokenizerSurfaces",
    "default_cache_dir",
    "detect_convention",
    "map_logits_mined",
    "normalize_token",
    "token_bytes",
    "tokenizer_surfaces",
]
