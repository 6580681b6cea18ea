"""`build_pack`: corpora -> split -> tokenizer(s) -> one trained expert per domain -> manifest.

A pack is built once into ``<cache>/packs/<size>-<variant>[-<hash>]/`` and reused afterwards. The
manifest is written last and atomically, so a directory without one is a half-built pack and is
rebuilt. A file lock keeps two processes from building the same pack at once. The manifest records every
file's size and sha256; a finished pack whose files do not match is rebuilt (``build_pack``) or reported
with the command that rebuilds it (``load_pack``, ``verify_pack``). When the cache root cannot be written,
a finished pack there is still reused; a new one is built in the fallback folder
(:func:`langchain_packllm.paths.writable_root`). User corpus names become folder names: they are checked
(:func:`langchain_packllm.paths.check_name`), whoever calls.

Layout of a pack directory::

    manifest.json              # PackManifest, written last
    data/<domain>/train.jsonl  # training documents ({"text": ...} per line)
    data/<domain>/heldout.jsonl
    tokenizer/                 # the shared tokenizer (variant "shared")
    experts/<domain>/          # save_pretrained model + tokenizer + packllm.json
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shlex
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from langchain_packllm.lab.pack import corpora
from langchain_packllm.lab.pack.corpora import CorpusSplit, CorpusUnavailableError
from langchain_packllm.lab.pack.manifest import (
    MANIFEST_NAME,
    DomainInfo,
    ExpertInfo,
    PackCorruptError,
    PackManifest,
    check_files,
    record_files,
)
from langchain_packllm.lab.pack.tokenizers import train_tokenizer
from langchain_packllm.lab.pack.train import (
    EvalResult,
    ExpertRecipe,
    TrainConfig,
    count_params,
    evaluate,
    make_model,
    pack_tokens,
    recipe_dict,
    save_expert,
    train_expert,
)
from langchain_packllm.paths import (
    check_name,
    fallback_home,
    inside,
    packllm_home,
    writable_error,
    writable_root,
)

logger = logging.getLogger(__name__)

RECIPE_VERSION = 1  # bump when a change to the recipe below should invalidate built packs
SIZES = ("default", "tiny")
VARIANTS = ("shared", "mixed")


# ----------------------------------------------------------------------------------------------------
# Size presets and per-domain plan


@dataclass(frozen=True)
class SizePreset:
    """Everything that differs between a ``tiny`` (CI) and a ``default`` (demo/benchmark) pack."""

    name: str
    context_length: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    shared_vocab_size: int
    mixed_vocab_sizes: tuple[int, ...]  # cycled over the experts of a mixed pack
    batch_size: int
    learning_rate: float
    max_steps: int
    time_budget_s: float  # per expert
    max_sources: int | None  # per domain, before the split
    n_heldout: int
    max_train_chars: int  # per domain, stored and trained on
    tokenizer_chars: int  # per domain, for tokenizer training
    eval_docs: int  # held-out documents per domain in the expert x domain matrix
    threads: int | None = None  # torch threads while building; None = leave torch's setting alone


PRESETS: dict[str, SizePreset] = {
    "default": SizePreset(
        "default",
        context_length=512,
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        shared_vocab_size=4096,  # the LM head is most of the compute at this width: keep it small
        mixed_vocab_sizes=(4096, 3072, 2560, 4000, 2048),
        batch_size=4,  # many small steps learn more than few large ones in a ~2-minute budget
        learning_rate=3e-3,
        max_steps=600,
        time_budget_s=110.0,
        max_sources=None,
        n_heldout=100,
        max_train_chars=6_000_000,
        tokenizer_chars=1_500_000,
        eval_docs=50,
    ),
    "tiny": SizePreset(
        "tiny",
        context_length=128,
        hidden_size=64,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        shared_vocab_size=1024,
        mixed_vocab_sizes=(1024, 1280, 1152, 896, 768),
        batch_size=8,
        learning_rate=5e-3,
        max_steps=100,
        time_budget_s=20.0,
        max_sources=200,
        n_heldout=16,
        max_train_chars=300_000,
        tokenizer_chars=100_000,
        eval_docs=16,
        threads=1,  # 64-wide models gain nothing from more threads, and one is stable on busy CI runners
    ),
}

# (architecture, tokenizer kind in a mixed pack) per built-in domain; user corpora cycle through USER_PLAN.
DOMAIN_PLAN: dict[str, tuple[str, str]] = {
    "foldoc": ("gpt2", "bytelevel-bpe"),
    "manpages": ("llama", "metaspace-bpe"),
    "pydocs": ("qwen2", "metaspace-unigram"),
    "pycode": ("gpt_neox", "bytelevel-bpe"),
    "fortunes": ("llama", "metaspace-bpe"),
}
USER_PLAN: tuple[tuple[str, str], ...] = (
    ("llama", "metaspace-bpe"),
    ("gpt2", "bytelevel-bpe"),
    ("qwen2", "metaspace-unigram"),
    ("gpt_neox", "bytelevel-bpe"),
)


def _recipe(arch: str, p: SizePreset) -> ExpertRecipe:
    """Shape per architecture: same width budget, each family's own MLP convention."""
    d = p.hidden_size
    if arch in ("gpt2", "gpt_neox"):  # 4x GELU MLP
        inter = 4 * d
    else:  # SwiGLU, ~8/3 d rounded to 16
        inter = (8 * d // 3 + 15) // 16 * 16
    kv = p.num_kv_heads if arch in ("llama", "qwen2") else p.num_heads
    return ExpertRecipe(arch, d, p.num_layers, p.num_heads, kv, inter, p.context_length)


# ----------------------------------------------------------------------------------------------------
# Cache locations: the root is `langchain_packllm.paths.packllm_home` (shared with the runtime)


def _build_config(
    size: str, variant: str, domains: Sequence[str], corpora_: dict[str, str], seed: int
) -> dict:
    """What identifies a pack: a finished pack is reused only if its manifest records the same."""
    for name in corpora_:
        check_name(name, "corpus name")
    user = {
        name: str(Path(os.path.expanduser(p)).resolve())
        if not any(c in p for c in "*?[")
        else os.path.expanduser(p)
        for name, p in corpora_.items()
    }
    config = {
        "recipe_version": RECIPE_VERSION,
        "size": size,
        "variant": variant,
        "domains": list(domains),
        "corpora": user,
        "seed": seed,
        # threads and the time budget are resources, not recipe: a pack built with others is reused
        "preset": {k: v for k, v in asdict(PRESETS[size]).items() if k not in ("threads", "time_budget_s")},
    }
    return json.loads(json.dumps(config))  # as it reads back from manifest.json (tuples -> lists)


def _pack_name(config: dict) -> str:
    name = f"{config['size']}-{config['variant']}"
    if (
        list(config["domains"]) == list(corpora.DEFAULT_DOMAINS)
        and not config["corpora"]
        and config["seed"] == 0
    ):
        return name
    digest = hashlib.sha256(
        json.dumps({k: config[k] for k in ("domains", "corpora", "seed")}, sort_keys=True).encode()
    ).hexdigest()
    return f"{name}-{digest[:8]}"


def _check_args(size: str, variant: str) -> None:
    if size not in PRESETS:
        raise ValueError(f"Unknown pack size {size!r}; choose one of {', '.join(SIZES)}.")
    if variant not in VARIANTS:
        raise ValueError(f"Unknown pack variant {variant!r}; choose one of {', '.join(VARIANTS)}.")


def default_pack_dir(
    size: str = "default",
    variant: str = "shared",
    cache_dir: str | os.PathLike | None = None,
    domains: Sequence[str] | None = None,
    corpora: dict[str, str] | None = None,
    seed: int = 0,
) -> Path:
    """Directory the pack of these settings is (or will be) built in, under `packllm_home`."""
    _check_args(size, variant)
    config = _build_config(size, variant, _domain_list(domains), corpora or {}, seed)
    return packllm_home(cache_dir) / "packs" / _pack_name(config)


def _domain_list(domains: Sequence[str] | None) -> list[str]:
    if domains is None:
        return list(corpora.DEFAULT_DOMAINS)
    if isinstance(domains, str):
        domains = [d for d in domains.split(",") if d.strip()]
    out = [d.strip() for d in domains]
    unknown = [d for d in out if d not in corpora.BUILTIN_DOMAINS]
    if unknown:
        raise ValueError(
            f"Unknown domain(s) {unknown}; built-in domains are {', '.join(corpora.BUILTIN_DOMAINS)}. "
            "Pass your own text as corpora={'name': 'path/or/glob'} (CLI: --corpus NAME=PATH)."
        )
    return out


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ----------------------------------------------------------------------------------------------------
# Public API


def load_pack(
    size: str = "default",
    variant: str = "shared",
    cache_dir: str | os.PathLike | None = None,
    domains: Sequence[str] | None = None,
    corpora: dict[str, str] | None = None,
    seed: int = 0,
) -> PackManifest:
    """The manifest of an already built pack.

    Raises:
        FileNotFoundError: the pack is not built (or only half built); the message says how to build it.
    """
    root = default_pack_dir(size, variant, cache_dir, domains, corpora, seed)
    fallback = fallback_home(create=False)
    if not (root / MANIFEST_NAME).exists() and fallback is not None:  # built there: the home was read-only
        if (fallback / "packs" / root.name / MANIFEST_NAME).exists():
            root = fallback / "packs" / root.name
    cmd = build_command(_build_config(size, variant, _domain_list(domains), corpora or {}, seed), cache_dir)
    if not (root / MANIFEST_NAME).exists():
        raise FileNotFoundError(
            f"No {size}-{variant} expert pack in {root}. Build it with `{cmd}` "
            f"(or build_pack(size={size!r}, variant={variant!r}) in Python)."
        )
    manifest = PackManifest.load(root)
    problem = check_files(manifest)
    if problem:
        raise PackCorruptError(
            f"The {size}-{variant} pack in {root} is corrupt: {problem}. Rebuild it with `{cmd}`."
        )
    return manifest


def build_command(config: dict, cache_dir: str | os.PathLike | None = None) -> str:
    """The ``packllm pack build`` command line that builds (or repairs) the pack of this build config."""
    cmd = f"packllm pack build{' --tiny' if config['size'] == 'tiny' else ''} --variant {config['variant']}"
    if list(config["domains"]) != list(corpora.DEFAULT_DOMAINS):
        cmd += f" --domains {shlex.quote(','.join(config['domains']))}"
    for name, path in config.get("corpora", {}).items():
        cmd += f" --corpus {shlex.quote(f'{name}={path}')}"
    if config.get("seed", 0):
        cmd += f" --seed {config['seed']}"
    if cache_dir is not None:
        cmd += f" --cache-dir {shlex.quote(str(cache_dir))}"
    return cmd


def _reusable(root: Path, config: dict) -> PackManifest | None:
    """The finished pack in ``root`` when it was built with ``config`` and its files match its manifest."""
    if not (root / MANIFEST_NAME).exists():
        return None
    try:
        manifest = PackManifest.load(root)
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as err:
        logger.warning("Pack manifest in %s is unreadable (%s); rebuilding.", root, err)
        return None
    if manifest.build_config != config:
        logger.warning("Pack in %s was built with other settings; rebuilding.", root)
        return None
    problem = check_files(manifest)
    if problem:
        logger.warning("Pack in %s is corrupt (%s); rebuilding it.", root, problem)
        return None
    logger.info("Reusing the %s pack in %s", root.name, root)
    return manifest


def build_pack(
    size: str = "default",
    variant: str = "shared",
    corpora: dict[str, str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    install: bool = False,
    seed: int = 0,
    domains: Sequence[str] | None = None,
    threads: int | None = None,
    time_budget_s: float | None = None,
) -> PackManifest:
    """Build (or reuse) a pack of small domain-expert causal LMs trained on real local text.

    Args:
        size: ``"default"`` (5 experts of ~2-3M parameters, ~10 minutes on 2 CPU cores) or ``"tiny"``
            (seconds; for tests and CI).
        variant: ``"shared"`` (one byte-level BPE tokenizer for all experts) or ``"mixed"`` (each expert
            its own tokenizer: GPT-2 byte-level BPE, Llama metaspace BPE, SentencePiece unigram).
        corpora: extra user domains, ``{name: path_or_glob}`` of text files.
        cache_dir: cache root (default `packllm_home`: $PACKLLM_HOME, $XDG_CACHE_HOME/packllm,
            ~/.cache/packllm).
        force: rebuild even if a finished pack exists.
        install: ``apt-get install`` missing Debian corpora (needs root).
        seed: seed of the split, the tokenizers and the training.
        domains: built-in domains to include (default all five: ``corpora.DEFAULT_DOMAINS``).
        threads: torch threads while building (default: the size preset's, i.e. 1 for ``tiny``; for
            ``default``, leave ``torch.get_num_threads()`` as the caller set it).
        time_budget_s: wall-clock training budget per expert (default: the preset's, 110 s for
            ``default``, 20 s for ``tiny``); training stops at this or at the preset's step count,
            whichever comes first. On a busy machine a larger budget buys the same number of steps.

    Returns:
        The `PackManifest` of the finished pack.

    Example:
        >>> m = build_pack("tiny", domains=["pycode"], corpora={"notes": "~/notes/*.txt"})  # doctest: +SKIP
        >>> m.expert("pycode").path  # doctest: +SKIP
    """
    _check_args(size, variant)
    domain_names = _domain_list(domains)
    user = dict(corpora or {})
    clash = sorted(set(user) & set(domain_names))
    if clash:
        raise ValueError(f"User corpus name(s) {clash} clash with built-in domains; rename them.")
    if not domain_names and not user:
        raise ValueError("Nothing to build: no domains and no corpora were given.")
    config = _build_config(size, variant, domain_names, user, seed)
    packs = packllm_home(cache_dir) / "packs"
    if writable_error(packs) is not None:  # read-only: reuse a sound pack there, else build in the fallback
        found = None if force else _reusable(packs / _pack_name(config), config)
        if found is not None:
            return found
        packs = writable_root("packs", cache_dir)
    root = inside(packs, _pack_name(config))

    with _locked(root.parent / f".{root.name}.lock"):
        if not force and (manifest := _reusable(root, config)) is not None:
            return manifest
        if root.exists():
            logger.info(
                "Removing %s %s", "old pack" if (root / MANIFEST_NAME).exists() else "half-built pack", root
            )
            shutil.rmtree(root)
        root.mkdir(parents=True)
        with _torch_threads(threads if threads is not None else PRESETS[size].threads):
            preset = PRESETS[size]
            if time_budget_s is not None:
                preset = replace(preset, time_budget_s=float(time_budget_s))
            return _build(root, config, preset, domain_names, user, install, seed)


# ----------------------------------------------------------------------------------------------------
# The build


def _load_sources(
    domain_names: list[str], user: dict[str, str], p: SizePreset, install: bool, seed: int
) -> dict[str, list[str]]:
    """Source documents per domain; installs missing Debian packages first if ``install``."""
    sources: dict[str, list[str]] = {}
    missing: list[CorpusUnavailableError] = []
    for name in domain_names:
        try:
            sources[name] = corpora.load_domain(name, p.max_sources, seed)
        except CorpusUnavailableError as err:
            missing.append(err)
    if missing and install:
        corpora.install_packages(pkg for err in missing for pkg in err.apt_packages)
        for err in missing:
            sources[err.domain] = corpora.load_domain(err.domain, p.max_sources, seed)
    elif missing:
        pkgs = sorted({pkg for err in missing for pkg in err.apt_packages})
        raise CorpusUnavailableError(
            ", ".join(err.domain for err in missing),
            pkgs,
            "; ".join(str(err).split(". ")[0] for err in missing),
        )
    for name, path in user.items():
        sources[name] = corpora.load_user_corpus(name, path, p.max_sources, seed)
    return {name: sources[name] for name in [*domain_names, *user]}


def _tokenizer_sample(splits: dict[str, CorpusSplit], chars: int) -> list[str]:
    """Up to ``chars`` characters of training documents from every domain (never held-out text)."""
    sample: list[str] = []
    for split in splits.values():
        total = 0
        for doc in split.train:
            if total >= chars:
                break
            sample.append(doc)
            total += len(doc)
    return sample


def _build(
    root: Path,
    config: dict,
    p: SizePreset,
    domain_names: list[str],
    user: dict[str, str],
    install: bool,
    seed: int,
) -> PackManifest:
    t_start = time.monotonic()
    variant = config["variant"]
    logger.info("Building the %s pack in %s", root.name, root)

    # 1. corpora, split, stored
    sources = _load_sources(domain_names, user, p, install, seed)
    splits: dict[str, CorpusSplit] = {}
    domain_infos: list[DomainInfo] = []
    for name, docs in sources.items():
        split = corpora.split_corpus(
            name, docs, n_heldout=p.n_heldout, max_train_chars=p.max_train_chars, seed=seed
        )
        splits[name] = split
        train_path, heldout_path = (
            inside(root, "data", name, "train.jsonl"),
            inside(root, "data", name, "heldout.jsonl"),
        )
        corpora.write_jsonl(train_path, split.train)
        corpora.write_jsonl(heldout_path, split.heldout)
        builtin = corpora.BUILTIN_DOMAINS.get(name)
        domain_infos.append(
            DomainInfo(
                name=name,
                source="builtin" if name not in user else user[name],
                description=builtin.description
                if builtin and name not in user
                else f"user corpus {user.get(name)}",
                train_path=str(train_path),
                heldout_path=str(heldout_path),
                n_train=len(split.train),
                n_heldout=len(split.heldout),
                n_sources=split.n_sources,
                train_chars=split.train_chars,
            )
        )
        logger.info(
            "Domain %s: %d sources -> %d train docs (%.1f MB), %d held out",
            name,
            split.n_sources,
            len(split.train),
            split.train_chars / 1e6,
            len(split.heldout),
        )

    # 2. tokenizer(s): shared, or one per expert of cycling conventions
    plans = {}
    user_i = 0
    for name in splits:
        if name in DOMAIN_PLAN and name not in user:
            plans[name] = DOMAIN_PLAN[name]
        else:
            plans[name] = USER_PLAN[user_i % len(USER_PLAN)]
            user_i += 1
    sample = _tokenizer_sample(splits, p.tokenizer_chars)
    tokenizers: dict[str, PreTrainedTokenizerFast] = {}
    shared_path: Path | None = None
    if variant == "shared":
        shared = train_tokenizer(sample, "bytelevel-bpe", p.shared_vocab_size, p.context_length)
        shared_path = root / "tokenizer"
        shared.save_pretrained(shared_path)
        tokenizers = dict.fromkeys(splits, shared)
    else:
        for i, name in enumerate(tqdm(splits, desc="tokenizers", leave=False)):
            kind = plans[name][1]
            vocab = p.mixed_vocab_sizes[i % len(p.mixed_vocab_sizes)]
            # unigram training is slow (EM over a large seed vocabulary): give it a third of the text
            text = (
                sample if kind != "metaspace-unigram" else _tokenizer_sample(splits, p.tokenizer_chars // 3)
            )
            tokenizers[name] = train_tokenizer(text, kind, vocab, p.context_length)

    # 3. experts
    experts: list[ExpertInfo] = []
    models = {}
    for i, name in enumerate(splits):
        arch, _ = plans[name]
        tok = tokenizers[name]
        kind = "bytelevel-bpe" if variant == "shared" else plans[name][1]
        recipe = _recipe(arch, p)
        model = make_model(recipe, tok, seed=seed + i)
        cfg = TrainConfig(
            batch_size=p.batch_size,
            learning_rate=p.learning_rate,
            max_steps=p.max_steps,
            time_budget_s=p.time_budget_s,
            seed=seed + i,
        )
        stream = pack_tokens(
            tok, splits[name].train, max_tokens=p.max_steps * p.batch_size * p.context_length
        )
        result = train_expert(model, stream, cfg, desc=f"expert {name} ({arch})")
        own = evaluate(model, tok, splits[name].heldout[: p.eval_docs], p.context_length)
        path = inside(root, "experts", name)
        info = ExpertInfo(
            name=name,
            domain=name,
            path=str(path),
            architecture=type(model).__name__,
            model_type=model.config.model_type,
            tokenizer_kind=kind,
            vocab_size=len(tok),
            params=count_params(model),
            context_length=p.context_length,
            train_tokens=result.train_tokens,
            train_steps=result.steps,
            train_seconds=round(result.seconds, 2),
            train_loss=round(result.final_loss, 4),
            heldout_loss=round(own.loss, 4),
            heldout_ppl=round(own.ppl, 3),
        )
        extra = {
            "size": p.name,
            "variant": variant,
            "seed": seed,
            "recipe": recipe_dict(recipe),
            "train_stream_tokens": len(stream),
            "heldout_bpb": round(own.bpb, 4),
            "tokens_per_second": round(result.tokens_per_second, 1),
        }
        save_expert(model, tok, path, {**{k: v for k, v in vars(info).items() if k != "path"}, **extra})
        experts.append(info)
        models[name] = model
        logger.info(
            "Expert %s: %s %.2fM params, held-out ppl %.2f",
            name,
            info.architecture,
            info.params / 1e6,
            info.heldout_ppl,
        )

    # 4. expert x domain held-out matrix
    heldout_eval = _eval_matrix(models, tokenizers, splits, p)

    manifest = PackManifest(
        size=p.name,
        variant=variant,
        root=str(root),
        experts=experts,
        domains=domain_infos,
        tokenizer_path=str(shared_path) if shared_path else None,
        seed=seed,
        build_config=config,
        heldout_eval=heldout_eval,
        build_seconds=round(time.monotonic() - t_start, 1),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        files=record_files(root),
    )
    manifest.save()  # last: its presence marks the pack as complete
    logger.info("Built the %s pack in %.0fs", root.name, manifest.build_seconds)
    return manifest


def _eval_matrix(models: dict, tokenizers: dict, splits: dict[str, CorpusSplit], p: SizePreset) -> dict:
    """Held-out loss / perplexity / bits-per-byte of every expert on every domain."""
    table: dict[str, dict[str, dict[str, float]]] = {"loss": {}, "ppl": {}, "bpb": {}}
    pairs = [(e, d) for e in models for d in splits]
    for e, d in tqdm(pairs, desc="held-out matrix", leave=False):
        r: EvalResult = evaluate(models[e], tokenizers[e], splits[d].heldout[: p.eval_docs], p.context_length)
        table["loss"].setdefault(e, {})[d] = round(r.loss, 4)
        table["ppl"].setdefault(e, {})[d] = round(r.ppl, 3)
        table["bpb"].setdefault(e, {})[d] = round(r.bpb, 4)
    table["docs_per_domain"] = {d: min(p.eval_docs, len(s.heldout)) for d, s in splits.items()}
    return table


def verify_pack(manifest: PackManifest) -> dict[str, str]:
    """Check every file against its sha256 in the manifest, then load every expert back through
    ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained(path)`` and score a held-out document; returns
    ``{expert: model class}``. Raises :class:`PackCorruptError` (naming the file and the command that
    rebuilds the pack) when a file does not match or an expert does not load."""
    root = Path(manifest.root)
    cmd = build_command(manifest.build_config, root.parent.parent) if manifest.build_config else None
    fix = f" Rebuild it with `{cmd}`." if cmd else " Rebuild it with `packllm pack build --force`."
    problem = check_files(manifest, full=True)
    if problem:
        raise PackCorruptError(f"The pack in {root} is corrupt: {problem}.{fix}")
    out = {}
    for e in manifest.experts:
        try:
            model = AutoModelForCausalLM.from_pretrained(e.path)
            tok = AutoTokenizer.from_pretrained(e.path)
            doc = manifest.heldout_documents(e.domain)[0]
            r = evaluate(model, tok, [doc], e.context_length)
        except Exception as err:  # safetensors, JSON, tokenizers: each has its own error type
            raise PackCorruptError(
                f"Expert {e.name} in {e.path} does not load ({type(err).__name__}: {err}).{fix}"
            ) from err
        if not r.tokens or r.loss != r.loss:
            raise PackCorruptError(f"Expert {e.name} in {e.path} loaded but gives no finite loss.{fix}")
        out[e.name] = type(model).__name__
    return out


def summary_table(manifest: PackManifest, metric: str = "ppl") -> str:
    """The expert x domain held-out matrix as text (rows: experts, columns: domains)."""
    table = manifest.heldout_eval.get(metric, {})
    doms = manifest.domain_names
    width = max(10, *(len(d) + 2 for d in doms))
    title = f"{metric} (expert \\ domain)"
    lines = [f"{title:<24}" + "".join(f"{d:>{width}}" for d in doms)]
    for e in manifest.expert_names:
        row = table.get(e, {})
        lines.append(f"{e:<24}" + "".join(f"{row.get(d, float('nan')):>{width}.3f}" for d in doms))
    return "\n".join(lines)
