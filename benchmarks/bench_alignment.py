"""Build times of the vocabulary alignment maps at realistic vocabulary sizes.

Trains BPE tokenizers with the `tokenizers` library on the Python stdlib source (no model hub needed):

- ``sp32k``: Llama-2 style, Metaspace ``▁`` + byte fallback (``<0x00>``..``<0xFF>``), 32,000 tokens;
- ``bl32k`` / ``bl50k``: GPT-2 style byte-level BPE, 32,000 / 50,000 tokens;
- ``bl150k``: byte-level BPE, 150,000 tokens. The stdlib alone saturates at about 123k tokens (every word
  fully merged), so its training text also holds each word of ``/usr/share/dict/american-english-large``
  (``apt-get install wamerican-large``) as `` word`` and `` Word``.

then times, for each (src -> dst) pair, a cold MinED build, a warm load from the disk cache, the prefix map
build, and the per-decode-step cost of applying each map to one row of logits (torch on one thread).

Run (about 2 minutes on 2 cores, plus about 1 minute to train the tokenizers the first time):
    python -m benchmarks.bench_alignment --out bench-alignment.json   (from the repo root)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from langchain_packllm.alignment import MinEDMap, PrefixMap, map_logits_mined, tokenizer_surfaces

logger = logging.getLogger("bench_alignment")

WORD_LIST = Path("/usr/share/dict/american-english-large")
PAIRS = [
    ("sp32k", "bl32k"),
    ("sp32k", "bl50k"),
    ("bl50k", "bl150k"),
    ("sp32k", "bl150k"),
    ("bl150k", "bl50k"),
]


def stdlib_documents() -> Iterator[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if "site-packages" not in path.parts:
            yield path.read_text(encoding="utf-8", errors="ignore")


def word_list_documents() -> Iterator[str]:
    if not WORD_LIST.exists():
        raise SystemExit(f"{WORD_LIST} is missing; install it with `apt-get install wamerican-large`.")
    words = WORD_LIST.read_text(encoding="utf-8", errors="ignore").split()
    for start in range(0, len(words), 1000):
        chunk = words[start : start + 1000]
        yield " ".join(chunk) + " " + " ".join(w.capitalize() for w in chunk)


def train(name: str, tok_dir: Path) -> PreTrainedTokenizerFast:
    """Train (or load from ``tok_dir``) one benchmark tokenizer."""
    path = tok_dir / f"{name}.json"
    if not path.exists():
        started = time.perf_counter()
        if name.startswith("bl"):
            backend = _train_byte_level(int(name[2:-1]) * 1000, with_words=name == "bl150k")
        else:
            backend = _train_llama_style(int(name[2:-1]) * 1000)
        tok_dir.mkdir(parents=True, exist_ok=True)
        backend.save(str(path))
        logger.info(
            "trained %s (%d tokens) in %.1f s", name, backend.get_vocab_size(), time.perf_counter() - started
        )
    backend = Tokenizer.from_file(str(path))
    if name.startswith("bl"):
        specials = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    else:
        specials = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


def _train_byte_level(vocab_size: int, with_words: bool) -> Tokenizer:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = list(stdlib_documents()) + (list(word_list_documents()) if with_words else [])
    backend.train_from_iterator(texts, trainer)
    if backend.get_vocab_size() < vocab_size:
        logger.warning("%d-token target reached only %d tokens", vocab_size, backend.get_vocab_size())
    return backend


def _train_llama_style(vocab_size: int) -> Tokenizer:
    """Metaspace BPE, then 256 byte-fallback tokens inserted after <unk>, <s>, </s>, as in Llama-2."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    specials = ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 256, special_tokens=specials, show_progress=False)
    backend.train_from_iterator(stdlib_documents(), trainer)
    spec = json.loads(backend.to_str())
    vocab = spec["model"]["vocab"]
    new_vocab = {token: i for token, i in vocab.items() if i < len(specials)}
    new_vocab.update({f"<0x{b:02X}>": len(specials) + b for b in range(256)})
    new_vocab.update({token: i + 256 for token, i in vocab.items() if i >= len(specials)})
    spec["model"]["vocab"] = new_vocab
    spec["model"]["byte_fallback"] = True
    backend = Tokenizer.from_str(json.dumps(spec))
    backend.decoder = decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback(), decoders.Fuse()])
    return backend


def per_call_ms(fn, repeats: int = 20) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return 1000 * (time.perf_counter() - started) / repeats


def run(tok_dir: Path, cache_dir: Path, pairs: list[tuple[str, str]]) -> list[dict]:
    names = sorted({name for pair in pairs for name in pair})
    toks = {name: train(name, tok_dir) for name in names}
    rows = []
    for src_name, dst_name in pairs:
        src, dst = toks[src_name], toks[dst_name]
        started = time.perf_counter()
        src_s, dst_s = tokenizer_surfaces(src), tokenizer_surfaces(dst)
        surfaces_s = time.perf_counter() - started

        started = time.perf_counter()
        cold = MinEDMap.from_tokenizers(src_s, dst_s, cache_dir=cache_dir)
        cold_s = time.perf_counter() - started
        started = time.perf_counter()
        warm = MinEDMap.from_tokenizers(src, dst, cache_dir=cache_dir)  # includes surfaces + hashing
        warm_s = time.perf_counter() - started
        assert warm.from_cache and not cold.from_cache

        started = time.perf_counter()
        prefix = PrefixMap.from_tokenizers(src_s, dst_s, cache_dir=cache_dir)
        prefix_s = time.perf_counter() - started

        # Per decode step, one row: the paper's direction reads dst (member) logits for each src (ref) token.
        member_logits = torch.randn(1, len(dst))  # (1, V_dst)
        gather_ms = per_call_ms(lambda m=member_logits, c=cold: map_logits_mined(m, c))
        src_logprobs = torch.randn(1, len(src)).log_softmax(-1)  # (1, V_src)
        prefix_ms = per_call_ms(lambda x=src_logprobs, p=prefix: p.map_logprobs(x))
        rows.append(
            {
                "src": src_name,
                "dst": dst_name,
                "src_vocab": len(src),
                "dst_vocab": len(dst),
                "exact_fraction": round(cold.exact_fraction, 4),
                "surfaces_s": round(surfaces_s, 2),
                "mined_build_s": round(cold_s, 2),
                "mined_cache_hit_s": round(warm_s, 2),
                "prefix_build_s": round(prefix_s, 2),
                "prefix_whole_fraction": round(prefix.whole_fraction, 4),
                "mined_gather_ms_per_step": round(gather_ms, 3),
                "prefix_logprobs_ms_per_step": round(prefix_ms, 3),
            }
        )
        logger.info("%s", rows[-1])
    return rows


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'src -> dst':<18}{'V_src x V_dst':>17}{'exact':>8}{'MinED build s':>15}{'cache hit s':>13}"
        f"{'prefix build s':>16}{'gather ms':>11}{'prefix ms':>11}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['src'] + ' -> ' + r['dst']:<18}{r['src_vocab']:>8,} x {r['dst_vocab']:<7,}"
            f"{r['exact_fraction']:>8.1%}{r['mined_build_s']:>15.1f}{r['mined_cache_hit_s']:>13.2f}"
            f"{r['prefix_build_s']:>16.1f}{r['mined_gather_ms_per_step']:>11.3f}"
            f"{r['prefix_logprobs_ms_per_step']:>11.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench-alignment.json"), help="JSON results file")
    parser.add_argument(
        "--tok-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "packllm-bench-tokenizers",
        help="where trained tokenizers are kept between runs",
    )
    parser.add_argument("--quick", action="store_true", help="only the 32k x 32k pair")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)  # per-step timings: one row is too small to gain from threads on a busy box
    pairs = PAIRS[:1] if args.quick else PAIRS
    with tempfile.TemporaryDirectory() as cache_dir:  # a fresh cache, so the first build is cold
        rows = run(args.tok_dir, Path(cache_dir), pairs)
    print_table(rows)
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}
    args.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
