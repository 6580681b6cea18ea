"""The evaluation harness against plain re-computations of the paper's protocol."""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import pytest
import torch

from langchain_packllm import FusionEngine
from langchain_packllm import weights as W
from langchain_packllm.lab.evaluation import (
    TfidfRouter,
    build_mc_questions,
    evaluate_lm,
    evaluate_mc,
    lm_prompt_length,
)
from langchain_packllm.members import load_member
from tests.naive import quadratic, simplex_qp_by_supports


@pytest.fixture(scope="module")
def engine(tiny_paths) -> FusionEngine:
    return FusionEngine([load_member(p, name=f"m{i}", device="cpu") for i, p in enumerate(tiny_paths)])


def stdlib_docs(pattern: str, n: int) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [p.read_text(errors="ignore")[:1500] for p in sorted(root.glob(pattern))[:n]]


def test_prompt_length_is_32_or_20_percent() -> None:
    assert lm_prompt_length(100) == 20
    assert lm_prompt_length(160) == 32
    assert lm_prompt_length(1000) == 32
    assert lm_prompt_length(9) == 1


def test_lm_eval_matches_plain_protocol(engine: FusionEngine) -> None:
    docs = {"code": stdlib_docs("a*.py", 2), "more": stdlib_docs("b*.py", 2)}
    result = evaluate_lm(engine, docs, methods=("uniform", "optimal", "greedy"), ks=(1, 3), progress=False)
    # plain: per document, prompt = min(32, 20%), perplexity on the rest, weights from the prompt
    for domain, texts in docs.items():
        nll = {"m0": 0.0, "uniform": 0.0, "optimal": 0.0}
        count = 0
        for text in texts:
            ids = engine.encode(text)[: engine.max_length]
            n_p = min(32, int(0.2 * len(ids)))
            x = torch.tensor([ids])
            with torch.no_grad():
                lp = torch.stack(
                    [
                        torch.log_softmax(m.model(input_ids=x).logits[0, :-1].float(), -1)
                        for m in engine.members
                    ]
                )
            y = x[0, 1:]
            rest = slice(n_p - 1, None)
            nll["m0"] -= float(lp[0, rest].gather(-1, y[rest, None]).double().sum())
            for method in ("uniform", "optimal"):
                w = W.solve(method, lp[:, : n_p - 1], y[: n_p - 1])
                fused = torch.log_softmax(torch.einsum("k,ktv->tv", w.float(), lp[:, rest]), -1)
                nll[method] -= float(fused.gather(-1, y[rest, None]).double().sum())
            count += len(ids) - n_p
        assert result.score(1, "m0", domain) == pytest.approx(math.exp(nll["m0"] / count), rel=1e-4)
        assert result.score(3, "uniform", domain) == pytest.approx(math.exp(nll["uniform"] / count), rel=1e-4)
        assert result.score(3, "optimal", domain) == pytest.approx(math.exp(nll["optimal"] / count), rel=1e-3)
    for domain in docs:  # mean weights of the full pack per domain: a point of the simplex
        assert sum(result.weights["optimal"][domain]) == pytest.approx(1.0)
        assert result.weights["uniform"][domain] == pytest.approx([1 / 3] * 3)
    table = result.markdown()
    assert "best-single" in table and "optimal" in table and "K=3" in table
    data = result.to_dict()
    assert data["average"]["3"]["best-single"] <= min(data["average"]["3"][m] for m in ("m0", "m1", "m2"))


def test_cbtm_router_prefers_the_matching_corpus() -> None:
    router = TfidfRouter(
        {
            "code": ["def f(x): return x", "import os\nclass A: pass"],
            "prose": ["the cat sat on the mat", "a dog ran"],
        }
    )
    w = router.weights("def g(y): import sys")
    assert float(w.sum()) == pytest.approx(1.0)
    assert w[0] > w[1]
    assert router.weights("the cat and the dog", ["prose", "code"])[0] > 0.5


def test_mc_questions_and_accuracy(engine: FusionEngine, tmp_path) -> None:
    docs = {"code": stdlib_docs("c*.py", 6)}
    qs = build_mc_questions(engine, docs, context_tokens=24, option_tokens=8)
    assert len(qs) == 6
    for q, text in zip(qs, docs["code"]):
        ids = engine.encode(text)
        assert q.context == ids[:24] and q.options[q.answer] == ids[24:32]
        assert len(q.options) == 4 and all(len(o) == 8 for o in q.options)
    result = evaluate_mc(
        engine, docs, methods=("uniform", "optimal", "cbtm"), ks=(1, 3), progress=False,
        expert_texts={n: ["def f(): pass"] for n in engine.names}, context_tokens=24, option_tokens=8,
    )  # fmt: skip
    for method in ("m0", "m1", "m2"):
        assert 0.0 <= result.score(1, method, "code") <= 1.0
    assert result.docs["code"] == 6
    result.plot(str(tmp_path / "mc.png"))
    assert (tmp_path / "mc.png").stat().st_size > 1000


def test_lm_eval_online_rows_match_plain_schedule(engine: FusionEngine) -> None:
    """``reweight_every=N``: the rest is scored N tokens at a time, each block with the weights minimising
    the prompt's and the scored text's quadratic models (naive support enumeration in tests/naive.py)."""
    every = 8
    docs = {"code": stdlib_docs("c*.py", 2)}
    result = evaluate_lm(
        engine, docs, methods=("optimal", "uniform"), ks=(3,), progress=False, reweight_every=every
    )
    assert "optimal@8" in result.nll[3] and "uniform@8" not in result.nll[3]
    nll, count = 0.0, 0
    for text in docs["code"]:
        ids = engine.encode(text)[: engine.max_length]
        n_p = min(32, int(0.2 * len(ids)))
        x = torch.tensor([ids])
        with torch.no_grad():
            lp = torch.stack(
                [torch.log_softmax(m.model(input_ids=x).logits[0, :-1].float(), -1) for m in engine.members]
            ).double()
        y = x[0, 1:]
        w = W.solve("optimal", lp[:, : n_p - 1], y[: n_p - 1])
        terms = [(*quadratic(lp[:, i], int(y[i]), w), w) for i in range(n_p - 1)]
        for c, i in enumerate(range(n_p - 1, len(ids) - 1)):
            nll -= float(torch.log_softmax(w @ lp[:, i], -1)[y[i]])
            terms.append((*quadratic(lp[:, i], int(y[i]), w), w))
            if (c + 1) % every == 0:
                w = simplex_qp_by_supports(terms)
        count += len(ids) - n_p
    assert result.score(3, "optimal@8", "code") == pytest.approx(math.exp(nll / count), rel=1e-3)
    assert "optimal@8" in result.markdown().split("by number of experts")[1]
