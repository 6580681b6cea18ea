"""The ``packllm`` command line: ``demo``, ``pack``, ``eval``, ``bench``.

Each subcommand lives next to the code it drives and registers itself here through an
``add_*_commands(subparsers)`` function; every one of them runs on the same :class:`FusionEngine`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="packllm", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    from langchain_packllm.lab.bench import add_bench_commands
    from langchain_packllm.lab.demo import add_demo_commands
    from langchain_packllm.lab.evaluation import add_eval_commands
    from langchain_packllm.lab.pack.cli import add_pack_commands

    add_demo_commands(sub)
    add_pack_commands(sub)
    add_eval_commands(sub)
    add_bench_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
