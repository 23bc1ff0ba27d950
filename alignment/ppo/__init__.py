"""PPO math as pure functions over [B, T] completion-token tensors with a float mask (see each module)."""

from alignment.ppo.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageEstimator,
    AdvantageParams,
    discounted_returns,
    gae,
    grpo_scores,
    group_mean_baseline,
    rloo_scores,
    validate_advantage_estimator,
)
from alignment.ppo.kl import KL_ESTIMATORS, AdaptiveKLController, FixedKLController, kl_k1, kl_k2, kl_k3
from alignment.ppo.logprobs import completion_logprobs, token_logprobs
from alignment.ppo.losses import (
    PolicyLossOutput,
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance,
    truncated_is_weights,
)
from alignment.ppo.masking import (
    LOSS_AGGREGATIONS,
    aggregate_loss,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)
from alignment.ppo.mismatch import token_mult_prob_error
from alignment.ppo.rewards import (
    RunningMoments,
    clip_scores,
    last_token_index,
    normalize_scores,
    penalize_truncated,
    token_level_rewards,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AdaptiveKLController",
    "AdvantageEstimator",
    "AdvantageParams",
    "FixedKLController",
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "PolicyLossOutput",
    "RunningMoments",
    "aggregate_loss",
    "clip_scores",
    "clipped_policy_loss",
    "clipped_value_loss",
    "completion_logprobs",
    "token_logprobs",
    "discounted_returns",
    "explained_variance",
    "gae",
    "grpo_scores",
    "group_mean_baseline",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "last_token_index",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "normalize_scores",
    "penalize_truncated",
    "rloo_scores",
    "token_level_rewards",
    "token_mult_prob_error",
    "truncated_is_weights",
    "validate_advantage_estimator",
]
