"""LangChain's standard unit tests for ChatPackLLM, on tiny local members."""

from __future__ import annotations

from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_packllm import ChatPackLLM
from tests.tiny_pack import tiny_pack_paths


class TestChatPackLLMStandard(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatPackLLM]:
        return ChatPackLLM

    @property
    def chat_model_params(self) -> dict:
        return {
            "model_ids": tiny_pack_paths(),
            "device": "cpu",
            "max_new_tokens": 8,
        }  # wins over the standard max_tokens=100

    @property
    def supports_image_inputs(self) -> bool:
        return False  # text-only causal LMs

    @property
    def supports_json_mode(self) -> bool:
        return True
