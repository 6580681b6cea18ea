"""Where the package keeps what it builds or converts: one root shared by the runtime and the lab.

Layout under the root (``packllm_home()``)::

    alignment/   # MinED / byte alignment maps between tokenizers
    models/      # GGUF members converted to safetensors, one folder per source sha256
    packs/       # the lab's domain-expert packs
    downloads/   # wheels fetched for the lab's real pack

When the root cannot be written (a read-only home, a full disk), each cache warns once and carries on:
alignment maps stay in memory, GGUF conversions and packs go to ``$PACKLLM_FALLBACK_HOME`` when set, else
to a temporary folder of the process (removed at exit). See :func:`writable_root`.
"""

from __future__ import annotations

import atexit
import errno
import logging
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

logger = logging.getLogger(__name__)


def packllm_home(cache_dir: str | os.PathLike | None = None) -> Path:
    """Root of the package's cache: ``cache_dir``, else ``$PACKLLM_HOME``, else
    ``$XDG_CACHE_HOME/packllm``, else ``~/.cache/packllm``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("PACKLLM_HOME"):
        return Path(os.environ["PACKLLM_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg).expanduser() / "packllm"


# --------------------------------------------------------------------------------------------------------
# When the root cannot be written: one warning, then a fallback folder (or memory)
# --------------------------------------------------------------------------------------------------------

FALLBACK_ENV = "PACKLLM_FALLBACK_HOME"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_WARNED: set[str] = set()
_LOCK = threading.Lock()
_TEMP_HOME: list[Path] = []  # this process's folder under the system temp dir, made on first need


def warn_once(key: str, message: str, *args: object) -> None:
    """Log ``message % args`` as a warning the first time ``key`` is seen in this process."""
    with _LOCK:
        if key in _WARNED:
            return
        _WARNED.add(key)
    logger.warning(message, *args)


def writable_error(folder: str | os.PathLike) -> OSError | None:
    """None when files can be created in ``folder`` (made if missing), else why not."""
    folder = Path(folder)
    try:
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(folder))
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".packllm-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        return err
    return None


def fallback_home(create: bool = True) -> Path | None:
    """Where the package writes when its root cannot be written: ``$PACKLLM_FALLBACK_HOME`` when set, else a
    folder of this process under the system temporary directory (removed at exit; None if ``create`` is
    False and there is none yet)."""
    if os.environ.get(FALLBACK_ENV):
        return Path(os.environ[FALLBACK_ENV]).expanduser()
    with _LOCK:
        if not _TEMP_HOME and create:
            folder = Path(tempfile.mkdtemp(prefix="packllm-"))
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
            _TEMP_HOME.append(folder)
        return _TEMP_HOME[0] if _TEMP_HOME else None


def writable_root(kind: str, home: str | os.PathLike | None = None) -> Path:
    """``packllm_home(home) / kind`` when it can be written, else the fallback's ``kind`` folder (with one
    warning per process naming the folder, the error and the fix). Raises OSError naming both folders when
    neither can be written."""
    primary = packllm_home(home) / kind
    err = writable_error(primary)
    if err is None:
        return primary
    fallback = fallback_home()
    assert fallback is not None
    second = writable_error(fallback / kind)
    if second is not None:
        raise OSError(
            err.errno,
            f"Cannot write the package's cache: {primary} ({err.strerror or err}) nor the fallback "
            f"{fallback / kind} ({second.strerror or second}). Point ${FALLBACK_ENV} (or $PACKLLM_HOME) at a "
            "writable folder.",
        )
    warn_once(
        f"unwritable:{primary}",
        "Cannot write %s (%s); writing %s under %s instead%s. Set $PACKLLM_HOME (or $%s) to a writable "
        "folder to keep it.",
        primary,
        err.strerror or err,
        kind,
        fallback,
        "" if os.environ.get(FALLBACK_ENV) else " (a temporary folder, removed at exit)",
        FALLBACK_ENV,
    )
    return fallback / kind


def check_name(name: str, what: str = "name") -> str:
    """``name`` when it is safe as one path component (letters, digits, ``_``, ``-``, ``.``; not starting
    with ``.`` or ``-``), else ValueError saying what was wrong."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"Bad {what} {name!r}: use letters, digits, '_', '-' or '.', starting with a letter or a digit "
            "(it names a folder, so no '/', '\\' or '..')."
        )
    return name


def inside(root: str | os.PathLike, *parts: str) -> Path:
    """``root / parts...``, refused (ValueError) when it would resolve outside ``root``."""
    base = Path(root).resolve()
    path = Path(root).joinpath(*parts)
    if not path.resolve().is_relative_to(base):
        raise ValueError(f"Refusing to write {path}: it is outside {root}.")
    return path
