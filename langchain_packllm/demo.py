"""``packllm demo``: a LangChain chain over prompts from different domains, printing what the pack wrote
and which member each prompt trusted.

Until the default expert pack is built, ``--tiny-random`` runs on tiny random-weight members made on the
spot (the weights then show the mechanics, not expertise).
"""

from __future__ import annotations

import argparse
import tempfile

from langchain_core.prompts import PromptTemplate

from langchain_packllm.llms import PackLLM

DEMO_PROMPTS = [
    "def read_config(path):\n    with open(path) as f:",
    "fork() creates a new process by duplicating the calling process.",
    "The quick brown fox",
]


def run_demo(llm: PackLLM, prompts: list[str], out=print) -> list[dict]:
    chain = PromptTemplate.from_template("{text}") | llm
    rows = []
    for prompt in prompts:
        result = chain.invoke({"text": prompt})
        report = llm.fusion_report(prompt)
        out(f"\n=== {prompt!r}")
        out(f"--> {result!r}")
        out("    weights: " + ", ".join(f"{n}={w:.2f}" for n, w in report.weights.items()))
        out("    prompt PPL: " + ", ".join(f"{n}={p:.1f}" for n, p in report.perplexities.items()))
        rows.append({"prompt": prompt, "text": result, "report": report.to_dict()})
    return rows


def _demo(args: argparse.Namespace) -> int:
    from langchain_packllm.testing import make_tiny_pack

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_tiny_pack(tmp, archs=("gpt2", "llama", "qwen2"))
        llm = PackLLM.from_model_ids(
            paths,
            names=["gpt2", "llama", "qwen2"],
            weighting=args.weighting,
            max_new_tokens=args.max_new_tokens,
        )
        run_demo(llm, DEMO_PROMPTS)
    return 0


def add_demo_commands(sub) -> None:
    p = sub.add_parser("demo", help="run a LangChain chain on the pack and show the weights per prompt")
    p.add_argument("--weighting", default="optimal", help="optimal|greedy|grid|sim|uniform|top1")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.set_defaults(func=_demo)
