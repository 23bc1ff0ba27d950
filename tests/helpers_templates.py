"""Tokenizers of seven tool-calling chat families, built locally (no hub): one shared byte-level BPE vocabulary holding
every family's special tokens (so the families share ids and vocabulary size, and one random model serves them all),
saved with each family's chat template, end-of-turn token, BOS and pad token. The templates are the released ones
where TRL ships them (trl/chat_templates: Qwen2.5, Qwen3, Llama 3.1, GLM-4.5, gpt-oss, byte for byte, which TRL's
`auto` response parsing recognises), else our rewrites of the official ones (tests/data/chat_templates: Hermes-2-Pro,
Mistral v0.3).

    from helpers_templates import FAMILIES, save_family_tokenizer
    path = save_family_tokenizer("qwen3", tmp_path / "tok")   # AutoTokenizer.from_pretrained(path) reads it back
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

TEMPLATES_DIR = Path(__file__).parent / "data" / "chat_templates"


@dataclass(frozen=True)
class TemplateFamily:
    template: str  # "trl:<name>" (trl.chat_template_utils.<name>_chat_template) or a file in tests/data/chat_templates
    eos: str  # the end-of-turn token the model samples (the tokenizer's eos_token)
    ends: tuple[str, ...]  # every token that ends a model turn (the checkpoint's generation-config EOS ids)
    bos: str | None  # the BOS the template writes ({{ bos_token }}), None when it writes none
    pad: str  # the pad token (the checkpoint's own when it has one, else the shared <pad>)
    specials: tuple[str, ...]  # special tokens: never split, dropped by decode(skip_special_tokens=True)
    markers: tuple[str, ...]  # added tokens that stay in decoded text (the tool-call and reasoning tags)
    call_format: str  # the rollout.tool_calls format that reads its model's tool calls

    @property
    def chat_template(self) -> str:
        if self.template.startswith("trl:"):
            import trl.chat_template_utils as shipped

            return getattr(shipped, f"{self.template[4:]}_chat_template")
        return (TEMPLATES_DIR / self.template).read_text(encoding="utf-8")


_QWEN_SPECIALS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
_LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                    "<|eom_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>")

FAMILIES: dict[str, TemplateFamily] = {
    "qwen2.5": TemplateFamily("trl:qwen2_5", "<|im_end|>", ("<|im_end|>", "<|endoftext|>"), None, "<|endoftext|>",
                              _QWEN_SPECIALS, ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"),
                              "auto"),
    "qwen3": TemplateFamily("trl:qwen3", "<|im_end|>", ("<|im_end|>", "<|endoftext|>"), None, "<|endoftext|>",
                            _QWEN_SPECIALS, ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
                                             "<think>", "</think>"), "auto"),
    "hermes2pro": TemplateFamily("hermes2pro.jinja", "<|im_end|>", ("<|im_end|>", "<|end_of_text|>"),
                                 "<|begin_of_text|>", "<|end_of_text|>",
                                 ("<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"),
                                 ("<tools>", "</tools>", "<tool_call>", "</tool_call>", "<tool_response>",
                                  "</tool_response>"), "hermes"),
    "llama3.1": TemplateFamily("trl:llama3_1", "<|eot_id|>", ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"),
                               "<|begin_of_text|>", "<|finetune_right_pad_id|>", _LLAMA3_SPECIALS, (), "auto"),
    "mistral_v0.3": TemplateFamily("mistral_v0.3.jinja", "</s>", ("</s>",), "<s>", "<pad>",
                                   ("<s>", "</s>", "<unk>", "<pad>", "[INST]", "[/INST]", "[TOOL_CALLS]",
                                    "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"),
                                   (), "mistral"),
    "glm4.5": TemplateFamily("trl:glm4moe", "<|observation|>", ("<|user|>", "<|observation|>", "<|endoftext|>"), None,
                             "<|endoftext|>", ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>",
                                               "<|observation|>", "<|endoftext|>"),
                             ("<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>",
                              "<arg_value>", "</arg_value>", "<tool_response>", "</tool_response>"), "auto"),
    "gpt-oss": TemplateFamily("trl:gptoss", "<|call|>", ("<|return|>", "<|call|>", "<|end|>"), None, "<|endoftext|>",
                              ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|call|>", "<|return|>",
                               "<|constrain|>", "<|endoftext|>"), (), "auto"),
}

# What the BPE learns from: chat prose, tool schemas and calls, the templates' boilerplate, numbers.
_CORPUS = """\
You are a helpful assistant. You are Qwen, created by Alibaba Cloud. You are a function calling AI model.
The lamp in the kitchen is red and the chair in the living room is blue. What color is the lamp? Let me look it up.
The weather in Paris is sunny today, with a temperature of 21 degrees; tomorrow it will rain in London and Berlin.
Please add the numbers 12 and 30, then multiply the result by 7. The answer is 294. First, second, third, fourth.
I will search the catalogue for the book, read the result, and answer the question in one short sentence.
Cutting Knowledge Date: December 2023. Today Date: 26 Jul 2024. Environment: ipython. Tools: brave_search.
# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
Given the following functions, please respond with a JSON for a function call with its proper arguments that best
answers the given prompt. Respond in the format {"name": function name, "parameters": dictionary of argument name and
its value}. Do not use variables. Don't make assumptions about what values to plug into functions.
Use the following pydantic model json schema for each tool call you will make.
{"type": "function", "function": {"name": "lookup", "description": "Look an item up in the house.", "parameters":
{"type": "object", "properties": {"item": {"type": "string", "description": "The item to find."}, "room": {"type":
"integer", "description": "The room number."}}, "required": ["item"]}}}
{"name": "lookup", "arguments": {"item": "lamp", "room": 17}}
{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}
{"name": "add", "arguments": {"a": 12, "b": 30}, "id": "a1b2c3d4e"}
{"content": "The lamp is red.", "call_id": "call00000"}
{"result": 42, "error": null, "ok": true, "items": [1, 2, 3], "text": "done"}
system user assistant tool ipython function arguments parameters name content description properties required type
string integer number boolean object array dict list str int float bool Union Any Args Returns Name Arguments
think reasoning answer final question result error timeout output input value key call id results available
Alice asked Bob whether the train to Lyon leaves at nine or at ten; Bob checked the timetable and said it leaves
at half past nine from platform four. They bought two tickets, a coffee, a sandwich and a newspaper, and waited.
The function returns a dictionary with the keys "status", "message" and "data"; on failure it raises an exception.
Tool results are passed back to the model as messages, and the model writes its final answer after reading them.
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 42 100 2023 2024 3.14 -1
"""


@functools.lru_cache(maxsize=1)
def _shared_vocabulary() -> str:
    """The trained byte-level BPE (tokenizers JSON) with the union of the families' special and marker tokens, in a
    fixed order: the same ids in every family. Deterministic; trains in a few milliseconds."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    specials = sorted({t for f in FAMILIES.values() for t in (*f.specials, f.pad)})
    markers = sorted({t for f in FAMILIES.values() for t in f.markers} - set(specials))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in markers])
    return tok.to_str()


def family_tokenizer(name: str):
    """A PreTrainedTokenizerFast of family `name`: the shared vocabulary, its chat template, EOS, BOS and pad."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    family = FAMILIES[name]
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_shared_vocabulary()), chat_template=family.chat_template,
        eos_token=family.eos, bos_token=family.bos, pad_token=family.pad,
        unk_token="<unk>" if name.startswith("mistral") else None, clean_up_tokenization_spaces=False)


def save_family_tokenizer(family: str, out_dir: Path) -> Path:
    """Saves family `family`'s tokenizer (AutoTokenizer.from_pretrained reads it) in `out_dir`; returns `out_dir`."""
    out_dir = Path(out_dir)
    family_tokenizer(family).save_pretrained(out_dir)
    return out_dir
