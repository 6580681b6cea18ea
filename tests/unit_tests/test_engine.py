"""The engine against a naive fused decoder written plainly here: no cache, no padding, every member
re-run on the whole sequence at every step."""

from __future__ import annotations

import math
import os

import pytest
import torch

from langchain_packllm import FusionEngine, PackLLM, SamplingConfig, WeightingConfig
from langchain_packllm import weights as W
from langchain_packllm.members import load_member
from langchain_packllm.testing import ARCH_CONFIGS, make_tiny_model

# PACKLLM_TEST_DEVICE=cuda runs these comparisons with the members on a GPU (benchmarks/gpu_bench.sh).
DEVICE = os.environ.get("PACKLLM_TEST_DEVICE", "cpu")


@pytest.fixture(scope="module")
def members64(tiny_paths):
    return [load_member(p, torch_dtype="float64", device=DEVICE) for p in tiny_paths]


def naive_greedy(members, weights, prompt: str, max_new_tokens: int) -> list[int]:
    tok = members[0].tokenizer
    ids = list(tok(prompt)["input_ids"])
    eos = {tok.eos_token_id}
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            fused = 0
            for w, m in zip(weights, members):
                logits = m.model(input_ids=torch.tensor([ids], device=m.device)).logits[0, -1].double().cpu()
                fused = fused + w * torch.log_softmax(logits, -1)
            nxt = int(torch.argmax(fused))
            if nxt in eos:
                break
            out.append(nxt)
            ids.append(nxt)
    return out


NOT_LINEAR_HEADS = {"cohere", "gemma2"}  # something follows the output layer (see testing.ARCH_CONFIGS)


def own_logits(model, input_ids: torch.Tensor, mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The model's own logits over a left-padded batch, as the engine's prefill calls it."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits[
            ..., :vocab_size
        ]


PROMPTS = ["def main(argv):\n    return", "import os", 'class Parser(object):\n    """Parse the', "x"]


@pytest.mark.parametrize("K", [1, 2, 3])
def test_fixed_weight_greedy_equals_naive_decoder(members64, K: int) -> None:
    members = members64[:K]
    fixed = [1.0 / K] * K if K != 2 else [0.7, 0.3]
    engine = FusionEngine(members)
    outs = engine.generate(PROMPTS, WeightingConfig(weighting=fixed), SamplingConfig(max_new_tokens=12))
    for prompt, out in zip(PROMPTS, outs):
        assert len(out.token_ids) == 12 and out.finish_reason == "length"
        assert out.token_ids == naive_greedy(members, fixed, prompt, 12), prompt
        assert out.report.weights == pytest.approx(dict(zip(engine.names, fixed)))


def test_batch_equals_single_prompts_with_solved_weights(members64) -> None:
    engine = FusionEngine(members64)
    batch = engine.generate(PROMPTS, WeightingConfig("optimal"), SamplingConfig(max_new_tokens=10))
    for prompt, out in zip(PROMPTS, batch):
        alone = engine.generate([prompt], WeightingConfig("optimal"), SamplingConfig(max_new_tokens=10))[0]
        assert out.token_ids == alone.token_ids
        assert list(out.report.weights.values()) == pytest.approx(
            list(alone.report.weights.values()), abs=1e-6
        )
        w = list(out.report.weights.values())
        assert out.token_ids == naive_greedy(members64, w, prompt, 10)


def plain_prompt_logprobs(members, prompt):
    tok = members[0].tokenizer
    ids = torch.tensor([tok(prompt)["input_ids"]], device=members[0].device)
    with torch.no_grad():
        lp = torch.stack(
            [torch.log_softmax(m.model(input_ids=ids).logits[0, :-1].double(), -1).cpu() for m in members]
        )
    return lp, ids[0, 1:].cpu()


@pytest.mark.parametrize("weighting", ["optimal", "greedy", "grid", "sim", "uniform", "top1"])
def test_report_matches_plain_recomputation(members64, weighting: str) -> None:
    engine = FusionEngine(members64)
    prompt = PROMPTS[2]
    report = engine.report(prompt, WeightingConfig(weighting, tau=0.5, grid_step=0.1))
    lp, y = plain_prompt_logprobs(members64, prompt)
    expected = W.solve(weighting, lp, y, tau=0.5, grid_step=0.1)
    assert list(report.weights.values()) == pytest.approx(expected.tolist(), abs=1e-6)
    ppl = [math.exp(-float(lp[k].gather(-1, y[:, None]).mean())) for k in range(3)]
    assert list(report.perplexities.values()) == pytest.approx(ppl, rel=1e-9)
    assert report.order == [engine.names[i] for i in sorted(range(3), key=lambda k: ppl[k])]
    assert report.fused_perplexity == pytest.approx(math.exp(W.prompt_loss(expected, lp, y)), rel=1e-6)
    assert report.prompt_tokens == y.numel() + 1 and report.weighting == weighting and report.fallback is None
    if weighting == "optimal":
        for rival in ("grid", "greedy"):
            rival_ppl = engine.report(prompt, WeightingConfig(rival, grid_step=0.1)).fused_perplexity
            assert math.log(report.fused_perplexity) <= math.log(rival_ppl) + 1e-6


def test_short_prompts_fall_back_to_uniform(members64) -> None:
    engine = FusionEngine(members64)
    for prompt in ["", "x"]:
        assert len(engine.encode(prompt)) <= 1
        out = engine.generate([prompt], WeightingConfig("optimal"), SamplingConfig(max_new_tokens=3))[0]
        assert out.report.weights == pytest.approx({n: 1 / 3 for n in engine.names})
        assert out.report.fallback
        assert len(out.token_ids) <= 3


def test_sampling_is_seeded_and_uses_processors(members64) -> None:
    engine = FusionEngine(members64)
    cfg = SamplingConfig(
        max_new_tokens=8, temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.2, seed=7
    )
    a = engine.generate(PROMPTS, sampling=cfg)
    b = engine.generate(PROMPTS, sampling=cfg)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    c = engine.generate(PROMPTS, sampling=SamplingConfig(max_new_tokens=8, temperature=0.9, seed=8))
    assert [o.token_ids for o in a] != [o.token_ids for o in c]
    # top_k=1 sampling is greedy decoding
    k1 = engine.generate(PROMPTS, sampling=SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=1, seed=1))
    greedy = engine.generate(PROMPTS, sampling=SamplingConfig(max_new_tokens=8))
    assert [o.token_ids for o in k1] == [o.token_ids for o in greedy]


def test_stop_sequences_cut_output_and_stream_concatenates(members64) -> None:
    engine = FusionEngine(members64)
    full = engine.generate([PROMPTS[0]], sampling=SamplingConfig(max_new_tokens=20))[0]
    assert full.finish_reason == "length" and len(full.text) > 6
    stop = full.text[3:6]
    cut = engine.generate([PROMPTS[0]], sampling=SamplingConfig(max_new_tokens=20, stop=(stop,)))[0]
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.finish_reason == "stop"
    for cfg in (SamplingConfig(max_new_tokens=20), SamplingConfig(max_new_tokens=20, stop=(stop,))):
        chunks = list(engine.stream(PROMPTS[0], sampling=cfg))
        assert chunks[-1].output is not None
        expected = engine.generate([PROMPTS[0]], sampling=cfg)[0].text
        assert "".join(c.text for c in chunks) == expected
        for c in chunks:
            assert stop not in c.text or not cfg.stop


def test_safe_prefix_holds_back_partial_characters_and_stops() -> None:
    from langchain_packllm.engine import _safe_prefix_length

    assert _safe_prefix_length("abc\ufffd", ()) == 3
    assert _safe_prefix_length("hello wo", ("world",)) == 6
    assert _safe_prefix_length("hello", ("xyz",)) == 5


def test_max_new_tokens_zero_and_long_prompt(members64) -> None:
    engine = FusionEngine(members64)
    out = engine.generate(["import os"], sampling=SamplingConfig(max_new_tokens=0))[0]
    assert out.text == "" and out.token_ids == [] and out.report.prompt_tokens > 1
    long_prompt = "x = 1\n" * 300
    with pytest.warns(UserWarning, match="keeping its last"):
        out = engine.generate([long_prompt], sampling=SamplingConfig(max_new_tokens=4))[0]
    assert out.report.truncated and out.report.prompt_tokens == engine.max_length - 4
    assert len(out.token_ids) == 4
    # More new tokens than the context holds: the prompt keeps half, generation stops at the limit.
    ctx = engine.max_length
    with pytest.warns(UserWarning, match="keeping its last"):
        out = engine.generate([long_prompt], sampling=SamplingConfig(max_new_tokens=ctx))[0]
    assert out.report.prompt_tokens == ctx // 2 and out.finish_reason == "length"
    assert len(out.token_ids) <= ctx - ctx // 2
    short = engine.generate(["import os"], sampling=SamplingConfig(max_new_tokens=ctx))[0]
    assert short.finish_reason == "stop" or short.report.prompt_tokens + len(short.token_ids) == ctx


def test_loglikelihood_matches_plain_sum(members64) -> None:
    engine = FusionEngine(members64)
    context, continuation = "def main(argv):\n", "    return 0"
    res = engine.loglikelihood([(context, continuation)], WeightingConfig("optimal"))[0]
    tok = members64[0].tokenizer
    ctx = tok(context)["input_ids"]
    whole = tok(context + continuation)["input_ids"]
    assert whole[: len(ctx)] == ctx
    lp, y = plain_prompt_logprobs(members64, context + continuation)
    n = len(ctx)
    w = W.solve("optimal", lp[:, : n - 1], y[: n - 1])
    assert list(res.report.weights.values()) == pytest.approx(w.tolist(), abs=1e-6)
    fused = torch.log_softmax(torch.einsum("k,ktv->tv", w, lp[:, n - 1 :]), -1)
    expected = float(fused.gather(-1, y[n - 1 :, None]).sum())
    assert res.logprob == pytest.approx(expected, abs=1e-6)
    assert res.is_greedy == bool((fused.argmax(-1) == y[n - 1 :]).all())


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_nan_member_is_named(tiny_paths, temperature: float) -> None:
    bad = load_member(tiny_paths[1], name="broken", device="cpu")
    import copy

    broken = copy.deepcopy(bad.model)
    with torch.no_grad():
        broken.get_output_embeddings().weight.fill_(float("nan"))
    from langchain_packllm.members import Member

    engine = FusionEngine([load_member(tiny_paths[0], device="cpu"), Member("broken", broken, bad.tokenizer)])
    with pytest.raises(FloatingPointError, match="'broken'"):
        engine.generate(
            ["import os"], sampling=SamplingConfig(max_new_tokens=2, temperature=temperature, seed=0)
        )


def test_errors_are_clear(tiny_paths, tmp_path) -> None:
    with pytest.raises(ValueError, match="at least one member"):
        FusionEngine([])
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        PackLLM.from_model_ids([str(tmp_path / "does-not-exist")])
    with pytest.raises(ValueError, match="2 fixed weights for 3 members"):
        PackLLM.from_model_ids(tiny_paths, weighting=[0.5, 0.5])
    with pytest.raises(ValueError, match="Unknown weighting"):
        PackLLM.from_model_ids(tiny_paths, weighting="best")
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=-1)


def test_concurrent_device_groups_match_sequential(members64) -> None:
    """The multi-device path (one thread per device) forced on CPU gives the same tokens and weights."""
    from langchain_packllm.scoring import device_groups

    engine = FusionEngine(members64)
    assert not engine.scorer.threaded and device_groups(members64) == [[0, 1, 2]]  # CPU only: no threads
    cfg = SamplingConfig(max_new_tokens=6)
    plain = engine.generate(PROMPTS, WeightingConfig("optimal"), cfg)
    threaded = FusionEngine(members64)
    threaded.scorer.use_device_groups([[2], [0], [1]])
    assert threaded.scorer.threaded
    outs = threaded.generate(PROMPTS, WeightingConfig("optimal"), cfg)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    for a, b in zip(outs, plain):
        assert list(a.report.weights.values()) == pytest.approx(list(b.report.weights.values()), abs=1e-12)
    res = threaded.loglikelihood([("import os", "\nimport sys")])[0]
    assert res.logprob == pytest.approx(engine.loglikelihood([("import os", "\nimport sys")])[0].logprob)


def test_device_groups_put_accelerators_first() -> None:
    from types import SimpleNamespace

    from langchain_packllm.scoring import device_groups

    fake = [SimpleNamespace(device=torch.device(d)) for d in ("cpu", "cuda:0", "cpu", "cuda:1", "cuda:0")]
    assert device_groups(fake) == [[1, 4], [3], [0, 2]]


def test_prefill_keeps_one_buffer_of_raw_logits(members64) -> None:
    """The solve reads raw logits from one (K, B, L, V) buffer: same weights as on log-probs, and the
    per-prompt slices are views of it (no per-member copy)."""
    engine = FusionEngine(members64)
    batch = [engine.encode(p) for p in PROMPTS[:3]]
    pre = engine.score(batch)
    scores, input_ids, last = pre.scores, pre.input_ids, pre.last
    K, B, L, V = scores.shape
    assert (K, B, L, V) == (3, 3, input_ids.shape[1], engine.vocab_size)
    row = scores[:, 1, L - len(batch[1]) : L - 1]
    assert row.reshape(K, -1).data_ptr() == row.data_ptr()  # flattening the row is a view, not a copy
    lp = torch.log_softmax(row, -1)
    y = input_ids[1, L - len(batch[1]) + 1 :]
    for name in ("optimal", "greedy", "sim"):
        assert W.solve(name, row, y).tolist() == pytest.approx(W.solve(name, lp, y).tolist(), abs=1e-9)
    sol = W.solve_with_stats("optimal", row, y)
    assert sol.perplexities.tolist() == pytest.approx(W.perplexities(lp, y).tolist(), rel=1e-9)
    assert sol.loss == pytest.approx(W.prompt_loss(sol.weights, lp, y), abs=1e-9)
    assert torch.equal(last, scores[:, :, -1]) and last.data_ptr() != scores.data_ptr()  # a copy


def test_the_prompt_score_buffer_is_reused_and_results_do_not_depend_on_it(members64, monkeypatch) -> None:
    """On the CPU the buffer of one call serves the next (when large enough): a short prompt after a long
    batch, and a long prompt after a short one, give what a fresh engine gives; results handed out
    (member_logprobs, reports, loglikelihood) are never views of it; empty_cache and the size cap drop it."""
    import langchain_packllm.scoring as scoring_mod

    if DEVICE != "cpu":
        pytest.skip("the buffer is kept on the CPU only")
    weighting, sampling = WeightingConfig("optimal"), SamplingConfig(max_new_tokens=6)

    def fresh(prompt: str):
        return FusionEngine(members64).generate([prompt], weighting, sampling)[0]

    engine = FusionEngine(members64)
    logprobs, *_ = engine.member_logprobs([engine.encode(p) for p in PROMPTS])
    kept = engine.scorer._spare
    assert kept is not None and kept.numel() == 3 * len(PROMPTS) * logprobs[0].shape[1] * engine.vocab_size
    before = [lp.clone() for lp in logprobs]
    for prompt in (PROMPTS[3], PROMPTS[2], PROMPTS[0]):  # shorter than the batch: the same buffer
        out, want = engine.generate([prompt], weighting, sampling)[0], fresh(prompt)
        assert out.token_ids == want.token_ids
        assert out.report.weights == pytest.approx(want.report.weights, abs=1e-9)
        assert engine.scorer._spare is kept
    assert all(torch.equal(a, b) for a, b in zip(before, logprobs))  # not overwritten by later calls

    long = PROMPTS[2] * 4  # longer than the kept buffer: a new, larger one replaces it
    out, want = engine.generate([long], weighting, sampling)[0], fresh(long)
    assert out.token_ids == want.token_ids and engine.scorer._spare.numel() > kept.numel()
    (ll,) = engine.loglikelihood([(PROMPTS[0], " x")])
    (want_ll,) = FusionEngine(members64).loglikelihood([(PROMPTS[0], " x")])
    assert ll.logprob == pytest.approx(want_ll.logprob, rel=1e-12)

    engine.empty_cache()
    assert engine.scorer._spare is None
    monkeypatch.setattr(scoring_mod, "KEEP_BUFFER_BYTES", 0)  # over the cap: not kept
    assert engine.generate([PROMPTS[0]], weighting, sampling)[0].token_ids == fresh(PROMPTS[0]).token_ids
    assert engine.scorer._spare is None


def test_zero_weight_member_is_not_run_and_its_minus_inf_logits_are_harmless(members64) -> None:
    """A member whose weight is 0 in every row is not run while decoding, and its -inf logits (a model that
    masks tokens) do not turn the mix into NaN (0 * -inf)."""
    import copy

    from langchain_packllm.members import Member

    masked = copy.deepcopy(members64[2].model)
    calls = []

    def mask_tokens(module, args, output):
        calls.append(output.shape[1])
        output[..., 5:50] = float("-inf")
        return output

    masked.get_output_embeddings().register_forward_hook(mask_tokens)
    members = [*members64[:2], Member("masked", masked, members64[2].tokenizer)]
    engine = FusionEngine(members)
    fixed = [0.6, 0.4, 0.0]
    outs = engine.generate(PROMPTS, WeightingConfig(weighting=fixed), SamplingConfig(max_new_tokens=8))
    assert calls and 1 not in calls  # the prefill (its prompt perplexity is reported), no decode step
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == naive_greedy(members64[:2], fixed[:2], prompt, 8), prompt
    calls.clear()
    # With a weight, the mask applies: no masked token is ever chosen, and the member runs every step.
    out = engine.generate(
        ["import os"], WeightingConfig(weighting=[0.2, 0.2, 0.6]), SamplingConfig(max_new_tokens=8)
    )
    assert calls.count(1) == 7 and not set(out[0].token_ids) & set(range(5, 50))


def test_unpadded_batch_equals_naive_decoder(members64) -> None:
    """Prompts of equal length run without attention mask or position ids."""
    engine = FusionEngine(members64)
    by_length: dict[int, list[str]] = {}
    for p in ["import os", "import re", "import sys", "x = 1", "y = 2", "def f(x):", "def g(y):"]:
        by_length.setdefault(len(engine.encode(p)), []).append(p)
    prompts = max(by_length.values(), key=len)
    assert len(prompts) >= 2
    fixed = [0.5, 0.3, 0.2]
    outs = engine.generate(prompts, WeightingConfig(weighting=fixed), SamplingConfig(max_new_tokens=10))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == naive_greedy(members64, fixed, prompt, 10), prompt


def test_prefill_writes_linear_heads_into_the_buffer_and_checks_them(members64) -> None:
    """Members whose logits are a plain linear layer over the base model's last hidden state get their
    prompt logits computed straight into the solve buffer; the scores equal the model's own logits. A
    model with anything after that layer (here a logit scale) is detected and keeps its own forward."""
    import copy
    import types

    from langchain_packllm.members import Member

    scaled = copy.deepcopy(members64[1].model)
    plain_forward = scaled.forward

    def forward(self, *args, **kwargs):
        out = plain_forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out

    scaled.forward = types.MethodType(forward, scaled)
    members = [members64[0], Member("scaled", scaled, members64[1].tokenizer)]
    engine = FusionEngine(members)
    batch = [engine.encode(p) for p in PROMPTS[:2]]
    pre = engine.score(batch)
    scores, input_ids, mask = pre.scores, pre.input_ids, pre.attention_mask
    assert engine.scorer.linear_head(0) is not None and engine.scorer.linear_head(1) is None
    for k, m in enumerate(members):
        own = own_logits(m.model, input_ids, mask, engine.vocab_size)
        assert torch.allclose(scores[k], own, rtol=1e-10, atol=1e-10)
    full = FusionEngine(members64)
    assert all(full.scorer.linear_head(k) is not None for k in range(3))  # GPT-2, Llama, Qwen2


def test_half_precision_members_fill_a_float32_buffer(tiny_paths) -> None:
    members = [load_member(p, torch_dtype="bfloat16", device=DEVICE) for p in tiny_paths[:2]]
    engine = FusionEngine(members)
    batch = [engine.encode(p) for p in PROMPTS[:2]]
    pre = engine.score(batch)
    scores, input_ids, mask = pre.scores, pre.input_ids, pre.attention_mask
    assert scores.dtype == torch.float32 and all(engine.scorer.linear_head(k) for k in range(2))
    for k, m in enumerate(members):
        own = own_logits(m.model, input_ids, mask, engine.vocab_size).float()
        assert torch.allclose(scores[k], own, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_nan_while_decoding_is_named(members64, temperature: float, bad_value: float) -> None:
    """A member that is fine on the prompt but emits NaN (or +inf) at a decode step is named; no text."""
    import copy

    from langchain_packllm.members import Member

    flaky = copy.deepcopy(members64[1].model)

    def poison_decode_steps(module, args, output):
        if output.shape[1] == 1:
            output[..., 7] = bad_value
        return output

    flaky.get_output_embeddings().register_forward_hook(poison_decode_steps)
    engine = FusionEngine([members64[0], Member("flaky", flaky, members64[1].tokenizer)])
    sampling = SamplingConfig(max_new_tokens=4, temperature=temperature, seed=0)
    with pytest.raises(FloatingPointError, match="'flaky'"):
        engine.generate(["import os"], WeightingConfig(weighting=[0.5, 0.5]), sampling)


def test_a_base_model_that_refuses_the_arguments_falls_back_to_the_model(members64) -> None:
    from langchain_packllm.scoring import LinearHead

    engine = FusionEngine(members64[:2])
    head = engine.scorer.linear_head(1)

    class Narrow(torch.nn.Module):
        def forward(self, input_ids, use_cache=False):  # no attention mask, position ids or cache
            raise AssertionError("not reached: the call's arguments do not fit")

    engine.scorer._heads[1] = LinearHead(Narrow(), head.weight, head.bias)
    fixed = [0.5, 0.5]
    out = engine.generate(PROMPTS[:2], WeightingConfig(weighting=fixed), SamplingConfig(max_new_tokens=6))
    assert engine.scorer.linear_head(1) is None
    for prompt, o in zip(PROMPTS[:2], out):
        assert o.token_ids == naive_greedy(members64[:2], fixed, prompt, 6)


@pytest.mark.parametrize("arch", sorted(set(ARCH_CONFIGS) - {"gpt2", "llama", "qwen2"}))
def test_prefill_scores_equal_the_models_own_logits_across_architectures(arch: str) -> None:
    """The linear-head shortcut is taken exactly where the logits are a plain linear layer (and refused
    where something follows it); either way the solve buffer holds the model's own logits, and decoding
    runs, for a left-padded batch."""
    from langchain_packllm.lab.bench import word_tokenizer
    from langchain_packllm.members import Member

    tokenizer = word_tokenizer(300)
    model = make_tiny_model(arch, tokenizer)
    engine = FusionEngine([Member(arch, model, tokenizer)])
    prompts = [" ".join(f"w{i}" for i in range(3, 3 + n)) for n in (4, 9)]
    pre = engine.score([engine.encode(p) for p in prompts], use_cache=True)
    scores, ids, mask = pre.scores, pre.input_ids, pre.attention_mask
    assert (engine.scorer.linear_head(0) is not None) == (arch not in NOT_LINEAR_HEADS)
    own = own_logits(model, ids, mask, engine.vocab_size)
    real = mask.bool()
    assert torch.allclose(scores[0][real], own[real], rtol=1e-4, atol=1e-4)
    outs = engine.generate(prompts, WeightingConfig(weighting=[1.0]), SamplingConfig(max_new_tokens=3))
    assert [len(o.token_ids) for o in outs] == [3, 3]


def test_the_kv_cache_goes_by_the_name_the_installed_transformers_takes(members64) -> None:
    """No deprecation warning for ``past_key_values`` from the forwards (transformers 5.x renamed it
    ``cache``; older releases still get ``past_key_values``)."""
    import warnings

    from langchain_packllm.members import cache_kwargs

    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=False): ...

    assert list(cache_kwargs(Old(), "c")) == ["past_key_values"]
    engine = FusionEngine(members64)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*", category=FutureWarning)
        engine.generate(PROMPTS[:2], WeightingConfig("optimal"), SamplingConfig(max_new_tokens=3))
        list(engine.stream(PROMPTS[0], sampling=SamplingConfig(max_new_tokens=3)))


def test_no_module_outside_the_engine_reaches_into_it() -> None:
    """The lab, the benchmarks and the examples use the engine's public seams only."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[2]
    private = re.compile(r"\bengine\.(_[a-z]\w*)|\.scorer\._|\.references\._")
    offenders = []
    for folder in ("langchain_packllm/lab", "benchmarks", "examples"):
        for path in (root / folder).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if private.search(line):
                    offenders.append(f"{path.relative_to(root)}:{n}: {line.strip()}")
    assert not offenders, offenders
