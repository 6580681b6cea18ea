"""GPU correctness check for the engine, runnable without LangChain installed.

Members in float64 on ``cuda`` must decode the same tokens and solve the same weights as on the CPU, and so
must a pack split across CPU and GPU (the one-thread-per-device path). Usage (repository root):

    python benchmarks/gpu_check.py
"""

from __future__ import annotations

import sys
import tempfile
import types
from pathlib import Path

# Import the engine without the package __init__ (which pulls in langchain_core for PackLLM).
_pkg = types.ModuleType("langchain_packllm")
_pkg.__path__ = [str(Path(__file__).resolve().parents[1] / "langchain_packllm")]
sys.modules.setdefault("langchain_packllm", _pkg)

import torch  # noqa: E402

from langchain_packllm.engine import FusionEngine, SamplingConfig, WeightingConfig  # noqa: E402
from langchain_packllm.members import load_member  # noqa: E402
from langchain_packllm.testing import make_tiny_pack  # noqa: E402

PROMPTS = ["def main(argv):\n    return", "import os", 'class Parser(object):\n    """Parse the', "x"]


def run(members, weighting: str):
    engine = FusionEngine(members)
    outs = engine.generate(PROMPTS, WeightingConfig(weighting), SamplingConfig(max_new_tokens=12))
    ll = engine.loglikelihood([("def main(argv):\n", "    return 0")])[0].logprob
    return engine, [o.token_ids for o in outs], [list(o.report.weights.values()) for o in outs], ll


def main() -> int:
    assert torch.cuda.is_available(), "no CUDA device visible"
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_tiny_pack(tmp, archs=("gpt2", "llama", "qwen2"))
        cpu = [load_member(p, torch_dtype="float64", device="cpu") for p in paths]
        gpu = [load_member(p, torch_dtype="float64", device="cuda") for p in paths]
        split = [gpu[0], cpu[1], gpu[2]]
        for weighting in ("optimal", "greedy", "uniform"):
            _, ref_ids, ref_w, ref_ll = run(cpu, weighting)
            for label, members in (("cuda", gpu), ("cpu+cuda", split)):
                engine, ids, w, ll = run(members, weighting)
                assert ids == ref_ids, (label, weighting, ids, ref_ids)
                assert max(abs(a - b) for x, y in zip(w, ref_w) for a, b in zip(x, y)) < 1e-6, (label, w)
                assert abs(ll - ref_ll) < 1e-6 * max(1.0, abs(ref_ll)), (label, ll, ref_ll)
                threads = engine.scorer.threaded
                print(f"ok {weighting:8s} {label:9s} threads={threads} groups={engine.scorer.groups}")
        # Half-precision members: the prefill writes their logits into the float32 solve buffer.
        half = [load_member(p, torch_dtype="bfloat16", device="cuda") for p in paths]
        engine = FusionEngine(half)
        pre = engine.score([engine.encode(p) for p in PROMPTS])
        scores, input_ids, mask = pre.scores, pre.input_ids, pre.attention_mask
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            for k, m in enumerate(half):
                own = m.model(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits.float()
                assert engine.scorer.linear_head(k) is not None
                assert torch.allclose(scores[k], own[..., : engine.vocab_size], rtol=2e-2, atol=2e-2), k
        print("ok bfloat16 members: prompt logits in the float32 buffer match their own forward")
        bad = load_member(paths[1], name="broken", torch_dtype="float32", device="cuda")
        with torch.no_grad():
            bad.model.get_output_embeddings().weight.fill_(float("nan"))
        try:
            FusionEngine([load_member(paths[0], device="cuda"), bad]).generate(["import os"])
        except FloatingPointError as err:
            assert "'broken'" in str(err)
            print("ok NaN member named on cuda")
        else:
            raise AssertionError("NaN member not detected on cuda")
    return 0


if __name__ == "__main__":
    sys.exit(main())
