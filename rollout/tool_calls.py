"""Reading tool calls out of a model turn's text.

Formats (`rollout.multi_turn.call_format`), each a strict parser of one model family's own output:
  hermes       Qwen2.5, Qwen3, Hermes-2-Pro: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks,
               several allowed, text around them allowed; a leading Qwen3 `<think>...</think>` block is skipped.
  llama3_json  Llama 3.1/3.2: the whole turn is one JSON object {"name": ..., "parameters": {...}} ("arguments" is
               accepted too), optionally after `<|python_tag|>`; several objects may be separated by ";".
  mistral      Mistral: `[TOOL_CALLS]` then a JSON list of {"name", "arguments"[, "id"]} (v0.3 templates), or
               `[TOOL_CALLS]name[ARGS]{...}` per call (v11+ templates; `name[CALL_ID]id[ARGS]{...}` too).
  auto         the tokenizer's own response parser: transformers' `parse_response` with the response template TRL
               attaches for known chat templates (Qwen2.5/Qwen3, Llama 3.1/3.2, GLM-4.5, gpt-oss, LFM2, Nemotron,
               Gemma 4), or one the tokenizer ships.
A recipe may name its own parser instead, 'module:function' taking the text and returning ToolCalls.

A turn without the format's call marker is the final answer ([]); a turn that has the marker but cannot be read
raises MalformedToolCall, whose `reason` becomes a metric (rollout/errors/malformed_call_<reason>). The reasons:
  unclosed       a <tool_call> without its </tool_call> (or a closing tag without an opening one)
  bad_json       text that must be JSON does not parse, has text after it, or is not the JSON object a call is
  not_a_list     Mistral v0.3: what follows [TOOL_CALLS] is JSON but not a list
  no_name        a call without a non-empty string "name"
  bad_arguments  arguments that are not an object (or a JSON string of one); Mistral v11: a call without [ARGS]
  unparseable    `auto` only: the tokenizer's parser failed

Ids are deterministic per turn: "call<k>" for hermes and llama3_json (their templates ignore ids), and for mistral
the call's own 9-character id when it has one, else 9 alphanumeric characters hashed from the turn's text and k
(Mistral's template requires exactly 9).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from alignment.errors import UserError


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict = field(default_factory=dict)
    id: str = "call0"


class MalformedToolCall(Exception):
    """A turn that tries to call a tool but cannot be read. `reason`: a short snake_case name (a metric's)."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(message or reason)
        self.reason = reason
        self.message = message or reason


def _arguments(name: str, arguments) -> dict:
    """A call's arguments as a dict: a dict as is, a JSON string of an object decoded ("" is no arguments)."""
    if isinstance(arguments, str):  # some formats carry the arguments as a JSON string
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            raise MalformedToolCall("bad_arguments", f"the arguments of {name} are a string that is not JSON") from None
    if not isinstance(arguments, dict):
        raise MalformedToolCall("bad_arguments", f"the arguments of {name} are {type(arguments).__name__}, "
                                                 "not an object")
    return arguments


def _call(body, call_id: str, arguments_keys: tuple[str, ...] = ("arguments",)) -> ToolCall:
    """The ToolCall of a decoded JSON call {"name": ..., <arguments key>: ...}; no arguments key: no arguments."""
    if not isinstance(body, dict):
        raise MalformedToolCall("bad_json", f"a call is JSON {type(body).__name__}, not an object")
    name = body.get("name")
    if not isinstance(name, str) or not name.strip():
        raise MalformedToolCall("no_name", "a call names no function")
    key = next((k for k in arguments_keys if k in body), None)
    return ToolCall(name, _arguments(name, body[key]) if key else {}, call_id)


def _json(text: str, what: str):
    """`text` (whitespace around it allowed) as JSON; bad_json when it is not exactly one JSON value."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise MalformedToolCall("bad_json", f"{what} is not JSON ({exc.msg} at character {exc.pos})") from None


def calls_from_message(message: dict) -> list[ToolCall]:
    """ToolCalls of a parsed assistant message (transformers' convention: tool_calls[i].function.{name, arguments})."""
    calls = []
    for k, item in enumerate(message.get("tool_calls") or []):
        function = item.get("function", item) if isinstance(item, dict) else None
        if not isinstance(function, dict):
            raise MalformedToolCall("no_name", f"tool call {k} names no function")
        calls.append(_call(function, item.get("id") or f"call{k}"))
    return calls


def tool_call_message(calls: list[ToolCall], content: str = "") -> dict:
    """An assistant message that makes `calls`, in the transformers chat-template convention (what chat templates
    render and SFT demonstrations hold)."""
    return {"role": "assistant", "content": content,
            "tool_calls": [{"type": "function", "id": c.id, "function": {"name": c.name, "arguments": c.arguments}}
                           for c in calls]}


# hermes ---------------------------------------------------------------------------------------------------------

_HERMES_TAG = re.compile(r"<tool_call>|</tool_call>")


def parse_hermes(text: str) -> list[ToolCall]:
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (Hermes, Qwen2.5, Qwen3)."""
    if "</think>" in text:  # Qwen3 reasoning: a call sketched while thinking is not a call
        text = text.rsplit("</think>", 1)[1]
    elif "<think>" in text:  # the turn ended inside its reasoning
        return []
    calls, opened = [], None
    for tag in _HERMES_TAG.finditer(text):
        if tag.group() == "<tool_call>":
            if opened is not None:
                raise MalformedToolCall("unclosed", "a <tool_call> block is not closed before the next one")
            opened = tag.end()
        else:
            if opened is None:
                raise MalformedToolCall("unclosed", "a </tool_call> closes no <tool_call>")
            k = len(calls)
            calls.append(_call(_json(text[opened:tag.start()], f"<tool_call> block {k}"), f"call{k}"))
            opened = None
    if opened is not None:
        raise MalformedToolCall("unclosed", "a <tool_call> block is not closed")
    return calls


# llama3_json ----------------------------------------------------------------------------------------------------

_PYTHON_TAG = "<|python_tag|>"


def parse_llama3_json(text: str) -> list[ToolCall]:
    """Llama 3.1/3.2 JSON calls: the turn is {"name": ..., "parameters": {...}} (after an optional <|python_tag|>),
    or several such objects separated by ";". A turn that starts otherwise is a final answer."""
    body = text.strip()
    if body.startswith(_PYTHON_TAG):
        body = body[len(_PYTHON_TAG):].strip()
    elif not body.startswith("{"):
        return []
    decoder, calls, at = json.JSONDecoder(), [], 0
    while True:
        try:
            value, end = decoder.raw_decode(body, at)
        except json.JSONDecodeError as exc:
            raise MalformedToolCall("bad_json", f"call {len(calls)} is not JSON ({exc.msg} at character {exc.pos})"
                                    ) from None
        calls.append(_call(value, f"call{len(calls)}", ("parameters", "arguments")))
        rest = body[end:].lstrip()
        if not rest:
            return calls
        if not rest.startswith(";"):
            raise MalformedToolCall("bad_json", f"text follows call {len(calls) - 1}: {rest[:30]!r}")
        at = len(body) - len(rest[1:].lstrip())


# mistral --------------------------------------------------------------------------------------------------------

_MISTRAL_MARKER = "[TOOL_CALLS]"
_ID_CHARS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def mistral_call_id(text: str, k: int) -> str:
    """9 alphanumeric characters, a hash of the turn's text and the call's index (Mistral's templates need 9)."""
    n = int.from_bytes(hashlib.sha256(f"{k}\n{text}".encode()).digest()[:8], "big")
    return "".join(_ID_CHARS[(n // 62**i) % 62] for i in range(9))


def parse_mistral(text: str) -> list[ToolCall]:
    """`[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]` (v0.3) or `[TOOL_CALLS]name[ARGS]{...}` (v11+)."""
    if _MISTRAL_MARKER not in text:
        return []
    calls = []

    def add(body, given_id=None):
        k = len(calls)
        if given_id is None and isinstance(body, dict):
            given_id = body.get("id")
        ok = isinstance(given_id, str) and len(given_id) == 9 and given_id.isalnum()
        calls.append(_call(body, given_id if ok else mistral_call_id(text, k)))

    for segment in text.split(_MISTRAL_MARKER)[1:]:
        segment = segment.strip()
        if segment.startswith(("[", "{")) and not segment.startswith(("[ARGS]", "[CALL_ID]")):  # v0.3: JSON
            value = _json(segment, "the text after [TOOL_CALLS]")
            if not isinstance(value, list):
                raise MalformedToolCall("not_a_list", f"[TOOL_CALLS] is followed by JSON {type(value).__name__}, "
                                                      "not a list of calls")
            for body in value:
                add(body)
        else:  # v11+: name[ARGS]{...}, or name[CALL_ID]id[ARGS]{...}
            name, has_args, arguments = segment.partition("[ARGS]")
            name, _, given_id = name.partition("[CALL_ID]")
            if not name.strip():
                raise MalformedToolCall("no_name", "a [TOOL_CALLS] call names no function")
            if not has_args:
                raise MalformedToolCall("bad_arguments", f"the call of {name.strip()} has no [ARGS]")
            add({"name": name.strip(), "arguments": _json(arguments, f"the [ARGS] of {name.strip()}")},
                given_id.strip() or None)
    return calls


CALL_FORMATS: dict[str, Callable[[str], list[ToolCall]]] = {
    "hermes": parse_hermes,
    "llama3_json": parse_llama3_json,
    "mistral": parse_mistral,
}


class ResponseParser:
    """`auto`: the tokenizer's response parser (transformers' parse_response, TRL's templates for known models)."""

    def __init__(self, tokenizer, end_tokens: list[str] | None = None):
        from trl.chat_template_utils import add_response_schema

        if getattr(tokenizer, "response_template", None) is None and getattr(tokenizer, "response_schema", None) is None:
            try:
                add_response_schema(tokenizer)
            except ValueError:  # TRL knows no parser for this template
                raise UserError("rollout.multi_turn.call_format: auto knows no tool-call parser for this chat template "
                                "(TRL's add_response_schema does not recognise it); set call_format to one of "
                                f"{', '.join(CALL_FORMATS)} or to your own 'module:function'") from None
        self.tokenizer = tokenizer
        # A turn reaches the parser without its end-of-turn token (TurnTokenizer.turn_text), but some response
        # templates need it (Llama's JSON call ends at <|eot_id|>, gpt-oss's at <|call|>): each is tried in turn.
        self.ends = ["", *(end_tokens or [tokenizer.eos_token])]
        # Some templates write part of the reply in the generation prompt (a <think> block): the parser needs it.
        self.prefix = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                                    tokenize=False)

    def __call__(self, text: str) -> list[ToolCall]:
        first_error = None
        for end in self.ends:
            try:
                message = self.tokenizer.parse_response(text + end, prefix=self.prefix)
            except Exception as exc:  # the parser's regex or JSON step: the turn tried to call but cannot be read
                first_error = first_error or exc
                continue
            return calls_from_message(message)
        raise MalformedToolCall("unparseable", f"{type(first_error).__name__}: {(str(first_error).splitlines() or [''])[0]}")


def load_call_parser(spec: str, tokenizer=None, end_tokens: list[str] | None = None) -> Callable[[str], list[ToolCall]]:
    """The parser `rollout.multi_turn.call_format` names: a format of CALL_FORMATS, auto (needs the tokenizer, and the
    tokens that end a model turn: see ResponseParser), or 'module:function' / 'file.py:function'."""
    if spec in CALL_FORMATS:
        return CALL_FORMATS[spec]
    if spec == "auto":
        if tokenizer is None:
            raise UserError("rollout.multi_turn.call_format: auto reads calls with the model's tokenizer, and none "
                            f"was given; name a format ({', '.join(CALL_FORMATS)}) instead")
        return ResponseParser(tokenizer, end_tokens)
    if ":" in spec:
        from alignment.user_code import load_callable

        return load_callable(spec, "rollout.multi_turn.call_format")
    raise UserError(f"rollout.multi_turn.call_format: '{spec}' is not auto, {', '.join(CALL_FORMATS)} or "
                    "'module:function'")
