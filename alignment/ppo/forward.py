"""Forward passes PPO needs: completion-token log-probs (and entropy) of a policy, per-token values of a critic."""

from __future__ import annotations

import torch

from alignment.ppo.batch import ModelInputs
from alignment.ppo.logprobs import token_logprobs


def policy_forward(
    model: torch.nn.Module, inputs: ModelInputs, temperature: float, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns (logp [b, T_mb], entropy [b, T_mb] or None) of the completion tokens under softmax(logits / T)."""
    # Logits only at the positions that predict completion tokens (P-1 .. L-2): the LM head over prompt positions
    # would be wasted work, a large share of it with 100k+ token vocabularies and long prompts.
    logits = model(
        input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, position_ids=inputs.position_ids, use_cache=False,
        logits_to_keep=inputs.completion_len + 1,
    ).logits[:, :-1]
    return token_logprobs(logits, inputs.input_ids[:, inputs.completion_start :], temperature, with_entropy)


class TokenValueModel(torch.nn.Module):
    """Critic: a sequence-classification model (backbone + 1-output `score` head) read at every position.

    Wrapping it gives DeepSpeed one module whose forward it hooks, and keeps the inner model's
    parameter names, so it saves as the same HF checkpoint it was loaded from.
    """

    def __init__(self, seq_cls_model: torch.nn.Module):
        super().__init__()
        self.inner = seq_cls_model

    def forward(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        backbone = getattr(self.inner, self.inner.base_model_prefix)
        hidden = backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return self.inner.score(hidden).squeeze(-1).float()  # [b, L]


def critic_forward(critic: torch.nn.Module, inputs: ModelInputs) -> torch.Tensor:
    """Per-token values [b, T_mb]: values[:, t] is V of the state before completion token t (position P + t - 1)."""
    values = critic(inputs.input_ids, inputs.attention_mask, inputs.position_ids)
    return values[:, inputs.completion_start - 1 : -1]
