"""LangChain's standard integration tests for ChatPackLLM, on tiny random local members.

The members are random-weight models: everything about the interface is checked (messages, streaming,
usage, metadata, tool-call and structured-output shapes); what needs a model that understands the request
(the right argument value, choosing to call a tool on its own) is marked ``xfail`` with the reason.
"""

from __future__ import annotations

import pytest
from langchain_core.exceptions import OutputParserException
from langchain_tests.integration_tests import ChatModelIntegrationTests

from langchain_packllm import ChatPackLLM
from tests.tiny_pack import tiny_pack_paths

RANDOM = "tiny random members produce a well-formed call (constrained decoding) but cannot pick the value asked for"
FREE_TEXT = (
    "tiny random members fill free-form JSON strings until the token budget runs out, so the JSON (valid so far) "
    "does not close and the pydantic object cannot be built; dict schemas accept the partial object"
)


class TestChatPackLLMIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatPackLLM]:
        return ChatPackLLM

    @property
    def chat_model_params(self) -> dict:
        return {
            "model_ids": tiny_pack_paths(),
            "device": "cpu",
            "max_new_tokens": 8,
            "constrained_max_tokens": 64,
        }

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        return False  # one instance serves one pack; model= other than model_name is refused

    # ---------------------------------------------------------------- what random members cannot do

    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    @pytest.mark.xfail(reason=RANDOM + " (args == {'input': 3})")
    def test_tool_calling(self, model) -> None:
        super().test_tool_calling(model)

    @pytest.mark.xfail(reason=RANDOM + " (args == {'input': 3})")
    async def test_tool_calling_async(self, model) -> None:
        await super().test_tool_calling_async(model)

    @pytest.mark.xfail(reason=RANDOM + " (a non-empty answer_style string within the token budget)")
    def test_bind_runnables_as_tools(self, model) -> None:
        super().test_bind_runnables_as_tools(model)

    @pytest.mark.xfail(reason=RANDOM + " (Chinese/Japanese characters in the name)")
    def test_unicode_tool_call_integration(self, model, *, tool_choice=None, force_tool_call=True) -> None:
        super().test_unicode_tool_call_integration(
            model, tool_choice=tool_choice, force_tool_call=force_tool_call
        )

    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    @pytest.mark.xfail(
        reason="tool_choice='auto' lets the first token choose between an answer and a call; random members "
        "seldom choose the call"
    )
    def test_agent_loop(self, model) -> None:
        super().test_agent_loop(model)

    # Only the pydantic variant fails (a partial dict still satisfies the dict variants, which XPASS); the
    # xfail mark must sit on the test itself for langchain-tests, so it is narrowed by the exception.
    @pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
    @pytest.mark.xfail(raises=OutputParserException, reason=FREE_TEXT)
    def test_structured_output(self, model, schema_type) -> None:
        super().test_structured_output(model, schema_type)

    @pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
    @pytest.mark.xfail(raises=OutputParserException, reason=FREE_TEXT)
    async def test_structured_output_async(self, model, schema_type) -> None:
        await super().test_structured_output_async(model, schema_type)

    @pytest.mark.xfail(
        reason="json_mode forces a JSON object, not the schema: random members write other keys"
    )
    def test_json_mode(self, model) -> None:
        super().test_json_mode(model)
