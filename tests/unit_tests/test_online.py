"""Weights that follow the text (``reweight_every``) against a naive decoder written plainly here: every
member re-run on the whole sequence at every step, each position's second-order model of Eq. 3 kept in a
list, and the quadratic minimised over the simplex by trying every support (no active set, no warm start).
"""

from __future__ import annotations

import pytest
import torch

from langchain_packllm import ChatPackLLM, FusionEngine, PackLLM, SamplingConfig, WeightingConfig
from langchain_packllm import weights as W
from langchain_packllm.alignment import MinEDMap
from langchain_packllm.members import load_member
from langchain_packllm.online import OnlineWeights
from tests.naive import mined_cols, quadratic, simplex_qp_by_supports

PROMPTS = ["def main(argv):\n    return", "import os\nimport sys\n", "The value of x is"]


@pytest.fixture(scope="module")
def members64(tiny_paths):
    return [load_member(p, torch_dtype="float64", device="cpu") for p in tiny_paths]


# ---------------------------------------------------------------------------------------------- naive


_MAPS: dict = {}


def _mined(src, dst) -> MinEDMap:
    key = (id(src), id(dst))
    if key not in _MAPS:
        _MAPS[key] = MinEDMap.from_tokenizers(src, dst)
    return _MAPS[key]


def member_logprobs(members, ref: int, ids: list[int]) -> torch.Tensor:
    """``(K, L, V_ref)``: every member's log-probs over the reference vocabulary at every position of the
    reference ids (a member of another vocabulary reads them through MinED and is gathered back)."""
    ref_tok = members[ref].tokenizer
    out = []
    with torch.no_grad():
        for m in members:
            if m.tokenizer.get_vocab() == ref_tok.get_vocab():
                logits = m.model(input_ids=torch.tensor([ids])).logits[0].double()[:, : len(ref_tok)]
            else:
                mined = _mined(ref_tok, m.tokenizer)
                inp = [int(mined.ids[i]) for i in ids]
                logits = mined_cols(m.model(input_ids=torch.tensor([inp])).logits[0].double(), mined)
            out.append(torch.log_softmax(logits, -1))
    return torch.stack(out)


def naive_online_greedy(members, ref: int, prompt: str, n: int, every: int):
    """Greedy decoding with the weights re-solved every ``every`` tokens on the prompt and the text since:
    the prompt's weights by ``weights.solve``; then each position's quadratic, expanded at the weights it
    was read with, minimised over the simplex. Returns the tokens and the weights in use at each token."""
    tok = members[ref].tokenizer
    ids = list(tok(prompt)["input_ids"])
    lp = member_logprobs(members, ref, ids)
    y = torch.tensor(ids[1:])
    w = W.solve("optimal", lp[:, :-1], y)
    terms = []
    for i in range(len(ids) - 1):
        f, g, H = quadratic(lp[:, i], ids[i + 1], w)
        terms.append((f, g, H, w))
    out, used = [], []
    for t in range(n):
        last = member_logprobs(members, ref, ids)[:, -1]  # (K, V)
        nxt = int(torch.argmax(w @ last))
        used.append(w)
        if nxt == tok.eos_token_id:
            break
        f, g, H = quadratic(last, nxt, w)
        terms.append((f, g, H, w))
        out.append(nxt)
        ids.append(nxt)
        if (t + 1) % every == 0:
            w = simplex_qp_by_supports(terms)
    return out, used


# ---------------------------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("every", [1, 3])
def test_online_greedy_equals_naive_decoder_shared_vocabulary(members64, every: int) -> None:
    engine = FusionEngine(members64)
    config = WeightingConfig("optimal", reweight_every=every)
    for prompt in PROMPTS:
        out = engine.generate([prompt], config, SamplingConfig(max_new_tokens=10))[0]
        want, used = naive_online_greedy(members64, 0, prompt, 10, every)
        assert out.token_ids == want, prompt
        traj = out.report.trajectory
        prompt_len = out.report.prompt_tokens
        assert traj[0][0] == prompt_len
        assert list(traj[0][1].values()) == pytest.approx(list(out.report.weights.values()))
        for position, weights in traj:  # the weights in use from each position on are the naive ones
            t = position - prompt_len
            if t < len(used):
                assert list(weights.values()) == pytest.approx(used[t].tolist(), abs=1e-6), (prompt, t)
        assert [p for p, _ in traj] == [prompt_len + t for t in range(0, len(want), every)][: len(traj)]


@pytest.mark.parametrize("ref", [0, 1])
def test_online_greedy_equals_naive_decoder_mined_reference_not_first(mixed64, ref: int) -> None:
    engine = FusionEngine(mixed64)
    assert engine.alignment == "mined"
    config = WeightingConfig("optimal", reweight_every=2)
    for prompt in PROMPTS:
        out = engine.generate(
            [prompt], config, SamplingConfig(max_new_tokens=8), reference=engine.reference(ref)
        )[0]
        want, _ = naive_online_greedy(mixed64, ref, prompt, 8, 2)
        assert out.token_ids == want, (ref, prompt)
        assert len(out.report.trajectory) > 1


@pytest.mark.parametrize("alignment", ["none", "mined", "prefix"])
def test_online_longer_than_the_text_equals_prompt_only_exactly(members64, mixed64, alignment) -> None:
    members = members64 if alignment == "none" else mixed64
    engine = FusionEngine(members, alignment=alignment)
    sampling = SamplingConfig(max_new_tokens=8)
    for prompt in PROMPTS:
        ref = engine.reference(len(members) - 1)  # the reference member is not the first
        plain = engine.generate([prompt], WeightingConfig("optimal"), sampling, reference=ref)[0]
        online = engine.generate(
            [prompt], WeightingConfig("optimal", reweight_every=9), sampling, reference=ref
        )[0]
        assert online.token_ids == plain.token_ids and online.text == plain.text
        assert online.report.weights == plain.report.weights
        assert [p for p, _ in online.report.trajectory] == [plain.report.prompt_tokens]
        assert plain.report.trajectory is None


@pytest.mark.parametrize("alignment", ["none", "mined", "prefix"])
@pytest.mark.parametrize("weighting", ["optimal", "sim", "top1"])
def test_online_stream_equals_invoke_and_weights_move(members64, mixed64, alignment, weighting) -> None:
    members = members64 if alignment == "none" else mixed64
    engine = FusionEngine(members, alignment=alignment)
    config = WeightingConfig(weighting, reweight_every=2)
    sampling = SamplingConfig(max_new_tokens=10)
    moved = False
    for prompt in PROMPTS:
        ref = engine.reference(len(members) - 1)
        out = engine.generate([prompt], config, sampling, reference=ref)[0]
        chunks = list(engine.stream(prompt, config, sampling, reference=ref))
        assert "".join(c.text for c in chunks) == out.text
        last = chunks[-1].output
        assert last.token_ids == out.token_ids and last.report.trajectory == out.report.trajectory
        traj = out.report.trajectory
        assert len(traj) == 1 + (len(out.token_ids) - 1) // 2 or out.finish_reason == "stop"
        for _, weights in traj:
            assert sum(weights.values()) == pytest.approx(1.0) and min(weights.values()) >= 0
        moved |= any(t[1] != traj[0][1] for t in traj)
    if weighting != "top1":  # top1 may rightly keep its member
        assert moved  # the weights do follow the text somewhere


def test_online_batch_equals_one_by_one(members64) -> None:
    engine = FusionEngine(members64)
    config = WeightingConfig("optimal", reweight_every=3)
    sampling = SamplingConfig(max_new_tokens=10)
    batch = engine.generate(PROMPTS, config, sampling)
    for prompt, out in zip(PROMPTS, batch):
        alone = engine.generate([prompt], config, sampling)[0]
        assert out.token_ids == alone.token_ids
        assert len(out.report.trajectory) == len(alone.report.trajectory)
        for (p, a), (q, b) in zip(out.report.trajectory, alone.report.trajectory):
            assert p == q and list(a.values()) == pytest.approx(list(b.values()), abs=1e-6)


def naive_scheduled_greedy(members, ref: int, prompt: str, n: int, schedule):
    """Greedy decoding with given weights: ``schedule`` lists ``(position, weights)``, the weights in use from
    that token position on. Also returns, at each scheduled position after the first, every member's
    perplexity on the text before it (what a ``top1`` re-solve there reads)."""
    tok = members[ref].tokenizer
    ids = list(tok(prompt)["input_ids"])
    out, ppls = [], []
    for _ in range(n):
        w = torch.tensor([v for p, v in schedule if p <= len(ids)][-1], dtype=torch.float64)
        lp = member_logprobs(members, ref, ids)  # (K, L, V)
        if any(p == len(ids) for p, _ in schedule[1:]):
            nll = -lp[:, :-1].gather(-1, torch.tensor(ids[1:]).expand(len(members), -1)[..., None])
            ppls.append(torch.exp(nll.mean((1, 2))))
        nxt = int(torch.argmax(w @ lp[:, -1]))
        if nxt == tok.eos_token_id:
            break
        out.append(nxt)
        ids.append(nxt)
    return out, ppls


@pytest.mark.parametrize("alignment", ["none", "mined"])
def test_zero_weight_members_skip_steps_and_catch_up_in_one_forward(
    members64, mixed64, alignment, monkeypatch
) -> None:
    """A member at weight 0 in every row skips its decode steps and, before each re-solve, reads the ids it
    missed in one forward. Here every solve puts all weight on the member that predicts the text worst (a
    member left behind regains weight once the text is not its own): the tokens equal the naive decoder's (full forwards, every member,
    every step) on a padded batch with the reference not first, and each re-solve reads the perplexities
    of the text so far, the skipped members' included."""
    members = members64 if alignment == "none" else mixed64
    K, every, n = len(members), 3, 12
    seen: list[torch.Tensor] = []

    def worst(ppl: torch.Tensor) -> torch.Tensor:  # top1 turned round: weight moves at most solves
        seen.append(ppl.clone())
        w = torch.zeros(K, dtype=torch.float64)
        w[int(torch.argmax(ppl))] = 1.0
        return w

    monkeypatch.setattr(W, "top1", worst)
    engine = FusionEngine(members, alignment=alignment)
    ref = engine.reference(K - 1)
    reads: dict[int, list[int]] = {k: [] for k in range(K)}
    original = engine.scorer.read

    def counting(ref_, ids, mask, positions, caches, active, views=None):
        for k in active:
            reads[k].append(ids.shape[1])
        return original(ref_, ids, mask, positions, caches, active, views)

    engine.scorer.read = counting
    config, sampling = WeightingConfig("top1", reweight_every=every), SamplingConfig(max_new_tokens=n)
    outs = engine.generate(PROMPTS, config, sampling, reference=ref)
    moves = 0
    for prompt, out in zip(PROMPTS, outs):
        schedule = [(p, list(w.values())) for p, w in out.report.trajectory]
        moves += sum(a[1] != b[1] for a, b in zip(schedule, schedule[1:]))
        want, _ = naive_scheduled_greedy(members, K - 1, prompt, n, schedule)
        assert out.token_ids == want, prompt
    assert moves >= 2, "the weights never moved: the test does not exercise a member regaining weight"
    steps = max(len(o.token_ids) for o in outs) - 1  # decode advances after the first token
    assert all(sum(sizes) <= steps for sizes in reads.values())  # no id read twice
    caught_up = 0
    for prompt in PROMPTS:  # one row: the re-solves' perplexities against the naive ones
        seen.clear()
        reads = {k: [] for k in range(K)}
        out = engine.generate([prompt], config, sampling, reference=ref)[0]
        assert all(sum(sizes) <= len(out.token_ids) - 1 for sizes in reads.values())
        caught_up += sum(s > 1 for sizes in reads.values() for s in sizes)
        schedule = [(p, list(w.values())) for p, w in out.report.trajectory]
        _, ppls = naive_scheduled_greedy(members, K - 1, prompt, n, schedule)
        online = seen[-len(ppls) :] if ppls else []
        assert len(ppls) == len(schedule) - 1
        for got, want in zip(online, ppls):
            assert got.tolist() == pytest.approx(want.tolist(), rel=1e-6)
    assert caught_up >= 2, "no member caught up"


# ---------------------------------------------------------------------------------------------- scoring


def test_scoring_is_causal_and_equals_the_naive_schedule(members64) -> None:
    """Changing a later token changes no earlier token's score; each block of ``every`` tokens is scored
    with the weights the naive decoder would use there."""
    engine = FusionEngine(members64)
    text = "import os\nimport sys\n\ndef main(argv):\n    return argv[0]\n"
    ids = engine.encode(text)
    pre = engine.score([ids])
    scores = pre.scores[:, 0].double()  # (K, L, V)
    engine.scorer.recycle(pre.scores)
    y = torch.tensor(ids[1:])
    n_ctx, every = 6, 4
    sol = W.solve_with_stats("optimal", scores[:, : n_ctx - 1], y[: n_ctx - 1])

    def run(targets):  # the fused distributions (C, V) at every position of the continuation
        online = OnlineWeights.start("optimal", every, [sol], [n_ctx - 1], [n_ctx])
        return online.fused_logprobs(scores[:, n_ctx - 1 : -1], targets)

    cont = y[n_ctx - 1 :]
    dist = run(cont)
    for j in (3, 7, 10):
        changed = cont.clone()
        changed[j] = (changed[j] + 1) % scores.shape[-1]
        other = run(changed)
        solved_after = (j // every + 1) * every  # the first position whose weights saw token j
        assert torch.equal(other[:solved_after], dist[:solved_after]), j
        assert not torch.equal(other[solved_after:], dist[solved_after:]), j
    base = dist.gather(-1, cont[:, None])[:, 0]
    # the naive schedule: weights re-solved on every position so far, every `every` tokens
    lp = torch.log_softmax(scores, -1)
    w = sol.weights
    terms = [(*quadratic(lp[:, i], int(y[i]), w), w) for i in range(n_ctx - 1)]
    for c in range(len(cont)):
        i = n_ctx - 1 + c
        want = float(torch.log_softmax(w @ scores[:, i], -1)[y[i]])
        assert float(base[c]) == pytest.approx(want, abs=1e-6), c
        terms.append((*quadratic(lp[:, i], int(y[i]), w), w))
        if (c + 1) % every == 0:
            w = simplex_qp_by_supports(terms)


@pytest.mark.parametrize("alignment", ["none", "mined"])
def test_loglikelihood_online(members64, mixed64, alignment) -> None:
    members = members64 if alignment == "none" else mixed64
    engine = FusionEngine(members, alignment=alignment)
    context, cont = "import os\nimport", " sys\nimport re\nimport json\n"
    plain = engine.loglikelihood([(context, cont)])[0]
    long = engine.loglikelihood([(context, cont)], WeightingConfig("optimal", reweight_every=100))[0]
    assert long.logprob == plain.logprob and long.report.weights == plain.report.weights
    online = engine.loglikelihood([(context, cont)], WeightingConfig("optimal", reweight_every=2))[0]
    assert online.logprob != plain.logprob and online.logprob < 0
    assert len(online.report.trajectory) > 1


def test_scoring_the_decoded_text_follows_the_same_weights(members64) -> None:
    """The decoder's own tokens, scored with the same setting, are each the argmax of the fused scores,
    and the weight trajectory is the decoder's."""
    engine = FusionEngine(members64)
    every = 2
    for prompt in PROMPTS:
        out = engine.generate(
            [prompt], WeightingConfig("optimal", reweight_every=every), SamplingConfig(max_new_tokens=12)
        )[0]
        ids = engine.encode(prompt)
        pre = engine.score([ids + out.token_ids])
        scores, n = pre.scores[:, 0], len(ids)
        y = torch.tensor(ids + out.token_ids)
        sol = W.solve_with_stats("optimal", scores[:, : n - 1], y[1:n])
        online = OnlineWeights.start("optimal", every, [sol], [n - 1], [n])
        gen = y[n:]
        fused = online.fused_logprobs(scores[:, n - 1 : -1], gen)
        engine.scorer.recycle(pre.scores)
        assert fused.argmax(-1).tolist() == out.token_ids, prompt
        assert [p for p, _ in out.report.trajectory] == [p for p, _ in online.trajectory[0]][
            : len(out.report.trajectory)
        ]
        for (_, a), (_, b) in zip(out.report.trajectory, online.trajectory[0]):
            assert list(a.values()) == pytest.approx(b, abs=1e-6)


# ---------------------------------------------------------------------------------------------- settings


def test_settings_are_checked_and_travel_per_call(tiny_paths) -> None:
    with pytest.raises(ValueError, match="reweight_every"):
        WeightingConfig("uniform", reweight_every=4)
    with pytest.raises(ValueError, match="reweight_every"):
        WeightingConfig("optimal", reweight_every=0)
    with pytest.raises(TypeError, match="reweight_every"):
        WeightingConfig("optimal", reweight_every=2.5)
    with pytest.raises(ValueError, match="reweight_every"):
        PackLLM.from_model_ids(tiny_paths, device="cpu", weighting="greedy", reweight_every=4)
    llm = PackLLM.from_model_ids(tiny_paths, device="cpu", max_new_tokens=6)
    info = llm.generate(["import os"], reweight_every=2).generations[0][0].generation_info
    assert len(info["trajectory"]) >= 2
    assert llm.generate(["import os"]).generations[0][0].generation_info["trajectory"] is None
    report = llm.fusion_report("import os", reweight_every=2)
    assert report.trajectory == ((report.prompt_tokens, report.weights),)
    chat = ChatPackLLM.from_model_ids(tiny_paths, device="cpu", max_new_tokens=6, reweight_every=2)
    msg = chat.invoke("hello")
    assert len(msg.response_metadata["trajectory"]) >= 2


@pytest.mark.parametrize("weighting", ["optimal", "sim"])
def test_held_steps_give_the_same_statistics_in_any_block_size(weighting, monkeypatch) -> None:
    """flush gathers the held steps' scores block by block (bounded temporaries): blocks of 3 positions
    that cut across steps and rows give the statistics of one block holding every position."""
    import langchain_packllm.online as online_mod

    K, B, V, steps = 3, 4, 50, 5
    gen = torch.Generator().manual_seed(0)
    pushed = [
        ([torch.randn(B, V, generator=gen) * 3 for _ in range(K)], torch.randint(0, V, (B,), generator=gen))
        for _ in range(steps)
    ]
    rows_at = [[0, 1, 2, 3], [0, 2, 3], [1, 3], [0, 1, 2, 3], [2]]  # rows that read each step

    def run(block_elements: int) -> OnlineWeights:
        monkeypatch.setattr(online_mod, "_CPU_BLOCK_ELEMENTS", block_elements)
        w = torch.softmax(torch.randn(B, K, generator=torch.Generator().manual_seed(1)), -1)
        zeros = torch.zeros(B, K, dtype=torch.float64)
        state = OnlineWeights(weighting, 8, w, [4] * B, zeros, zeros, torch.zeros(B, K, K), [10] * B)
        for (scores, targets), rows in zip(pushed, rows_at):
            state.push(scores, targets, rows)
        state.flush()
        return state

    small, large = run(3 * K * V), run(1 << 22)
    for name in ("linear", "hess", "nll"):
        # the moments are computed in the scores' float32 (batched products of another batch count round
        # differently: 7.6e-6 on Hessian entries of 20-30, 4 float32 ulps, on one 2-core host), summed in float64
        assert torch.allclose(getattr(small, name), getattr(large, name), rtol=1e-5, atol=1e-5), name
    assert small.counts == large.counts == [4 + sum(b in r for r in rows_at) for b in range(B)]
    assert bool(getattr(large, "nll" if weighting == "sim" else "hess").abs().sum() > 0)
