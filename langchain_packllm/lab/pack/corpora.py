"""Real-text domains for the expert pack, and their deterministic train / held-out split.

Built-in domains (Debian packages in brackets; ``pycode`` is always present):

- ``foldoc``:   the Free On-line Dictionary of Computing, one document per entry [dict-foldoc]
- ``manpages``: Linux man pages (sections 2-7) rendered to plain text [manpages, manpages-dev]
- ``pydocs``:   the Python documentation's reStructuredText sources [python3-doc]
- ``pycode``:   the Python standard library's own ``.py`` files [none]
- ``fortunes``: fortune cookies, one document per cookie [fortunes]

User corpora are given as ``NAME=PATH_OR_GLOB`` (a text file, a directory, or a glob): one document
per file, and files larger than ``BIG_FILE_CHARS`` are split on blank lines.

The split (`split_corpus`) works on *source* documents (an entry, a page, a file): sources are
deduplicated, shuffled with a fixed seed, and the first ``n_heldout`` long enough ones are held out.
Only then are documents chunked to a bounded length, so no part of a held-out source is ever in
the training text (nor in the tokenizer's).

Example:
    >>> docs = load_domain("pycode", max_sources=20)
    >>> split = split_corpus("pycode", docs, n_heldout=4)
    >>> set(split.train).isdisjoint(split.heldout)
    True
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sysconfig
import textwrap
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

BIG_FILE_CHARS = 20_000  # user-corpus files above this are split on blank lines
MIN_DOC_CHARS = 32  # shorter sources are dropped as noise


class CorpusUnavailableError(RuntimeError):
    """A built-in domain's data is not installed on this machine."""

    def __init__(self, domain: str, apt_packages: Sequence[str], detail: str = ""):
        self.domain = domain
        self.apt_packages = tuple(apt_packages)
        self.install_command = "apt-get install -y " + " ".join(apt_packages)
        msg = f"The {domain!r} corpus is not installed{': ' + detail if detail else ''}. "
        msg += (
            f"Install it with `sudo {self.install_command}`, or pass install=True (CLI: --install) when "
            "running as root, or leave the domain out (domains=[...], CLI: --domains)."
        )
        super().__init__(msg)


# ----------------------------------------------------------------------------------------------------
# Built-in domains


@dataclass(frozen=True)
class Domain:
    """A built-in text domain: how to find its sources and turn them into documents."""

    name: str
    description: str
    apt_packages: tuple[str, ...]
    load: Callable[[int | None, int], list[str]]  # (max_sources, seed) -> documents


def _shuffled(items: Sequence, seed: int, name: str) -> list:
    """A copy of ``items`` shuffled by a seed that also depends on the domain name (stable across runs)."""
    out = list(items)
    random.Random(seed * 1_000_003 + zlib.crc32(name.encode())).shuffle(out)
    return out


def _take(items: Sequence, max_sources: int | None, seed: int, name: str) -> list:
    items = _shuffled(sorted(items), seed, name)
    return items if max_sources is None else items[:max_sources]


# --- foldoc -------------------------------------------------------------------------------------------

FOLDOC_DICT = Path("/usr/share/dictd/foldoc.dict.dz")
_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _dictd_number(s: str) -> int:
    """Decode a dictd index number (base64 digits, most significant first)."""
    n = 0
    for c in s:
        n = n * 64 + _B64[c]
    return n


def load_foldoc(max_sources: int | None = None, seed: int = 0) -> list[str]:
    """FOLDOC entries: ``headword`` line, blank line, definition (dedented)."""
    index = FOLDOC_DICT.with_suffix("").with_suffix(".index")
    if not FOLDOC_DICT.exists() or not index.exists():
        raise CorpusUnavailableError("foldoc", ("dict-foldoc",), f"{FOLDOC_DICT} not found")
    data = gzip.decompress(FOLDOC_DICT.read_bytes())  # dictzip is gzip-compatible
    spans = set()
    for line in index.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and not parts[0].startswith("00"):  # 00-database-* are metadata entries
            spans.add((_dictd_number(parts[1]), _dictd_number(parts[2])))
    docs = []
    for off, length in _take(spans, max_sources, seed, "foldoc"):
        entry = data[off : off + length].decode("utf-8", errors="replace").strip("\n")
        head, _, body = entry.partition("\n\n")
        headword = head.replace("\n", " ").split("%%%")[0].strip()  # alternates are joined by %%%
        body = textwrap.dedent(body).strip()
        if headword and body:
            docs.append(f"{headword}\n\n{body}\n")
    return docs


# --- manpages -----------------------------------------------------------------------------------------

MANPAGE_PACKAGES = ("manpages", "manpages-dev")
_OVERSTRIKE = re.compile(r".\x08")  # bold 'X\bX' and underline '_\bX', as `col -b` removes them
_ROFF_ESCAPE = re.compile(r"\\f[BIRP]|\\f\(..|\\\(..|\\[&|^%]|\\s[-+]?\d")


def _manpage_files() -> list[Path]:
    files: list[Path] = []
    if shutil.which("dpkg-query"):
        for pkg in MANPAGE_PACKAGES:
            proc = subprocess.run(["dpkg-query", "-L", pkg], capture_output=True, text=True)
            if proc.returncode != 0:
                raise CorpusUnavailableError("manpages", MANPAGE_PACKAGES, f"package {pkg} is missing")
            files += [Path(p) for p in proc.stdout.splitlines() if re.search(r"/man/man\d/[^/]+$", p)]
    else:  # not Debian: take the sections the two packages provide from the usual location
        for sec in "234567":
            files += sorted(Path("/usr/share/man").glob(f"man{sec}/*"))
    files = [f for f in files if f.is_file() and not f.is_symlink()]
    if not files:
        raise CorpusUnavailableError("manpages", MANPAGE_PACKAGES, "no man page files found")
    return files


def _read_roff(path: Path) -> str:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8", errors="replace")


def _strip_roff(src: str) -> str:
    """Last-resort rendering when neither mandoc nor groff is installed: drop requests, keep text."""
    out = []
    for line in src.splitlines():
        if line.startswith(('.\\"', "'\\\"")):
            continue
        if line.startswith((".", "'")):
            macro, _, rest = line[1:].partition(" ")
            if macro in ("SH", "SS"):
                out += ["", rest.strip('"').upper() if macro == "SH" else rest.strip('"')]
            elif macro in ("B", "I", "BR", "IR", "RB", "RI", "BI", "IB", "TP", "IP") and rest:
                out.append(rest.replace('"', ""))
            elif macro in ("PP", "P", "LP"):
                out.append("")
            continue
        out.append(line)
    return _ROFF_ESCAPE.sub("", "\n".join(out)).replace("\\-", "-").replace("\\e", "\\")


def render_manpage(path: Path) -> str | None:
    """Plain text of one man page (None for ``.so`` redirects): mandoc, else groff, else roff stripped."""
    src = _read_roff(path)
    body = [ln for ln in src.splitlines() if ln.strip() and not ln.startswith(('.\\"', "'\\\""))]
    if not body or body[0].startswith(".so "):
        return None
    if shutil.which("mandoc"):
        cmd = ["mandoc", "-Tutf8", "-Owidth=78", str(path)]
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    elif shutil.which("groff"):
        cmd = ["groff", "-t", "-man", "-Tutf8", "-P-c", "-rLL=78n"]
        proc = subprocess.run(cmd, input=src, capture_output=True, text=True, errors="replace")
    else:
        proc = None
    text = _OVERSTRIKE.sub("", proc.stdout) if proc is not None and proc.stdout.strip() else _strip_roff(src)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n") + "\n"


def load_manpages(max_sources: int | None = None, seed: int = 0) -> list[str]:
    """Man pages from the ``manpages`` and ``manpages-dev`` packages, one document per page."""
    files = _take(_manpage_files(), max_sources, seed, "manpages")
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        pages = list(
            tqdm(pool.map(render_manpage, files), total=len(files), desc="render man pages", leave=False)
        )
    return [p for p in pages if p]


# --- pydocs -------------------------------------------------------------------------------------------


def _pydocs_root() -> Path:
    roots = sorted(
        Path(p) for p in glob.glob("/usr/share/doc/python3*/html/_sources") if re.search(r"python3\.\d+", p)
    )
    if not roots:
        raise CorpusUnavailableError(
            "pydocs", ("python3-doc",), "/usr/share/doc/python3.*/html/_sources not found"
        )
    return max(roots, key=lambda p: [int(x) for x in re.findall(r"python3\.(\d+)", str(p))])  # newest


def load_pydocs(max_sources: int | None = None, seed: int = 0) -> list[str]:
    """The Python documentation's reST sources (``*.rst.txt``), one document per page."""
    files = _take(_pydocs_root().rglob("*.rst.txt"), max_sources, seed, "pydocs")
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


# --- pycode -------------------------------------------------------------------------------------------


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    # tests are not library code, and pydoc_data is the language reference stored as one big dict
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "pydoc_data"}
    return [p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts)]


def load_pycode(max_sources: int | None = None, seed: int = 0) -> list[str]:
    """The Python standard library's ``.py`` files (tests, site-packages and pydoc_data excluded)."""
    out = []
    for f in _take(_stdlib_files(), max_sources, seed, "pycode"):
        try:
            out.append(f.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return out


# --- fortunes -----------------------------------------------------------------------------------------

FORTUNE_DIRS = ("/usr/share/games/fortunes", "/usr/share/fortune", "/usr/share/fortunes")


def load_fortunes(max_sources: int | None = None, seed: int = 0) -> list[str]:
    """Fortune cookies: every data file (not ``.dat``/``.u8``) split on ``%`` lines."""
    files = [
        p
        for d in FORTUNE_DIRS
        if Path(d).is_dir()
        for p in sorted(Path(d).iterdir())
        if p.is_file() and not p.is_symlink() and not p.suffix and p.name != "README"
    ]
    if not files:
        raise CorpusUnavailableError(
            "fortunes", ("fortunes",), f"no fortune files in {', '.join(FORTUNE_DIRS)}"
        )
    cookies = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        cookies += [c.strip("\n") + "\n" for c in re.split(r"^%\s*$", text, flags=re.M) if c.strip()]
    return _take(cookies, max_sources, seed, "fortunes")


BUILTIN_DOMAINS: dict[str, Domain] = {
    d.name: d
    for d in (
        Domain("foldoc", "Free On-line Dictionary of Computing entries", ("dict-foldoc",), load_foldoc),
        Domain("manpages", "Linux man pages, sections 2-7, rendered", MANPAGE_PACKAGES, load_manpages),
        Domain("pydocs", "Python documentation, reStructuredText sources", ("python3-doc",), load_pydocs),
        Domain("pycode", "Python standard library source code", (), load_pycode),
        Domain("fortunes", "fortune cookies", ("fortunes",), load_fortunes),
    )
}
DEFAULT_DOMAINS: tuple[str, ...] = tuple(BUILTIN_DOMAINS)


def load_domain(name: str, max_sources: int | None = None, seed: int = 0) -> list[str]:
    """Documents of a built-in domain (deterministically sampled when ``max_sources`` is set).

    Raises:
        CorpusUnavailableError: the domain's Debian package is not installed (the message has the
            ``apt-get install`` command).
    """
    if name not in BUILTIN_DOMAINS:
        raise KeyError(f"Unknown domain {name!r}; built-in domains are {', '.join(BUILTIN_DOMAINS)}.")
    return BUILTIN_DOMAINS[name].load(max_sources, seed)


def install_packages(packages: Iterable[str]) -> None:
    """Run ``apt-get install -y PACKAGES`` (needs root); raise with the command if it fails."""
    packages = sorted(set(packages))
    if not packages:
        return
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    if not shutil.which("apt-get"):
        raise RuntimeError(f"apt-get is not available here; install the packages {packages} by hand.")
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        raise PermissionError(
            f"Installing {packages} needs root: run `sudo {' '.join(cmd)}` and build again."
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    logger.info("Running %s", " ".join(cmd))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:  # the package lists may be stale or missing: update once and retry
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")


# ----------------------------------------------------------------------------------------------------
# User corpora

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def parse_corpus_spec(spec: str) -> tuple[str, str]:
    """Parse ``NAME=PATH_OR_GLOB`` (the CLI's ``--corpus``)."""
    name, sep, path = spec.partition("=")
    name, path = name.strip(), path.strip()
    if not sep or not name or not path:
        raise ValueError(f"Bad corpus spec {spec!r}: expected NAME=PATH_OR_GLOB, e.g. legal=~/texts/*.txt")
    if not _NAME_RE.match(name):
        raise ValueError(f"Bad corpus name {name!r}: use letters, digits, '_', '-' or '.'.")
    return name, path


def _pack_paragraphs(text: str, max_chars: int) -> list[str]:
    """Split ``text`` on blank lines and greedily re-join consecutive paragraphs up to ``max_chars``."""
    out, cur = [], ""
    for para in re.split(r"\n\s*\n", text):
        para = para.strip("\n")
        if not para.strip():
            continue
        if cur and len(cur) + 2 + len(para) > max_chars:
            out.append(cur + "\n")
            cur = ""
        cur = f"{cur}\n\n{para}" if cur else para
    if cur:
        out.append(cur + "\n")
    return out


def load_user_corpus(
    name: str,
    path_or_glob: str | os.PathLike,
    max_sources: int | None = None,
    seed: int = 0,
    max_chars: int = 4000,
) -> list[str]:
    """Documents of a user corpus: every text file under a path or matching a glob.

    One document per file; a file of more than ``BIG_FILE_CHARS`` characters is split on blank lines
    into documents of up to ``max_chars``. Binary and non-UTF-8 files are skipped.
    """
    pattern = os.path.expanduser(str(path_or_glob))
    if os.path.isdir(pattern):
        files = [Path(p) for p in glob.glob(os.path.join(pattern, "**", "*"), recursive=True)]
    elif os.path.isfile(pattern):
        files = [Path(pattern)]
    else:
        files = [Path(p) for p in glob.glob(pattern, recursive=True)]
    files = sorted(f for f in files if f.is_file())
    if not files:
        raise FileNotFoundError(
            f"Corpus {name!r}: no files match {path_or_glob!r} (a file, directory or glob)."
        )
    docs: list[str] = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            logger.debug("corpus %s: skipping unreadable or non-UTF-8 file %s", name, f)
            continue
        if "\x00" in text:
            continue
        docs += _pack_paragraphs(text, max_chars) if len(text) > BIG_FILE_CHARS else [text]
    if not docs:
        raise ValueError(f"Corpus {name!r}: the files matching {path_or_glob!r} hold no UTF-8 text.")
    return _take(docs, max_sources, seed, name)


# ----------------------------------------------------------------------------------------------------
# Split


@dataclass
class CorpusSplit:
    """Training and held-out documents of one domain. Held-out text is never trained on."""

    name: str
    train: list[str]
    heldout: list[str]
    n_sources: int = 0
    meta: dict = field(default_factory=dict)

    @property
    def train_chars(self) -> int:
        return sum(len(d) for d in self.train)


def chunk_text(text: str, max_chars: int) -> list[str]:
    """Cut a document into pieces of at most ``max_chars``: on blank lines, else lines, else characters."""
    if len(text) <= max_chars:
        return [text]
    pieces: list[str] = []
    for para in _pack_paragraphs(text, max_chars):
        if len(para) <= max_chars:
            pieces.append(para)
            continue
        cur = ""
        for line in para.splitlines(keepends=True):
            while len(line) > max_chars:  # one huge line: hard cut
                if cur:
                    pieces.append(cur)
                    cur = ""
                pieces.append(line[:max_chars])
                line = line[max_chars:]
            if len(cur) + len(line) > max_chars:
                pieces.append(cur)
                cur = ""
            cur += line
        if cur:
            pieces.append(cur)
    return [p for p in pieces if p.strip()]


def split_corpus(
    name: str,
    sources: Sequence[str],
    n_heldout: int = 100,
    min_heldout_chars: int = 300,
    heldout_max_chars: int = 1200,
    train_max_chars: int = 4000,
    max_train_chars: int | None = None,
    seed: int = 0,
) -> CorpusSplit:
    """Deterministic train / held-out split of one domain's source documents.

    Sources are cleaned (trailing spaces), deduplicated, dropped when shorter than ``MIN_DOC_CHARS``
    and shuffled with ``seed``. The first ``n_heldout`` sources of at least ``min_heldout_chars``
    characters (at most 10% of the sources, at least 1) are held out; each contributes its first
    chunk of up to ``heldout_max_chars`` characters and the rest of it is discarded. Every other
    source is chunked into training documents of up to ``train_max_chars``, kept in shuffled order
    until ``max_train_chars`` characters.
    """
    seen: set[str] = set()
    clean: list[str] = []
    for s in sources:
        s = "\n".join(line.rstrip() for line in s.splitlines()).strip("\n") + "\n"
        if len(s) >= MIN_DOC_CHARS and s not in seen:
            seen.add(s)
            clean.append(s)
    if len(clean) < 2:
        raise ValueError(
            f"Domain {name!r} has {len(clean)} usable document(s) (>= {MIN_DOC_CHARS} chars); at least 2 "
            "are needed for a training and a held-out split."
        )
    clean = _shuffled(clean, seed, name)
    n_heldout = max(1, min(n_heldout, len(clean) // 10))
    heldout_idx: list[int] = [i for i, s in enumerate(clean) if len(s) >= min_heldout_chars][:n_heldout]
    if not heldout_idx:  # no long document: hold out the longest ones instead
        heldout_idx = sorted(range(len(clean)), key=lambda i: -len(clean[i]))[:n_heldout]
        logger.warning(
            "Domain %s has no document of >= %d chars; holding out the longest ones.", name, min_heldout_chars
        )
    held = set(heldout_idx)
    heldout = [chunk_text(clean[i], heldout_max_chars)[0] for i in heldout_idx]
    train: list[str] = []
    total = 0
    for i, s in enumerate(clean):
        if i in held:
            continue
        for piece in chunk_text(s, train_max_chars):
            if max_train_chars is not None and total >= max_train_chars:
                break
            train.append(piece)
            total += len(piece)
    return CorpusSplit(name=name, train=train, heldout=heldout, n_sources=len(clean))


def write_jsonl(path: Path, docs: Iterable[str]) -> None:
    """Write documents as JSON lines ``{"text": ...}``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[str]:
    """Read documents written by `write_jsonl`."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]
