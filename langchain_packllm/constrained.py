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
import re
import threading
from dataclasses import dataclass
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


# ---------------------------------------------------------------------- calls written in the text ("auto")

# Under tool_choice="auto" a chat model may write its call in its own format instead of starting the answer
# with "{": Qwen2.5's <tool_call>{...}</tool_call> (Hermes style), or a fenced ```json block. The JSON
# object starts where these openers end.
_TAG, _TAG_END = "<tool_call>", "</tool_call>"
_OPENER = re.compile(r"<tool_call>\s*|```[ \t]*(?:json)?[ \t]*\n?\s*(?=\{)", re.IGNORECASE)
# What may still follow "```" before the "{" of a fenced call (the fence is held back while it may open one)
_FENCE_PENDING = re.compile(r"[ \t]*(?:j(?:s(?:o(?:n)?)?)?)?[ \t]*\n?\s*(?:\{.*)?", re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class TextCall:
    """A tool call found in an answer's text: ``error`` is None when ``name`` is a bound tool and ``args``
    are valid for its parameters' schema; ``raw`` is the call's text."""

    name: str | None
    args: dict[str, Any] | None
    raw: str
    error: str | None


def _may_open(text: str, p: int) -> bool:
    """Whether a call may open at ``text[p]`` (an opener, or the start of one cut by the end of the text)."""
    rest = text[p:]
    if rest.startswith(_TAG) or _TAG.startswith(rest):
        return True
    if rest.startswith("```"):
        return _FENCE_PENDING.fullmatch(rest, 3) is not None
    return "```".startswith(rest)


def streamable_length(text: str) -> int:
    """How much of an answer's (left-stripped) text can be streamed under ``tool_choice="auto"`` before
    decoding ends: nothing when it starts with ``{`` (a call), else the text before the first place a call
    may open (full or partial ``<tool_call>`` / fence opener), without trailing blanks (the message's content
    may end there)."""
    if text.startswith("{"):
        return 0
    end = len(text)
    for p, ch in enumerate(text):
        if ch in "<`" and _may_open(text, p):
            end = p
            break
    return len(text[:end].rstrip())


def call_is_open(text: str) -> bool:
    """Whether a tool call has started in an answer's (left-stripped) text and not closed yet: the answer
    starts with ``{`` (the grammar closes that call), or its last ``<tool_call>`` / fenced JSON opener has
    no complete JSON object after it yet."""
    if text.startswith("{"):
        return True
    last = None
    for m in _OPENER.finditer(text):
        last = m
    if last is None:  # an opener not complete yet ("<tool_", "```json" before its "{")
        return any(ch in "<`" and _may_open(text, p) for p, ch in enumerate(text))
    try:
        json.JSONDecoder().raw_decode(text, last.end())
    except json.JSONDecodeError:
        return True
    return False


def _validate(
    name: Any, args: Any, tools: dict[str, dict[str, Any]], ll_tok: llguidance.LLTokenizer
) -> str | None:
    if not isinstance(name, str) or name not in tools:
        return f"Not a call of a bound tool: {name!r} (the tools are {sorted(tools)})."
    if not isinstance(args, dict):
        return f"The arguments of {name!r} are not a JSON object: {args!r}."
    params = tools[name].get("parameters") or {"type": "object", "properties": {}}
    grammar = LLMatcher.grammar_from_json_schema(strict_schema(params))
    matcher = LLMatcher(ll_tok, grammar, log_level=0)
    text = json.dumps(args, ensure_ascii=False)
    if matcher.consume_tokens(ll_tok.tokenize_str(text)) and matcher.is_accepting():
        return None
    detail = matcher.get_error() if matcher.is_error() else "incomplete"
    return (
        f"The arguments of {name!r} do not match its parameters' schema: {text} ({detail.splitlines()[0]})."
    )


def text_tool_calls(
    text: str, tools: list[dict[str, Any]], ll_tok: llguidance.LLTokenizer, finish_reason: str = "stop"
) -> tuple[list[TextCall], str]:
    """The tool calls written in an answer's text, and the text without them.

    A ``<tool_call>...</tool_call>`` block is always a call: one that is not JSON, names no bound tool or
    has arguments invalid for the tool's schema comes back with ``error`` set. A fenced ```json block is a
    call when its object has the shape of one (``{"name": ..., "arguments": {...}}``, or ``"parameters"``);
    any other fenced JSON stays text. Arguments given as a JSON string are read as JSON."""
    by_name = {t["function"]["name"]: t["function"] for t in tools}
    decoder = json.JSONDecoder()
    calls, pieces, pos, i = [], [], 0, 0
    while (m := _OPENER.search(text, i)) is not None:
        tagged = m.group().lower().startswith("<")
        start = m.end()
        closer = _TAG_END if tagged else "```"
        try:
            data, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError as err:
            if not tagged:
                i = start
                continue
            close = text.find(_TAG_END, start)
            end = len(text) if close < 0 else close
            why = "ran out of tokens (raise max_tokens)" if finish_reason == "length" else str(err)
            calls.append(TextCall(None, None, text[start:end].strip(), f"Tool call is not JSON: {why}"))
        else:
            shaped = (
                isinstance(data, dict) and "name" in data and ("arguments" in data or "parameters" in data)
            )
            if not shaped and not tagged:
                i = end
                continue
            name = data.get("name") if isinstance(data, dict) else None
            args = data.get("arguments", data.get("parameters")) if isinstance(data, dict) else None
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    pass
            calls.append(TextCall(name, args, text[start:end], _validate(name, args, by_name, ll_tok)))
        after = len(text[end:]) - len(text[end:].lstrip())
        if text.startswith(closer, end + after):
            end += after + len(closer)
        pieces.append(text[pos : m.start()])
        pos = i = end
    pieces.append(text[pos:])
    return calls, "".join(pieces).strip() if calls else text


class AutoCallBudget:
    """Under ``tool_choice="auto"``: a plain answer ends after ``text_budget`` tokens (``max_tokens``), while
    an answer in which a tool call has started by then (see :func:`call_is_open`) decodes on, up to the call
    budget the engine was given (``constrained_max_tokens``), and ends as soon as its call closes.

    Ending a row means allowing only its first EOS id; ``cut[b]`` records a row ended at ``text_budget``
    (its finish reason is ``"length"``). One processor per call (it keeps the call's prompt width)."""

    def __init__(self, reference, text_budget: int):
        self.decode = reference.decode
        self.eos = min(reference.eos_ids)
        self.text_budget = text_budget
        self._prompt_width: int | None = None
        self.cut: dict[int, bool] = {}

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        width = input_ids.shape[1]
        if self._prompt_width is None:
            self._prompt_width = width
        generated = width - self._prompt_width
        if generated < self.text_budget:
            return scores
        rows = input_ids[:, self._prompt_width :].tolist()
        for b, ids in enumerate(rows):
            if call_is_open(self.decode(ids).lstrip()):
                continue
            self.cut.setdefault(b, generated == self.text_budget)
            scores[b] = float("-inf")
            scores[b, self.eos] = 0.0
        return scores
