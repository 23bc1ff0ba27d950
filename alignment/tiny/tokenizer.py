"""A word-level tokenizer over the tiny task's fixed vocabulary, built locally (no hub)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from alignment.tiny.task import EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS, UNK_TOKEN, vocabulary

MODEL_MAX_LENGTH = 256

# "<|user|> {u} <|end|> <|assistant|> {a} <|end|>", messages joined by one space; the generation
# prompt " <|assistant|>" makes render(prompt, add_generation_prompt=True) a prefix of
# render(prompt + completion), which TRL's prompt/completion handling relies on.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if not loop.first %} {% endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "<|user|> {{ message['content'] }} <|end|>"
    "{%- elif message['role'] == 'assistant' -%}"
    "<|assistant|> {{ message['content'] }} <|end|>"
    "{%- else -%}"
    "{{ raise_exception('the tiny chat template supports only user and assistant roles, got ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if messages %} {% endif -%}<|assistant|>"
    "{%- endif -%}"
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    """WordLevel tokenizer, whitespace pre-tokenizer; decode joins words with single spaces."""
    vocab = {token: i for i, token in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # No decoder: tokenizers then joins tokens with single spaces, which is exactly our text format.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        # no bos token: nothing is prepended, prompts start with <|user|>
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (UNK_TOKEN, PAD_TOKEN, EOS_TOKEN)],
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="left",
        clean_up_tokenization_spaces=False,  # True would turn "cheap ." into "cheap." on decode
    )


def save_tokenizer(out_dir: str | Path) -> PreTrainedTokenizerFast:
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


__all__ = ["CHAT_TEMPLATE", "MODEL_MAX_LENGTH", "make_tokenizer", "save_tokenizer"]
