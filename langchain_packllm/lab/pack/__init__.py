"""Expert pack builder: small domain-expert causal LMs trained locally on real text.

The pack is the project's test bed (the paper's cBTM setting in miniature): one expert per domain,
saved so that ``AutoModelForCausalLM.from_pretrained(path)`` loads it, with held-out documents that
no expert or tokenizer has seen.

Example:
    >>> from langchain_packllm.lab.pack import build_pack
    >>> manifest = build_pack("tiny", domains=["pycode"], corpora={"notes": "notes/*.txt"})  # doctest: +SKIP
    >>> [e.name for e in manifest.experts]  # doctest: +SKIP
    ['pycode', 'notes']
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
from langchain_packllm.lab.pack.manifest import DomainInfo, ExpertInfo, PackManifest

__all__ = [
    "BUILTIN_DOMAINS",
    "DEFAULT_DOMAINS",
    "PRESETS",
    "CorpusUnavailableError",
    "DomainInfo",
    "ExpertInfo",
    "PackManifest",
    "build_pack",
    "default_pack_dir",
    "load_pack",
    "packllm_home",
    "summary_table",
    "verify_pack",
]
