"""Token ids of a multi-turn conversation as the trainer must see them: token-in, token-out.

The model's turns are the token ids the engine sampled, never re-encoded from their text. The environment's turns
are rendered by the chat template once, at the moment they arrive, and appended as token ids. Re-rendering the whole
conversation instead (render(messages) -> tokenize) drifts from what was sampled: a template that re-formats a tool
call, strips reasoning or whitespace, or a BPE that merges across a turn boundary gives the trainer tokens the engine
never produced (trl#5224, verl#6501).

To render only the new part, the template renders a probe conversation: a user turn, an assistant turn whose text
is a sentinel, then the new messages and the generation prompt. The environment's part is what follows the model's
turn there: from the end-of-turn token the model sampled (e.g. Qwen's "<|im_end|>", exclusive) or, when it stopped
otherwise, from the template's own end of turn (the tokenizer's EOS, inclusive), up to the end. Only the text after
the model's turn is read, so templates that render earlier turns differently once more follow (Qwen3 drops the
reasoning of earlier turns) still give exact tokens: earlier turns are never rendered again. Templates that render
tool results only after an assistant turn with tool calls (gpt-oss) get a probe whose assistant turn has calls
named after the tool messages; one that drops the messages either way is an error, never a silent gap.
"""

from __future__ import annotations

from alignment.errors import UserError
from rollout.tool_calls import ToolCall, tool_call_message

_SENTINEL = "SENTINEL7421"  # an assistant turn's text in the probe conversation, found again in its rendering


class TurnTokenizer:
    """Renders prompts and environment turns of one chat template (and tool list) as token ids."""

    def __init__(self, tokenizer, tools: list[dict] | None = None, end_tokens: list[str] | None = None):
        """`end_tokens`: the tokens that end a model turn (the engine stops on them), e.g. GLM's <|user|> and
        <|observation|>, gpt-oss's <|return|>, <|call|> and <|end|>; default the tokenizer's EOS."""
        self.tokenizer = tokenizer
        self.tools = tools or None
        self.end_tokens = [t for t in (end_tokens or [tokenizer.eos_token]) if t]

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The first prompt: the messages (with the tool list, if any) and the generation prompt."""
        return self._encode(self._render(messages, generation_prompt=True))

    def end_token_ids(self) -> list[int]:
        """The ids of the end-of-turn tokens (those the vocabulary has)."""
        ids = [self.tokenizer.convert_tokens_to_ids(t) for t in self.end_tokens]
        return [i for i in ids if i is not None and i != self.tokenizer.unk_token_id]

    def turn_text(self, ids: list[int]) -> str:
        """A model turn's text as its environment reads it: special tokens kept (gpt-oss writes its tool calls in
        channel tokens), less the end-of-turn token."""
        if ids and self.tokenizer.decode([ids[-1]]) in self.end_tokens:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def environment_ids(self, messages: list[dict], last_model_token: int | None) -> list[int]:
        """Tokens that follow a model turn ending with `last_model_token`: the rest of the template's closing of that
        turn, `messages` (tool results, a user turn) and the generation prompt of the model's next turn."""
        sampled_end = self.tokenizer.decode([last_model_token]) if last_model_token is not None else ""
        problems = []
        for with_calls in (False, True):
            try:
                after = self._after_model_turn(messages, with_calls)
            except UserError as exc:  # e.g. gpt-oss: "no previous assistant message with a tool call"
                problems.append(str(exc))
                continue
            missing = [m["role"] for m in messages if isinstance(m.get("content"), str) and m["content"] not in after]
            if missing:
                problems.append(f"it leaves out the {', '.join(missing)} message(s)")
                continue
            if sampled_end in self.end_tokens and sampled_end in after:  # the model sampled the end of its turn
                return self._encode(after[after.index(sampled_end) + len(sampled_end):])
            ends = [(after.index(t), t) for t in self.end_tokens if t in after]
            if not ends:
                raise UserError(f"the chat template ends an assistant turn with none of {self.end_tokens}; multi-turn "
                                "rollouts cannot tell where the model's turn ends")
            at, end = min(ends)
            if sampled_end in self.end_tokens:  # ended by another end token (Llama's <|eom_id|> for <|eot_id|>): its own
                return self._encode(after[at + len(end):])
            return self._encode(after[at:])  # the model stopped otherwise (a stop string): the end of its turn is ours
        raise UserError(f"the chat template cannot render {[m.get('role') for m in messages]} after an assistant turn: "
                        + "; ".join(problems))

    def _after_model_turn(self, messages: list[dict], with_calls: bool) -> str:
        """The rendering of the probe conversation with `messages` and the generation prompt, after the model's
        text. `with_calls`: the probe's assistant turn calls the tools that the `tool` messages answer."""
        turn = {"role": "assistant", "content": _SENTINEL}
        if with_calls:
            turn = tool_call_message([ToolCall(m.get("name") or "tool", {}, m.get("tool_call_id") or f"call{k}")
                                      for k, m in enumerate(messages) if m.get("role") == "tool"], _SENTINEL)
        rendered = self._render([{"role": "user", "content": "hi"}, turn, *messages], generation_prompt=True)
        at = rendered.rfind(_SENTINEL)
        if at < 0:
            raise UserError("the chat template drops an assistant turn's text; multi-turn rollouts cannot place the "
                            "environment's turns after the model's")
        return rendered[at + len(_SENTINEL):]

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tools=self.tools, add_generation_prompt=generation_prompt,
                                                      tokenize=False)
        except Exception as exc:  # jinja's raise_exception: the template's own words
            raise UserError(f"the chat template cannot render {[m.get('role') for m in messages]}: {exc}") from None

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


def end_of_turn_tokens(model_path: str, tokenizer) -> list[str]:
    """The tokens that end a model turn: the tokenizer's EOS and the EOS ids of the model's generation config (which
    vLLM stops on too: Llama 3.1's <|eom_id|>, GLM's <|user|> and <|observation|>, gpt-oss's <|call|>)."""
    from transformers import GenerationConfig

    ends = [tokenizer.eos_token] if tokenizer.eos_token else []
    try:
        ids = GenerationConfig.from_pretrained(model_path).eos_token_id
    except (OSError, ValueError):  # no generation config: the tokenizer's EOS alone
        return ends
    for token_id in [ids] if isinstance(ids, int) else (ids or []):
        token = tokenizer.convert_ids_to_tokens(int(token_id))
        if token and token not in ends:
            ends.append(token)
    return ends
