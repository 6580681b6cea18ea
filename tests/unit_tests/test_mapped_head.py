"""A member read through a MinED map computes its logits on the member ids the map reads only
(``Scorer.mapped_head``): the same scores, tokens and log-likelihoods as its full logits gathered.

Packs of two tiny members with different tokenizers (a Metaspace BPE with byte fallback and a byte-level
BPE, float64), in both orders, each member the reference in turn, under ``alignment="mined"`` and
``"own-prompt"``: an engine with the mapped heads on (``mapped_head_max_fraction = 1``) against one with
them off (``0``: the member's whole output layer, gathered through the map). The feature matrix
(``test_plan_matrix.py``) runs one order with them on and the other off, against the naive decoders.
"""

from __future__ import annotations

import pytest
import torch

from langchain_packllm import FusionEngine, SamplingConfig, WeightingConfig
from langchain_packllm.scoring import LinearHead

PROMPTS = ["def main(argv):\n    return", "The value of x is"]
ORDERS = ("bl-first", "ms-first")  # mixed64 is [byte-level GPT-2, Metaspace Llama]


def engines(pack, mode: str) -> tuple[FusionEngine, FusionEngine]:
    on, off = FusionEngine(pack, alignment=mode), FusionEngine(pack, alignment=mode)
    on.scorer.mapped_head_max_fraction, off.scorer.mapped_head_max_fraction = 1.0, 0.0
    return on, off


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("ref", [0, 1])
def test_scores_equal_the_gathered_full_logits_and_only_mapped_members_get_a_head(mixed64, order, ref):
    pack = mixed64 if order == "bl-first" else mixed64[::-1]
    on, off = engines(pack, "mined")
    reference = on.reference(ref)
    ids = [reference.encode(p) for p in PROMPTS]  # two rows of different lengths: left-padded
    got, want = on.score(ids, reference), off.score(ids, off.reference(ref))
    torch.testing.assert_close(got.scores, want.scores, rtol=0, atol=1e-12)
    other = 1 - ref
    head = on.scorer.mapped_head(reference, other)
    assert head is not None and on.scorer.mapped_head(reference, ref) is None  # the reference reads itself
    assert off.scorer.mapped_head(off.reference(ref), other) is None
    token_map = reference.token_maps[other]
    full = on.scorer.linear_head(other).weight
    distinct = torch.unique(token_map.ids)
    assert torch.equal(distinct[head.columns], token_map.ids)  # each reference token's member id
    assert torch.equal(head.weight, full[distinct])  # the rows of those ids, and no other
    assert head.weight.shape[0] < full.shape[0]


@pytest.mark.parametrize("mode", ["mined", "own-prompt"])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("ref", [0, 1])
def test_decoding_and_loglikelihood_equal_the_gathered_full_logits(mixed64, mode, order, ref, monkeypatch):
    pack = mixed64 if order == "bl-first" else mixed64[::-1]
    on, off = engines(pack, mode)
    for engine in (on, off):  # every prompt picks member ``ref`` (the choice is per prompt)
        monkeypatch.setattr(
            engine.references,
            "choose_and_read",
            lambda text, read=None, e=engine: (e.reference(ref), None, None),
        )
    sampling = SamplingConfig(max_new_tokens=12)
    for weighting in (WeightingConfig([0.6, 0.4]), WeightingConfig("optimal", reweight_every=4)):
        a, b = on.generate(PROMPTS, weighting, sampling), off.generate(PROMPTS, weighting, sampling)
        assert [o.token_ids for o in a] == [o.token_ids for o in b]
        assert all(o.report.reference == pack[ref].name for o in a)
        for x, y in zip(a, b):
            assert x.report.weights == pytest.approx(y.report.weights, abs=1e-9)
    pairs = [(PROMPTS[0], " x + 1"), (PROMPTS[1], " 42.")]
    a = on.loglikelihood(pairs, WeightingConfig("optimal"))
    b = off.loglikelihood(pairs, WeightingConfig("optimal"))
    assert [r.logprob for r in a] == pytest.approx([r.logprob for r in b], abs=1e-9)
    assert on.scorer.mapped_head(on.reference(ref), 1 - ref) is not None


def test_the_fraction_decides_and_a_head_is_built_once(mixed64):
    engine = FusionEngine(mixed64)
    reference, k = engine.reference(0), 1
    distinct = torch.unique(reference.token_maps[k].ids).numel()
    fraction = distinct / engine.scorer.linear_head(k).weight.shape[0]
    engine.scorer.mapped_head_max_fraction = fraction * 0.999
    assert engine.scorer.mapped_head(reference, k) is None  # decided once: kept off for this map
    engine.scorer.mapped_head_max_fraction = 1.0
    assert engine.scorer.mapped_head(reference, k) is None
    fresh = FusionEngine(mixed64)
    fresh.scorer.mapped_head_max_fraction = fraction
    head = fresh.scorer.mapped_head(fresh.reference(0), k)
    assert head is not None and head is fresh.scorer.mapped_head(fresh.reference(0), k)


class _RejectsCache(torch.nn.Module):
    """A base model that takes no cache arguments: the mapped path must fall back to the model."""

    def __init__(self, base):
        super().__init__()
        self.inner = base

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        raise TypeError("forward() got an unexpected keyword argument 'past_key_values'")


def test_a_base_that_rejects_the_arguments_falls_back_to_the_models_own_logits(mixed64):
    on, off = engines(mixed64, "mined")
    reference, k = on.reference(0), 1
    head = on.scorer.linear_head(k)
    on.scorer._heads[k] = LinearHead(_RejectsCache(head.base), head.weight, head.bias)
    ids = [reference.encode(PROMPTS[0])]
    got = on.score(ids, reference).scores
    want = off.score(ids, off.reference(0)).scores
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert on.scorer.linear_head(k) is None and on.scorer.mapped_head(reference, k) is None
