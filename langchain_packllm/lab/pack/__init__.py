"""Expert pack builder: small domain-expert causal LMs trained locally on real text.

The pack is the project's test bed (the paper's cBTM setting in miniature): one expert per domain,
saved so that ``AutoModelForCausalLM.from_pretrained(path)`` loads it, with held-out documents that
no expert or tokenizer has seen.

Example:
    >>> from langchain_packllm.lab.pack import build_pack
    >>> manifest = build_pack("tiny", domains=["pycode"], corpora={"notes": "notes/*.txt"})  # doctest: +SKIP
    >>> [e.name for e in manifest.experts]  # doctest: +SKIP
    ['pycode', 'notes']

The real pack (:mod:`~langchain_packllm.lab.pack.real`): three pretrained GGUF models from PyPI packages,
converted once; ``PackLLM.from_model_ids(real_pack_paths(), names=REAL_NAMES)`` or ``load_real_pack()``.
"""

from langchain_packllm.lab.pack.builder import (
    PRESETS,
    build_pack,
    default_pack_dir,
    load_pack,
    packllm_home,
    summary_table,
    verify_pack,
)
from langchain_packllm.lab.pack.corpora import BUILTIN_DOMAINS, DEFAULT_DOMAINS, CorpusUnavailableError
from langchain_packllm.lab.pack.manifest import DomainInfo, ExpertInfo, PackCorruptError, PackManifest
from langchain_packllm.lab.pack.real import REAL_NAMES, build_real_pack, load_real_pack, real_pack_paths

__all__ = [
    "BUILTIN_DOMAINS",
    "DEFAULT_DOMAINS",
    "PRESETS",
    "CorpusUnavailableError",
    "DomainInfo",
    "ExpertInfo",
    "PackCorruptError",
    "PackManifest",
    "REAL_NAMES",
    "build_pack",
    "build_real_pack",
    "default_pack_dir",
    "load_pack",
    "load_real_pack",
    "packllm_home",
    "real_pack_paths",
    "summary_table",
    "verify_pack",
]
