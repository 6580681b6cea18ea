"""Constrained decoding: a mask on the fused scores so that only text a grammar accepts can be produced.

The grammars (JSON schemas, or a Lark grammar with inline ``%json`` schemas) are compiled and matched by
`llguidance <https://github.com/guidance-ai/llguidance>`_, a Rust library that computes the set of allowed
tokens for a whole vocabulary in well under a millisecond per step. :class:`GrammarLogitsProcessor` is a
transformers-style logits processor: put it in ``SamplingConfig(logits_processors=(...))`` and the engine
applies it to the fused scores (Eq. 1) before temperature, top-k and top-p.

Example::

    >>> grammar = json_schema_grammar({"type": "object"})
    >>> sampling = SamplingConfig(processor_factories=(GrammarLogitsProcessor.factory(grammar),))
    >>> engine.generate([prompt], sampling=sampling)[0].text
    '{"a": 1}'
"""

from __future__ import annotations

import json
import threading
from typing import Any

import llguidance
import llguidance.hf
import llguidance.torch
import torch
from llguidance import LLMatcher

_TOKENIZERS: dict[tuple, tuple[Any, llguidance.LLTokenizer]] = {}
_TOKENIZERS_LOCK = threading.Lock()

# A plain answer (any text that does not start with "{") or a JSON tool call: the choice under
# tool_choice="auto". The first character decides.
_AUTO_TEMPLATE = "start: TEXT | call\nTEXT: /[^{](.|\\n)*/\ncall: %json {schema}\n"


def ll_tokenizer(
    tokenizer, vocab_size: int, eos_token_ids: list[int] | None = None
) -> llguidance.LLTokenizer:
    """llguidance's view of a Hugging Face fast tokenizer, built once per (tokenizer, width, EOS ids).

    ``vocab_size`` is the width of the scores (a model's output layer may be wider than the tokenizer);
    ``eos_token_ids`` are the tokens that end a generation (default: the tokenizer's EOS).
    """
    eos = sorted(set(eos_token_ids)) if eos_token_ids else None
    key = (id(tokenizer), vocab_size, tuple(eos or ()))
    with _TOKENIZERS_LOCK:
        cached = _TOKENIZERS.get(key)
        if cached is not None and cached[0] is tokenizer:
            return cached[1]
        try:
            ll_tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)
        except ValueError as err:
            raise ValueError(
                f"Constrained decoding needs a fast (Rust `tokenizers`) tokenizer; got {type(tokenizer).__name__}. "
                "Load the members with AutoTokenizer.from_pretrained(..., use_fast=True)."
            ) from err
        _TOKENIZERS[key] = (tokenizer, ll_tok)
        return ll_tok


def strict_schema(schema: Any) -> Any:
    """A copy of a JSON schema where objects that list ``properties`` allow no others (as OpenAI's strict
    mode does): generated arguments then hold only the declared keys."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_schema(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    if isinstance(schema.get("properties"), dict):  # property names are not schemas: keep them as they are
        out["properties"] = {k: strict_schema(v) for k, v in schema["properties"].items()}
    return out


def tool_call_schema(tools: list[dict[str, Any]]) -> dict[str, Any]:
    """JSON schema of one call to one of ``tools`` (OpenAI tool dicts): ``{"name": ..., "arguments": {...}}``,
    arguments restricted to the declared parameters."""
    if not tools:
        raise ValueError("A tool call needs at least one tool; got none.")
    calls = []
    for t in tools:
        fn = t["function"]
        params = strict_schema(fn.get("parameters") or {"type": "object", "properties": {}})
        calls.append(
            {
                "type": "object",
                "properties": {"name": {"const": fn["name"]}, "arguments": params},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


# Compact JSON: ", " and ": " separators and no other whitespace, so that a model cannot spend its token
# budget on blanks (llguidance otherwise allows any whitespace between tokens).
_JSON_OPTIONS = {"whitespace_flexible": False}


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """An llguidance grammar accepting exactly the (compact) JSON documents valid for ``schema``."""
    return LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)


def text_or_call_grammar(call_schema: dict[str, Any]) -> str:
    """An llguidance grammar accepting a plain answer or a JSON object valid for ``call_schema``."""
    schema = {**call_schema, "x-guidance": _JSON_OPTIONS}
    return LLMatcher.grammar_from_lark(_AUTO_TEMPLATE.replace("{schema}", json.dumps(schema)))


class GrammarLogitsProcessor:
    """Masks the scores of every token that would leave the grammar; one matcher per batch row.

    The engine passes ``input_ids`` as the left-padded prompts (width ``L``, equal for all rows) followed by
    the generated tokens. The first call of a generation records ``L``; later calls feed each row's matcher
    only the tokens after it, so the prompt is never matched against the grammar. A call whose width does not
    grow starts a new generation, so one processor may serve several calls (never concurrently).
    """

    def __init__(self, grammar: str, tokenizer, vocab_size: int, eos_token_ids: list[int] | None = None):
        self.grammar = grammar
        self.vocab_size = vocab_size
        self._tokenizer = ll_tokenizer(tokenizer, vocab_size, eos_token_ids)
        error = LLMatcher.validate_grammar(grammar, self._tokenizer)
        if error:
            raise ValueError(f"Invalid grammar for constrained decoding: {error}")
        self._prompt_width: int | None = None
        self._last_width: int | None = None
        self._matchers: list[LLMatcher] = []
        self._consumed: list[int] = []

    @classmethod
    def for_reference(cls, grammar: str, reference) -> GrammarLogitsProcessor:
        """A processor over a call's reference (:class:`~langchain_packllm.reference.Reference`): its
        tokenizer, the width of the fused scores and the EOS ids that end the call."""
        return cls(grammar, reference.tokenizer, reference.vocab_size, sorted(reference.eos_ids))

    @classmethod
    def factory(cls, grammar: str):
        """A ``SamplingConfig(processor_factories=...)`` entry: builds the processor from each call's plan,
        over whichever reference member the call reads with."""
        return lambda plan: [cls.for_reference(grammar, plan.reference)]

    def errors(self) -> list[str | None]:
        """Each row's matcher error (None when the row's text is valid so far)."""
        return [m.get_error() if m.is_error() else None for m in self._matchers]

    def _start(self, batch: int, width: int) -> None:
        self._prompt_width = width
        self._matchers = [LLMatcher(self._tokenizer, self.grammar) for _ in range(batch)]
        self._consumed = [0] * batch

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        batch, width = input_ids.shape
        if self._last_width is None or width <= self._last_width or len(self._matchers) != batch:
            self._start(batch, width)
        self._last_width = width
        generated = input_ids[:, self._prompt_width :].tolist()  # (B, t): only what was generated
        bitmask = torch.full(
            llguidance.torch.get_bitmask_shape(batch, self.vocab_size), -1, dtype=torch.int32
        )
        for b, matcher in enumerate(self._matchers):
            if not (matcher.is_stopped() or matcher.is_error()):
                matcher.consume_tokens(generated[b][self._consumed[b] :])
            self._consumed[b] = len(generated[b])
            if matcher.is_error():  # cannot happen while the mask is obeyed; end the row rather than go on
                bitmask[b] = 0
                for eos in self._tokenizer.eos_tokens:
                    bitmask[b, eos // 32] |= 1 << (eos % 32)
            else:  # a finished grammar (stopped) allows only EOS
                llguidance.torch.fill_next_token_bitmask(matcher, bitmask, b)
        bits = torch.arange(32, dtype=torch.int32)
        allowed = ((bitmask.unsqueeze(-1) >> bits) & 1).bool().reshape(batch, -1)[:, : scores.shape[-1]]
        return scores.masked_fill(~allowed.to(scores.device), float("-inf"))
