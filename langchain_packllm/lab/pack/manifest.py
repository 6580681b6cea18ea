"""`PackManifest`: what a built expert pack holds, as a JSON file written last into the pack directory.

Paths are stored relative to the pack directory in ``manifest.json`` and made absolute when loaded,
so a cache directory can be moved or mounted elsewhere. The manifest also records every file of the pack
(size, sha256, modification time): :func:`check_files` finds a truncated, missing or rewritten file before
the pack is reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from langchain_packllm.lab.pack.corpora import read_jsonl

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


class PackCorruptError(RuntimeError):
    """A finished pack whose files do not match its manifest, or whose experts do not load; the message
    names the file and the command that rebuilds the pack."""


@dataclass
class ExpertInfo:
    """One expert model of the pack."""

    name: str  # the expert's name: its domain
    domain: str
    path: str  # directory for AutoModelForCausalLM / AutoTokenizer.from_pretrained
    architecture: str  # model class, e.g. "LlamaForCausalLM"
    model_type: str  # config.model_type, e.g. "llama"
    tokenizer_kind: str  # "bytelevel-bpe" | "metaspace-bpe" | "metaspace-unigram"
    vocab_size: int
    params: int
    context_length: int
    train_tokens: int
    train_steps: int
    train_seconds: float
    train_loss: float
    heldout_loss: float  # nats/token on its own domain's held-out documents
    heldout_ppl: float


@dataclass
class DomainInfo:
    """One domain's data: training text (for cBTM's tf-idf) and held-out documents (never trained on)."""

    name: str
    source: str  # "builtin" or the user's PATH_OR_GLOB
    description: str
    train_path: str  # JSONL, one {"text": ...} per line
    heldout_path: str
    n_train: int
    n_heldout: int
    n_sources: int
    train_chars: int


@dataclass
class PackManifest:
    """A built pack of domain experts.

    Example:
        >>> manifest = load_pack("tiny", "shared")  # doctest: +SKIP
        >>> model = AutoModelForCausalLM.from_pretrained(manifest.expert("pycode").path)  # doctest: +SKIP
        >>> docs = manifest.heldout_documents("pycode")  # doctest: +SKIP
    """

    size: str
    variant: str
    root: str  # the pack directory
    experts: list[ExpertInfo]
    domains: list[DomainInfo]
    tokenizer_path: str | None  # the shared tokenizer (variant "shared"), else None
    seed: int = 0
    build_config: dict = field(default_factory=dict)
    heldout_eval: dict = field(default_factory=dict)  # {"ppl"|"bpb"|"loss": {expert: {domain: value}}}
    build_seconds: float = 0.0
    created: str = ""
    files: dict = field(default_factory=dict)  # {path relative to root: {"size", "sha256", "mtime_ns"}}
    format_version: int = FORMAT_VERSION

    # --- access -------------------------------------------------------------------------------------

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.experts]

    @property
    def expert_paths(self) -> list[str]:
        return [e.path for e in self.experts]

    @property
    def domain_names(self) -> list[str]:
        return [d.name for d in self.domains]

    def expert(self, name: str) -> ExpertInfo:
        for e in self.experts:
            if e.name == name:
                return e
        raise KeyError(
            f"No expert {name!r} in the {self.size}-{self.variant} pack; it has {self.expert_names}."
        )

    def domain(self, name: str) -> DomainInfo:
        for d in self.domains:
            if d.name == name:
                return d
        raise KeyError(
            f"No domain {name!r} in the {self.size}-{self.variant} pack; it has {self.domain_names}."
        )

    def heldout_documents(self, domain: str) -> list[str]:
        """The held-out documents of ``domain`` (never seen by any expert or tokenizer)."""
        return read_jsonl(self.domain(domain).heldout_path)

    def train_documents(self, domain: str) -> list[str]:
        """The training documents of ``domain`` (e.g. for cBTM's tf-idf centroids)."""
        return read_jsonl(self.domain(domain).train_path)

    # --- JSON ---------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """JSON-ready dict with paths relative to ``root``."""
        root = Path(self.root)

        def rel(p: str | None) -> str | None:
            return None if p is None else os.path.relpath(p, root)

        d = asdict(self)
        d.pop("root")
        d["tokenizer_path"] = rel(self.tokenizer_path)
        for e in d["experts"]:
            e["path"] = rel(e["path"])
        for dom in d["domains"]:
            dom["train_path"], dom["heldout_path"] = rel(dom["train_path"]), rel(dom["heldout_path"])
        return d

    @classmethod
    def from_dict(cls, d: dict, root: str | Path) -> PackManifest:
        """Inverse of `to_dict`: relative paths are resolved against ``root``."""
        root = Path(root).resolve()

        def ab(p: str | None) -> str | None:
            return None if p is None else str(root / p)

        version = d.get("format_version", 0)
        if version != FORMAT_VERSION:
            raise ValueError(
                f"Pack manifest in {root} has format_version {version}, this code reads {FORMAT_VERSION}: "
                "rebuild it with `packllm pack build --force`."
            )
        experts = [ExpertInfo(**{**e, "path": ab(e["path"])}) for e in d["experts"]]
        domains = [
            DomainInfo(**{**x, "train_path": ab(x["train_path"]), "heldout_path": ab(x["heldout_path"])})
            for x in d["domains"]
        ]
        known = {f.name for f in fields(cls)} - {"root", "experts", "domains", "tokenizer_path"}
        rest = {k: v for k, v in d.items() if k in known}
        return cls(
            root=str(root),
            experts=experts,
            domains=domains,
            tokenizer_path=ab(d.get("tokenizer_path")),
            **rest,
        )

    def save(self) -> Path:
        """Write ``manifest.json`` into ``root`` atomically (temp file + rename)."""
        path = Path(self.root) / MANIFEST_NAME
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".manifest-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a pack is meant to be shared
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, root: str | Path) -> PackManifest:
        """Read ``root/manifest.json``."""
        path = Path(root) / MANIFEST_NAME
        return cls.from_dict(json.loads(path.read_text()), root)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def record_files(root: str | Path) -> dict:
    """Size, sha256 and modification time of every file under ``root`` but the manifest and dot files."""
    root = Path(root)
    files = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != MANIFEST_NAME and not any(part.startswith(".") for part in Path(rel).parts):
            st = p.stat()
            files[rel] = {"size": st.st_size, "sha256": _sha256(p), "mtime_ns": st.st_mtime_ns}
    return files


def check_files(manifest: PackManifest, full: bool = False) -> str | None:
    """None when every file the manifest records is there with its size (and its sha256, checked when its
    modification time changed, or always with ``full``), else what is wrong, naming the file. A manifest
    that records no files (written before they were recorded) passes."""
    root = Path(manifest.root)
    for rel, rec in manifest.files.items():
        path = root / rel
        try:
            st = path.stat()
        except OSError:
            return f"{path} is missing"
        if not path.is_file():
            return f"{path} is not a file"
        if st.st_size != rec.get("size"):
            return f"{path} has {st.st_size} bytes, the manifest records {rec.get('size')}"
        if (full or st.st_mtime_ns != rec.get("mtime_ns")) and _sha256(path) != rec.get("sha256"):
            return f"{path} does not match the sha256 in its manifest"
    return None
