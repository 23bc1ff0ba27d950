"""Tool-call parsers (rollout/tool_calls.py) and the five chat families' templates (tests/data/chat_templates):
each parser on good, absent and malformed calls; each template on a tool conversation, the prefix property that
multi-turn rollouts lean on (with the exact places where the real templates lack it), and template -> parser round
trips of tool calls."""

from __future__ import annotations

import re

import pytest
from helpers_templates import FAMILIES, family_tokenizer, save_family_tokenizer

from alignment.errors import UserError
from rollout.tool_calls import (CALL_FORMATS, MalformedToolCall, ToolCall, load_call_parser, mistral_call_id,
                                parse_hermes, parse_llama3_json, parse_mistral, tool_call_message)

REASONS = {"unclosed", "bad_json", "not_a_list", "no_name", "bad_arguments"}
LAMP = {"item": "lamp"}


def custom_parser(text: str) -> list[ToolCall]:  # named by 'tests.test_tool_calls:custom_parser'
    return [ToolCall("echo", {"text": text})]


# --- parsers ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, calls", [
    ('<tool_call>\n{"name": "lookup", "arguments": {"item": "lamp"}}\n</tool_call>',
     [ToolCall("lookup", LAMP, "call0")]),
    ('Let me look.\n<tool_call>\n{"name": "lookup", "arguments": {"item": "lamp"}}\n</tool_call>\n<tool_call>\n'
     '{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
     [ToolCall("lookup", LAMP, "call0"), ToolCall("add", {"a": 1, "b": 2}, "call1")]),
    ('<tool_call>{"name": "lookup", "arguments": "{\\"item\\": \\"lamp\\"}"}</tool_call>',
     [ToolCall("lookup", LAMP, "call0")]),
    ('<tool_call>{"name": "now"}</tool_call>', [ToolCall("now", {}, "call0")]),  # no arguments
    ('<think>\nI could write <tool_call> here.\n</think>\n\n<tool_call>\n{"name": "lookup", "arguments": '
     '{"item": "lamp"}}\n</tool_call>', [ToolCall("lookup", LAMP, "call0")]),  # Qwen3 reasoning is skipped
    ("The lamp is red.", []),
    ("", []),
    ("<think>\nstill thinking about <tool_call>", []),  # the turn ended inside its reasoning
])
def test_hermes_reads_calls(text, calls):
    assert parse_hermes(text) == calls


@pytest.mark.parametrize("text, calls", [
    ('{"name": "lookup", "parameters": {"item": "lamp"}}', [ToolCall("lookup", LAMP, "call0")]),
    ('<|python_tag|>{"name": "lookup", "arguments": {"item": "lamp"}}\n', [ToolCall("lookup", LAMP, "call0")]),
    (' {"name": "lookup", "parameters": "{\\"item\\": \\"lamp\\"}"}', [ToolCall("lookup", LAMP, "call0")]),
    ('{"name": "lookup", "parameters": {"item": "lamp"}}; {"name": "add", "parameters": {"a": 1}}',
     [ToolCall("lookup", LAMP, "call0"), ToolCall("add", {"a": 1}, "call1")]),
    ("The lamp is red.", []),
    ("The answer is {1, 2}.", []),  # JSON inside a sentence is no call: the turn must start with it
    ("", []),
])
def test_llama3_json_reads_calls(text, calls):
    assert parse_llama3_json(text) == calls


def test_mistral_reads_calls():
    v03 = ('[TOOL_CALLS] [{"name": "lookup", "arguments": {"item": "lamp"}}, '
           '{"name": "add", "arguments": "{\\"a\\": 1}"}]')
    assert parse_mistral(v03) == [ToolCall("lookup", LAMP, mistral_call_id(v03, 0)),
                                  ToolCall("add", {"a": 1}, mistral_call_id(v03, 1))]
    with_id = '[TOOL_CALLS] [{"name": "lookup", "arguments": {"item": "lamp"}, "id": "a1B2c3D4e"}]'
    assert parse_mistral(with_id) == [ToolCall("lookup", LAMP, "a1B2c3D4e")]
    v11 = '[TOOL_CALLS]lookup[ARGS]{"item": "lamp"}[TOOL_CALLS]add[CALL_ID]z9y8x7w6v[ARGS]{"a": 1}'
    assert parse_mistral(v11) == [ToolCall("lookup", LAMP, mistral_call_id(v11, 0)),
                                  ToolCall("add", {"a": 1}, "z9y8x7w6v")]
    assert parse_mistral("The lamp is red.") == [] and parse_mistral("") == []


def test_mistral_ids_are_nine_alphanumerics_fixed_by_the_turn():
    ids = {mistral_call_id(text, k) for text in ("a", "b") for k in (0, 1)}
    assert len(ids) == 4 and all(len(i) == 9 and i.isalnum() for i in ids)
    assert mistral_call_id("a", 0) == mistral_call_id("a", 0)


@pytest.mark.parametrize("parse, text, reason", [
    (parse_hermes, '<tool_call>\n{"name": "lookup", "arguments": {}}', "unclosed"),
    (parse_hermes, '{"name": "lookup", "arguments": {}}\n</tool_call>', "unclosed"),
    (parse_hermes, '<tool_call>{"name": "a"}<tool_call>{"name": "b"}</tool_call>', "unclosed"),
    (parse_hermes, "<tool_call>\n{name: lookup}\n</tool_call>", "bad_json"),
    (parse_hermes, '<tool_call>[{"name": "lookup"}]</tool_call>', "bad_json"),
    (parse_hermes, '<tool_call>{"arguments": {"item": "lamp"}}</tool_call>', "no_name"),
    (parse_hermes, '<tool_call>{"name": "", "arguments": {}}</tool_call>', "no_name"),
    (parse_hermes, '<tool_call>{"name": "lookup", "arguments": ["lamp"]}</tool_call>', "bad_arguments"),
    (parse_hermes, '<tool_call>{"name": "lookup", "arguments": "lamp"}</tool_call>', "bad_arguments"),
    (parse_hermes, '<tool_call>{"name": "lookup", "arguments": "[1]"}</tool_call>', "bad_arguments"),
    (parse_llama3_json, '{"name": "lookup", "parameters": {"item": ', "bad_json"),
    (parse_llama3_json, '<|python_tag|>brave_search.call(query="lamp")', "bad_json"),
    (parse_llama3_json, '{"name": "lookup", "parameters": {}} and then some', "bad_json"),
    (parse_llama3_json, '{"name": "lookup", "parameters": {}};', "bad_json"),
    (parse_llama3_json, '{"parameters": {"item": "lamp"}}', "no_name"),
    (parse_llama3_json, '{"name": "lookup", "parameters": [1]}', "bad_arguments"),
    (parse_mistral, '[TOOL_CALLS] [{"name": "lookup", "arguments": ', "bad_json"),
    (parse_mistral, '[TOOL_CALLS] [{"name": "lookup", "arguments": {}}] trailing', "bad_json"),
    (parse_mistral, '[TOOL_CALLS] {"name": "lookup", "arguments": {}}', "not_a_list"),
    (parse_mistral, '[TOOL_CALLS] [{"arguments": {}}]', "no_name"),
    (parse_mistral, '[TOOL_CALLS] [{"name": "lookup", "arguments": 3}]', "bad_arguments"),
    (parse_mistral, "[TOOL_CALLS]lookup", "bad_arguments"),
    (parse_mistral, "[TOOL_CALLS][ARGS]{}", "no_name"),
    (parse_mistral, "[TOOL_CALLS]lookup[ARGS]{oops", "bad_json"),
    (parse_mistral, '[TOOL_CALLS]lookup[ARGS]"lamp"', "bad_arguments"),
])
def test_malformed_calls_name_their_reason(parse, text, reason):
    with pytest.raises(MalformedToolCall) as caught:
        parse(text)
    assert caught.value.reason == reason and reason in REASONS and re.fullmatch(r"[a-z]+(_[a-z]+)*", reason)
    assert caught.value.message and "\n" not in caught.value.message


def test_load_call_parser():
    assert set(CALL_FORMATS) == {"hermes", "llama3_json", "mistral"}
    assert all(load_call_parser(name) is parse for name, parse in CALL_FORMATS.items())
    assert load_call_parser("tests.test_tool_calls:custom_parser")("hi") == custom_parser("hi")
    assert load_call_parser("llama3_json")('{"name": "lookup", "parameters": {"item": "lamp"}}') == [
        ToolCall("lookup", LAMP, "call0")]
    assert load_call_parser("tests.test_tool_calls:custom_parser")("hi") == [ToolCall("echo", {"text": "hi"})]
    for spec, words in [("xml", "is not auto, hermes, llama3_json, mistral"), ("auto", "tokenizer"),
                        ("no_such_module_xyz:parse", "no_such_module_xyz"), ("tests.test_tool_calls:REASONS", "not a")]:
        with pytest.raises(UserError, match=words) as caught:
            load_call_parser(spec)
        assert "\n" not in str(caught.value)


def test_tool_call_message_follows_the_transformers_convention():
    calls = [ToolCall("lookup", LAMP, "call0"), ToolCall("now", {}, "call1")]
    message = tool_call_message(calls, content="Let me see.")
    assert message == {"role": "assistant", "content": "Let me see.", "tool_calls": [
        {"type": "function", "id": "call0", "function": {"name": "lookup", "arguments": LAMP}},
        {"type": "function", "id": "call1", "function": {"name": "now", "arguments": {}}}]}
    assert tool_call_message([])["tool_calls"] == [] and tool_call_message([])["content"] == ""


# --- chat templates -----------------------------------------------------------------------------------------------

TOOLS = [{"type": "function", "function": {
    "name": "lookup", "description": "Look an item up.",
    "parameters": {"type": "object", "properties": {"item": {"type": "string", "description": "The item."}},
                   "required": ["item"]}}}]
FIRST, SECOND = ToolCall("lookup", LAMP, "a1b2c3d4e"), ToolCall("lookup", {"item": "chair"}, "b1b2c3d4e")


def _result(call: ToolCall, text: str) -> dict:
    return {"role": "tool", "content": text, "tool_call_id": call.id, "name": call.name}


# system, user, [call, result] x 2, final answer: the shape of a rollout (one call per turn: Llama 3.1's limit)
TOOL_LOOP = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What colors?"},
             tool_call_message([FIRST]), _result(FIRST, "red"), tool_call_message([SECOND], "And the chair."),
             _result(SECOND, "blue"), {"role": "assistant", "content": "Red and blue."}]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"},
        {"role": "assistant", "content": "bye"}]
CASES = {"tool_loop": (TOOL_LOOP, TOOLS, {}), "chat_tools": (CHAT, TOOLS, {}), "chat": (CHAT, None, {}),
         "tool_loop_nothink": (TOOL_LOOP, TOOLS, {"enable_thinking": False})}

# Where the real templates lack the prefix property: (case, boundary, k), k the length of the shorter conversation;
# "gen": render(messages[:k], add_generation_prompt=True) is not a prefix of render(messages) (messages[k] is the
# model's), "end": render(messages[:k]) is not (messages[k-1] is the model's).
PREFIX_BREAKS = {
    "qwen2.5": set(),
    "llama3.1": set(),
    # tool_use template: the last tool turn ends "</tool_response><|im_end|>", one followed by more "...\n<|im_end|>"
    "hermes2pro": {("tool_loop", "gen", 4), ("tool_loop", "gen", 6), ("tool_loop_nothink", "gen", 4),
                   ("tool_loop_nothink", "gen", 6)},
    # the last assistant turn after the last user query gets a "<think>\n\n</think>\n\n" block, earlier ones none;
    # with enable_thinking=False the generation prompt holds that empty block too
    "qwen3": {("tool_loop", "end", 3), ("tool_loop", "end", 5), ("chat_tools", "end", 3), ("chat", "end", 3),
              ("tool_loop_nothink", "gen", 2), ("tool_loop_nothink", "end", 3), ("tool_loop_nothink", "gen", 4),
              ("tool_loop_nothink", "end", 5)},
    # the system message is written only into a user turn that ends the conversation; [AVAILABLE_TOOLS] goes before
    # the last user turn, so it moves when another user turn follows
    "glm4.5": set(),
    # a final answer that ends the conversation closes with <|return|>, one followed by more with <|end|>; a
    # generation prompt after a tool result renders the tool call's analysis differently
    "gpt-oss": {("chat", "end", 3), ("chat_tools", "end", 3), ("tool_loop", "end", 5), ("tool_loop", "gen", 6),
                ("tool_loop_nothink", "end", 5), ("tool_loop_nothink", "gen", 6)},
    "mistral_v0.3": {("tool_loop", "gen", 2), ("tool_loop_nothink", "gen", 2), ("chat", "gen", 2), ("chat", "gen", 4),
                     ("chat_tools", "gen", 2), ("chat_tools", "end", 3), ("chat_tools", "gen", 4)},
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return request.param, FAMILIES[request.param], family_tokenizer(request.param)


def _render(tokenizer, messages, tools=None, generation_prompt=False, **extra) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=generation_prompt,
                                         tokenize=False, **extra)


def test_template_renders_a_tool_conversation(family):
    name, fam, tokenizer = family
    text = _render(tokenizer, TOOL_LOOP, TOOLS, generation_prompt=True)
    assert "Look an item up." in text and "What colors?" in text and "Red and blue." in text
    assert text.count("lamp") == 1 and "red" in text and "blue" in text  # the call and the tool results
    assert fam.eos in text and (fam.bos is None or text.startswith(fam.bos))
    without_prompt = _render(tokenizer, TOOL_LOOP, TOOLS)
    if name != "gpt-oss":  # gpt-oss closes the conversation's last answer with <|return|>, else with <|end|>
        assert text.startswith(without_prompt)
    if name == "mistral_v0.3":  # no generation prompt: the model answers right after [/INST] or [/TOOL_RESULTS]
        assert text == without_prompt
    else:
        assert "assistant" in text[len(without_prompt):]
    if fam.template.startswith("qwen"):  # the others write a tool-call turn without its content
        assert "And the chair." in text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    for token in (*fam.specials, *fam.markers):
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1, token


def test_prefix_property_at_assistant_turn_boundaries(family):
    name, fam, tokenizer = family
    breaks = set()
    for case, (messages, tools, extra) in CASES.items():
        full = _render(tokenizer, messages, tools, **extra)
        for k in range(1, len(messages)):
            if messages[k]["role"] == "assistant" and messages[k - 1]["role"] != "assistant":
                boundary, shorter = "gen", _render(tokenizer, messages[:k], tools, generation_prompt=True, **extra)
            elif messages[k - 1]["role"] == "assistant":
                boundary, shorter = "end", _render(tokenizer, messages[:k], tools, **extra)
            else:
                continue
            if not full.startswith(shorter):
                breaks.add((case, boundary, k))
    assert breaks == PREFIX_BREAKS[name]


@pytest.mark.parametrize("calls", [[FIRST], [FIRST, SECOND]], ids=["one", "two"])
def test_template_tool_calls_parse_back(family, calls):
    name, fam, tokenizer = family
    if name == "gpt-oss" and len(calls) > 1:  # its template writes each call as a message of its own
        calls = calls[:1]
    if name == "llama3.1" and len(calls) > 1:
        with pytest.raises(Exception, match="single tool-calls"):  # the official template's own limit
            _render(tokenizer, [TOOL_LOOP[1], tool_call_message(calls)], TOOLS)
        return
    messages = [TOOL_LOOP[1], tool_call_message(calls)]
    prompt = _render(tokenizer, messages[:1], TOOLS, generation_prompt=True)
    rendered = _render(tokenizer, messages, TOOLS)
    assert rendered.startswith(prompt)
    turn = rendered[len(prompt):]
    ends = [e for e in fam.ends if turn.rstrip().endswith(e)]  # GLM's template ends a turn by the next role's token
    turn = turn[:turn.rindex(ends[0])] if ends else turn.rstrip()  # parsers get a turn without its end (turn_text)
    parsed = load_call_parser(fam.call_format, tokenizer, list(fam.ends))(turn)
    if fam.call_format != "mistral":  # only Mistral's template writes the ids
        parsed = [ToolCall(c.name, c.arguments, calls[k].id) for k, c in enumerate(parsed)]
    assert parsed == calls


def test_families_share_one_vocabulary_and_save(tmp_path):
    from transformers import AutoTokenizer

    vocabularies = {name: family_tokenizer(name).get_vocab() for name in FAMILIES}
    first = next(iter(vocabularies.values()))
    assert all(v == first for v in vocabularies.values()) and 900 <= len(first) <= 1100
    path = save_family_tokenizer("qwen3", tmp_path / "qwen3")
    loaded = AutoTokenizer.from_pretrained(path)
    assert loaded.chat_template == FAMILIES["qwen3"].chat_template
    assert (loaded.eos_token, loaded.pad_token, len(loaded)) == ("<|im_end|>", "<|endoftext|>", len(first))
