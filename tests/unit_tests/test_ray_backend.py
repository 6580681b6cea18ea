"""backend="ray": members in Ray actors on a local cluster (started and stopped here), checked token for
token against the in-process engine over the same saved members, with faults and bad set-ups."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import time

import pytest
import torch

from langchain_packllm import ChatPackLLM, FusionEngine, PackLLM, SamplingConfig, WeightingConfig
from langchain_packllm.members import load_member

ray = pytest.importorskip("ray")

from langchain_packllm.ray_backend import (  # noqa: E402
    LOCAL_SYSTEM_CONFIG,
    MemberActorError,
    RayFusionEngine,
    check_member_resources,
    load_ray_engine,
)

PROMPTS = ["def main(", "import os\nclass Foo:\n    def", "x"]  # three lengths: the batch is padded


@pytest.fixture(scope="module", autouse=True)
def cluster(tmp_path_factory):
    home = tmp_path_factory.mktemp("packllm-home")
    mp = pytest.MonkeyPatch()
    mp.setenv("PACKLLM_HOME", str(home))  # the actors inherit it: alignment maps and conversions stay here
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _system_config=LOCAL_SYSTEM_CONFIG)
    # A CPU matrix product's reduction order depends on the thread count: the in-process engine runs with
    # the actors' one thread (Ray's default) so that floats, not only tokens, compare equal.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    ray.shutdown()
    mp.undo()


@pytest.fixture(scope="module")
def shared(tiny_paths):
    """The three-member shared-vocabulary pack: in-process, and on Ray through the LangChain factory."""
    local = FusionEngine([load_member(p, device="cpu") for p in tiny_paths])
    llm = PackLLM.from_model_ids(tiny_paths, device="cpu", backend="ray", max_new_tokens=12)
    assert isinstance(llm.engine, RayFusionEngine)
    yield local, llm
    llm.engine.close()


@pytest.fixture(scope="module")
def mixed(mixed_paths):
    local = FusionEngine([load_member(p, device="cpu") for p in mixed_paths])
    # a member on an actor sends back its whole output layer (no mapped head, Scorer.mapped_head): the
    # in-process engine is compared on the same computation, bit for bit
    local.scorer.mapped_head_max_fraction = 0.0
    resources = [{"num_cpus": 1, "torch_threads": 1}, {"num_cpus": 1}]
    remote = load_ray_engine(mixed_paths, member_resources=resources)
    yield local, remote
    remote.close()


def _same_outputs(a, b) -> None:
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.text for o in a] == [o.text for o in b]
    assert [o.finish_reason for o in a] == [o.finish_reason for o in b]
    for x, y in zip(a, b):
        assert x.report.weights == y.report.weights
        assert repr(x.report.perplexities) == repr(y.report.perplexities)  # NaN for a 1-token prompt
        assert x.report.reference == y.report.reference
        assert repr(x.report.bits_per_byte) == repr(y.report.bits_per_byte)


def _cached_calls(engine: RayFusionEngine) -> list[int]:
    gc.collect()
    deadline = time.monotonic() + 10
    while True:
        counts = ray.get([a.cached_calls.remote() for a in engine.actors])
        if not any(counts) or time.monotonic() > deadline:
            return counts
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------- equality


def test_members_live_in_actors(shared):
    local, llm = shared
    pids = {m.extra["ray"]["pid"] for m in llm.engine.members}
    assert len(pids) == 3 and os.getpid() not in pids
    assert llm.engine.names == local.names
    assert [m.vocab_size for m in llm.engine.members] == [m.vocab_size for m in local.members]


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingConfig(max_new_tokens=12),
        SamplingConfig(max_new_tokens=10, temperature=0.9, top_p=0.9, seed=3),
        SamplingConfig(max_new_tokens=16, stop=("\n",), repetition_penalty=1.3),
    ],
    ids=["greedy", "sampled", "stop-and-processor"],
)
def test_shared_batch_equals_in_process(shared, sampling):
    local, llm = shared
    want = local.generate(PROMPTS, sampling=sampling)
    got = llm.engine.generate(PROMPTS, sampling=sampling)
    _same_outputs(want, got)


@pytest.mark.parametrize("weighting", ["optimal", "greedy", [0.2, 0.5, 0.3]])
def test_shared_weightings_equal(shared, weighting):
    local, llm = shared
    config, sampling = WeightingConfig(weighting=weighting), SamplingConfig(max_new_tokens=6)
    _same_outputs(
        local.generate(PROMPTS[:2], config, sampling), llm.engine.generate(PROMPTS[:2], config, sampling)
    )


@pytest.mark.parametrize("weighting", ["top1", "optimal"])
def test_weights_that_follow_the_text_equal(shared, mixed, weighting):
    """reweight_every on Ray: members at weight 0 skip steps and catch up with one multi-token forward on
    their actors (top1 leaves two of three behind), on a padded batch and on a mixed-vocabulary pack."""
    config, sampling = WeightingConfig(weighting, reweight_every=3), SamplingConfig(max_new_tokens=10)
    for local, remote in (shared[0], shared[1].engine), mixed:
        want, got = local.generate(PROMPTS, config, sampling), remote.generate(PROMPTS, config, sampling)
        _same_outputs(want, got)
        assert [o.report.trajectory for o in got] == [o.report.trajectory for o in want]
        assert len(got[0].report.trajectory) > 1


def test_shared_stream_equals_in_process(shared):
    local, llm = shared
    sampling = SamplingConfig(max_new_tokens=20)
    want = [c.text for c in local.stream("def f(x):", sampling=sampling)]
    got = [c.text for c in llm.engine.stream("def f(x):", sampling=sampling)]
    assert got == want and len(got) > 2
    in_process = PackLLM(engine=local, max_new_tokens=20)
    assert list(llm.stream("def f(x):", max_new_tokens=20)) == list(in_process.stream("def f(x):"))


def test_shared_loglikelihood_and_report_equal(shared):
    local, llm = shared
    requests = [("def main(", "):\n    return"), ("", "import os")]
    want, got = local.loglikelihood(requests), llm.engine.loglikelihood(requests)
    assert [(r.logprob, r.is_greedy) for r in got] == [(r.logprob, r.is_greedy) for r in want]
    assert llm.engine.report("class Foo:").weights == local.report("class Foo:").weights


def test_chat_structured_output_equal(shared):
    local, llm = shared
    schema = {
        "title": "Point",
        "type": "object",
        "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
        "required": ["x", "y"],
    }
    results = []
    for engine in (local, llm.engine):
        chat = ChatPackLLM(engine=engine, max_new_tokens=40)
        message = chat.invoke("Say hello")
        structured = chat.with_structured_output(schema, method="json_schema").invoke("A point:")
        results.append((message.content, structured))
    assert results[0] == results[1]


def test_caches_are_freed_after_calls_and_abandoned_streams(shared):
    _, llm = shared
    llm.engine.generate(PROMPTS, sampling=SamplingConfig(max_new_tokens=4))
    stream = llm.engine.stream("def f(x):", sampling=SamplingConfig(max_new_tokens=30))
    next(stream)
    assert max(ray.get([a.cached_calls.remote() for a in llm.engine.actors])) == 1
    del stream
    assert _cached_calls(llm.engine) == [0, 0, 0]


def test_mixed_vocabularies_equal_in_process(mixed):
    local, remote = mixed
    assert remote.alignment == "mined"
    sampling = SamplingConfig(max_new_tokens=10)
    prompts = ["def main():\n    return", "The quick brown fox", "x"]
    want, got = local.generate(prompts, sampling=sampling), remote.generate(prompts, sampling=sampling)
    _same_outputs(want, got)
    for prompt in prompts[:2]:
        assert [c.text for c in remote.stream(prompt, sampling=sampling)] == [
            c.text for c in local.stream(prompt, sampling=sampling)
        ]
    ll = [("def main():", "\n    return 1")]
    assert remote.loglikelihood(ll)[0].logprob == local.loglikelihood(ll)[0].logprob


def test_own_prompt_equals_in_process_with_either_reference(mixed_paths):
    """Under alignment="own-prompt" (each member reads the prompt with its own tokens, the choice's forwards
    kept as its KV cache on its actor): batches, streams, reports, weights that follow the text and
    loglikelihood equal the in-process engine's, with the prompts choosing either member as reference."""
    local = FusionEngine([load_member(p, device="cpu") for p in mixed_paths], alignment="own-prompt")
    local.scorer.mapped_head_max_fraction = 0.0  # as the actors compute (see the mixed fixture)
    resources = [{"num_cpus": 0, "torch_threads": 1}] * 2
    remote = load_ray_engine(mixed_paths, member_resources=resources, alignment="own-prompt")
    try:
        assert remote.alignment == "own-prompt"
        sampling = SamplingConfig(max_new_tokens=8)
        for weighting in (WeightingConfig("optimal"), WeightingConfig("optimal", reweight_every=3)):
            want = local.generate(PREFIX_PROMPTS, weighting, sampling)
            got = remote.generate(PREFIX_PROMPTS, weighting, sampling)
            _same_outputs(want, got)
            assert {o.report.reference for o in want} == set(local.names)
            assert [o.report.trajectory for o in want] == [o.report.trajectory for o in got]
        for prompt in PREFIX_PROMPTS[:2]:
            assert [c.text for c in remote.stream(prompt, sampling=sampling)] == [
                c.text for c in local.stream(prompt, sampling=sampling)
            ]
        ll = [("def main():", "\n    return 1"), ("        return", " None\n")]
        assert [r.logprob for r in remote.loglikelihood(ll)] == [r.logprob for r in local.loglikelihood(ll)]
        assert _cached_calls(remote) == [0, 0]
    finally:
        remote.close()


# ---------------------------------------------------------------------------------------------- prefix


# Under alignment="prefix" each prompt picks its reference by bits per byte: member 0 (byte-level BPE) for
# the first and last, member 1 (Metaspace) for the second, so each member follows the other's text once.
PREFIX_PROMPTS = ["def main():\n    return", "        return None\n", "x"]


@pytest.fixture(scope="module")
def prefix(mixed_paths):
    """The mixed pair under alignment="prefix": in-process, and on Ray (actors that reserve no CPU, so they
    place next to the ``mixed`` pair's)."""
    local = FusionEngine([load_member(p, device="cpu") for p in mixed_paths], alignment="prefix")
    resources = [{"num_cpus": 0, "torch_threads": 1}] * 2
    remote = load_ray_engine(mixed_paths, member_resources=resources, alignment="prefix")
    yield local, remote
    remote.close()


@pytest.fixture
def crops(monkeypatch):
    """Every crop of a member's cache on the driver, in-process (DynamicCache) and on Ray (RemoteCache)."""
    from transformers import DynamicCache

    from langchain_packllm.ray_backend import RemoteCache

    seen = {"inprocess": [], "ray": []}
    for cls, key in ((DynamicCache, "inprocess"), (RemoteCache, "ray")):

        def spy(self, n, _crop=cls.crop, _seen=seen[key]):
            _seen.append(n)
            return _crop(self, n)

        monkeypatch.setattr(cls, "crop", spy)
    return seen


def test_prefix_batch_equals_in_process_with_either_reference(prefix, crops):
    local, remote = prefix
    assert remote.alignment == local.alignment == "prefix"
    sampling = SamplingConfig(max_new_tokens=8)
    want = local.generate(PREFIX_PROMPTS, sampling=sampling)
    got = remote.generate(PREFIX_PROMPTS, sampling=sampling)
    _same_outputs(want, got)
    assert [o.report.reference for o in got] == [remote.names[i] for i in (0, 1, 0)]
    # re-encoding the growing text changed a member's last tokens: its cache was cropped, on both paths
    assert crops["ray"] == crops["inprocess"] and len(crops["ray"]) >= 3
    for weighting in ("optimal", [0.3, 0.7]):
        config = WeightingConfig(weighting=weighting)
        _same_outputs(
            local.generate(PREFIX_PROMPTS[:2], config, sampling),
            remote.generate(PREFIX_PROMPTS[:2], config, sampling),
        )


def test_prefix_stream_equals_in_process(prefix):
    local, remote = prefix
    sampling = SamplingConfig(max_new_tokens=10)
    for prompt in PREFIX_PROMPTS[:2]:
        want = [c.text for c in local.stream(prompt, sampling=sampling)]
        got = [c.text for c in remote.stream(prompt, sampling=sampling)]
        assert got == want and len(got) > 2
    # the reference forced to member 1 for a prompt that would pick member 0
    ref_local, ref_remote = local.reference(1), remote.reference(1)
    want = list(local.stream(PREFIX_PROMPTS[0], sampling=sampling, reference=ref_local))
    got = list(remote.stream(PREFIX_PROMPTS[0], sampling=sampling, reference=ref_remote))
    assert [c.text for c in got] == [c.text for c in want]
    assert got[-1].output.token_ids == want[-1].output.token_ids
    assert got[-1].output.report.reference == remote.names[1]


def test_prefix_crop_reaches_the_actor(prefix, crops, monkeypatch):
    """A crop on the driver is applied on the actor with the next forward: while the stream runs the actor's
    cache holds as many positions as the driver's RemoteCache says, and the text state forwarded more
    tokens than its text has (it re-fed the tokens after each crop)."""
    from langchain_packllm import bytealign
    from langchain_packllm.ray_backend import RemoteModel

    _, remote = prefix
    made, states = [], []
    new_cache, start = RemoteModel.new_cache, bytealign.MemberTextState.resume

    def spy_new_cache(self):
        made.append((self, new_cache(self)))
        return made[-1][1]

    def spy_start(self, *args, **kwargs):
        states.append(self)
        return start(self, *args, **kwargs)

    monkeypatch.setattr(RemoteModel, "new_cache", spy_new_cache)
    monkeypatch.setattr(bytealign.MemberTextState, "resume", spy_start)
    checked = 0
    for _ in remote.stream(PREFIX_PROMPTS[0], sampling=SamplingConfig(max_new_tokens=10)):
        for model, cache in made:
            handle = cache._packllm_ray
            if handle is None or handle.crop is not None:
                continue  # not sent yet, or a crop waits for the next forward
            held = ray.get(
                model.actor.__ray_call__.remote(lambda w, key: w.caches[key][0].get_seq_length(), handle.key)
            )
            assert held == cache.get_seq_length() == handle.length
            checked += 1
    assert crops["ray"] and checked > 2
    (state,) = states
    assert state.forwarded_tokens > len(state.enc.ids)
    made.clear()


def test_prefix_report_loglikelihood_and_freed_caches(prefix):
    local, remote = prefix
    for prompt in PREFIX_PROMPTS[:2]:
        assert remote.report(prompt).weights == local.report(prompt).weights
    requests = [("def main():", "\n    return 1")]
    with pytest.raises(RuntimeError, match="alignment='mined'") as want:
        local.loglikelihood(requests)
    with pytest.raises(RuntimeError) as got:
        remote.loglikelihood(requests)
    assert str(got.value) == str(want.value)
    remote.generate(PREFIX_PROMPTS, sampling=SamplingConfig(max_new_tokens=4))
    stream = remote.stream(PREFIX_PROMPTS[1], sampling=SamplingConfig(max_new_tokens=30))
    next(stream)
    assert max(ray.get([a.cached_calls.remote() for a in remote.actors])) >= 1
    del stream
    assert _cached_calls(remote) == [0, 0]


# ---------------------------------------------------------------------------------------------- faults


def test_actor_killed_mid_stream_then_next_call_succeeds(shared):
    local, llm = shared
    engine = llm.engine
    victim = engine.members[1]
    old_pid = ray.get(victim.model.actor.pid.remote())
    stream = engine.stream("def f(x):", sampling=SamplingConfig(max_new_tokens=60))
    next(stream)
    ray.kill(victim.model.actor, no_restart=False)
    with pytest.raises(MemberActorError, match=repr(victim.name)) as info:
        for _ in stream:
            pass
    assert info.value.member == victim.name
    sampling = SamplingConfig(max_new_tokens=8)
    _same_outputs(local.generate(PROMPTS, sampling=sampling), engine.generate(PROMPTS, sampling=sampling))
    assert ray.get(victim.model.actor.pid.remote()) != old_pid  # the restarted actor served it


def _raise_oom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_names_the_member_and_the_driver_stays_usable(shared):
    local, llm = shared
    engine = llm.engine
    victim = engine.members[2]
    actor = victim.model.actor
    ray.get(actor.__ray_call__.remote(lambda w: setattr(w.member.model, "forward", _raise_oom)))
    try:
        with pytest.raises(MemberActorError, match=f"{victim.name!r}.*out of device memory"):
            engine.generate(PROMPTS, sampling=SamplingConfig(max_new_tokens=3))
    finally:
        ray.get(actor.__ray_call__.remote(lambda w: w.member.model.__dict__.pop("forward", None)))
    sampling = SamplingConfig(max_new_tokens=5)
    _same_outputs(local.generate(PROMPTS, sampling=sampling), engine.generate(PROMPTS, sampling=sampling))


@pytest.mark.parametrize(
    ("resources", "error", "match"),
    [
        ({"num_gpus": 1}, TypeError, "one dict per member"),
        ([{"num_gpus": 1}], ValueError, "Got 1 member_resources for 2"),
        ([{"gpus": 1}, {}], ValueError, "unknown keys"),
        ([{"num_cpus": -1}, {}], ValueError, "must be a number >= 0"),
        ([{"num_gpus": 1}, {}], ValueError, "cannot place every member.*GPU"),
        ([{"num_cpus": 2}, {"num_cpus": 1}], ValueError, "cannot place every member.*CPU"),
        ([{"resources": {"tpu": 1}}, {}], ValueError, "tpu"),
    ],
)
def test_bad_member_resources_fail_before_loading(mixed_paths, resources, error, match):
    start = time.perf_counter()
    with pytest.raises(error, match=match):
        load_ray_engine(mixed_paths, member_resources=resources)
    assert time.perf_counter() - start < 2  # nothing loaded


def test_resource_check_accepts_good_specs():
    assert check_member_resources(None, 2) == [{}, {}]
    assert check_member_resources([{"num_gpus": 1, "torch_threads": 4}, {"resources": {"a": 1}}], 2)[0] == {
        "num_gpus": 1,
        "torch_threads": 4,
    }


def test_inprocess_rejects_ray_arguments(tiny_paths):
    with pytest.raises(ValueError, match="backend='ray' only"):
        PackLLM.from_model_ids(tiny_paths[:1], member_resources=[{}])
    with pytest.raises(ValueError, match="backend must be one of"):
        PackLLM.from_model_ids(tiny_paths[:1], backend="dask")


def test_missing_cluster_is_a_clear_error(tiny_paths):
    code = (
        "from langchain_packllm.ray_backend import load_ray_engine\n"
        "try:\n"
        f"    load_ray_engine({tiny_paths[:1]!r}, ray_address='127.0.0.1:9')\n"
        "except ConnectionError as e:\n"
        "    print('ConnectionError', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("ConnectionError No Ray cluster answers at '127.0.0.1:9'"), out.stderr


def test_runtime_import_does_not_import_ray():
    code = "import sys, langchain_packllm\nprint('ray' in sys.modules)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_close_ends_the_actors(mixed):
    _, remote = mixed
    actors = remote.actors
    remote.close()
    for actor in actors:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.pid.remote(), timeout=30)
    with pytest.raises(MemberActorError, match="closed"):
        remote.generate(["x"], sampling=SamplingConfig(max_new_tokens=2))


def test_a_step_sends_new_ids_and_gets_logits_only(shared, monkeypatch):
    """What crosses per decode step: 8 bytes per row in (24 with padding: the id, one mask column, the
    position; the mask so far stays on the actor), B x V logits out, per member."""
    import langchain_packllm.ray_backend as rb

    _, llm = shared
    engine = llm.engine
    sent, received = [], []
    to_wire, from_wire = rb._to_wire, rb._from_wire

    def spy_to(t):
        wire = to_wire(t)
        sent.append(0 if wire is None else wire[1].nbytes)
        return wire

    def spy_from(wire):
        received.append(0 if wire is None else wire[1].nbytes)
        return from_wire(wire)

    monkeypatch.setattr(rb, "_to_wire", spy_to)
    monkeypatch.setattr(rb, "_from_wire", spy_from)
    V, K = engine.members[0].vocab_size, 3
    for prompts, per_row in ((["def main("], 8), (PROMPTS, 24)):
        B = len(prompts)
        plan = engine.plan(prompts, 4)[0][1]
        steps = engine.decode_steps(plan, WeightingConfig("uniform"), SamplingConfig(max_new_tokens=4))
        next(steps)  # prefill
        sent.clear(), received.clear()
        next(steps)  # one decode step
        assert sum(sent) == K * B * per_row  # four wire slots per forward: ids, mask, mask tail, positions
        assert received == [B * V * 4] * K  # float32 members: their logits, nothing else
        steps.close()
    from langchain_packllm.lab.bench_ray import prompt_bytes, step_bytes

    assert step_bytes(3, 1, 152_000, 2) == {"in": 24, "out": 912_000}
    assert prompt_bytes(3, 1, 512, 152_000, 2) == {"in": 12_288, "out": 466_944_000}
