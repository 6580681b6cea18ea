"""Quality of vocabulary alignment: MinED (the paper's, section 3.4) against prefix alignment
(``langchain_packllm.bytealign``), in bits per byte on held-out text.

Two tiny experts with different tokenizers, trained here for a few hundred AdamW steps (no model hub):

- ``code``: GPT-2 architecture, GPT-2-style byte-level BPE (512 tokens), trained on Python stdlib source;
- ``prose``: Llama architecture, Llama-2-style Metaspace BPE with byte fallback (400 + 256 tokens), trained
  on the English text of ``pydoc_data.topics`` (the Python reference manual).

Held-out documents (stdlib files and manual topics never trained on) are cut into chunks of ``--chars``
characters. Each chunk is split where BOTH tokenizers start a token (the first such byte after 20% of the
chunk), so every row scores exactly the same bytes: the prompt (weights are solved on it) and the rest
(scored). Rows:

- each expert alone, on its own tokenization;
- ``mined``: the engine's MinED path (``FusionEngine.member_logprobs`` with the reference set per chunk),
  reference = the expert with the lowest bits per byte on the prompt (the engine's rule);
- ``prefix``: each expert reads its own tokens, rows mapped onto the reference vocabulary by
  ``bytealign`` (longest reference prefix); ``prefix+prior``: each member token's mass split over every
  consistent reference token by the reference's own distribution (``prior=``);
- ``one-forward``: rows from ``bytealign.prefix_logprobs`` over one forward per expert. Where a reference
  boundary falls inside a member token, that row knows the member's token goes on past it (it is read from
  the member's tokenization of the WHOLE text): not a causal model, optimistic; reported to show how much;
- ``causal``: rows from ``bytealign.MemberTextState``, the decoding path: each member's row at reference
  position i depends only on the text before it (one incremental forward per reference token). This is the
  honest score and what decoding does. ``causal, one-forward weights``: weights solved on the one-forward
  prompt rows (what a prefill on one forward would use), scored on causal rows;
- weights: ``optimal`` (Eq. 3 exact minimiser) and ``uniform``; members' rows smoothed with
  ``smooth_logprobs(eps)`` before Eq. 1 (``--eps``; a sweep over eps is reported for ``prefix``).

Also reported: how much of the member's probability mass MinED's gather reads (distinct member ids read,
and the sum over all reference ids, which counts some twice), against 1 for prefix alignment.

Run from the repo root (about 5 minutes on 2 busy cores; trained experts are kept in ``--workdir``):
    python -m benchmarks.bench_alignment_quality --out docs/alignment-quality.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from langchain_packllm import weights as W
from langchain_packllm.alignment import MinEDMap
from langchain_packllm.bytealign import (
    DEFAULT_EPSILON,
    MemberTextState,
    PrefixAligner,
    encode_text,
    prefix_logprobs,
    smooth_logprobs,
)
from langchain_packllm.engine import FusionEngine
from langchain_packllm.members import load_member
from langchain_packllm.testing import make_tiny_model, train_bytelevel_tokenizer, train_metaspace_tokenizer

logger = logging.getLogger("bench_alignment_quality")
LOG2 = math.log(2)


# ---------------------------------------------------------------------------------------------- data


def code_files() -> tuple[list[str], list[str]]:
    """Stdlib ``.py`` sources: (train, held-out), every 8th file held out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(encoding="utf-8", errors="ignore") for p in sorted(root.glob("*.py"))]
    return [t for i, t in enumerate(texts) if i % 8], [t for i, t in enumerate(texts) if i % 8 == 0]


def prose_topics() -> tuple[list[str], list[str]]:
    """The Python reference manual's topics (English prose): (train, held-out), every 8th held out."""
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)]
    return [t for i, t in enumerate(texts) if i % 8], [t for i, t in enumerate(texts) if i % 8 == 0]


def chunks(texts: list[str], chars: int, n: int, seed: int) -> list[str]:
    pieces = [t[i : i + chars] for t in texts for i in range(0, len(t) - chars, chars)]
    pieces = [p for p in pieces if p.strip()]
    random.Random(seed).shuffle(pieces)
    return pieces[:n]


# ---------------------------------------------------------------------------------------------- experts


def train_expert(arch: str, tokenizer, text: str, steps: int, seed: int, seq: int = 128, batch: int = 16):
    """A tiny causal LM (``make_tiny_model``) trained with AdamW on random windows of ``text``."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    model = make_tiny_model(arch, tokenizer, seed=seed, init_scale=0.02).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    start = tokenizer.bos_token_id
    for step in range(steps):
        offsets = torch.randint(0, len(ids) - seq, (batch,), generator=gen)
        x = torch.stack([ids[o : o + seq] for o in offsets.tolist()])
        x = torch.cat([torch.full((batch, 1), start), x], dim=1)  # (B, 1 + seq): start token first
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            logger.info("%s step %d loss %.3f", arch, step, float(loss))
    return model.eval()


def build_experts(workdir: Path, steps: int) -> list[str]:
    code_train, _ = code_files()
    prose_train, _ = prose_topics()
    code_text, prose_text = "\n".join(code_train)[:1_500_000], "\n".join(prose_train)
    specs = [
        ("code", "gpt2", lambda: train_bytelevel_tokenizer(code_text, 512), code_text),
        ("prose", "llama", lambda: train_metaspace_tokenizer(prose_text, 400), prose_text),
    ]
    paths = []
    for i, (name, arch, make_tok, text) in enumerate(specs):
        path = workdir / f"{name}-{arch}-{steps}"
        if not (path / "config.json").exists():
            started = time.perf_counter()
            tok = make_tok()
            model = train_expert(arch, tok, text, steps, seed=i)
            model.save_pretrained(path)
            tok.save_pretrained(path)
            logger.info("trained %s in %.0f s", path.name, time.perf_counter() - started)
        paths.append(str(path))
    return paths


# ---------------------------------------------------------------------------------------------- scoring


def own_logprobs(member, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits = member.model(input_ids=torch.tensor([ids])).logits[0, :, : len(member.tokenizer)]
    return torch.log_softmax(logits.double(), -1)  # (n, V)


def common_split(encs, n_bytes: int) -> int | None:
    """The first text byte >= 20% of the chunk where every tokenizer starts a token."""
    starts = [{s - len(e.lead) for s in e.starts[e.n_special :]} for e in encs]
    for c in range(max(1, n_bytes // 5), n_bytes - n_bytes // 4):
        if all(c in s for s in starts):
            return c
    return None


def fused_nll(w: torch.Tensor, lp: torch.Tensor, targets: torch.Tensor) -> float:
    """NLL (nats) of ``targets`` ``(T,)`` under Eq. 1 with weights ``w`` ``(K,)`` over ``lp`` ``(K, T, V)``."""
    fused = torch.log_softmax(torch.einsum("k,ktv->tv", w.to(lp), lp), dim=-1)
    return -float(fused.gather(-1, targets[:, None]).sum())


def causal_rows(members, aligners, ref: int, ref_enc, c_ref: int, use_prior: bool) -> list[torch.Tensor]:
    """Each member's (T_rest, V_ref) rows for the reference tokens from index ``c_ref`` on, from the
    decoding path: the reference reads its own ids; the others follow the text with MemberTextState
    (with the reference's own row as the prior when ``use_prior``)."""
    ref_rows = own_logprobs(members[ref], ref_enc.ids)  # (n_ref, V_ref)
    out = []
    for k, m in enumerate(members):
        if k == ref:
            out.append(ref_rows[c_ref - 1 : -1])
            continue
        prior = (lambda j: ref_rows[j : j + 1]) if use_prior else (lambda j: None)
        state = MemberTextState(m.model, m.tokenizer, aligners[k])
        prompt = ref_enc.stream[len(ref_enc.lead) : ref_enc.starts[c_ref]].decode("utf-8")
        rows = [state.start(prompt, prior(c_ref - 1))[0]]
        for j in range(c_ref, len(ref_enc.ids) - 1):
            rows.append(state.append(aligners[k].reference.surfaces[ref_enc.ids[j]], prior(j))[0])
        out.append(torch.stack(rows).double())
    return out


def run(args) -> dict:
    workdir = Path(args.workdir)
    paths = build_experts(workdir, args.steps)
    members = [
        load_member(p, name=n, device="cpu", torch_dtype="float32") for p, n in zip(paths, ["code", "prose"])
    ]
    names = [m.name for m in members]
    K = len(members)
    engine = FusionEngine(members, alignment="mined")
    aligners = {
        (k, r): PrefixAligner(members[k].tokenizer, members[r].tokenizer) for k in range(K) for r in range(K)
    }
    mined = {
        (r, k): MinEDMap.from_tokenizers(members[r].tokenizer, members[k].tokenizer)
        for r in range(K)
        for k in range(K)
        if r != k
    }
    domains = {"code": code_files()[1], "prose": prose_topics()[1]}
    eps_sweep = sorted({args.eps, 1e-1, 1e-2, 1e-3, 1e-4, 1e-6, 1e-10}, reverse=True)

    nll: dict[str, dict[str, float]] = {}
    nbytes: dict[str, int] = {}
    extra: dict = {"refs": {}, "mined_mass_distinct": [], "mined_mass_read": []}
    for tag in ("prefix", "prefix+prior"):
        extra[f"{tag} mass"], extra[f"{tag} unreached"] = [], []

    def add(row: str, domain: str, value: float) -> None:
        nll.setdefault(row, {}).setdefault(domain, 0.0)
        nll[row][domain] += value

    started = time.perf_counter()
    for domain, texts in domains.items():
        nbytes[domain] = 0
        for doc in chunks(texts, args.chars, args.docs, seed=1):
            encs = [encode_text(m.tokenizer, doc) for m in members]
            if max(len(e.ids) for e in encs) > 250:
                continue
            data = doc.encode("utf-8")
            c = common_split(encs, len(data))
            if c is None:
                continue
            n_rest = len(data) - c
            nbytes[domain] += n_rest
            own = [own_logprobs(m, e.ids) for m, e in zip(members, encs)]
            # each expert alone; and its bits per byte on the prompt (the reference rule)
            prompt_bpb = []
            for k, (e, lp) in enumerate(zip(encs, own)):
                tgt = torch.tensor(e.ids[1:])
                tok_nll = -lp[:-1].gather(-1, tgt[:, None])[:, 0]  # (n-1,)
                text_starts = torch.tensor(e.starts[e.n_special :]) - len(e.lead)
                add(names[k], domain, float(tok_nll[text_starts >= c].sum()))
                prompt_bpb.append(float(tok_nll[text_starts < c].sum()) / c)
            ref = min(range(K), key=prompt_bpb.__getitem__)
            extra["refs"][names[ref]] = extra["refs"].get(names[ref], 0) + 1
            r_enc = encs[ref]
            r_starts = [s - len(r_enc.lead) for s in r_enc.starts[r_enc.n_special :]]
            c_tok = r_starts.index(c)  # reference text token index where the rest begins
            targets = torch.tensor(r_enc.ids[r_enc.n_special :])  # (T_ref,)
            p_y, r_y = targets[:c_tok], targets[c_tok:]

            # MinED, through the engine (reference ids, MinED-mapped inputs, logits gathered back)
            lp_list, _, _, _ = engine.member_logprobs([r_enc.ids], reference=engine.reference(ref))
            lp_m = torch.stack([x[0, :-1] for x in lp_list]).double()  # (K, T_ref, V_ref)
            for k in range(K):
                if k == ref:
                    continue
                src = mined[(ref, k)]
                inp = src.map_ids(torch.tensor(r_enc.ids))
                p = own_logprobs(members[k], inp.tolist())[:-1].exp()  # (T_ref, V_k): member on mapped ids
                extra["mined_mass_distinct"].append(
                    float(p[:, torch.unique(torch.as_tensor(src.ids))].sum(-1).mean())
                )
                extra["mined_mass_read"].append(float(p[:, torch.as_tensor(src.ids)].sum(-1).mean()))

            # prefix alignment, one forward per member over its own tokens; with and without the prior
            prior = own[ref][r_enc.n_special - 1 : -1]  # (T_ref, V_ref): the reference's own rows
            for tag, use_prior in (("prefix", False), ("prefix+prior", True)):
                raw = torch.stack(
                    [
                        prefix_logprobs(
                            aligners[(k, ref)], r_enc, encs[k], own[k], prior if use_prior else None
                        )
                        for k in range(K)
                    ]
                )  # (K, T_ref, V_ref)
                for k in range(K):
                    if k != ref:
                        extra[f"{tag} mass"].append(float(raw[k].exp().sum(-1).mean()))
                        hit = raw[k, c_tok:].gather(-1, r_y[:, None])
                        extra[f"{tag} unreached"].append(float(torch.isinf(hit).double().mean()))
                # the decoding path (causal): from the reference's first token that starts after the text's
                # first byte on, every row comes from MemberTextState; the 1-2 rows before it from `raw`
                text_starts = [st - len(r_enc.lead) for st in r_enc.starts]
                j0 = next(j for j in range(r_enc.n_special, len(r_enc.ids)) if text_starts[j] >= 1)
                causal = causal_rows(
                    members, {k: aligners[(k, ref)] for k in range(K)}, ref, r_enc, j0, use_prior
                )
                causal = torch.cat(
                    [raw[:, : j0 - r_enc.n_special], torch.stack(causal)], dim=1
                )  # (K, T_ref, V)
                for eps in eps_sweep if not use_prior else [args.eps]:
                    lp_p = smooth_logprobs(raw, eps)
                    w = W.solve("optimal", lp_p[:, :c_tok], p_y)
                    if eps != args.eps:
                        add(f"{tag} optimal eps={eps:g}", domain, fused_nll(w, lp_p[:, c_tok:], r_y))
                        continue
                    lp_c = smooth_logprobs(causal, eps)
                    w_c = W.solve("optimal", lp_c[:, :c_tok], p_y)
                    add(f"{tag} one-forward optimal", domain, fused_nll(w, lp_p[:, c_tok:], r_y))
                    add(f"{tag} one-forward uniform", domain, fused_nll(W.uniform(K), lp_p[:, c_tok:], r_y))
                    add(f"{tag} causal optimal", domain, fused_nll(w_c, lp_c[:, c_tok:], r_y))
                    add(f"{tag} causal uniform", domain, fused_nll(W.uniform(K), lp_c[:, c_tok:], r_y))
                    add(f"{tag} causal, one-forward weights", domain, fused_nll(w, lp_c[:, c_tok:], r_y))
            w = W.solve("optimal", lp_m[:, :c_tok], p_y)
            add("mined optimal", domain, fused_nll(w, lp_m[:, c_tok:], r_y))
            add("mined uniform", domain, fused_nll(W.uniform(K), lp_m[:, c_tok:], r_y))
            add("reference alone", domain, -float(lp_m[ref, c_tok:].gather(-1, r_y[:, None]).sum()))
        logger.info("%s done (%.0f s)", domain, time.perf_counter() - started)

    bpb = {row: {d: v / nbytes[d] / LOG2 for d, v in per.items()} for row, per in nll.items()}
    for row in bpb:
        bpb[row]["average"] = sum(bpb[row][d] for d in domains) / len(domains)
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    return {
        "bits_per_byte": bpb,
        "bytes_scored": nbytes,
        "references_chosen": extra["refs"],
        "mined_mass_distinct_ids": mean(extra["mined_mass_distinct"]),
        "mined_mass_read_with_duplicates": mean(extra["mined_mass_read"]),
        "prefix_mass": mean(extra["prefix mass"]),
        "prefix_prior_mass": mean(extra["prefix+prior mass"]),
        "prefix_targets_unreached": mean(extra["prefix unreached"]),
        "prefix_prior_targets_unreached": mean(extra["prefix+prior unreached"]),
        "settings": vars(args),
        "seconds": time.perf_counter() - started,
    }


def markdown(result: dict) -> str:
    bpb = result["bits_per_byte"]
    domains = [d for d in next(iter(bpb.values())) if d != "average"]
    lines = ["| method | " + " | ".join(domains) + " | average |", "|---" * (len(domains) + 2) + "|"]
    for row, per in bpb.items():
        lines.append(f"| {row} | " + " | ".join(f"{per[d]:.3f}" for d in [*domains, "average"]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="AdamW steps per expert")
    parser.add_argument("--docs", type=int, default=30, help="held-out chunks per domain")
    parser.add_argument("--chars", type=int, default=400, help="characters per chunk")
    parser.add_argument("--eps", type=float, default=DEFAULT_EPSILON, help="smoothing of mapped members")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "packllm-bench-quality"))
    parser.add_argument("--out", default=None, help="write the JSON result here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(int(os.environ.get("TORCH_NUM_THREADS", "2")))
    result = run(args)
    print(markdown(result))
    print(json.dumps({k: v for k, v in result.items() if k != "bits_per_byte"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
