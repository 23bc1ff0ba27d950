"""Row formats per data kind: validate each row and normalise it to the columns the stages use.

Kinds and the formats each accepts (a "message list" is a non-empty list of
`{"role": "system" | "user" | "assistant" | "tool", "content": str}`; an assistant turn may carry `tool_calls` (a
list, the transformers chat-template convention) and a tool turn `name` and `tool_call_id`; other keys in a message
are dropped):

  sft         `text`                          -> text
              `prompt` + `completion`         -> prompt/completion (both strings, or both message
                                                 lists with an all-assistant completion)
              `messages` (with an assistant turn) -> messages
  preference  `prompt` + `chosen` + `rejected` -> explicit prompt (strings, or messages with
                                                 chosen/rejected starting with an assistant turn)
              `chosen` + `rejected` only       -> implicit prompt: the shared prefix is extracted
                                                 (messages: the common leading turns; strings: the
                                                 common prefix cut back to the last whitespace,
                                                 which goes with the answers: "Q: sky? A: blue" /
                                                 "Q: sky? A: green" -> "Q: sky? A:" + " blue" / " green").
                                                 Full conversations in chosen/rejected take this path
                                                 even when a string `prompt` column is also present.
              optional numeric `margin` (if the first row has it, every row must)
              HH-style transcripts (chosen/rejected strings "\n\nHuman: ...\n\nAssistant: ...", Anthropic's
              HH-RLHF format) are turned into conversations and take the implicit-prompt path, so a reward
              model trained on them reads the chat-template renderings a chat policy's PPO gives it.
  prompt      `prompt` (string or message list), or `messages` (a conversation ending in a user turn);
              every other column is kept (gold labels for reward functions) and must appear in every
              row of the source. An HH-style prompt ("\n\nHuman: ...\n\nAssistant:") becomes messages.

A source's own column names map onto these with `columns` in its recipe entry (see load.py).

The first row of a source fixes its format; a later row in another format is malformed. Columns a
format does not use are dropped (sft, preference) and listed in the report.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

from alignment.data.sources import MalformedRow

ROLES = ("system", "user", "assistant", "tool")
TOOL_KEYS = {"assistant": ("tool_calls",), "tool": ("name", "tool_call_id")}  # kept when a message has them


@dataclass(frozen=True)
class Format:
    layout: str            # "text" | "prompt_completion" | "messages" | "preference" | "prompt"
    conversational: bool
    columns: tuple[str, ...]

    def describe(self) -> str:
        names = {"text": "text", "prompt_completion": "prompt/completion", "messages": "messages",
                 "preference": "prompt/chosen/rejected", "prompt": "prompt"}
        style = "conversational" if self.conversational else "plain text"
        extra = [c for c in self.columns if c not in ("text", "prompt", "completion", "messages", "chosen", "rejected")]
        cols = f" + {', '.join(extra)}" if extra else ""
        return f"{names[self.layout]} ({style}){cols}"


@dataclass
class Normaliser:
    """Validates and normalises the rows of one source; `__call__` raises MalformedRow (without location)."""

    kind: str
    layout: str | None = None
    conversational: bool | None = None
    has_margin: bool | None = None
    extra_columns: tuple[str, ...] | None = None
    extra_types: dict[str, str] = field(default_factory=dict)
    ignored_columns: set[str] = field(default_factory=set)
    prompts_extracted: int = 0
    prompt_column_ignored: int = 0   # rows whose string `prompt` was ignored for whole conversations
    hh_transcripts: int = 0          # rows whose HH-style transcripts were turned into conversations

    @property
    def format(self) -> Format | None:
        if self.layout is None:
            return None
        columns = {"text": ("text",), "prompt_completion": ("prompt", "completion"), "messages": ("messages",),
                   "preference": ("prompt", "chosen", "rejected") + (("margin",) if self.has_margin else ()),
                   "prompt": ("prompt",) + (self.extra_columns or ())}[self.layout]
        return Format(self.layout, bool(self.conversational), columns)

    def __call__(self, row: object) -> dict:
        if not isinstance(row, dict):
            raise MalformedRow(f"expected an object with named columns, got {type(row).__name__}")
        return {"sft": self._sft, "preference": self._preference, "prompt": self._prompt}[self.kind](row)

    # -- sft ---------------------------------------------------------------------------------
    def _sft(self, row: dict) -> dict:
        if self.layout is None:
            if "messages" in row:
                self.layout = "messages"
            elif "prompt" in row or "completion" in row:
                self.layout = "prompt_completion"
            elif "text" in row:
                self.layout = "text"
            else:
                raise MalformedRow(f"no 'text', 'prompt'+'completion' or 'messages' column (columns: {_names(row)})")
        if self.layout == "text":
            self._ignore(row, ("text",))
            self._style(False, "text")
            return {"text": _text(_get(row, "text"), "text")}
        if self.layout == "messages":
            self._ignore(row, ("messages",))
            self._style(True, "messages")
            messages = _messages(_get(row, "messages"), "messages")
            if not any(m["role"] == "assistant" for m in messages):
                raise MalformedRow("'messages' has no assistant turn to learn from")
            return {"messages": messages}
        self._ignore(row, ("prompt", "completion"))
        prompt, conv = _text_or_messages(_get(row, "prompt"), "prompt")
        self._style(conv, "prompt")
        completion = _get(row, "completion")
        if conv:
            completion = _messages(completion, "completion", prompt_field="prompt")
            _all_assistant(completion, "completion")
        else:
            completion = _text(completion, "completion", prompt_field="prompt")
        return {"prompt": prompt, "completion": completion}

    # -- preference --------------------------------------------------------------------------
    def _preference(self, row: dict) -> dict:
        self.layout = "preference"
        if self.has_margin is None:
            self.has_margin = "margin" in row
        self._ignore(row, ("prompt", "chosen", "rejected", "margin"))
        hh = hh_messages(row.get("chosen")), hh_messages(row.get("rejected"))
        if hh[0] is not None and hh[1] is not None:
            row = {**row, "chosen": hh[0], "rejected": hh[1]}
            self.hh_transcripts += 1
        chosen, conv = _text_or_messages(_get(row, "chosen"), "chosen")
        rejected = _get(row, "rejected")
        rejected = _messages(rejected, "rejected", prompt_field="chosen") if conv else _text(rejected, "rejected", prompt_field="chosen")
        self._style(conv, "chosen")
        prompt = row.get("prompt")
        if conv and chosen[0]["role"] != "assistant":  # whole conversations: the shared turns are the prompt
            self.prompt_column_ignored += prompt is not None
            prompt, chosen, rejected = _split_conversations(chosen, rejected)
            self.prompts_extracted += 1
        elif conv:
            if prompt is None:
                raise MalformedRow("'prompt' is missing and 'chosen' starts with an assistant turn (no prompt turns to extract)")
            prompt = _messages(prompt, "prompt", prompt_field="chosen")
            if prompt[-1]["role"] == "assistant":
                raise MalformedRow("'prompt' ends with an assistant turn; the answer belongs in 'chosen'/'rejected'")
            if rejected[0]["role"] != "assistant":
                raise MalformedRow("'rejected' must start with an assistant turn, like 'chosen'")
        elif prompt is None:
            prompt, chosen, rejected = _split_texts(chosen, rejected)
            self.prompts_extracted += 1
        else:
            prompt = _text(prompt, "prompt", prompt_field="chosen")
        if chosen == rejected:
            raise MalformedRow("'chosen' and 'rejected' are identical")
        out = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        if self.has_margin:
            out["margin"] = _number(row.get("margin"), "margin")
        elif row.get("margin") is not None:
            raise MalformedRow("has a 'margin' but the first row of this source has none (give it in every row or none)")
        return out

    # -- prompt ------------------------------------------------------------------------------
    def _prompt(self, row: dict) -> dict:
        self.layout = "prompt"
        key = "messages" if "prompt" not in row and "messages" in row else "prompt"
        prompt, conv = _text_or_messages(_get(row, key), key)
        if not conv and (hh := hh_messages(prompt)) is not None:
            prompt, conv = (hh[:-1] if hh[-1] == {"role": "assistant", "content": ""} else hh), True
            self.hh_transcripts += 1
        if conv and prompt[-1]["role"] != "user":
            raise MalformedRow(f"'{key}' ends with a(n) {prompt[-1]['role']} turn; a prompt conversation ends with the "
                               "user turn to answer")
        self._style(conv, key)
        extras = tuple(sorted(k for k in row if k != key))
        if self.extra_columns is None:
            self.extra_columns = extras
        elif extras != self.extra_columns:
            missing = sorted(set(self.extra_columns) - set(extras))
            if missing:
                raise MalformedRow(f"'{missing[0]}' is missing (earlier rows have it)")
            new = sorted(set(extras) - set(self.extra_columns))
            raise MalformedRow(f"unexpected column '{new[0]}' (earlier rows do not have it)")
        for key in extras:  # one type per column, or the table cannot be built
            value = row[key]
            if value is None:
                continue
            kind = "number" if isinstance(value, (int, float)) and not isinstance(value, bool) else type(value).__name__
            first = self.extra_types.setdefault(key, kind)
            if first != kind:
                raise MalformedRow(f"'{key}' is {_kind_of(value)} but earlier rows hold {first} values")
        return {"prompt": prompt, **{k: row[k] for k in extras}}

    # -- helpers -----------------------------------------------------------------------------
    def _style(self, conversational: bool, key: str) -> None:
        if self.conversational is None:
            self.conversational = conversational
        elif self.conversational != conversational:
            now, before = ("a message list", "strings") if conversational else ("a string", "message lists")
            raise MalformedRow(f"'{key}' is {now} but earlier rows use {before}")

    def _ignore(self, row: dict, used: tuple[str, ...]) -> None:
        self.ignored_columns.update(k for k in row if k not in used)


def _names(row: dict) -> str:
    return ", ".join(map(str, row)) or "none"


def _get(row: dict, key: str) -> object:
    if row.get(key) is None:
        raise MalformedRow(f"'{key}' is missing")
    return row[key]


def _kind_of(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _text(value: object, key: str, prompt_field: str | None = None) -> str:
    if isinstance(value, list) and prompt_field:
        raise MalformedRow(f"'{key}' is a message list but '{prompt_field}' is a string (use strings or message lists for both)")
    if not isinstance(value, str):
        raise MalformedRow(f"'{key}' must be a string, got {_kind_of(value)}")
    if not value.strip():
        raise MalformedRow(f"'{key}' is empty")
    return value


def _text_or_messages(value: object, key: str) -> tuple[str | list[dict], bool]:
    if isinstance(value, str):
        return _text(value, key), False
    if isinstance(value, list):
        return _messages(value, key), True
    raise MalformedRow(f"'{key}' must be a string or a list of messages, got {_kind_of(value)}")


def _messages(value: object, key: str, prompt_field: str | None = None) -> list[dict]:
    if isinstance(value, str) and prompt_field:
        raise MalformedRow(f"'{key}' is a string but '{prompt_field}' is a message list (use strings or message lists for both)")
    if not isinstance(value, list):
        raise MalformedRow(f"'{key}' must be a list of messages, got {_kind_of(value)}")
    if not value:
        raise MalformedRow(f"'{key}' is an empty list of messages")
    out = []
    for i, message in enumerate(value, 1):
        if not isinstance(message, dict):
            raise MalformedRow(f"'{key}' message {i} must be an object with 'role' and 'content', got {_kind_of(message)}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            shown = "missing" if role is None else repr(role)
            raise MalformedRow(f"'{key}' message {i} has role {shown} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise MalformedRow(f"'{key}' message {i}: 'content' must be a string, got {_kind_of(content)}")
        kept = {k: message[k] for k in TOOL_KEYS.get(role, ()) if message.get(k) is not None}
        if not isinstance(kept.get("tool_calls", []), list):
            raise MalformedRow(f"'{key}' message {i}: 'tool_calls' must be a list, got {_kind_of(kept['tool_calls'])}")
        out.append({"role": role, "content": content, **kept})
    return out


def _all_assistant(messages: list[dict], key: str) -> None:
    for i, m in enumerate(messages, 1):
        if m["role"] != "assistant":
            raise MalformedRow(f"'{key}' message {i} has role '{m['role']}'; a completion holds assistant turns only")


def _number(value: object, key: str) -> float:
    if value is None:
        raise MalformedRow(f"'{key}' is missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MalformedRow(f"'{key}' must be a number, got {value!r}")
    if not math.isfinite(value):
        raise MalformedRow(f"'{key}' must be a finite number, got {value!r}")
    return float(value)


_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ ]?")


def hh_messages(value: object) -> list[dict] | None:
    """An HH-style transcript ("\n\nHuman: ...\n\nAssistant: ...", Anthropic's HH-RLHF) as messages; None when
    `value` is not one (it must start with a turn marker and hold both a Human and an Assistant turn)."""
    if not isinstance(value, str):
        return None
    turns = list(_HH_TURN.finditer(value))
    if not turns or turns[0].start() != 0 or {t.group(1) for t in turns} != {"Human", "Assistant"}:
        return None
    ends = [t.start() for t in turns[1:]] + [len(value)]
    return [{"role": "user" if t.group(1) == "Human" else "assistant", "content": value[t.end() : end].strip()}
            for t, end in zip(turns, ends)]


def _split_conversations(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """Implicit prompt of two conversations: their common leading turns."""
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    if k == len(chosen) == len(rejected):
        raise MalformedRow("'chosen' and 'rejected' are identical")
    if k == 0:
        raise MalformedRow("'chosen' and 'rejected' share no leading turns to use as the prompt (give a 'prompt' column)")
    prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
    if not chosen or not rejected:
        raise MalformedRow("one of 'chosen'/'rejected' is the other's prefix; each needs its own answer")
    if chosen[0]["role"] != "assistant" or rejected[0]["role"] != "assistant":
        raise MalformedRow("'chosen' and 'rejected' differ before the first answer (the turn after the shared prompt must be an assistant turn)")
    return prompt, chosen, rejected


def _split_texts(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Implicit prompt of two texts: the common prefix cut back to the start of its last whitespace run."""
    if chosen == rejected:
        raise MalformedRow("'chosen' and 'rejected' are identical")
    prefix = os.path.commonprefix([chosen, rejected])
    cut = len(prefix)
    while cut > 0 and not prefix[cut - 1].isspace():  # back to a word boundary
        cut -= 1
    while cut > 0 and prefix[cut - 1].isspace():  # the whitespace goes with the answers
        cut -= 1
    if cut == 0:
        raise MalformedRow("no 'prompt' column and 'chosen'/'rejected' share no leading words to use as the prompt")
    return chosen[:cut], chosen[cut:], rejected[cut:]
