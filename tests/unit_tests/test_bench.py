"""``packllm bench`` end to end on members small enough for the unit suite: every section runs and reports
what its tables read, and the solver rows agree with each other where they must (timings are not checked:
they are the benchmark's output, never a test's)."""

from __future__ import annotations

import math

import pytest

from langchain_packllm.lab.bench import BenchConfig, format_results, run_all


@pytest.fixture(scope="module")
def results():
    cfg = BenchConfig(
        vocab_size=300,
        hidden=32,
        layers=1,
        ks=(1, 2),
        batch_sizes=(1, 3),
        decode_prompt=8,
        decode_tokens=3,
        ttft_prompt=16,
        repeats=2,
        solve_ks=(2, 3),
        solve_lengths=(8,),
        solve_vocabs=(64,),
        solve_repeats=1,
        grid_step=0.1,
        memory_prompt=16,
    )
    return run_all(cfg)


def test_decode_rows_hold_both_bounds(results) -> None:
    assert [(r["K"], r["batch"]) for r in results.decode] == [(1, 1), (1, 3), (2, 1), (2, 3)]
    for r in results.decode:
        assert len(r["member_step_ms"]) == r["K"] and len(r["generate_step_ms"]) == r["K"]
        for key in ("ratio_to_bound", "ratio_to_members_in_turn", "ratio_to_generate_sum"):
            assert math.isfinite(r[key]) and r[key] > 0, key


def test_ttft_and_memory_rows(results) -> None:
    assert [r["K"] for r in results.ttft] == [2]
    assert all(r["ttft_ms"] > 0 and math.isfinite(r["ratio_to_prefill_plus_solve"]) for r in results.ttft)
    assert [r["K"] for r in results.memory] == [1, 2]


def test_solver_rows_agree(results) -> None:
    rows = {(r["solver"], r["K"]): r for r in results.solve}
    assert set(rows) == {(s, K) for s in ("optimal", "greedy", "grid", "grid-exhaustive") for K in (2, 3)}
    for K in (2, 3):
        # The branch-and-bound grid finds the exhaustive grid's point; optimal is at or below both.
        assert rows["grid", K]["loss"] == pytest.approx(rows["grid-exhaustive", K]["loss"], abs=1e-6)
        assert rows["grid-exhaustive", K]["evaluated"] == rows["grid-exhaustive", K]["points"]
        assert rows["grid", K]["evaluated"] <= rows["grid", K]["points"]
        for rival in ("greedy", "grid"):
            assert rows["optimal", K]["loss"] <= rows[rival, K]["loss"] + 1e-6


def test_tables_print_every_section(results) -> None:
    text = format_results(results)
    for title in ("## Decode", "## Time to first token", "## Weight solving", "## Peak memory"):
        assert title in text
    assert "fused / in turn" in text and "grid-exhaustive" in text


def test_command_line_sets_the_solve_vocabularies_and_rejects_bad_ones() -> None:
    from langchain_packllm.lab.bench import _config
    from langchain_packllm.lab.cli import build_parser

    parse = build_parser().parse_args
    cfg, only = _config(parse(["bench", "--only", "solve", "--size", "1b", "--solve-vocabs", "4096,131072"]))
    assert cfg.solve_vocabs == (4096, 131072) and only == ("solve",)
    assert (cfg.hidden, cfg.layers) == (2048, 22)
    assert _config(parse(["bench", "--quick"]))[0].solve_vocabs == (4096, 32768)
    for bad, message in (("4k", "comma-separated integers"), ("1,4096", "at least 2 tokens")):
        with pytest.raises(SystemExit, match=message):
            _config(parse(["bench", "--solve-vocabs", bad]))
    with pytest.raises(SystemExit, match="Unknown bench section"):
        _config(parse(["bench", "--only", "solve,speed"]))


def test_align_section_is_asked_for_by_name() -> None:
    from langchain_packllm.lab.bench import _config, _exhaustive_nearest
    from langchain_packllm.lab.cli import build_parser

    parse = build_parser().parse_args
    assert _config(parse(["bench", "--only", "align"]))[1] == ("align",)
    assert "align" not in _config(parse(["bench"]))[1]  # it needs the real pack: never run by default
    # the baseline's tie-breaks: distance, then the longest common prefix, then the lowest index
    assert _exhaustive_nearest(["cat", "dogs", "zz"], ["cap", "cab", "dog", "dot", "a", "b"]) == [0, 2, 4]


def test_reweight_section_compares_online_with_prompt_only_weights() -> None:
    cfg = BenchConfig(
        vocab_size=300, hidden=32, layers=1, ks=(1, 2), batch_sizes=(2,), decode_prompt=8, decode_tokens=3,
        repeats=1, reweight_every=2,
    )  # fmt: skip
    results = run_all(cfg, only=("reweight",))
    (row,) = results.reweight  # K=1 has no weights to follow
    assert (row["K"], row["batch"], row["every"]) == (2, 2, 2) and row["steps"] == 4
    assert math.isfinite(row["online_throughput_ratio"]) and row["online_throughput_ratio"] > 0
    assert row["state_bytes_per_row"] == 8 * (4 + 6 + 3)
    assert "Weights that follow the text" in format_results(results)
