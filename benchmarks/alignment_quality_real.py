"""Quality of vocabulary alignment on the REAL pack (SmolLM2-135M, Gemma3-270M, Qwen2.5-Coder-0.5B):
MinED (the engine's default for mixed vocabularies, paper section 3.4) against prefix alignment
(``langchain_packllm.bytealign``), in bits per byte on held-out passages of the four domains that
``packllm eval lm --pack real`` uses (``real_eval_documents``: third-party Python code, Debian's Python docs,
manual pages, licenses; the same passages, seed 0).

Each passage is cut to its first ``--tokens`` SmolLM2 tokens (the eval cuts to half the context). The prompt
is the eval's (the first 32 tokens or 20% of them, whichever is shorter, counted with SmolLM2's tokenizer),
moved forward to the first byte where all three tokenizers start a token, so every row below scores
exactly the same bytes (the rest). Measured:

1. **Mass MinED keeps**, per directed pair (reference r -> member k): member k reads r's tokens through
   the MinED map (``TokenMap.ids``, with its own BOS put in front / r's BOS hidden, as the engine does);
   at each position, of k's distribution over its OWN vocabulary, the mass on the distinct member ids the
   reference vocabulary maps to (all MinED's gather can read), and the plain gather's sum over reference
   ids (the paper's, which counts an id once per preimage; the engine divides it, ``TokenMap.split``).
   Mean over positions. Prefix alignment keeps 1.0 by construction.
2. **Each member inside the pack against alone**: bits per byte of member k on the rest, reading its own
   tokens (alone: the engine with k as the reference), against reading r's tokens through MinED (the
   engine's ``member_logprobs`` with reference r): the ratio per pair and domain. The issue's goal: within
   5% (ratio <= 1.05).
3. **Fused bits per byte**: weights solved on the prompt (Eq. 3 ``optimal``, and ``uniform``), scored on
   the rest; reference = the engine's choice (the lowest bits per byte on the prompt,
   ``engine.bits_per_byte``). Rows: ``mined`` (the engine's MinED path); ``prefix one-forward`` (the
   engine's prefix prefill, ``bytealign.reference_logprobs`` with the reference's prior, one forward per
   member over the WHOLE passage: where a reference boundary falls inside a member token, that row knows
   the member's token goes on, so it is optimistic, not causal); ``prefix causal`` (the engine's prefix
   DECODING path, ``PrefixSteps``: ``MemberTextState`` per non-reference member, one incremental forward
   per reference token, the reference's row as prior; weights from the one-forward prompt rows, as the
   prefix prefill solves them); mapped rows smoothed with ``smooth_logprobs`` (eps 1e-4) as the engine
   does. Also each member alone, ``best-single`` (per domain, the best member: the oracle) and the best
   member overall.
4. **Each member inside the pack under prefix alignment**: on the passages where member k is not the
   reference, its bits per byte in the one-forward and the causal rows against alone, on the same bytes.

Run from the repo root (2 busy cores: about 2.3 minutes per 128-token passage without the causal rows,
so ``--docs 2 --tokens 128`` takes about 18 minutes; the causal rows, ``--causal-docs N`` per domain, cost
one incremental forward per reference token per member: several more minutes per passage)::

    PACKLLM_HOME=$HOME/.cache/packllm .venv/bin/python -m benchmarks.alignment_quality_real \\
        --docs 2 --tokens 128 --causal-docs 0 --out docs/results/alignment-quality-real.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path

import torch

from langchain_packllm import weights as W
from langchain_packllm.bytealign import MemberTextState, encode_text, reference_logprobs, smooth_logprobs
from langchain_packllm.engine import FusionEngine
from langchain_packllm.lab.evaluation import lm_prompt_length
from langchain_packllm.lab.pack.real import REAL_NAMES, real_eval_documents, real_pack_paths
from langchain_packllm.members import load_member

logger = logging.getLogger("alignment_quality_real")
LOG2 = math.log(2)


# ---------------------------------------------------------------------------------------------- passages


def cut_passage(text: str, tokenizer, tokens: int) -> tuple[str, int] | None:
    """The passage cut to its first ``tokens`` tokens of ``tokenizer`` and the eval's prompt cut (chars)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"][:tokens]
    n = len(offsets)
    n_prompt = lm_prompt_length(n)
    if n < 16 or n_prompt < 2:
        return None
    return text[: offsets[-1][1]], offsets[n_prompt - 1][1]


def common_split(encs, data: bytes, start: int) -> int | None:
    """The first text byte >= ``start`` where every tokenizer starts a token (and a UTF-8 character)."""
    starts = [{s - len(e.lead) for s in e.starts[e.n_special :]} for e in encs]
    for c in range(max(1, start), len(data) - len(data) // 4):
        if all(c in s for s in starts) and (data[c] & 0xC0) != 0x80:
            return c
    return None


def split_passage(doc: str, members, tokens: int):
    """A held-out passage cut as every row here scores it: ``(text, data, split, encs)`` (the passage cut to
    its first ``tokens`` tokens of member 0, its UTF-8, the first byte of the scored rest, every member's
    ``encode_text``), or None when it is too short or no byte after the prompt starts a token everywhere."""
    cut = cut_passage(doc, members[0].tokenizer, tokens)
    if cut is None:
        return None
    text, prompt_chars = cut
    data = text.encode("utf-8")
    encs = [encode_text(m.tokenizer, text) for m in members]
    split = common_split(encs, data, len(text[:prompt_chars].encode("utf-8")))
    return None if split is None else (text, data, split, encs)


def real_members() -> list:
    """The real pack's three members, float32 on the CPU (converted under ``$PACKLLM_HOME``)."""
    return [
        load_member(p, name=n, device="cpu", torch_dtype="float32")
        for n, p in zip(REAL_NAMES, real_pack_paths())
    ]


def script_main(doc: str, run, markdown, *extra: tuple[str, dict], passages: bool = True) -> None:
    """The command line of a real-pack script: ``--docs`` and ``--tokens`` (the held-out passages; not
    with ``passages=False``), ``--out`` and ``extra`` arguments (``(flag, add_argument keywords)``); prints
    ``markdown(run(args))`` and, with ``--out``, writes the JSON there and the tables beside it (``.txt``)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    if passages:
        parser.add_argument("--docs", type=int, default=2, help="held-out passages per domain")
        parser.add_argument("--tokens", type=int, default=128, help="SmolLM2 tokens per passage (at most)")
    for flag, kwargs in extra:
        parser.add_argument(flag, **kwargs)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here (and the tables, .txt)")
    args = parser.parse_args()
    result = run(args)
    table = markdown(result)
    print(table)
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        args.out.with_suffix(".txt").write_text(table + "\n")


def engine_positions(ref, enc, text: str) -> tuple[list[int], int]:
    """The engine's ids of ``text`` read with ``ref`` and the index in them of ``enc``'s first text token."""
    ids = ref.encode(text)
    offset = len(ids) - enc.n_text
    if offset < 0 or ids[offset:] != enc.ids[enc.n_special :]:
        raise ValueError(f"{ref.name}: the engine's ids and encode_text's disagree on this passage")
    return ids, offset


# ---------------------------------------------------------------------------------------------- scoring


def fused_nll(w: torch.Tensor, lp: torch.Tensor, targets: torch.Tensor) -> float:
    """NLL (nats) of ``targets`` ``(T,)`` under Eq. 1 with weights ``w`` ``(K,)`` over ``lp`` ``(K, T, V)``."""
    fused = torch.log_softmax(torch.einsum("k,ktv->tv", w.to(lp), lp), dim=-1)
    return -float(fused.gather(-1, targets[:, None]).sum())


def own_vocab_probs(member, token_map, ref_ids: list[int]) -> torch.Tensor:
    """Member k's next-token probabilities over its OWN vocabulary when it reads the reference ids through
    the MinED map, with its BOS put in front (``lead``) or the reference's BOS hidden (``hide``), as the
    engine's scorer does: ``(n_rows, V_k)``, row i predicting reference id ``ref_ids[i + 1]``."""
    inp = token_map.ids.cpu()[torch.tensor(ref_ids)].tolist()
    drop_first = token_map.hide is not None and ref_ids[0] == token_map.hide
    if drop_first:
        inp = inp[1:]
    if token_map.lead is not None:
        inp = [token_map.lead, *inp]
    with torch.inference_mode():
        logits = member.model(input_ids=torch.tensor([inp])).logits[0, :, : len(member.tokenizer)]
    p = torch.softmax(logits.double(), -1)
    if token_map.lead is not None:
        p = p[1:]  # the row after the member's own BOS predicts the first reference id
    return p[:-1]


def causal_rows(engine, ref_index: int, aligners, r_enc, own_rows: torch.Tensor, j0: int) -> torch.Tensor:
    """The prefix DECODING path (``PrefixSteps``): every member's rows ``(K, T_rest, V_ref)`` for reference
    text tokens ``j0..``; the reference reads its own ids (``own_rows``: its one-forward rows, row j
    predicting text token j), the others follow the text with ``MemberTextState`` (the reference's row as
    prior), one incremental forward per reference token."""
    out = []
    data = r_enc.stream[len(r_enc.lead) :]
    for k, m in enumerate(engine.members):
        if k == ref_index:
            out.append(own_rows[j0:])
            continue
        state = MemberTextState(m.model, m.tokenizer, aligners[k])
        prompt = data[: r_enc.starts[r_enc.n_special + j0] - len(r_enc.lead)].decode("utf-8")
        rows = [state.start(prompt, own_rows[j0 : j0 + 1])[0]]
        surfaces = aligners[k].reference.surfaces
        for j in range(j0, r_enc.n_text - 1):
            rows.append(state.append(surfaces[r_enc.ids[r_enc.n_special + j]], own_rows[j + 1 : j + 2])[0])
        out.append(torch.stack(rows).to(own_rows))
    return torch.stack(out)


def run(args) -> dict:
    members = real_members()
    names = [m.name for m in members]
    K = len(members)
    engine = FusionEngine(members, alignment="mined")
    engine.prepare_alignment(progress=False)
    prefix_engine = FusionEngine(members, alignment="prefix")  # only for its aligners (public Reference)
    refs = [engine.reference(r) for r in range(K)]
    documents = real_eval_documents(args.docs)

    nll: dict[str, dict[str, float]] = {}  # row -> domain -> summed NLL (nats)
    nbytes: dict[str, int] = {}
    causal_bytes: dict[str, int] = {}
    pair_nll: dict[tuple[int, int], dict[str, float]] = {}  # (ref, member) -> domain -> NLL
    # prefix alignment, member k where it is not the reference: NLL inside the pack, alone, bytes
    prefix_member: dict[tuple[str, str, int], dict[str, float]] = {}  # (rows, "inside"/"alone", k) -> NLL
    prefix_bytes: dict[tuple[str, int], dict[str, float]] = {}  # (rows, k) -> domain -> bytes
    mass = {(r, k): {"distinct": [], "plain": []} for r in range(K) for k in range(K) if r != k}
    chosen: dict[str, dict[str, int]] = {}
    passages_used: dict[str, int] = {}

    def add(table: dict, key, domain: str, value: float) -> None:
        table.setdefault(key, {}).setdefault(domain, 0.0)
        table[key][domain] += value

    started = time.perf_counter()
    for domain, docs in documents.items():
        nbytes[domain] = causal_bytes[domain] = passages_used[domain] = 0
        for doc_i, doc in enumerate(docs):
            passage = split_passage(doc, members, args.tokens)
            if passage is None:
                logger.warning("%s passage %d: too short or no common token boundary; skipped", domain, doc_i)
                continue
            text, data, split, encs = passage
            passages_used[domain] += 1
            n_rest = len(data) - split
            nbytes[domain] += n_rest
            prompt_text = data[:split].decode("utf-8")

            # the engine's MinED path with every member as the reference in turn
            mined_lp, rest_nll, c_toks = {}, {}, {}
            for r in range(K):
                ids, offset = engine_positions(refs[r], encs[r], text)
                text_starts = [s - len(encs[r].lead) for s in encs[r].starts[encs[r].n_special :]]
                c_toks[r] = text_starts.index(split)  # first rest text token
                first_row = 1 if refs[r].hides_start(ids) else 0
                lp_list, input_ids, _, _ = engine.member_logprobs([ids], reference=refs[r])
                lp = torch.stack([x[0, :-1] for x in lp_list]).double()  # (K, n-1, V_r): row i -> ids[i+1]
                del lp_list
                targets = input_ids[0, 1:]
                s = offset + c_toks[r] - 1  # the row predicting the first rest token
                p_rows = torch.arange(max(offset - 1, first_row), s)  # prompt rows (as the prefill solves)
                rest_nll[r] = [-float(lp[k, s:].gather(-1, targets[s:, None]).sum()) for k in range(K)]
                for k in range(K):
                    add(pair_nll, (r, k), domain, rest_nll[r][k])
                    if k == r:
                        continue
                    tm = refs[r].token_maps[k]
                    p = own_vocab_probs(members[k], tm, ids)  # (rows, V_k)
                    image = tm.ids.cpu()
                    mass[(r, k)]["distinct"] += p[:, torch.unique(image)].sum(-1).tolist()
                    mass[(r, k)]["plain"] += p[:, image].sum(-1).tolist()
                    del p
                mined_lp[r] = (lp, targets, p_rows, s)

            # the engine's choice of reference, and the fused rows
            bpb = engine.bits_per_byte(prompt_text)
            ref = min(range(K), key=lambda i: bpb[i] if math.isfinite(bpb[i]) else math.inf)
            chosen.setdefault(domain, {}).setdefault(names[ref], 0)
            chosen[domain][names[ref]] += 1
            scores: dict[str, float] = {names[k]: rest_nll[k][k] for k in range(K)}  # each alone
            for r in range(K):  # MinED with each reference, whatever the rule says
                lp, targets, p_rows, s = mined_lp[r]
                w = W.solve("optimal", lp[:, p_rows], targets[p_rows])
                opt = fused_nll(w, lp[:, s:], targets[s:])
                scores[f"mined optimal, reference {names[r]}"] = opt
                if r == ref:
                    scores["mined optimal"] = opt
                    scores["mined uniform"] = fused_nll(W.uniform(K), lp[:, s:], targets[s:])
            del mined_lp, lp

            # prefix alignment: the engine's prefill rows (one forward per member, with the reference's prior)
            aligners = dict(enumerate(prefix_engine.reference(ref).aligners))
            raw, r_enc = reference_logprobs(members, ref, text, aligners)  # (K, T_ref, V_ref)
            raw = raw.double()
            c_tok = c_toks[ref]
            y = torch.tensor(r_enc.ids[r_enc.n_special :])
            lp_p = smooth_logprobs(raw)
            # rows predicting text token 0: a member without BOS reading a BOS reference has none (abstains)
            w_p = W.solve("optimal", lp_p[:, 1:c_tok], y[1:c_tok])
            scores["prefix one-forward optimal"] = fused_nll(w_p, lp_p[:, c_tok:], y[c_tok:])
            scores["prefix one-forward uniform"] = fused_nll(W.uniform(K), lp_p[:, c_tok:], y[c_tok:])

            member_rows = [("one-forward", lp_p[:, c_tok:])]
            for row, value in scores.items():
                add(nll, row, domain, value)
            if doc_i < args.causal_docs:
                t0 = time.perf_counter()
                causal = smooth_logprobs(causal_rows(engine, ref, aligners, r_enc, raw[ref], c_tok))
                causal_bytes[domain] += n_rest
                add(nll, "prefix causal optimal", domain, fused_nll(w_p, causal, y[c_tok:]))
                add(nll, "prefix causal uniform", domain, fused_nll(W.uniform(K), causal, y[c_tok:]))
                member_rows.append(("causal", causal))
                for row in [*names, "mined optimal", "prefix one-forward optimal"]:
                    add(nll, f"(causal passages) {row}", domain, scores[row])
                logger.info("%s passage %d: causal rows in %.0f s", domain, doc_i, time.perf_counter() - t0)
            for rows_name, rows in member_rows:  # each non-reference member inside the pack, and alone
                for k in range(K):
                    if k != ref:
                        inside = -float(rows[k].gather(-1, y[c_tok:, None]).sum())
                        add(prefix_member, (rows_name, "inside", k), domain, inside)
                        add(prefix_member, (rows_name, "alone", k), domain, rest_nll[k][k])
                        add(prefix_bytes, (rows_name, k), domain, n_rest)
            del raw, member_rows, lp_p
            logger.info("%s passage %d done (%.0f s), reference %s", domain, doc_i,
                        time.perf_counter() - started, names[ref])  # fmt: skip
        logger.info("%s done (%.0f s)", domain, time.perf_counter() - started)

    domains = [d for d in documents if nbytes[d]]

    def to_bpb(per: dict[str, float], counts: dict[str, int]) -> dict[str, float]:
        out = {d: per[d] / counts[d] / LOG2 for d in domains if d in per and counts[d]}
        if len(out) == len(domains):
            out["average"] = sum(out.values()) / len(out)
        return out

    bpb = {}
    for row, per in nll.items():
        bpb[row] = to_bpb(per, causal_bytes if row.startswith(("(causal", "prefix causal")) else nbytes)
    singles = {n: bpb[n] for n in names}
    oracle = {d: min(s[d] for s in singles.values()) for d in domains}
    bpb["best-single (oracle per domain)"] = {**oracle, "average": sum(oracle.values()) / len(oracle)}
    best = min(names, key=lambda n: singles[n]["average"])
    bpb[f"best member overall ({best})"] = dict(singles[best])

    pairs = {}
    for (r, k), per in pair_nll.items():
        if r == k:
            continue
        inside = to_bpb(per, nbytes)
        alone = to_bpb(pair_nll[(k, k)], nbytes)
        pairs[f"{names[r]} -> {names[k]}"] = {
            "inside_bpb": inside,
            "alone_bpb": alone,
            "ratio": {d: inside[d] / alone[d] for d in inside},
        }
    prefix_members = {}
    for (rows_name, k), counts in prefix_bytes.items():
        per = {}
        for d, n in counts.items():
            inside = prefix_member[(rows_name, "inside", k)][d] / n / LOG2
            alone = prefix_member[(rows_name, "alone", k)][d] / n / LOG2
            per[d] = {"inside_bpb": inside, "alone_bpb": alone, "ratio": inside / alone, "bytes": n}
        n_all = sum(counts.values())
        inside = sum(prefix_member[(rows_name, "inside", k)].values()) / n_all / LOG2
        alone = sum(prefix_member[(rows_name, "alone", k)].values()) / n_all / LOG2
        per["all"] = {"inside_bpb": inside, "alone_bpb": alone, "ratio": inside / alone, "bytes": n_all}
        prefix_members.setdefault(rows_name, {})[names[k]] = per
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    masses = {
        f"{names[r]} -> {names[k]}": {"distinct": mean(v["distinct"]), "plain_gather": mean(v["plain"])}
        for (r, k), v in mass.items()
    }
    return {
        "bits_per_byte": bpb,
        "pairs": pairs,
        "prefix_members": prefix_members,
        "mined_mass": masses,
        "references_chosen": chosen,
        "passages": passages_used,
        "bytes_scored": nbytes,
        "causal_bytes_scored": causal_bytes,
        "settings": vars(args),
        "seconds": time.perf_counter() - started,
    }


def markdown(result: dict) -> str:
    bpb = result["bits_per_byte"]
    domains = list(result["passages"])
    domains = [d for d in domains if result["bytes_scored"][d]]
    head = "| row | " + " | ".join(domains) + " | average |"
    lines = ["**Bits per byte on the rest of each passage (lower is better)**", "", head]
    lines.append("|---" * (len(domains) + 2) + "|")
    for row, per in bpb.items():
        cells = [f"{per[d]:.3f}" if d in per else "" for d in [*domains, "average"]]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "**Each member inside the pack (reading the reference's tokens through MinED) / alone**",
        "",
    ]
    lines.append(
        "| reference -> member | " + " | ".join(domains) + " | average | alone avg bpb | inside avg bpb |"
    )
    lines.append("|---" * (len(domains) + 4) + "|")
    for pair, v in result["pairs"].items():
        cells = [f"{v['ratio'][d]:.3f}" for d in [*domains, "average"]]
        lines.append(f"| {pair} | " + " | ".join(cells)
                     + f" | {v['alone_bpb']['average']:.3f} | {v['inside_bpb']['average']:.3f} |")  # fmt: skip
    lines += ["", "**Probability mass MinED can read (member's own distribution, mean over positions)**", ""]
    lines += ["| reference -> member | distinct member ids | plain gather (sum over reference ids) |",
              "|---|---|---|"]  # fmt: skip
    for pair, v in result["mined_mass"].items():
        lines.append(f"| {pair} | {v['distinct']:.3f} | {v['plain_gather']:.3f} |")
    lines.append("| prefix alignment (any pair) | 1.000 | 1.000 |")
    for rows_name, per_member in result.get("prefix_members", {}).items():
        lines += ["", f"**Each member inside the pack under prefix alignment ({rows_name} rows; passages where "
                  "it is not the reference) / alone, same bytes**", ""]  # fmt: skip
        lines += ["| member | " + " | ".join(domains) + " | all | alone bpb (all) | inside bpb (all) |",
                  "|---" * (len(domains) + 4) + "|"]  # fmt: skip
        for name, per in per_member.items():
            cells = [f"{per[d]['ratio']:.3f}" if d in per else "" for d in [*domains, "all"]]
            lines.append(f"| {name} | " + " | ".join(cells)
                         + f" | {per['all']['alone_bpb']:.3f} | {per['all']['inside_bpb']:.3f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=2, help="held-out passages per domain")
    parser.add_argument("--tokens", type=int, default=128, help="SmolLM2 tokens per passage (at most)")
    parser.add_argument(
        "--causal-docs", type=int, default=0, help="passages per domain with causal prefix rows"
    )
    parser.add_argument(
        "--out", default=None, help="write the JSON result here (and the tables next to it, .txt)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(int(os.environ.get("TORCH_NUM_THREADS", "2")))
    result = run(args)
    table = markdown(result)
    print(table)
    skip = ("bits_per_byte", "pairs", "prefix_members")
    print(json.dumps({k: v for k, v in result.items() if k not in skip}, indent=1))
    if args.out:
        out = Path(args.out)
        out.write_text(json.dumps(result, indent=1) + "\n")
        out.with_suffix(".txt").write_text(table + "\n")


if __name__ == "__main__":
    main()
