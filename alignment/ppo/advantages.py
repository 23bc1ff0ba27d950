"""Advantage estimators: GAE with a critic, and the critic-free GRPO, Dr. GRPO, RLOO, REINFORCE++.

Token tensors are [B, T] with a float right-padded `mask` [B, T] (1 for real tokens up to and
including EOS). Group estimators expect the `group_size` samples of one prompt to be consecutive
in the batch (rows g*G .. g*G+G-1), as the rollout engines return them.

The registry `ADVANTAGE_ESTIMATORS` maps a recipe's `advantage_estimator` name to an
`AdvantageEstimator` whose `compute(scores, kl, mask, values, params)` every estimator shares, so
the training loop makes one lookup, and the config checks the name with
`validate_advantage_estimator` before any model loads.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from alignment.ppo.masking import SumAcrossRanks, masked_whiten
from alignment.ppo.rewards import token_level_rewards


# --------------------------------------------------------------------------- building blocks


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016, eq. 16).

        delta_t = r_t + gamma * V_{t+1} - V_t                 (V_{t+1} = 0 after the last real token)
        A_t     = sum_{l>=0} (gamma * lam)^l * delta_{t+l}  = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                                  (the value target, the TD(lambda) return)

    rewards, values, mask: [B, T]. Returns (advantages [B, T], returns [B, T]), both 0 at padding.
    Rewards and values at padding are zeroed first, so nothing past EOS leaks into real tokens.
    """
    rewards = rewards * mask
    values = values * mask
    T = rewards.shape[1]
    lastgaelam = torch.zeros_like(rewards[:, 0])
    advantages_reversed = []
    for t in reversed(range(T)):
        nextvalues = values[:, t + 1] if t < T - 1 else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1) * mask
    returns = (advantages + values) * mask
    return advantages, returns


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = sum_{k>=t} gamma^(k-t) * r_k = r_t + gamma * G_{t+1}   (reward-to-go, no critic).

    rewards, mask: [B, T]. Returns [B, T], 0 at padding.
    """
    rewards = rewards * mask
    running = torch.zeros_like(rewards[:, 0])
    returns_reversed = []
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns_reversed.append(running)
    return torch.stack(returns_reversed[::-1], dim=1) * mask


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """scores [B] -> [B / G, G], one row per prompt."""
    if group_size < 1 or scores.shape[0] % group_size != 0:
        raise ValueError(f"batch of {scores.shape[0]} scores is not a whole number of groups of {group_size}")
    return scores.view(-1, group_size)


def grpo_scores(scores: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO's group-relative score (Shao et al. 2024, DeepSeekMath, sec. 4.1.2).

        A_i = (s_i - mean_g(s)) / (std_g(s) + eps)     std_g: unbiased (torch.std), as in TRL
        Dr. GRPO (Liu et al. 2025): scale_by_std=False,  A_i = s_i - mean_g(s)

    scores: [B], B = n_prompts * group_size. Returns [B].
    """
    grouped = _groups(scores, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    return centred.flatten()


def rloo_scores(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE Leave-One-Out (Kool et al. 2019; Ahmadian et al. 2024).

        A_i = s_i - 1/(G-1) * sum_{j != i} s_j        baseline: the mean of the *other* samples

    scores: [B], B = n_prompts * group_size, group_size >= 2. Returns [B].
    """
    if group_size < 2:
        raise ValueError(f"RLOO needs group_size >= 2, got {group_size}")
    grouped = _groups(scores, group_size)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).flatten()


def group_mean_baseline(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """A_i = s_i - mean_g(s)   (REINFORCE++-baseline's baseline, Hu et al. 2025).   scores: [B] -> [B]."""
    grouped = _groups(scores, group_size)
    return (grouped - grouped.mean(dim=1, keepdim=True)).flatten()


# --------------------------------------------------------------------------- estimators


@dataclass(frozen=True)
class AdvantageParams:
    """Hyper-parameters shared by the estimators; each uses the ones it names."""

    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda
    kl_coef: float = 0.0  # beta of the KL penalty in the reward (0 when the KL is a loss term instead)
    group_size: int = 1  # samples per prompt, consecutive in the batch
    eps: float = 1e-6  # GRPO std guard
    # Whitening statistics over the global batch under data parallelism (REINFORCE++'s baseline is the batch mean):
    # an all-reduce sum, or None when this process holds the whole batch. Groups never span ranks, so GRPO/RLOO
    # need none.
    sum_across_ranks: SumAcrossRanks | None = None


# compute(scores [B], kl [B, T], mask [B, T], values [B, T] | None, params) -> (advantages, returns)
AdvantageFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, AdvantageParams],
    tuple[torch.Tensor, torch.Tensor],
]


def gae_estimator(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, values: torch.Tensor | None, params: AdvantageParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO (Ouyang et al. 2022): GAE over r_t = score at EOS - beta*KL_t; advantages whitened over
    the (global) batch, returns (the critic's targets) left raw."""
    if values is None:
        raise ValueError("the 'gae' advantage estimator needs critic values")
    rewards = token_level_rewards(scores, kl, mask, params.kl_coef)
    advantages, returns = gae(rewards, values, mask, params.gamma, params.lam)
    return masked_whiten(advantages, mask, sum_across_ranks=params.sum_across_ranks), returns


def _critic_free(
    baselined_scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, params: AdvantageParams, whiten: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Place the baselined score at EOS with the per-token KL penalty, take the reward-to-go,
    optionally whiten over the batch. With kl_coef = 0 and gamma = 1 every token's advantage is
    its sequence's baselined score (the score broadcast over the tokens)."""
    rewards = token_level_rewards(baselined_scores, kl, mask, params.kl_coef)
    returns = discounted_returns(rewards, mask, params.gamma)
    advantages = masked_whiten(returns, mask, sum_across_ranks=params.sum_across_ranks) if whiten else returns
    return advantages, returns


def grpo_estimator(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, values: torch.Tensor | None, params: AdvantageParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO: (s - mean_g) / (std_g + eps) at every token."""
    return _critic_free(grpo_scores(scores, params.group_size, True, params.eps), kl, mask, params, whiten=False)


def dr_grpo_estimator(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, values: torch.Tensor | None, params: AdvantageParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dr. GRPO: s - mean_g at every token (pair it with loss aggregation "seq_mean_token_sum")."""
    return _critic_free(grpo_scores(scores, params.group_size, False), kl, mask, params, whiten=False)


def rloo_estimator(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, values: torch.Tensor | None, params: AdvantageParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO: s_i - mean of the other samples of its prompt, at every token."""
    return _critic_free(rloo_scores(scores, params.group_size), kl, mask, params, whiten=False)


def reinforce_pp_estimator(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, values: torch.Tensor | None, params: AdvantageParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu et al. 2025): reward-to-go of score - beta*KL, whitened over the whole batch
    (the batch statistics are the baseline)."""
    return _critic_free(scores, kl, mask, params, whiten=True)


def reinforce_pp_baseline_estimator(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, values: torch.Tensor | None, params: AdvantageParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++-baseline (Hu et al. 2025): group mean subtracted from the score, reward-to-go
    with the KL penalty, then global whitening."""
    return _critic_free(group_mean_baseline(scores, params.group_size), kl, mask, params, whiten=True)


@dataclass(frozen=True)
class AdvantageEstimator:
    compute: AdvantageFn
    needs_critic: bool  # trains a value model
    min_group_size: int  # samples per prompt the estimator needs (2: it compares samples of a prompt)


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    "gae": AdvantageEstimator(gae_estimator, needs_critic=True, min_group_size=1),
    "grpo": AdvantageEstimator(grpo_estimator, needs_critic=False, min_group_size=2),
    "dr_grpo": AdvantageEstimator(dr_grpo_estimator, needs_critic=False, min_group_size=2),
    "rloo": AdvantageEstimator(rloo_estimator, needs_critic=False, min_group_size=2),
    "reinforce++": AdvantageEstimator(reinforce_pp_estimator, needs_critic=False, min_group_size=1),
    "reinforce++_baseline": AdvantageEstimator(reinforce_pp_baseline_estimator, needs_critic=False, min_group_size=2),
}


def validate_advantage_estimator(name: str, group_size: int) -> list[str]:
    """Config-time check; returns error messages (empty when fine) for the config to report together."""
    if name not in ADVANTAGE_ESTIMATORS:
        return [f"{name!r} is not an advantage estimator; choose one of {', '.join(sorted(ADVANTAGE_ESTIMATORS))}"]
    needed = ADVANTAGE_ESTIMATORS[name].min_group_size
    if group_size < needed:
        return [
            f"{name!r} compares samples of the same prompt: it needs at least {needed} samples per prompt, got {group_size}"
        ]
    return []
