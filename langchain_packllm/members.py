"""Members of a pack: a causal LM, its tokenizer, a name, and where it runs.

Loading goes through ``AutoModelForCausalLM`` / ``AutoTokenizer`` from a hub id, a local path, or a ``.gguf``
file (converted once to safetensors under ``$PACKLLM_HOME/models``, see :mod:`langchain_packllm.gguf`), never
with remote code unless the caller passes ``trust_remote_code=True``. Loaded members are remembered per
process, keyed by (id, dtype, device, kwargs), a GGUF file's id being its sha256, so building several
LangChain objects over the same models (for instance through ``configurable_fields``) loads nothing twice
while one of them is alive. The cache holds its models by weak reference: once no pack (no ``Member``)
uses a model any more it is freed, and the next ``load_member`` reads it from disk again.
:func:`clear_member_cache` forgets every entry at once.

A bare name that is not on disk (``"gpt2"``, ``"org/name"``) is a hub id. When the hub cannot be reached
(``HF_HUB_OFFLINE`` is set, or a connection to the endpoint fails within :data:`HUB_PROBE_SECONDS`), it is
looked up in the local Hugging Face cache only, and a miss fails at once saying so, instead of waiting for
the hub's retries.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import socket
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from langchain_packllm.gguf import convert_gguf, gguf_sha256, is_gguf_path

logger = logging.getLogger(__name__)

# key -> (weak reference to the model, tokenizer, extra): an entry lives exactly as long as its model
_CACHE: dict[str, tuple[weakref.ref, PreTrainedTokenizerBase, dict[str, Any]]] = {}
_CACHE_LOCK = threading.RLock()
HUB_PROBE_SECONDS = 3.0  # how long a connection to the hub may take before it counts as unreachable
_HUB_PROBES: dict[tuple[str, int], tuple[float, str | None]] = {}  # (host, port) -> (when, why unreachable)
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)


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
        entry = _CACHE.get(key)
        cached = entry[0]() if entry is not None else None
        if cached is not None:
            return Member(name or default_name, cached, entry[1], dict(entry[2]))
        model_kwargs.setdefault("trust_remote_code", False)
        tokenizer_kwargs.setdefault("trust_remote_code", False)
        if dtype is not None:
            model_kwargs.setdefault("dtype", dtype)
        source = model_id
        if gguf_file:
            conversion = convert_gguf(model_id, sha256=extra["sha256"])
            source = str(conversion.path)
            extra["converted"] = source
        local = gguf_file or _looks_local(model_id)
        if local:
            _check_model_dir(model_id, source)
        offline = None if local else hub_unreachable()
        if offline is not None:  # the local Hugging Face cache only: no retries against an unreachable hub
            model_kwargs.setdefault("local_files_only", True)
            tokenizer_kwargs.setdefault("local_files_only", True)
        try:
            tokenizer = _load_tokenizer(model_id, source, local, tokenizer_kwargs)
            model = AutoModelForCausalLM.from_pretrained(source, **model_kwargs)
        except OSError as err:
            if offline is not None:
                raise OSError(
                    f"Could not load member {model_id!r}: it is not a local path, it is not in the local "
                    f"Hugging Face cache, and the model hub is unreachable ({offline}). Pass a local folder "
                    "saved with save_pretrained or a .gguf file instead (e.g. from_model_ids(['./my-model']) "
                    f"or ['./model.Q4_K_M.gguf']), or fetch it first where the hub is reachable "
                    f"(`huggingface-cli download {model_id}`)."
                ) from err
            raise OSError(
                f"Could not load member {model_id!r}: {err}. Check the path or hub id, and the network "
                "if it is a hub id."
            ) from err
        if target is not None:
            model = model.to(target)
        model.eval()
        _remember(key, model, tokenizer, extra)
        logger.info("Loaded member %s on %s", model_id, model.get_input_embeddings().weight.device)
        return Member(name or default_name, model, tokenizer, dict(extra))


def _remember(key: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, extra: dict) -> None:
    """Cache ``model`` under ``key`` for as long as something else holds it (call with the lock held)."""
    ref = weakref.ref(model)
    _CACHE[key] = (ref, tokenizer, dict(extra))
    weakref.finalize(model, _forget, key, ref)


def _forget(key: str, ref: weakref.ref) -> None:
    with _CACHE_LOCK:
        entry = _CACHE.get(key)
        if entry is not None and entry[0] is ref:  # not a newer load of the same key
            del _CACHE[key]


def _looks_local(model_id: str) -> bool:
    """A path rather than a hub id: it exists, or it is written as a path (absolute, ``./``, ``~``, or more
    than the one ``/`` of ``org/name``)."""
    return (
        os.path.exists(model_id)
        or os.path.isabs(model_id)
        or model_id.startswith((".", "~"))
        or model_id.count("/") > 1
        or (os.sep != "/" and os.sep in model_id)
    )


def _check_model_dir(model_id: str, folder: str) -> None:
    """A clear error for a local member that is not a model folder (missing, a file, or no config.json)."""
    fix = "pass a folder saved with save_pretrained (config.json, the weights, the tokenizer files) or a .gguf file"
    if not os.path.isdir(folder):
        what = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise FileNotFoundError(f"Model path {model_id!r} {what}; {fix}, or a hub id such as 'gpt2'.")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(
            f"Model path {model_id!r} is not a model folder: it has no config.json; {fix}."
        )


def _load_tokenizer(model_id: str, source: str, local: bool, kwargs: dict) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained(source)``; a local folder without tokenizer files is a clear error
    (transformers would suggest installing sentencepiece, which is not the cause)."""
    try:
        return _as_saved(source, AutoTokenizer.from_pretrained(source, **kwargs))
    except ValueError as err:
        if local and not any(os.path.isfile(os.path.join(source, f)) for f in _TOKENIZER_FILES):
            raise FileNotFoundError(
                f"Model path {model_id!r} has no tokenizer files (none of {', '.join(_TOKENIZER_FILES)}): "
                "save the tokenizer beside the model (tokenizer.save_pretrained(folder)), or pass a .gguf "
                "file."
            ) from err
        raise


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached now, or None when it can (or when it cannot be told).

    ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set counts as unreachable; otherwise one TCP connection
    to the endpoint (``HF_ENDPOINT``, or the HTTPS proxy when one is set) must open within
    :data:`HUB_PROBE_SECONDS`. The answer is remembered for a minute.
    """
    from urllib.parse import urlsplit

    try:
        from huggingface_hub import constants

        offline, endpoint = bool(constants.HF_HUB_OFFLINE), constants.ENDPOINT
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        offline, endpoint = False, "https://huggingface.co"
    if offline or _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        return "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT") or endpoint
    proxies = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
    proxy = next((os.environ[v] for v in proxies if os.environ.get(v)), None)
    url = urlsplit(proxy if proxy and "://" in proxy else (f"http://{proxy}" if proxy else endpoint))
    if not url.hostname:
        return None
    where = (url.hostname, url.port or (443 if url.scheme == "https" else 80))
    now = time.monotonic()
    with _CACHE_LOCK:
        seen = _HUB_PROBES.get(where)
    if seen is not None and now - seen[0] < 60:
        return seen[1]
    result: list[str | None] = []

    def probe() -> None:  # in a thread: name resolution has no timeout of its own
        try:
            socket.create_connection(where, timeout=HUB_PROBE_SECONDS).close()
            result.append(None)
        except OSError as err:
            result.append(f"cannot connect to {where[0]}:{where[1]}: {err}")

    thread = threading.Thread(target=probe, daemon=True, name="packllm-hub-probe")
    thread.start()
    thread.join(HUB_PROBE_SECONDS + 1)
    why = result[0] if result else f"no connection to {where[0]}:{where[1]} within {HUB_PROBE_SECONDS:g} s"
    with _CACHE_LOCK:
        _HUB_PROBES[where] = (now, why)
    return why


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


def clear_member_cache() -> None:
    """Forget every loaded member: the next :func:`load_member` reads it from disk again.

    Not needed to free memory (the cache holds models by weak reference: a model no pack uses any more is
    freed by itself); a model a pack still uses stays in memory until that pack is gone.
    """
    with _CACHE_LOCK:
        _CACHE.clear()


clear_cache = clear_member_cache  # the former name


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


def new_cache(model: Any) -> Any:
    """A fresh KV cache for one call of a member's ``model``: a ``DynamicCache``, or what the model's own
    ``new_cache()`` makes (a member in a Ray actor: a driver-side stand-in whose ``get_seq_length`` and
    ``crop`` act on the actor's cache, ``ray_backend.RemoteCache``)."""
    factory = getattr(model, "new_cache", None)
    return factory() if callable(factory) else DynamicCache(config=model.config)
