"""Train one small domain-expert causal LM from a transformers config, on CPU, in plain PyTorch.

The flow, top to bottom: `ExpertRecipe` -> `make_model` (a randomly initialised GPT-2 / Llama /
Qwen2 / GPT-NeoX from its config) -> `pack_tokens` (documents into one token stream) ->
`train_expert` (AdamW, warmup + cosine schedule, random fixed-length blocks, wall-clock budget)
-> `evaluate` (held-out negative log-likelihood) -> `save_expert` (``save_pretrained`` + tokenizer +
``packllm.json``), which `AutoModelForCausalLM.from_pretrained(path)` loads back.

Example:
    >>> from langchain_packllm.lab.pack.tokenizers import train_tokenizer
    >>> tok = train_tokenizer(["hello world, hello pack"] * 64, vocab_size=300)
    >>> model = make_model(ExpertRecipe("llama", 32, 1, 2, 1, 64, 32), tok)
    >>> stream = pack_tokens(tok, ["hello world, hello pack"] * 64)
    >>> result = train_expert(model, stream, TrainConfig(batch_size=4, max_steps=5, time_budget_s=10))
    >>> result.steps
    5
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

logger = logging.getLogger(__name__)

ARCHITECTURES: tuple[str, ...] = ("gpt2", "llama", "qwen2", "gpt_neox")


@dataclass(frozen=True)
class ExpertRecipe:
    """Shape of one expert model."""

    architecture: str  # one of ARCHITECTURES
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int  # grouped-query attention where the architecture has it (llama, qwen2)
    intermediate_size: int
    context_length: int


def model_config(recipe: ExpertRecipe, tokenizer: PreTrainedTokenizerFast) -> PretrainedConfig:
    """The transformers config of ``recipe``, sized to the tokenizer (special-token ids included)."""
    r = recipe
    ids = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    if r.architecture == "gpt2":
        return GPT2Config(
            n_positions=r.context_length,
            n_embd=r.hidden_size,
            n_layer=r.num_layers,
            n_head=r.num_heads,
            n_inner=r.intermediate_size,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **ids,
        )
    if r.architecture == "llama":
        return LlamaConfig(
            hidden_size=r.hidden_size,
            intermediate_size=r.intermediate_size,
            num_hidden_layers=r.num_layers,
            num_attention_heads=r.num_heads,
            num_key_value_heads=r.num_kv_heads,
            max_position_embeddings=r.context_length,
            **ids,
        )
    if r.architecture == "qwen2":
        return Qwen2Config(
            hidden_size=r.hidden_size,
            intermediate_size=r.intermediate_size,
            num_hidden_layers=r.num_layers,
            num_attention_heads=r.num_heads,
            num_key_value_heads=r.num_kv_heads,
            max_position_embeddings=r.context_length,
            use_sliding_window=False,
            **ids,
        )
    if r.architecture == "gpt_neox":
        return GPTNeoXConfig(
            hidden_size=r.hidden_size,
            intermediate_size=r.intermediate_size,
            num_hidden_layers=r.num_layers,
            num_attention_heads=r.num_heads,
            max_position_embeddings=r.context_length,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            **ids,
        )
    raise ValueError(f"Unknown architecture {r.architecture!r}; choose one of {', '.join(ARCHITECTURES)}.")


def make_model(recipe: ExpertRecipe, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised causal LM of ``recipe`` for ``tokenizer`` (deterministic in ``seed``)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config(recipe, tokenizer))
    logger.info("Created %s with %.2fM parameters", type(model).__name__, count_params(model) / 1e6)
    return model


def count_params(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ----------------------------------------------------------------------------------------------------
# Data


def pack_tokens(
    tokenizer: PreTrainedTokenizerFast, docs: Sequence[str], max_tokens: int | None = None, chunk: int = 256
) -> torch.Tensor:
    """Tokenize documents in order into one stream ``[bos] doc eos [bos] doc eos ...``, stopping once
    ``max_tokens`` tokens are collected. Returns a (N,) int64 tensor."""
    from langchain_packllm.lab.pack.tokenizers import encode_documents

    parts: list[torch.Tensor] = []
    total = 0
    for start in range(0, len(docs), chunk):
        for ids in encode_documents(tokenizer, docs[start : start + chunk]):
            parts.append(torch.tensor(ids, dtype=torch.long))
            total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    if not parts:
        raise ValueError("No training documents to tokenize: the training split is empty.")
    stream = torch.cat(parts)  # (N,)
    return stream if max_tokens is None else stream[:max_tokens]


# ----------------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainConfig:
    """Optimisation settings of one expert."""

    batch_size: int = 8
    learning_rate: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
    warmup: float = 0.05  # fraction of training spent in linear warmup
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    max_steps: int = 2000
    time_budget_s: float = 120.0  # wall-clock budget; training stops at whichever limit comes first
    seed: int = 0
    amp: bool | None = None  # bfloat16 autocast; None = on where the CPU/GPU has native bf16


@dataclass
class TrainResult:
    """What one training run did."""

    steps: int
    train_tokens: int
    final_loss: float  # mean training loss over the last steps
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.train_tokens / max(self.seconds, 1e-9)


@cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); emulated bf16 is slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _use_amp(cfg: TrainConfig, device: torch.device) -> bool:
    if cfg.amp is not None:
        return cfg.amp
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_bf16()


def lr_at(progress: float, cfg: TrainConfig) -> float:
    """Learning rate at ``progress`` in [0, 1]: linear warmup, then cosine to ``min_lr_ratio``."""
    if progress < cfg.warmup:
        return cfg.learning_rate * max(progress, 1e-3) / cfg.warmup
    t = min(1.0, (progress - cfg.warmup) / max(1e-9, 1.0 - cfg.warmup))
    return cfg.learning_rate * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def train_expert(
    model: PreTrainedModel, tokens: torch.Tensor, cfg: TrainConfig, desc: str = "train"
) -> TrainResult:
    """Train ``model`` on random ``context_length`` blocks of the token stream ``tokens`` (N,).

    Progress through the schedule is ``max(step / max_steps, elapsed / time_budget_s)``, so the
    learning rate anneals fully whichever limit ends training.
    """
    device = next(model.parameters()).device
    block = (
        model.config.max_position_embeddings
        if hasattr(model.config, "max_position_embeddings")
        else model.config.n_positions
    )
    block = min(block, len(tokens) - 1)
    if block < 8:
        raise ValueError(f"{desc}: only {len(tokens)} training tokens; the corpus is too small to train on.")
    amp = _use_amp(cfg, device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    offsets = torch.arange(block)  # (T,)
    losses: list[float] = []
    model.train()
    t0 = time.monotonic()
    step = 0
    bar = tqdm(total=cfg.max_steps, desc=desc, leave=False, dynamic_ncols=True)
    while step < cfg.max_steps:
        elapsed = time.monotonic() - t0
        if elapsed >= cfg.time_budget_s:
            break
        progress = max(step / cfg.max_steps, elapsed / cfg.time_budget_s)
        lr = lr_at(progress, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(tokens) - block, (cfg.batch_size,), generator=gen)  # (B,)
        x = tokens[starts[:, None] + offsets[None, :]].to(device)  # (B, T)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = model(input_ids=x, labels=x).loss  # labels are shifted inside the model
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step += 1
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}", lr=f"{lr:.1e}")
    bar.close()
    model.eval()
    seconds = time.monotonic() - t0
    if not losses:
        raise RuntimeError(f"{desc}: no training step fitted in time_budget_s={cfg.time_budget_s}; raise it.")
    tail = losses[-max(1, min(20, len(losses) // 5)) :]
    result = TrainResult(step, step * cfg.batch_size * block, sum(tail) / len(tail), seconds)
    logger.info(
        "%s: %d steps, %d tokens, %.1fs (%.0f tok/s), final loss %.3f",
        desc,
        result.steps,
        result.train_tokens,
        seconds,
        result.tokens_per_second,
        result.final_loss,
    )
    return result


# ----------------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class EvalResult:
    """Summed negative log-likelihood of some documents, with token and byte counts."""

    nll: float  # nats, summed over predicted tokens
    tokens: int  # predicted tokens
    bytes: int  # UTF-8 bytes of the documents

    @property
    def loss(self) -> float:
        return self.nll / max(self.tokens, 1)

    @property
    def ppl(self) -> float:
        """Per-token perplexity (comparable between models that share a tokenizer)."""
        return math.exp(self.loss)

    @property
    def bpb(self) -> float:
        """Bits per UTF-8 byte (comparable between any tokenizers)."""
        return self.nll / math.log(2) / max(self.bytes, 1)


@torch.inference_mode()
def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    docs: Sequence[str],
    context_length: int,
    batch_size: int = 16,
) -> EvalResult:
    """Negative log-likelihood of ``docs`` (each encoded as a prompt: bos where the tokenizer adds it).

    Long documents are scored in windows of ``context_length`` that overlap by one token, so every
    token after a document's first is predicted exactly once, from at most one window of context.
    """
    device = next(model.parameters()).device
    windows: list[list[int]] = []
    for ids in tokenizer(list(docs), add_special_tokens=True, verbose=False)["input_ids"]:
        step = context_length - 1
        for start in range(0, max(1, len(ids) - 1), step):
            w = ids[start : start + context_length]
            if len(w) >= 2:
                windows.append(w)
    was_training = model.training
    model.eval()
    nll, n_tok = 0.0, 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size]
        width = max(len(w) for w in batch)
        x = torch.full((len(batch), width), pad, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
        for j, w in enumerate(batch):
            x[j, : len(w)] = torch.tensor(w)
            mask[j, : len(w)] = 1
        x, mask = x.to(device), mask.to(device)
        logits = model(input_ids=x, attention_mask=mask).logits.float()  # (B, T, V)
        logp = F.log_softmax(logits[:, :-1], dim=-1)  # (B, T-1, V)
        tgt_logp = logp.gather(-1, x[:, 1:, None]).squeeze(-1)  # (B, T-1)
        keep = mask[:, 1:].bool()
        nll -= tgt_logp[keep].sum().item()
        n_tok += int(keep.sum().item())
    model.train(was_training)
    return EvalResult(nll, n_tok, sum(len(d.encode("utf-8")) for d in docs))


# ----------------------------------------------------------------------------------------------------
# Saving

PACKLLM_JSON = "packllm.json"


def save_expert(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, path: str | Path, info: dict
) -> Path:
    """Save model, tokenizer and ``packllm.json`` so the ``Auto*`` classes load the directory back."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / PACKLLM_JSON).write_text(json.dumps(info, indent=2) + "\n")
    return path


def recipe_dict(recipe: ExpertRecipe) -> dict:
    return asdict(recipe)
