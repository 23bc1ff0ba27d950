"""Random tiny models of the architectures users bring, on the tiny default's tokenizer (vLLM's CPU backend serves
them: head_dim 64). Each family differs from our Llama where weight sync can go wrong: tied input/output
embeddings, q/k/v biases, grouped-query attention, q/k norms, fused projections, scaled embeddings."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

# family -> (transformers config class name, what sets it apart, config overrides)
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "untied", {"tie_word_embeddings": False}),
    "qwen2": ("Qwen2Config", "tied, qkv bias, GQA 2:1", {"tie_word_embeddings": True, "num_key_value_heads": 1}),
    "qwen3": ("Qwen3Config", "tied, q/k norm, GQA 2:1", {"tie_word_embeddings": True, "num_key_value_heads": 1}),
    "gemma": ("GemmaConfig", "tied, scaled embeddings, GQA 2:1", {"tie_word_embeddings": True, "num_key_value_heads": 1}),
    "mistral": ("MistralConfig", "untied, GQA 2:1", {"tie_word_embeddings": False, "num_key_value_heads": 1}),
    "phi3": ("Phi3Config", "untied, fused qkv and gate/up", {"tie_word_embeddings": False}),
    "olmo2": ("Olmo2Config", "untied, q/k norm, post-norm", {"tie_word_embeddings": False}),
}


def save_family_model(family: str, out_dir: Path, tokenizer_dir: Path, seed: int = 0, max_positions: int = 256) -> Path:
    """A random 2-layer model of `family` (hidden 128, 2 heads of 64) with the tokenizer of `tokenizer_dir`."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cls_name, _, overrides = FAMILIES[family]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = getattr(transformers, cls_name)(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        head_dim=64, max_position_embeddings=max_positions, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **{"num_key_value_heads": 2, **overrides},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():  # non-trivial norms and biases, so a sync that drops them shows
            for name, p in model.named_parameters():
                if p.dim() == 1:
                    p.add_(0.1 * torch.randn_like(p))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def perturb_(model: torch.nn.Module, seed: int, scale: float = 0.5) -> None:
    """Add relative Gaussian noise to every parameter in place: another policy of the same shape (tied tensors stay tied)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=g))
