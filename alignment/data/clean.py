"""Text cleaning (`data.clean`) and the token-length measure of a row.

Cleaning applies to the text fields of a row (text, prompt, completion, messages, chosen, rejected;
for message lists, each message's content) and never to the extra columns of prompt data:
  strip_html           remove HTML/XML tags, comments and <script>/<style> blocks, then unescape
                       entities (`&amp;` -> `&`). Only tag-shaped text is removed: "a < b > c" stays.
  strip_control_chars  remove Unicode control characters except newline and tab; CR LF / CR -> LF.
  normalize_whitespace collapse runs of spaces/tabs to one space, trim spaces at line ends, keep at
                       most one blank line, trim the field. Where two strings are joined into one
                       sequence (a string prompt and its completion / chosen / rejected), the joint
                       keeps one whitespace character if it had any, since it changes tokenisation.
                       (This flattens code indentation; turn it off for code data.)
The caller counts the rows each step changed, and drops rows a step left empty.
"""

from __future__ import annotations

import html
import re
import unicodedata

from alignment.config.sections import CleanSection

_HTML_BLOCK = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_HTML_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9:-]*(?:\s[^<>]*)?/?>")
_HSPACE = re.compile(r"[^\S\n]+")
_TRAILING = re.compile(r" +\n")
_BLANKS = re.compile(r"\n{3,}")

TEXT_FIELDS = ("text", "prompt", "completion", "messages", "chosen", "rejected")


def strip_html(text: str) -> str:
    text = _HTML_BLOCK.sub("", text)
    text = _HTML_COMMENT.sub("", text)
    text = _HTML_TAG.sub("", text)
    return html.unescape(text)


def strip_control_chars(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch) != "Cc")


def normalize_whitespace(text: str, keep_start: bool = False, keep_end: bool = False) -> str:
    out = _HSPACE.sub(" ", text)
    out = _TRAILING.sub("\n", out)
    out = _BLANKS.sub("\n\n", out)
    out = out.strip()
    if keep_start and text[:1].isspace() and out:
        out = " " + out
    if keep_end and text[-1:].isspace() and out:
        out = out + " "
    return out


class Cleaner:
    """Applies the enabled steps to a normalised row; returns the new row and the steps that changed it."""

    def __init__(self, clean: CleanSection):
        self.steps = []
        if clean.strip_html:
            self.steps.append(("html stripped", lambda t, s, e: strip_html(t)))
        if clean.strip_control_chars:
            self.steps.append(("control chars removed", lambda t, s, e: strip_control_chars(t)))
        if clean.normalize_whitespace:
            self.steps.append(("whitespace normalised", normalize_whitespace))

    def __call__(self, row: dict) -> tuple[dict, set[str]]:
        if not self.steps:
            return row, set()
        changed: set[str] = set()
        out = dict(row)
        string_pair = isinstance(row.get("prompt"), str) and any(k in row for k in ("completion", "chosen", "rejected"))
        for key in TEXT_FIELDS:
            value = row.get(key)
            if isinstance(value, str):
                keep_end = string_pair and key == "prompt"
                keep_start = string_pair and key != "prompt"
                out[key] = self._text(value, keep_start, keep_end, changed)
            elif isinstance(value, list):
                out[key] = [{**m, "content": self._text(m["content"], False, False, changed)} for m in value]
        return out, changed

    def _text(self, text: str, keep_start: bool, keep_end: bool, changed: set[str]) -> str:
        for name, step in self.steps:
            new = step(text, keep_start, keep_end)
            if new != text:
                changed.add(name)
                text = new
        return text


def empty_field(row: dict) -> str | None:
    """The first text field that cleaning left empty (message contents count), or None."""
    for key in TEXT_FIELDS:
        value = row.get(key)
        if isinstance(value, str) and not value.strip():
            return key
        if isinstance(value, list) and any(not m["content"].strip() for m in value):
            return key
    return None


def sequences(row: dict, tokenizer) -> list[str]:
    """The full sequences a trainer builds from a row, as text; a row's length is the longest one's.

    sft: the text / prompt + completion / all messages; preference: prompt + chosen and
    prompt + rejected; prompt: the prompt (with the generation prompt for messages). Message lists
    go through the tokenizer's chat template; without one, the contents are joined by newlines.
    """
    if "text" in row:
        return [row["text"]]
    if "messages" in row:
        return [_render(row["messages"], tokenizer, False)]
    prompt = row["prompt"]
    answers = [row[k] for k in ("completion", "chosen", "rejected") if k in row]
    if not answers:
        return [_render(prompt, tokenizer, True) if isinstance(prompt, list) else prompt]
    if isinstance(prompt, list):
        return [_render(prompt + a, tokenizer, False) for a in answers]
    return [prompt + a for a in answers]


def _render(messages: list[dict], tokenizer, add_generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return "\n".join(m["content"] for m in messages)


def token_lengths(texts: list[str], tokenizer, templated: bool) -> list[int]:
    """Token counts, batched. Chat-template output already holds its special tokens."""
    out: list[int] = []
    for start in range(0, len(texts), 1000):
        batch = tokenizer(texts[start:start + 1000], add_special_tokens=not templated)["input_ids"]
        out.extend(len(ids) for ids in batch)
    return out
