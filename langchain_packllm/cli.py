"""The ``packllm`` command line. Subcommands are mounted from their modules (``pack``: the expert pack)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from langchain_packllm.pack.cli import add_pack_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="packllm", description="Pack of LLMs: test-time fusion of causal LMs."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    add_pack_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
