"""Would members inside the pack stay close to themselves if they read the reference's text, not its ids?

A measurement for issue 14's goal "each member's perplexity inside the pack within 5% of its perplexity
alone", on the REAL pack (SmolLM2-135M, Gemma3-270M, Qwen2.5-Coder-0.5B) and the held-out passages of
``alignment_quality_real`` (``split_passage``: the prompt cut at a byte where all three tokenizers start a
token). For each ordered pair (reference r, member k), the member scores the reference's tokens of the rest
several ways, each row read on the reference vocabulary through the MinED columns (``take_columns`` and the
split of shared images, as the engine reads every non-reference member), or, in the last two, by string
prefix:

- ``mined``: the engine's reading (``engine.member_logprobs`` with reference r): member k reads the MinED
  image of every reference id, prompt included (one id per reference token);
- ``own-prompt``: the prompt with its own tokens, then the MinED image of each reference id of the rest
  (``alignment="own-prompt"``);
- ``piecewise``: the prompt with its own tokens, then each reference token's TEXT tokenized by the member
  (one or more of its own ids per reference token: the same bytes, segmented close to its own way); the row
  after the last piece of reference token i predicts token i + 1. A reference token whose bytes are not
  valid UTF-8 alone (a piece of a character) waits for the next ones; until they complete, the member's last
  row stands for the tokens in between.

- ``mined in, prefix out``: the ``mined`` reading, its rows over the member's own vocabulary moved onto the
  reference's by string prefix (``PrefixAligner.map_boundary``, each member token's mass split over the
  reference tokens it is consistent with by the reference's own row, as prefix alignment does at a
  boundary; smoothed as the engine smooths), and ``..., no prior`` (the prefix map alone, no reference
  information).

Each against the member alone on its own tokens of the same bytes (the ratio of bits). Not an engine mode:
this measures whether building ``piecewise`` would meet the goal.

Run from the repo root (about 3 minutes on 2 cores)::

    PACKLLM_HOME=$HOME/.cache/packllm .venv/bin/python -m benchmarks.piecewise_reading_real \\
        --docs 2 --tokens 128 --out docs/results/piecewise-reading-real.json
"""

from __future__ import annotations

import math
import time

import torch

from benchmarks.alignment_quality_real import (
    engine_positions,
    own_vocab_probs,
    real_members,
    script_main,
    split_passage,
)
from langchain_packllm import FusionEngine
from langchain_packllm import weights as W
from langchain_packllm.bytealign import smooth_logprobs
from langchain_packllm.lab.pack.real import real_eval_documents
from langchain_packllm.reference import encode_prompt
from langchain_packllm.scoring import take_columns

LOG2 = math.log(2)
READINGS = ("mined", "own-prompt", "piecewise", "mined in, prefix out", "mined in, prefix out, no prior")


def mapped_logprobs(logits: torch.Tensor, token_map) -> torch.Tensor:
    """A member's rows ``(n, V_k)`` on the reference vocabulary, log-softmaxed (the engine's reading)."""
    cols = take_columns(logits, token_map.ids.to(logits.device))
    if token_map.split is not None:
        cols = cols + token_map.split.to(cols)
    return torch.log_softmax(cols.double(), -1)


def alone_nll(member, text: str, split: int) -> float:
    """Member alone on its own tokens of ``text``: its NLL (nats) of the tokens starting at byte ``split``."""
    enc = member.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    byte_at = [0]
    for ch in text:
        byte_at.append(byte_at[-1] + len(ch.encode("utf-8")))
    first = next(i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and byte_at[a] >= split)
    with torch.inference_mode():
        logits = member.model(input_ids=torch.tensor([ids])).logits[0, :, : len(member.tokenizer)]
    lp = torch.log_softmax(logits.double(), -1)
    return -sum(float(lp[i - 1, ids[i]]) for i in range(first, len(ids)))


def read_rows(member, token_map, prefix: list[int], pieces: list[list[int]]) -> torch.Tensor:
    """Member's log-probs on the reference vocabulary ``(n, V_ref)``: row 0 after ``prefix``, row i after the
    pieces of the first i tokens (an empty piece list: the previous row again)."""
    ids = list(prefix)
    at = [len(ids) - 1]
    for p in pieces[:-1]:
        ids += p
        at.append(len(ids) - 1)
    with torch.inference_mode():
        logits = member.model(input_ids=torch.tensor([ids])).logits[0]
    return mapped_logprobs(logits[torch.tensor(at)].float(), token_map)


def text_pieces(member, surfaces: list[bytes | None], ref_ids: list[int], fallback) -> list[list[int]]:
    """Each reference token's text tokenized by the member; a token that is not valid UTF-8 alone waits
    (empty list) until its bytes complete a character; a special token reads its MinED image."""
    out: list[list[int]] = []
    pending = b""
    for rid in ref_ids:
        data = surfaces[rid]
        if data is None:
            out.append([int(fallback[rid])])
            continue
        pending += data
        try:
            piece = pending.decode("utf-8")
        except UnicodeDecodeError:
            out.append([])
            continue
        pending = b""
        out.append(list(member.tokenizer(piece, add_special_tokens=False)["input_ids"]))
    return out


def fused_nll(engine, prefix_engine, members, r: int, text: str, r_enc, split: int) -> dict[str, float]:
    """NLL (nats) of the rest under Eq. 1 with ``optimal`` weights solved on the prompt, reference ``r``:
    every member's rows read through the MinED columns (the engine's ``mined``), or moved by string prefix
    with the reference's prior (``mined in, prefix out``)."""
    ref = engine.reference(r)
    ids, offset = engine_positions(ref, r_enc, text)
    j0 = next(j for j in range(r_enc.n_text) if r_enc.starts[r_enc.n_special + j] - len(r_enc.lead) >= split)
    cut = offset + j0 - 1  # the row predicting the rest's first token
    lp = engine.member_logprobs([ids], reference=ref)[0]
    mined = torch.stack([x[0, :-1] for x in lp]).double()  # (K, L - 1, V): row i predicts ids[i + 1]
    aligners = prefix_engine.reference(r).aligners
    prior = lp[r][0, :-1].float()
    moved = []
    for k, m in enumerate(members):
        if k == r:
            moved.append(mined[k])
            continue
        own = (
            own_vocab_probs(m, ref.token_maps[k], ids).log().float()
        )  # the last rows (no row for a hidden BOS)
        rows = aligners[k].map_boundary(own, prior[-own.shape[0] :])
        full = torch.zeros_like(mined[k])
        full[-own.shape[0] :] = torch.log_softmax(smooth_logprobs(rows).double(), -1)
        moved.append(full)
    start = 1 if ref.hides_start(ids) else 0
    y = torch.tensor(ids[1:])
    out = {}
    for name, rows in (("mined optimal", mined), ("mined in, prefix out, optimal", torch.stack(moved))):
        w = W.solve("optimal", rows[:, start:cut], y[start:cut])
        fused = torch.log_softmax(torch.einsum("k,ktv->tv", w.to(rows), rows[:, cut:]), -1)
        out[name] = -float(fused.gather(-1, y[cut:, None]).sum())
    return out


def run(args) -> dict:
    members = real_members()
    names = [m.name for m in members]
    K = len(members)
    engine = FusionEngine(members, alignment="mined")
    engine.prepare_alignment(progress=False)
    refs = [engine.reference(r) for r in range(K)]
    prefix_engine = FusionEngine(members, alignment="prefix")  # for its aligners (member -> reference)
    table: dict[tuple[str, int, int], list[float]] = {}  # (reading, ref, member) -> [inside, alone]
    fused: dict[str, float] = {}  # row -> NLL (nats) of the rests
    n_bytes = 0
    started = time.perf_counter()
    for domain, docs in real_eval_documents(args.docs).items():
        for doc in docs:
            passage = split_passage(doc, members, args.tokens)
            if passage is None:
                continue
            text, data, split, encs = passage
            prompt = data[:split].decode("utf-8")
            alone = [alone_nll(m, text, split) for m in members]
            for r in range(K):
                ref, r_enc = refs[r], encs[r]
                ids, offset = engine_positions(ref, r_enc, text)
                j0 = next(
                    j
                    for j in range(r_enc.n_text)
                    if r_enc.starts[r_enc.n_special + j] - len(r_enc.lead) >= split
                )
                rest = ids[offset + j0 :]  # the reference's tokens of the rest
                targets = torch.tensor(rest)
                lp_mined = engine.member_logprobs([ids], reference=ref)[0]  # K x (1, L, V)
                surfaces = engine.references.surfaces(r).surfaces
                aligners = prefix_engine.reference(r).aligners
                prior = lp_mined[r][0, offset + j0 - 1 : -1].float()  # the reference's own rows
                for k, m in enumerate(members):
                    if k == r:
                        continue
                    tm = ref.token_maps[k]
                    rows = {"mined": lp_mined[k][0, offset + j0 - 1 : -1].double()}
                    own = encode_prompt(m.tokenizer, prompt)
                    mapped = [[int(tm.ids[t])] for t in rest]
                    rows["own-prompt"] = read_rows(m, tm, own, mapped)
                    rows["piecewise"] = read_rows(m, tm, own, text_pieces(m, surfaces, rest, tm.ids))
                    # the engine's MinED reading, its own-vocabulary rows moved by string prefix instead
                    own_rows = (
                        own_vocab_probs(m, tm, ids)[-len(rest) :].log().float()
                    )  # rows predicting the rest
                    for name, p in (
                        ("mined in, prefix out", prior),
                        ("mined in, prefix out, no prior", None),
                    ):
                        moved = aligners[k].map_boundary(own_rows, p)
                        rows[name] = torch.log_softmax(smooth_logprobs(moved).double(), -1)
                    for reading, lp in rows.items():
                        nll = -float(lp.gather(-1, targets[:, None]).sum())
                        cell = table.setdefault((reading, r, k), [0.0, 0.0])
                        cell[0] += nll
                        cell[1] += alone[k]
            # fused: the engine's reference for the prompt, weights solved on the prompt, scored on the rest
            r = engine.choose_reference(prompt)[0].index
            for name, nll in fused_nll(engine, prefix_engine, members, r, text, encs[r], split).items():
                fused[name] = fused.get(name, 0.0) + nll
            fused["best member alone"] = fused.get("best member alone", 0.0) + min(alone)
            for k in range(K):
                fused[f"{names[k]} alone"] = fused.get(f"{names[k]} alone", 0.0) + alone[k]
            n_bytes += len(data) - split
            print(f"{domain}: {time.perf_counter() - started:.0f} s", flush=True)
    ratios = {
        reading: {
            f"{names[r]} -> {names[k]}": v[0] / v[1] for (rd, r, k), v in table.items() if rd == reading
        }
        for reading in READINGS
    }
    return {
        "command": f"python -m benchmarks.piecewise_reading_real --docs {args.docs} --tokens {args.tokens}",
        "inside_over_alone": ratios,
        "fused_bits_per_byte": {row: nll / n_bytes / LOG2 for row, nll in fused.items()},
        "seconds": time.perf_counter() - started,
    }


def markdown(result: dict) -> str:
    pairs = list(result["inside_over_alone"]["mined"])
    lines = ["**A member reading the reference's tokens of the rest, inside the pack / alone (bits, same bytes)**",
             "", "| reference -> member | " + " | ".join(READINGS) + " |", "|---" * (len(READINGS) + 1) + "|"]  # fmt: skip
    for pair in pairs:
        lines.append(
            f"| {pair} | "
            + " | ".join(f"{result['inside_over_alone'][r][pair]:.3f}" for r in READINGS)
            + " |"
        )
    lines += ["", "**Fused bits per byte on the rest (the engine's reference; optimal weights from the prompt)**", "",
              "| row | bits per byte |", "|---|---|"]  # fmt: skip
    for row, v in result["fused_bits_per_byte"].items():
        lines.append(f"| {row} | {v:.3f} |")
    lines.append(f"\n({result['seconds']:.0f} s)")
    return "\n".join(lines)


def main() -> None:
    script_main(
        __doc__,
        run,
        markdown,
    )


if __name__ == "__main__":
    main()
