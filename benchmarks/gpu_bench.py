"""``packllm bench`` without the package __init__ (so without LangChain), for GPU boxes with only torch and
transformers. Same arguments as ``packllm bench``."""

from __future__ import annotations

import sys
import types
from pathlib import Path

_pkg = types.ModuleType("langchain_packllm")
_pkg.__path__ = [str(Path(__file__).resolve().parents[1] / "langchain_packllm")]
sys.modules.setdefault("langchain_packllm", _pkg)

import argparse  # noqa: E402

from langchain_packllm.lab.bench import add_bench_commands  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="gpu_bench")
    add_bench_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *sys.argv[1:]])
    sys.exit(args.func(args))
