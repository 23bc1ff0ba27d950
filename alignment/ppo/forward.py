"""Forward passes PPO needs: completion-token log-probs (and entropy) of a policy, per-token values of a critic."""

from __future__ import annotations

import os

import torch

from alignment.ppo.batch import ModelInputs
from alignment.ppo.logprobs import token_logprobs


def policy_forward(
    model: torch.nn.Module, inputs: ModelInputs, temperature: float, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns (logp [b, T_mb], entropy [b, T_mb] or None) of the completion tokens under softmax(logits / T)."""
    # Logits only at the positions that predict completion tokens: the LM head over prompt positions would be wasted
    # work, a large share of it with 100k+ token vocabularies and long prompts. Padded: the last T_mb + 1 positions
    # (P-1 .. L-1, the last dropped); packed: exactly the predicting positions (HF takes a tensor of indices).
    keep = inputs.logit_positions if inputs.packed else inputs.completion_len + 1
    logits = model(
        input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, position_ids=inputs.position_ids, use_cache=False,
        logits_to_keep=keep,
    ).logits
    if not inputs.packed:
        return token_logprobs(logits[:, :-1], inputs.input_ids[:, inputs.completion_start :], temperature, with_entropy)
    logp, entropy = token_logprobs(logits, inputs.input_ids[:, inputs.logit_positions + 1], temperature, with_entropy)
    return inputs.unpack(logp[0]), inputs.unpack(entropy[0]) if entropy is not None else None


class TokenValueModel(torch.nn.Module):
    """Critic: a sequence-classification model (backbone + 1-output `score` head) read at every position, as
    `value_scale * head + value_shift`.

    Wrapping it gives DeepSpeed one module whose forward it hooks, and keeps the inner model's
    parameter names, so it saves as the same HF checkpoint it was loaded from. The affine output puts a critic
    initialised from a reward model on the scale of the returns it must fit (`critic_output_affine`); it is held in
    buffers, so checkpoints and resumed runs keep it.
    """

    def __init__(self, seq_cls_model: torch.nn.Module, value_scale: float = 1.0, value_shift: float = 0.0):
        super().__init__()
        self.inner = seq_cls_model
        self.register_buffer("value_scale", torch.tensor(float(value_scale)))
        self.register_buffer("value_shift", torch.tensor(float(value_shift)))

    def forward(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        backbone = getattr(self.inner, self.inner.base_model_prefix)
        hidden = backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return self.inner.score(hidden).squeeze(-1).float() * self.value_scale + self.value_shift  # [b, L]


def critic_forward(critic: torch.nn.Module, inputs: ModelInputs) -> torch.Tensor:
    """Per-token values [b, T_mb]: values[:, t] is V of the state before completion token t (position P + t - 1)."""
    values = critic(inputs.input_ids, inputs.attention_mask, inputs.position_ids)
    if inputs.packed:
        return inputs.unpack(values[0, inputs.logit_positions])
    return values[:, inputs.completion_start - 1 : -1]


def critic_output_affine(recipe) -> tuple[float, float]:
    """(value_scale, value_shift) for a PPO recipe's critic.

    A critic initialised from a reward model outputs raw RM scores, while a `normalize: true` term of that model gives
    PPO weight * (r - mean) / std (the RM's reward_stats.json): returns and values would start on different scales,
    value clipping would let the critic close the gap by only `algorithm.value_clip` per step, and a constant offset
    c in the values enters late-token advantages as -c (gamma lam)^(T-t), which whitening does not remove.
    OpenRLHF folds the statistics into the critic's head at load; here they scale its output the same way. Identity
    when the critic is not such a model, or when `reward_normalization: running` standardises the total again.
    """
    from reward.scoring import read_stats

    if recipe.value is None or recipe.algorithm.reward_normalization != "none":
        return 1.0, 0.0
    same = lambda a, b: os.path.realpath(a) == os.path.realpath(b)  # noqa: E731
    for source in recipe.rewards:
        if source.kind == "model" and source.normalize and same(source.path, recipe.value.name_or_path):
            stats = read_stats(source.path)
            if stats:
                std = max(stats["std"], 1e-8)  # the scorer's own guard
                return source.weight / std, -source.weight * stats["mean"] / std
    return 1.0, 0.0
