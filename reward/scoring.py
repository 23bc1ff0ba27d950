"""Scoring with a trained reward model: `RewardModelScorer(path).score(prompts, completions) -> Tensor[B]`.

A sequence is encoded exactly as the RM stage encoded its training pairs (`encode`): chat messages
through the tokenizer's chat template (prompt messages + one assistant message), plain text as
prompt + completion + EOS. The reward is the score head's output at the last non-pad token.
With `normalize=True` scores are standardised with the `reward_stats.json` the RM stage saved next
to the weights (mean/std of rewards over its training set).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from alignment.errors import UserError

STATS_FILE = "reward_stats.json"


def as_messages(completion) -> list[dict]:
    if isinstance(completion, str):
        return [{"role": "assistant", "content": completion}]
    if isinstance(completion, dict):
        return [completion]
    return list(completion)


def encode(tokenizer, prompt, completion) -> list[int]:
    """Token ids of prompt + completion as the RM sees them (same rule as TRL's RewardTrainer)."""
    if isinstance(prompt, str) and isinstance(completion, str):
        text = prompt + completion
        if tokenizer.eos_token and not text.endswith(tokenizer.eos_token):
            text += tokenizer.eos_token
        return list(tokenizer(text=text)["input_ids"])
    if isinstance(prompt, str):
        raise ValueError("a text prompt needs a text completion (got chat messages)")
    messages = list(prompt) + as_messages(completion)
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


def read_stats(path: str | Path) -> dict | None:
    f = Path(path) / STATS_FILE
    return json.loads(f.read_text()) if f.is_file() else None


class RewardModelScorer:
    """Batched scalar rewards from an RM checkpoint (full model, or a LoRA adapter dir that is merged on load)."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", normalize: bool = False,
                 batch_size: int = 32, max_length: int | None = None, dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(path)
        if not path.is_dir():
            raise UserError(f"reward model '{path}' is not a directory")
        self.path, self.device, self.batch_size = path, torch.device(device), batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if (path / "adapter_config.json").is_file():
            from alignment.stages.common import merge_adapter

            self.model = merge_adapter(path, AutoModelForSequenceClassification)
        else:
            self.model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=dtype)
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(self.device).eval()
        self.stats = read_stats(path)
        self.max_length = max_length or (self.stats or {}).get("max_length")
        self.normalize = normalize
        if normalize and self.stats is None:
            raise UserError(f"normalize=True but '{path}' has no {STATS_FILE} (written by `alignment rm`)")

    @torch.no_grad()
    def score_ids(self, sequences: list[list[int]]) -> torch.Tensor:
        """Rewards [B] of already encoded sequences (right-padded in batches)."""
        pad = self.tokenizer.pad_token_id
        out = []
        for start in range(0, len(sequences), self.batch_size):
            batch = [s[: self.max_length] if self.max_length else s for s in sequences[start : start + self.batch_size]]
            width = max(len(s) for s in batch)
            ids = torch.tensor([s + [pad] * (width - len(s)) for s in batch], device=self.device)
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in batch], device=self.device)
            out.append(self.model(input_ids=ids, attention_mask=mask).logits[:, 0].float().cpu())
        rewards = torch.cat(out) if out else torch.zeros(0)
        if self.normalize:
            rewards = (rewards - self.stats["mean"]) / max(self.stats["std"], 1e-8)
        return rewards

    def score(self, prompts: list, completions: list) -> torch.Tensor:
        """Rewards [B] for B (prompt, completion) pairs; prompts/completions are text or chat messages."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        return self.score_ids([encode(self.tokenizer, p, c) for p, c in zip(prompts, completions)])
