"""The untrained tiny Llama (about 0.35M parameters) that the tiny default starts from.

Shape chosen for vLLM's CPU backend: head_dim 64 (128 hidden / 2 heads) is a supported attention
head size there; head_dim 16 is not.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from alignment.tiny.task import EOS_TOKEN, PAD_TOKEN, vocabulary


def make_config(vocab: list[str] | None = None) -> LlamaConfig:
    vocab = vocab or vocabulary()
    eos_id, pad_id = vocab.index(EOS_TOKEN), vocab.index(PAD_TOKEN)
    return LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        # The tokenizer has no BOS token; like GPT-2/Qwen, the config points BOS at the EOS id.
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype="float32",
    )


def make_model(seed: int = 0) -> LlamaForCausalLM:
    """Deterministic random init (fixed seed, global torch RNG left untouched)."""
    return make_model_for(vocabulary(), seed)


def make_model_for(vocab: list[str], seed: int = 0) -> LlamaForCausalLM:
    """The tiny Llama over `vocab` (whose special tokens include the tiny EOS and pad tokens)."""
    config = make_config(vocab)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    return model


def save_model(out_dir: str | Path, seed: int = 0) -> LlamaForCausalLM:
    model = make_model(seed)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return model
