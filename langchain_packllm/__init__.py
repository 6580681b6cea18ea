"""langchain-packllm: fuse several causal language models at test time (Pack of LLMs) inside LangChain."""

from importlib import metadata

from langchain_packllm.chat_models import ChatPackLLM
from langchain_packllm.engine import (
    FusionEngine,
    FusionOutput,
    FusionReport,
    LoglikelihoodResult,
    SamplingConfig,
    StreamChunk,
    WeightingConfig,
)
from langchain_packllm.llms import PackLLM
from langchain_packllm.members import Member, load_member

try:
    __version__ = metadata.version(__package__ or "langchain-packllm")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
del metadata

__all__ = [
    "ChatPackLLM",
    "FusionEngine",
    "FusionOutput",
    "FusionReport",
    "LoglikelihoodResult",
    "Member",
    "PackLLM",
    "SamplingConfig",
    "StreamChunk",
    "WeightingConfig",
    "__version__",
    "load_member",
]
