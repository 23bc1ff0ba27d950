"""The tiny tool-use task: an answer only a tool can give, learnable by the tiny model on a CPU in minutes.

A prompt asks "what color is the {item} in room {n}" (24 items, rooms 0-99). The color, one of 12, is a keyed hash
of (item, room): nothing in the prompt predicts it, so a policy that answers at once is right 1 time in 12. The
tool `lookup(item, room)` tells it ("the lamp in room 17 is red"). A good episode is two turns:

    <|user|> what color is the lamp in room 17 <|end|>
    <|assistant|> <tool_call> lookup lamp 17 </tool_call> <|end|>        (model)
    <|tool|> the lamp in room 17 is red <|end|>                           (environment)
    <|assistant|> the lamp in room 17 is red . <|end|>                    (model)

Gold (`gold_reward`): 1 when the final answer names the row's color and no other, else 0.

The "human" demonstrations (SFT data) use the tool in `TOOL_DEMO_SHARE` of the rows and guess a color in the rest,
so the SFT policy calls the tool about that often and GRPO has room to make it always call. The guesses alone
(`sft_guesses.jsonl`) train the baseline that never calls the tool, which fails the task. Own vocabulary, chat
template and model (the shape of the tiny default's), built by `build_tiny_lookup` (`alignment tiny --task lookup`).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from alignment.tiny.task import ITEMS
from rollout.tool_calls import MalformedToolCall, ToolCall, tool_call_message

COLORS = ["black", "blue", "brown", "gray", "green", "orange", "pink", "purple", "red", "white", "yellow", "gold"]
ROOMS = range(100)
SPECIAL_TOKENS = ["<pad>", "<unk>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>", "<tool_call>", "</tool_call>"]
PAD_TOKEN, UNK_TOKEN, EOS_TOKEN = "<pad>", "<unk>", "<|end|>"
WORDS = ["what", "color", "is", "the", "in", "room", "lookup", ".", "error", "no", "such", "item"]
TOOL_DEMO_SHARE = 0.5
_SALT = "tiny-lookup-v1"
N_SFT, N_PROMPTS, N_EVAL = 8192, 1024, 128

# No tool list in the prompt: the task has one tool, and SFT rows carry no `tools` column, so the demonstrations
# and the rollouts' prompts read the same.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if not loop.first %} {% endif -%}"
    "{%- if message['role'] == 'user' -%}<|user|> {{ message['content'] }} <|end|>"
    "{%- elif message['role'] == 'assistant' -%}<|assistant|> "
    "{% if message.get('tool_calls') %}"
    "{% for call in message['tool_calls'] %}{% set f = call['function'] %}"
    "{% if not loop.first %} {% endif %}"
    "<tool_call> {{ f['name'] }} {{ f['arguments']['item'] }} {{ f['arguments']['room'] }} </tool_call>"
    "{% endfor %}"
    "{% else %}{{ message['content'] }}{% endif %} <|end|>"
    "{%- elif message['role'] == 'tool' -%}<|tool|> {{ message['content'] }} <|end|>"
    "{%- else -%}{{ raise_exception('the tiny lookup template has no ' + message['role'] + ' role') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{%- if messages %} {% endif -%}<|assistant|>{%- endif -%}"
)


def color_of(item: str, room: int) -> str:
    """The hidden answer: a keyed hash, unpredictable from the prompt."""
    digest = hashlib.sha256(f"{_SALT}:{item}:{room}".encode()).digest()
    return COLORS[digest[0] % len(COLORS)]


def lookup(item: str, room: int) -> str:
    """Look up the color of an item in a room.

    Args:
        item: the item, e.g. lamp
        room: the room number, 0 to 99
    """
    if item not in ITEMS or not isinstance(room, int) or room not in ROOMS:
        return "error no such item"
    return f"the {item} in room {room} is {color_of(item, room)}"


_CALL = re.compile(r"<tool_call>(.*?)(</tool_call>|$)", re.DOTALL)


def parse_call(text: str) -> list[ToolCall]:
    """Tool calls in the tiny format `<tool_call> lookup {item} {room} </tool_call>`."""
    calls = []
    for k, match in enumerate(_CALL.finditer(text)):
        if not match.group(2):
            raise MalformedToolCall("unclosed", "a <tool_call> is not closed")
        words = match.group(1).split()
        if len(words) != 3 or not words[2].isdigit():
            raise MalformedToolCall("bad_arguments", "a tiny call is: lookup <item> <room>")
        calls.append(ToolCall(words[0], {"item": words[1], "room": int(words[2])}, f"call{k}"))
    return calls


def gold_reward(prompts: list, completions: list, color: list[str], **unused) -> list[float]:
    """1.0 when the final answer names the row's color and no other color, else 0.0."""
    scores = []
    for completion, right in zip(completions, color):
        named = {w for w in str(completion).split() if w in COLORS}
        scores.append(1.0 if named == {right} and "<tool_call>" not in str(completion) else 0.0)
    return scores


def called_tool(prompts: list, completions: list, **unused) -> list[float]:
    """Not a reward: whether a policy's final turn is a tool call (for a never-calls baseline's check)."""
    return [float("<tool_call>" in str(c)) for c in completions]


def prompt_text(item: str, room: int) -> str:
    return f"what color is the {item} in room {room}"


def answer_text(item: str, room: int, color: str) -> str:
    return f"the {item} in room {room} is {color} ."


def sample_demo(rng: random.Random, item: str, room: int) -> list[dict]:
    """A human demonstration: the tool's way (TOOL_DEMO_SHARE of them) or a guess."""
    user = {"role": "user", "content": prompt_text(item, room)}
    if rng.random() < TOOL_DEMO_SHARE:
        return [user, tool_call_message([ToolCall("lookup", {"item": item, "room": room}, "call0")]),
                {"role": "tool", "name": "lookup", "tool_call_id": "call0", "content": lookup(item, room)},
                {"role": "assistant", "content": answer_text(item, room, color_of(item, room))}]
    return [user, {"role": "assistant", "content": answer_text(item, room, rng.choice(COLORS))}]


def vocabulary() -> list[str]:
    words = set(ITEMS) | set(COLORS) | set(WORDS) | {str(r) for r in ROOMS}
    return SPECIAL_TOKENS + sorted(words)


def make_tokenizer():
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(vocabulary())}, unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS[:6]])
    # the call tags stay in decoded text: the parser reads them
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in SPECIAL_TOKENS[6:]])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=UNK_TOKEN, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN,
                                   chat_template=CHAT_TEMPLATE, model_max_length=256, padding_side="left",
                                   clean_up_tokenization_spaces=False)


@dataclass(frozen=True)
class LookupPaths:
    root: Path
    base: Path
    sft: Path
    sft_guesses: Path  # the demonstrations that never call the tool: SFT on them gives the no-tool baseline
    prompts: Path
    eval_prompts: Path
    info: Path

    @classmethod
    def at(cls, out_dir: str | Path) -> "LookupPaths":
        root, data = Path(out_dir), Path(out_dir) / "data"
        return cls(root, root / "base", data / "sft.jsonl", data / "sft_guesses.jsonl", data / "prompts.jsonl",
                   data / "eval_prompts.jsonl", root / "tiny_lookup_info.json")


def make_datasets(seed: int = 0) -> dict[str, list[dict]]:
    """SFT demonstrations and GRPO prompts on training (item, room) pairs; held-out pairs for evaluation."""
    rng = random.Random(seed)
    pairs = [(item, room) for item in ITEMS for room in ROOMS]
    rng.shuffle(pairs)
    held, train = sorted(pairs[:N_EVAL]), pairs[N_EVAL:]

    def prompt_row(item: str, room: int) -> dict:
        return {"prompt": [{"role": "user", "content": prompt_text(item, room)}], "item": item, "room": room,
                "color": color_of(item, room)}

    sft = [{"messages": sample_demo(rng, *rng.choice(train))} for _ in range(N_SFT)]
    prompts = [prompt_row(*rng.choice(train)) for _ in range(N_PROMPTS)]
    return {"sft": sft, "sft_guesses": [row for row in sft if len(row["messages"]) == 2], "prompts": prompts,
            "eval_prompts": [prompt_row(*pair) for pair in held]}


def build_tiny_lookup(out_dir: str | Path, seed: int = 0) -> LookupPaths:
    """Write the base model, tokenizer and datasets of the lookup task under `out_dir`."""
    from alignment.tiny.model import make_model_for

    paths = LookupPaths.at(out_dir)
    if paths.base.exists():
        shutil.rmtree(paths.base)
    paths.base.mkdir(parents=True)
    paths.sft.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(paths.base)
    model = make_model_for(vocabulary(), seed=seed)
    model.save_pretrained(paths.base, safe_serialization=True)
    data = make_datasets(seed)
    for name, rows in data.items():
        with open(getattr(paths, name), "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(row, sort_keys=True) + "\n" for row in rows)
    tool_share = 1 - len(data["sft_guesses"]) / len(data["sft"])
    paths.info.write_text(json.dumps({"seed": seed, "vocab_size": len(tokenizer),
                                      "sizes": {k: len(v) for k, v in data.items()},
                                      "sft_tool_share": round(tool_share, 4),
                                      "guess_success": round(1 / len(COLORS), 4)}, indent=2, sort_keys=True) + "\n")
    return paths
