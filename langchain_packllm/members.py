"""Members of a pack: a causal LM, its tokenizer, a name, and where it runs.

Loading goes through ``AutoModelForCausalLM`` / ``AutoTokenizer`` from a hub id, a local path, or a ``.gguf``
file (converted once to safetensors under ``$PACKLLM_HOME/models``, see :mod:`langchain_packllm.gguf`), never
with remote code unless the caller passes ``trust_remote_code=True``. Loaded members are kept in a
process-level cache keyed by (id, dtype, device, kwargs), a GGUF file's id being its sha256, so building
several LangChain objects over the same models (for instance through ``configurable_fields``) loads nothing
twice.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from langchain_packllm.gguf import convert_gguf, gguf_sha256, is_gguf_path

logger = logging.getLogger(__name__)

_CACHE: dict[str, Member] = {}
_CACHE_LOCK = threading.Lock()


@dataclass
class Member:
    """One model of the pack. ``name`` is what reports call it (the model id or path by default; a GGUF
    file's stem). ``extra`` says where a GGUF member came from (``gguf``, ``sha256``, ``converted``)."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def vocab_size(self) -> int:
        """Width of the model's output layer (may exceed ``len(tokenizer)`` because of padding)."""
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def max_length(self) -> int | None:
        """The longest sequence the model accepts, from its config, or None when unbounded/unknown."""
        cfg = self.model.config
        for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(cfg, attr, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    @property
    def eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (
            self.tokenizer.eos_token_id,
            getattr(self.model.generation_config, "eos_token_id", None),
        ):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, (list, tuple)):
                ids.update(int(i) for i in source)
        return ids


def _resolve_dtype(torch_dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    if torch_dtype is None or isinstance(torch_dtype, torch.dtype) or torch_dtype == "auto":
        return torch_dtype
    value = getattr(torch, str(torch_dtype).replace("torch.", ""), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"Unknown torch_dtype {torch_dtype!r}; use e.g. 'float32', 'bfloat16' or 'auto'.")
    return value


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def load_member(
    model_id: str | os.PathLike[str],
    *,
    name: str | None = None,
    device: str | torch.device | None = None,
    torch_dtype: str | torch.dtype | None = None,
    model_kwargs: dict[str, Any] | None = None,
    tokenizer_kwargs: dict[str, Any] | None = None,
) -> Member:
    """Load (or fetch from the process cache) one member from a hub id, a local directory or a ``.gguf`` file.

    A ``.gguf`` file is converted once into ``$PACKLLM_HOME/models/<sha256>`` (needs the ``gguf`` package)
    and loaded from there; its default name is the file's stem. ``device`` is a torch device string; pass ``model_kwargs={"device_map": "auto"}`` to let accelerate
    spread a large model over several devices instead. ``trust_remote_code`` stays False unless it is in
    ``model_kwargs`` / ``tokenizer_kwargs``.
    """
    model_kwargs = dict(model_kwargs or {})
    tokenizer_kwargs = dict(tokenizer_kwargs or {})
    dtype = _resolve_dtype(torch_dtype)
    uses_device_map = "device_map" in model_kwargs
    target = None if uses_device_map else torch.device(device or default_device())
    model_id = os.fspath(model_id)
    default_name, cache_id, extra = model_id, model_id, {}
    gguf_file = is_gguf_path(model_id)
    if gguf_file:
        if not os.path.isfile(model_id):
            raise FileNotFoundError(f"GGUF file {model_id!r} does not exist.")
        digest = gguf_sha256(model_id)
        default_name, cache_id = Path(model_id).stem, f"gguf:{digest}"
        extra = {"gguf": os.path.abspath(model_id), "sha256": digest}
    key = json.dumps(
        [cache_id, str(dtype), str(target), model_kwargs, tokenizer_kwargs], sort_keys=True, default=str
    )
    with _CACHE_LOCK:
        cached = _CACHE.get(key)
        if cached is not None:
            return Member(name or default_name, cached.model, cached.tokenizer, dict(cached.extra))
        model_kwargs.setdefault("trust_remote_code", False)
        tokenizer_kwargs.setdefault("trust_remote_code", False)
        if dtype is not None:
            model_kwargs.setdefault("dtype", dtype)
        source = model_id
        if gguf_file:
            conversion = convert_gguf(model_id, sha256=extra["sha256"])
            source = str(conversion.path)
            extra["converted"] = source
        looks_local = os.path.sep in model_id or model_id.startswith(".") or os.path.exists(model_id)
        if looks_local and not os.path.isdir(source):
            raise FileNotFoundError(
                f"Model path {model_id!r} does not exist; pass a directory saved with save_pretrained, "
                "a .gguf file, or a hub id such as 'gpt2'."
            )
        try:
            tokenizer = _as_saved(source, AutoTokenizer.from_pretrained(source, **tokenizer_kwargs))
            model = AutoModelForCausalLM.from_pretrained(source, **model_kwargs)
        except OSError as err:
            raise OSError(
                f"Could not load member {model_id!r}: {err}. Check the path or hub id, and the network "
                "if it is a hub id."
            ) from err
        if target is not None:
            model = model.to(target)
        model.eval()
        member = Member(default_name, model, tokenizer, extra)
        _CACHE[key] = member
        logger.info("Loaded member %s on %s", model_id, member.device)
        return Member(name or default_name, model, tokenizer, dict(extra))


_PROBE = "Tokenize this:  two spaces,\ttab\nnew line, café 東京 12345 def f(x): return x**2"


def _as_saved(path: str, tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The tokenizer exactly as its ``tokenizer.json`` defines it.

    For some model types (e.g. ``qwen2``) ``AutoTokenizer`` swaps in the architecture's own tokenizer class,
    which rebuilds the pre-tokenizer: a custom tokenizer saved beside such a model would then encode text
    differently from how the model was trained. When a local directory's ``tokenizer.json`` encodes a probe
    text differently from what ``AutoTokenizer`` returned, the file wins (with a warning).
    """
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file) or not getattr(tokenizer, "is_fast", False):
        return tokenizer
    saved = PreTrainedTokenizerFast(
        tokenizer_file=file,
        model_max_length=tokenizer.model_max_length,
        **{k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)},
    )
    if saved(_PROBE)["input_ids"] == tokenizer(_PROBE)["input_ids"]:
        return tokenizer
    logger.warning(
        "AutoTokenizer loaded %s as %s, which encodes text differently from its tokenizer.json; using "
        "the tokenizer.json as saved.",
        path,
        type(tokenizer).__name__,
    )
    return saved


def clear_cache() -> None:
    """Forget every loaded member (frees them once nothing else holds a reference)."""
    with _CACHE_LOCK:
        _CACHE.clear()


@functools.cache
def _cache_argument(forward_type: type) -> str:
    """The name a model class's ``forward`` takes its KV cache under: ``cache`` from the transformers
    releases that renamed it (``past_key_values`` then warns, and goes in 5.40), else ``past_key_values``."""
    try:
        params = inspect.signature(forward_type.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(module: Any, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` for ``module(...)``: the KV cache under the argument name the installed
    transformers expects (see :func:`_cache_argument`)."""
    return {_cache_argument(type(module)): cache}
