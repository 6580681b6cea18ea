"""GGUF members: a ``.gguf`` file converted once into a safetensors folder, then loaded like any saved model.

``load_member("model.Q4_K_M.gguf")`` (hence ``PackLLM.from_model_ids([...])``) calls
:func:`convert_gguf`, which

1. checks the file itself, in well under a second: the GGUF magic, a metadata block that parses, tensor data
   that the file is long enough to hold (a truncated download fails here, naming the file);
2. hashes it (sha256; the digest is cached by (path, size, mtime), in memory and under
   ``$PACKLLM_HOME/models/digests.json``, so a second load does not hash the file again);
3. reuses ``$PACKLLM_HOME/models/<sha256>/`` when its manifest verifies, else converts: transformers' own
   GGUF loader (``from_pretrained(folder, gguf_file=...)``, never with remote code) dequantizes the weights
   to dense float32 tensors, and the model, its generation config and the tokenizer (chat template
   included) are saved with ``save_pretrained`` into a temporary folder beside the target, with a manifest
   (the source's sha256, each output file's size and sha256, the library versions), then moved into place
   with ``os.replace``. A folder that fails verification (a file missing, of the wrong size or, once its
   modification time changed, of the wrong sha256) is converted again, with a warning. When
   ``$PACKLLM_HOME/models`` cannot be written, the conversion goes to ``$PACKLLM_FALLBACK_HOME/models`` (else
   a temporary folder of the process), with one warning (:func:`langchain_packllm.paths.writable_root`).

End of generation: GGUF stores one ``eos_token_id``; llama.cpp also stops on the file's ``eot``/``eom`` ids
and on the usual end-of-turn control tokens (``<|im_end|>``, ``<|endoftext|>``, ``<end_of_turn>``, ...). The
converted generation config lists all of them, as the original checkpoints do (Qwen2.5 stops on
``<|im_end|>`` and ``<|endoftext|>``, Gemma 3 on ``<eos>`` and ``<end_of_turn>``).

Converting needs the ``gguf`` package (``pip install 'langchain-packllm[gguf]'``); loading a converted folder
does not.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import mmap
import os
import shutil
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from langchain_packllm.paths import fallback_home, packllm_home, writable_root

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when a change to the conversion below should invalidate converted folders
MANIFEST_NAME = "packllm-gguf.json"
MODELS_DIR = "models"
DIGESTS_NAME = "digests.json"
INSTALL_HINT = "pip install 'langchain-packllm[gguf]'  (or: pip install 'gguf>=0.10')"

# Token texts llama.cpp treats as end of generation when the vocabulary marks them as control tokens.
EOG_TOKEN_TEXTS = (
    "<|endoftext|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "<｜end▁of▁sentence｜>",
)
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


class GGUFError(ValueError):
    """A ``.gguf`` file that cannot become a member (unreadable, truncated, or of an unsupported kind)."""


class GGUFFormatError(GGUFError):
    """Not a GGUF file, or a truncated / corrupt one."""


class GGUFArchitectureError(GGUFError):
    """A valid GGUF file whose architecture transformers cannot read from GGUF."""

    def __init__(self, message: str, architecture: str) -> None:
        super().__init__(message)
        self.architecture = architecture


class GGUFMissingError(ImportError):
    """The ``gguf`` package, which transformers needs to read GGUF files, is not installed."""


def is_gguf_path(model_id: str | os.PathLike) -> bool:
    """Whether a member id names a GGUF file (by its suffix, as llama.cpp and the hub name them)."""
    return str(model_id).lower().endswith(".gguf")


# --------------------------------------------------------------------------------------------------------
# Reading the header (own parser: fast, and needs nothing but the standard library)
# --------------------------------------------------------------------------------------------------------

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass
class GGUFTensorInfo:
    name: str
    dims: tuple[int, ...]  # ggml order (fastest-moving first)
    ggml_type: int
    offset: int  # from the start of the data section


@dataclass
class GGUFHeader:
    """What :func:`read_gguf_header` found: metadata (scalars, and the arrays asked for), the tensor table."""

    path: str
    version: int
    metadata: dict[str, Any]
    tensors: list[GGUFTensorInfo]
    data_start: int
    file_size: int
    array_lengths: dict[str, int] = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "?"))


def read_gguf_header(path: str | os.PathLike, arrays: tuple[str, ...] = ()) -> GGUFHeader:
    """Parse a GGUF file's metadata and tensor table without reading tensor data.

    Arrays are skipped (only their length is kept) unless named in ``arrays``. Raises
    :class:`GGUFFormatError` for a file that is not GGUF or ends inside its header.
    """
    path = str(path)
    size = os.path.getsize(path)
    if size == 0:
        raise GGUFFormatError(_corrupt(path, "the file is empty"))
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as blob:
        if blob[:4] != b"GGUF":
            raise GGUFFormatError(
                f"{path} is not a GGUF file (it does not start with the GGUF magic bytes, but with "
                f"{bytes(blob[:4])!r}). Pass a .gguf model file, or a folder saved with save_pretrained."
            )
        try:
            return _parse(path, blob, size, set(arrays))
        except (struct.error, UnicodeDecodeError, IndexError, OverflowError, MemoryError) as err:
            raise GGUFFormatError(_corrupt(path, f"its header ends early or is garbled ({err})")) from err


def _parse(path: str, blob: mmap.mmap, size: int, wanted: set[str]) -> GGUFHeader:
    (version,) = struct.unpack_from("<I", blob, 4)
    order = "<"
    if version > 0xFFFF:  # a big-endian file
        order = ">"
        (version,) = struct.unpack_from(">I", blob, 4)
    if version not in (2, 3):
        raise GGUFFormatError(_corrupt(path, f"GGUF version {version} is not one this reader knows (2, 3)"))
    n_tensors, n_kv = struct.unpack_from(order + "QQ", blob, 8)
    if n_tensors > size or n_kv > size:
        raise GGUFFormatError(_corrupt(path, "its header counts are impossible"))
    pos = 24

    def string(p: int) -> tuple[str, int]:
        (n,) = struct.unpack_from(order + "Q", blob, p)
        p += 8
        if p + n > size:
            raise struct.error("string past the end of the file")
        return blob[p : p + n].decode("utf-8"), p + n

    def value(p: int, vtype: int, keep: bool) -> tuple[Any, int]:
        if vtype in _SCALARS:
            fmt = order + _SCALARS[vtype]
            return struct.unpack_from(fmt, blob, p)[0], p + struct.calcsize(fmt)
        if vtype == _STRING:
            return string(p)
        if vtype == _ARRAY:
            etype, count = struct.unpack_from(order + "IQ", blob, p)
            p += 12
            if etype in _SCALARS:
                width = struct.calcsize(_SCALARS[etype])
                if p + width * count > size:
                    raise struct.error("array past the end of the file")
                out = list(struct.unpack_from(f"{order}{count}{_SCALARS[etype]}", blob, p)) if keep else count
                return out, p + width * count
            items = []
            for _ in range(count):
                item, p = value(p, etype, keep)
                if keep:
                    items.append(item)
            return (items if keep else count), p
        raise GGUFFormatError(_corrupt(path, f"unknown metadata value type {vtype}"))

    metadata: dict[str, Any] = {}
    lengths: dict[str, int] = {}
    for _ in range(n_kv):
        key, pos = string(pos)
        (vtype,) = struct.unpack_from(order + "I", blob, pos)
        pos += 4
        keep = vtype != _ARRAY or key in wanted
        val, pos = value(pos, vtype, keep)
        if vtype == _ARRAY and not keep:
            lengths[key] = int(val)
        else:
            metadata[key] = val
            if vtype == _ARRAY:
                lengths[key] = len(val)
    tensors = []
    for _ in range(n_tensors):
        name, pos = string(pos)
        (n_dims,) = struct.unpack_from(order + "I", blob, pos)
        pos += 4
        if n_dims > 8:
            raise GGUFFormatError(_corrupt(path, f"tensor {name!r} claims {n_dims} dimensions"))
        dims = struct.unpack_from(f"{order}{n_dims}Q", blob, pos)
        pos += 8 * n_dims
        ggml_type, offset = struct.unpack_from(order + "IQ", blob, pos)
        pos += 12
        tensors.append(GGUFTensorInfo(name, tuple(dims), ggml_type, offset))
    alignment = int(metadata.get("general.alignment", 32)) or 32
    data_start = (pos + alignment - 1) // alignment * alignment
    return GGUFHeader(path, version, metadata, tensors, data_start, size, lengths)


def _corrupt(path: str, what: str) -> str:
    return (
        f"{path} is not a readable GGUF file: {what}. It is probably truncated (an interrupted download or "
        "copy) or corrupt: download it again, or reinstall the package that ships it."
    )


def check_gguf_file(path: str | os.PathLike, arrays: tuple[str, ...] = ()) -> GGUFHeader:
    """:func:`read_gguf_header`, then check that the file holds every tensor's data (not truncated)."""
    header = read_gguf_header(path, arrays)
    sizes = _quant_sizes()
    end = header.data_start
    for t in header.tensors:
        if t.ggml_type not in sizes:  # a type this gguf version does not know: transformers will say
            continue
        block, type_size = sizes[t.ggml_type]
        n = 1
        for d in t.dims:
            n *= d
        end = max(end, header.data_start + t.offset + n // block * type_size)
    if end > header.file_size:
        raise GGUFFormatError(
            _corrupt(
                str(path),
                f"its tensors need {end:,} bytes but the file has {header.file_size:,}",
            )
        )
    return header


def _quant_sizes() -> dict[int, tuple[int, int]]:
    gguf = require_gguf()
    return {int(k): (int(v[0]), int(v[1])) for k, v in gguf.GGML_QUANT_SIZES.items()}


def require_gguf(path: str | os.PathLike | None = None):
    """The ``gguf`` module, or a :class:`GGUFMissingError` saying how to install it."""
    try:
        import gguf
    except ImportError as err:
        what = f"Loading the GGUF member {path}" if path is not None else "Reading GGUF files"
        raise GGUFMissingError(
            f"{what} needs the 'gguf' package, which transformers uses to read GGUF files: {INSTALL_HINT}"
        ) from err
    return gguf


# --------------------------------------------------------------------------------------------------------
# The source's sha256, cached by (path, size, mtime)
# --------------------------------------------------------------------------------------------------------

_DIGESTS: dict[tuple[str, int, int], str] = {}
_DIGESTS_LOCK = threading.Lock()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """The sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def gguf_sha256(path: str | os.PathLike, home: str | os.PathLike | None = None) -> str:
    """The GGUF file's sha256, hashed once per (path, size, mtime): the digest is kept in memory and in
    ``$PACKLLM_HOME/models/digests.json``, so another process does not hash the file again either."""
    real = os.path.realpath(path)
    st = os.stat(real)
    stamp = (real, st.st_size, st.st_mtime_ns)
    with _DIGESTS_LOCK:
        if stamp in _DIGESTS:
            return _DIGESTS[stamp]
    store = packllm_home(home) / MODELS_DIR / DIGESTS_NAME
    known = _read_json(store) or {}
    entry = known.get(real)
    if (
        isinstance(entry, dict)
        and entry.get("size") == st.st_size
        and entry.get("mtime_ns") == st.st_mtime_ns
    ):
        digest = str(entry["sha256"])
    else:
        t0 = time.monotonic()
        digest = file_sha256(real)
        logger.info("sha256 of %s: %s (%.1fs)", real, digest, time.monotonic() - t0)
        known = _read_json(store) or {}
        known[real] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        with contextlib.suppress(OSError):  # a read-only home only costs a re-hash next time
            _write_json_atomic(store, known)
    with _DIGESTS_LOCK:
        _DIGESTS[stamp] = digest
    return digest


def _read_umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


_UMASK = _read_umask()  # read once, at import: os.umask has no getter that leaves it alone


def _share(path: Path, directory: bool = False) -> None:
    """Give a file made by mkstemp/mkdtemp (mode 0600/0700) the permissions of an ordinary one (umask)."""
    with contextlib.suppress(OSError):
        os.chmod(path, (0o777 if directory else 0o666) & ~_UMASK)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
        _share(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------------------------------
# Converted folders: where, and whether one is sound
# --------------------------------------------------------------------------------------------------------


def converted_dir(sha256: str, home: str | os.PathLike | None = None) -> Path:
    """Where the GGUF file of this sha256 is (or will be) converted: ``$PACKLLM_HOME/models/<sha256>``."""
    return packllm_home(home) / MODELS_DIR / _check_sha256(sha256)


def _check_sha256(digest: str) -> str:
    """``digest`` if it is a sha256 in hex (it names a folder), else ValueError."""
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"Bad sha256 {digest!r}: expected 64 lowercase hex digits.")
    return digest


def verify_converted(folder: str | os.PathLike, sha256: str | None = None, full: bool = False) -> str | None:
    """None when ``folder`` is a complete conversion (of the GGUF file with this ``sha256``), else the reason.

    Every output file must exist with its recorded size; its sha256 is checked again when its modification
    time differs from the recorded one (it was rewritten, or copied), or always with ``full=True``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return "not converted yet"
    manifest = _read_json(folder / MANIFEST_NAME)
    if not isinstance(manifest, dict):
        return f"no readable {MANIFEST_NAME} (an interrupted conversion?)"
    if manifest.get("format") != FORMAT_VERSION:
        return f"converted by format {manifest.get('format')}, this version writes {FORMAT_VERSION}"
    if sha256 is not None and manifest.get("source", {}).get("sha256") != sha256:
        return "its manifest names another source file"
    files = manifest.get("files")
    if not isinstance(files, dict) or "config.json" not in files:
        return "its manifest lists no model files"
    for name, rec in files.items():
        p = folder / name
        try:
            st = p.stat()
        except OSError:
            return f"{name} is missing"
        if st.st_size != rec.get("size"):
            return f"{name} has {st.st_size} bytes, the manifest says {rec.get('size')}"
        if full or st.st_mtime_ns != rec.get("mtime_ns"):
            if file_sha256(p) != rec.get("sha256"):
                return f"{name} does not match its sha256"
    return None


@dataclass(frozen=True)
class GGUFConversion:
    """A converted GGUF member: the folder to load, the source's sha256, and its manifest."""

    path: Path
    sha256: str
    source: str
    manifest: dict[str, Any]
    converted: bool  # True when this call converted it (False: reused)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        try:
            import fcntl
        except ImportError:  # not POSIX: no cross-process lock
            yield
            return
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def convert_gguf(
    path: str | os.PathLike,
    *,
    sha256: str | None = None,
    home: str | os.PathLike | None = None,
    force: bool = False,
    origin: str | None = None,
) -> GGUFConversion:
    """The converted folder of a GGUF file: reused when it verifies, converted (once) otherwise.

    ``sha256`` skips hashing when the caller already knows the file's digest (the lab's real pack checks it
    while assembling the file); ``origin`` is recorded in the manifest (where the file came from). Raises FileNotFoundError, :class:`GGUFFormatError`,
    :class:`GGUFArchitectureError` or :class:`GGUFMissingError`, each naming the file.
    """
    src = os.path.abspath(os.fspath(path))
    if not os.path.isfile(src):
        raise FileNotFoundError(f"GGUF file {src!r} does not exist.")
    digest = _check_sha256(sha256 or gguf_sha256(src, home))
    target = converted_dir(digest, home)
    fallback = fallback_home(create=False)
    if (
        not force
    ):  # a sound conversion is reused where it is, in the home or (if the home is read-only) the fallback
        for folder in (target, *([fallback / MODELS_DIR / digest] if fallback else [])):
            if verify_converted(folder, digest) is None:
                return GGUFConversion(folder, digest, src, _read_json(folder / MANIFEST_NAME), False)
    models = writable_root(MODELS_DIR, home)  # the home's, else the fallback (with one warning)
    target = models / digest
    with _locked(models / f".{digest}.lock"):
        reason = "conversion forced" if force else verify_converted(target, digest)
        if reason is None:  # another process converted it while we waited
            return GGUFConversion(target, digest, src, _read_json(target / MANIFEST_NAME), False)
        if target.exists():
            logger.warning(
                "Converted GGUF member %s is unusable (%s); converting %s again.", target, reason, src
            )
        for stale in models.glob(f".{digest}.tmp-*"):  # left by an interrupted conversion
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{digest}.tmp-", dir=models))
        try:
            _share(tmp, directory=True)
            manifest = _convert_into(src, tmp, digest)
            if origin:
                manifest["source"]["origin"] = origin
            _write_json_atomic(tmp / MANIFEST_NAME, manifest)
            if target.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{digest}.tmp-old-", dir=models))
                os.replace(target, old / "x")
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return GGUFConversion(target, digest, src, manifest, True)


def _convert_into(src: str, out: Path, digest: str) -> dict[str, Any]:
    """Convert the GGUF file ``src`` into the empty folder ``out``; return the manifest to record."""
    gguf = require_gguf(src)
    header = check_gguf_file(src, arrays=("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"))
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.monotonic()
    logger.info("Converting GGUF member %s (%s) into %s", src, header.architecture, out.parent / digest)
    # transformers reads tokenizer_config.json etc. from the GGUF's folder when there are some: load from a
    # folder that holds nothing but (a link to) the file.
    with tempfile.TemporaryDirectory(prefix=".stage-", dir=out) as stage:
        name = "model.gguf"
        try:
            os.symlink(src, os.path.join(stage, name))
        except OSError:  # no symlinks here: read it where it is
            stage, name = os.path.split(src)
        try:
            model = AutoModelForCausalLM.from_pretrained(stage, gguf_file=name, trust_remote_code=False)
            tokenizer = AutoTokenizer.from_pretrained(stage, gguf_file=name, trust_remote_code=False)
        except ImportError as err:
            if "gguf" in str(err).lower():
                raise GGUFMissingError(
                    f"Loading the GGUF member {src} needs the 'gguf' package: {INSTALL_HINT}"
                ) from err
            raise
        except (ValueError, KeyError, NotImplementedError) as err:
            text = str(err)
            if "not supported" in text and ("architecture" in text.lower() or header.architecture in text):
                raise GGUFArchitectureError(
                    f"{src} is a GGUF model of architecture {header.architecture!r}, which transformers "
                    f"{transformers.__version__} cannot read from GGUF ({text}). Use the model's original "
                    "checkpoint (a hub id, or a folder saved with save_pretrained), or a transformers version "
                    "that reads this architecture from GGUF.",
                    header.architecture,
                ) from err
            raise GGUFError(
                f"transformers {transformers.__version__} could not load the GGUF file {src} "
                f"({type(err).__name__}: {text}). If the file is truncated or corrupt, download it again or "
                "reinstall the package that ships it."
            ) from err
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the weights are dense now; save_pretrained refuses a GGUF-tagged model
        quantizer.remove_quantization_config(model)
    top = max(tokenizer.get_vocab().values(), default=-1)
    width = model.get_output_embeddings().weight.shape[0]
    if top >= width:
        logger.warning(
            "%s: transformers' GGUF tokenizer has token id %d but the model only %d logits (it adds tokens the "
            "file lacks, e.g. GPT-2's <|endoftext|>); the member will not load until they match.",
            src,
            top,
            width,
        )
    eos = end_of_generation_ids(header, model.generation_config)
    if eos:
        model.generation_config.eos_token_id = eos[0] if len(eos) == 1 else eos
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    files = {}
    for p in sorted(out.rglob("*")):
        if p.is_file():
            _share(p)
            st = p.stat()
            rel = p.relative_to(out).as_posix()
            files[rel] = {"size": st.st_size, "sha256": file_sha256(p), "mtime_ns": st.st_mtime_ns}
    seconds = time.monotonic() - t0
    logger.info("Converted %s in %.1fs", src, seconds)
    import torch

    return {
        "format": FORMAT_VERSION,
        "source": {
            "file": os.path.basename(src),
            "path": src,
            "sha256": digest,
            "size": os.path.getsize(src),
        },
        "architecture": header.architecture,
        "model_name": header.metadata.get("general.name"),
        "model_class": type(model).__name__,
        "file_type": header.metadata.get("general.file_type"),
        "dtype": str(model.dtype).replace("torch.", ""),
        "eos_token_ids": eos,
        "files": files,
        "versions": {
            "transformers": transformers.__version__,
            "gguf": getattr(gguf, "__version__", None) or _dist_version("gguf"),
            "torch": torch.__version__,
        },
        "converted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 1),
    }


def _dist_version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def end_of_generation_ids(header: GGUFHeader, generation_config: Any = None) -> list[int]:
    """The ids a GGUF model stops on, as llama.cpp reads them: the file's eos / eot / eom ids, and the usual
    end-of-turn texts (:data:`EOG_TOKEN_TEXTS`) where the vocabulary marks them as control tokens."""
    ids: list[int] = []

    def add(i: Any) -> None:
        if isinstance(i, int) and i >= 0 and i not in ids:
            ids.append(i)

    existing = getattr(generation_config, "eos_token_id", None)
    for i in existing if isinstance(existing, (list, tuple)) else [existing]:
        add(i)
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        add(header.metadata.get(key))
    tokens = header.metadata.get("tokenizer.ggml.tokens")
    types = header.metadata.get("tokenizer.ggml.token_type")
    if isinstance(tokens, list) and isinstance(types, list) and len(tokens) == len(types):
        index = {t: i for i, t in enumerate(tokens) if t in EOG_TOKEN_TEXTS}
        for text in EOG_TOKEN_TEXTS:
            i = index.get(text)
            if i is not None and types[i] in (_CONTROL, _USER_DEFINED):
                add(i)
    return ids
