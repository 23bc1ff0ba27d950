"""Loading models and tokenizers from a local checkpoint or a hub id, and rendering prompts to token ids."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from alignment.config.sections import LoraSection, ModelSection
from alignment.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(model: ModelSection | str) -> PreTrainedTokenizerBase:
    """The tokenizer of a recipe's model section, or of a checkpoint directory / hub id."""
    if isinstance(model, str):
        model = ModelSection(name_or_path=model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model.name_or_path, trust_remote_code=model.trust_remote_code)
    except OSError as exc:
        raise UserError(f"model.name_or_path: cannot load a tokenizer from '{model.name_or_path}': {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token is None:  # many base models ship without one; padding is always masked out
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(section: ModelSection) -> torch.nn.Module:
    return load_model(section, AutoModelForCausalLM)


def load_value_model(section: ModelSection) -> torch.nn.Module:
    """A 1-output sequence-classification model: an RM checkpoint as is, or a fresh head on an LM checkpoint."""
    model = load_model(section, AutoModelForSequenceClassification, num_labels=1)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model


def load_model(section: ModelSection, auto_cls, **kwargs) -> torch.nn.Module:
    try:
        return auto_cls.from_pretrained(
            section.name_or_path, dtype=DTYPES[section.dtype], trust_remote_code=section.trust_remote_code, **kwargs
        )
    except OSError as exc:
        raise UserError(f"model.name_or_path: cannot load '{section.name_or_path}': {str(exc).splitlines()[0]}") from None


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them (transformers' checkpointing).

    Non-reentrant, so it works when the layer inputs need no gradient (frozen embeddings, LoRA), and with the KV
    cache off, which checkpointing cannot use. The loss and gradients do not change; activations stop growing with
    the number of layers, for about a third more compute.
    """
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    target.config.use_cache = False


def disable_dropout(model: torch.nn.Module) -> None:
    """Turn every dropout of `model` off, so that it computes the same function in training mode as in eval mode.

    PPO needs it: the ratio pi / pi_old compares log-probs of two forward passes, the rollout engine samples without
    dropout, and the sync check compares the two; dropout would add noise to all three (OpenRLHF and TRL's PPO turn
    it off too). Both kinds are covered: `nn.Dropout` modules (GPT-2, Phi) and the float rates attention modules
    keep as attributes and pass to their attention kernel in training mode (`attention_dropout` in Llama, Qwen2 and
    most decoders since transformers 4.36).
    """
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict]) -> list[int]:
    """Token ids of a prompt: chat-templated with the generation prompt for messages, plain for text."""
    if isinstance(prompt, str):
        return tokenizer(prompt, add_special_tokens=True)["input_ids"]
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def lora_config(lora: LoraSection | None, task_type: str):
    """peft LoraConfig, or None for full fine-tuning. For SEQ_CLS peft keeps the score head trainable and saved."""
    if lora is None:
        return None
    from peft import LoraConfig

    target = lora.target_modules
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target if isinstance(target, str) else list(target),
        task_type=task_type,
    )
