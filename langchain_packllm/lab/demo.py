"""``packllm demo``: a LangChain chain over prompts from every domain of the expert pack, printing what the
pack wrote and how much each expert counted. The pack is built on first use (about 10 minutes on 2 CPU
cores for ``default``, seconds for ``--tiny``) and reused after.
"""

from __future__ import annotations

import argparse
import logging

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.outputs import LLMResult
from langchain_core.prompts import PromptTemplate

from langchain_packllm.llms import PackLLM

logger = logging.getLogger(__name__)


def domain_prompts(manifest, chars: int = 160) -> dict[str, str]:
    """One prompt per domain: the opening of a held-out document (never trained on)."""
    prompts = {}
    for domain in manifest.domain_names:
        docs = [d for d in manifest.heldout_documents(domain) if len(d.strip()) >= 40]
        if docs:
            text = docs[0].strip()[:chars]
            prompts[domain] = text[: text.rfind(" ")] if " " in text[40:] else text
    return prompts


class _ReportCollector(BaseCallbackHandler):
    """Keeps the fusion report that PackLLM puts in each generation's ``generation_info``."""

    def __init__(self) -> None:
        self.infos: list[dict] = []

    def on_llm_end(self, response: LLMResult, **kwargs) -> None:
        self.infos.extend(gen[0].generation_info for gen in response.generations)


def run_demo(llm: PackLLM, prompts: dict[str, str], out=print) -> list[dict]:
    """Invoke ``prompt | llm`` on each prompt; print the text, the weights and the prompt perplexities."""
    chain = PromptTemplate.from_template("{text}") | llm
    collector = _ReportCollector()
    rows = []
    names = llm.engine.names
    width = max(len(n) for n in names)
    for domain, prompt in prompts.items():
        text = chain.invoke({"text": prompt}, config={"callbacks": [collector]})
        info = collector.infos[-1]
        top = max(info["weights"], key=info["weights"].get)
        out(f"\n=== [{domain}] {prompt!r}")
        out(f"--> {text!r}")
        for name in names:
            bar = "#" * round(30 * info["weights"][name])
            out(
                f"    {name:<{width}}  w={info['weights'][name]:.2f}  ppl={info['perplexities'][name]:9.1f}  {bar}"
            )
        out(f"    trusted most: {top}{'  (the domain expert)' if top == domain else ''}")
        rows.append(
            {"domain": domain, "prompt": prompt, "text": text, "weights": info["weights"], "top": top}
        )
    hits = sum(r["top"] == r["domain"] for r in rows if r["domain"] in names)
    out(f"\nThe prompt's own domain expert got the largest weight on {hits} of {len(rows)} prompts.")
    return rows


def _demo(args: argparse.Namespace) -> int:
    from langchain_packllm.lab.pack import build_pack

    size = "tiny" if args.tiny else "default"
    manifest = build_pack(size, "shared", install=args.install, cache_dir=args.cache_dir)
    llm = PackLLM.from_model_ids(
        manifest.expert_paths,
        names=manifest.expert_names,
        weighting=args.weighting,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=0.95,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        device=args.device,
    )
    print(
        f"Pack: {size}-shared, {len(manifest.experts)} experts ({', '.join(manifest.expert_names)}), "
        f"weighting={args.weighting}"
    )
    run_demo(llm, domain_prompts(manifest))
    return 0


def add_demo_commands(sub) -> None:
    p = sub.add_parser(
        "demo", help="run a LangChain chain on the expert pack and show the weights per prompt"
    )
    p.add_argument("--tiny", action="store_true", help="use the tiny pack (builds in seconds)")
    p.add_argument("--weighting", default="optimal", help="optimal|greedy|grid|sim|uniform|top1")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--repetition-penalty", type=float, default=1.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="torch device for the members (default: cuda if present)")
    p.add_argument(
        "--cache-dir", default=None, help="pack cache root (default $PACKLLM_HOME or ~/.cache/packllm)"
    )
    p.add_argument("--install", action="store_true", help="apt-get install missing Debian corpora (root)")
    p.set_defaults(func=_demo)
