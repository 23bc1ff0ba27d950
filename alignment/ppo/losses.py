"""PPO losses (per token; reduce them with masking.aggregate_loss) and their diagnostics.

Token tensors are [B, T] with a float `mask` [B, T], 1 for real tokens up to and including EOS.
Stats are detached scalars averaged over the real tokens of the micro-batch.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from alignment.ppo.masking import masked_mean, masked_var


LOG_RATIO_BOUND = 20.0


@dataclass
class PolicyLossOutput:
    loss_per_token: torch.Tensor  # [B, T], differentiable; 0 at padding
    clip_fraction: torch.Tensor  # scalar: share of tokens whose gradient the clip removes
    dual_clip_fraction: torch.Tensor  # scalar: share of tokens capped by the dual clip
    approx_kl: torch.Tensor  # scalar: k3 estimate of KL(pi_old || pi_theta)
    ratio_mean: torch.Tensor  # scalar: mean of pi_theta / pi_old


def truncated_is_weights(old_logp: torch.Tensor, sampler_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly brings
    you off-policy RL training"): correct for the sampler (vLLM) drawing tokens from a slightly
    different distribution than the trainer's pi_old.

        w_t = min(pi_old(x_t) / pi_sampler(x_t), C) = min(exp(old_logp - sampler_logp), C)

    old_logp: [B, T] trainer's log-probs before the update; sampler_logp: [B, T] vLLM's.
    Returns [B, T], detached (a weight on the loss, not a path for gradients).
    """
    return torch.exp(old_logp - sampler_logp).clamp(max=cap).detach()


def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    is_weights: torch.Tensor | None = None,
) -> PolicyLossOutput:
    """Clipped surrogate of PPO (Schulman et al. 2017, eq. 7), as a loss to minimise, per token.

        rho_t = pi_theta(x_t) / pi_old(x_t) = exp(clamp(logp - old_logp, -20, 20))
        L_t   = max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps_low, 1 + eps_high))
    Separate eps_low / eps_high: DAPO's "clip-higher" (Yu et al. 2025) raises eps_high only.
    Dual clip (Ye et al. 2020, "Mastering Complex Control in MOBA Games", eq. 5), c > 1:
        L_t   = min(L_t, -c * A_t)   for A_t < 0       (a huge ratio cannot blow up a negative step)
    Truncated importance sampling: L_t <- w_t * L_t with w_t from `truncated_is_weights`.

    logp: [B, T] current policy, differentiable; old_logp: [B, T] before this update (detached);
    advantages: [B, T]; mask: [B, T]; is_weights: [B, T] or None.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    advantages = advantages.detach()
    old_logp = old_logp.detach()

    # Bounded as veRL does: past |log rho| = 88 (float32) exp overflows, and although the clipped loss stays finite
    # its gradient is inf * 0 = NaN (a sampled token the trainer gives log-prob < -88 is enough). exp(20) is far past
    # any clip range, so the bound changes nothing else.
    log_ratio = torch.clamp(logp - old_logp, -LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    ratio = torch.exp(log_ratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg_loss = torch.max(pg_loss1, pg_loss2)

    if dual_clip is not None:
        pg_loss3 = -advantages * dual_clip
        capped = torch.min(pg_loss, pg_loss3)
        dual_clipped = (advantages < 0) & (pg_loss3 < pg_loss)
        pg_loss = torch.where(advantages < 0, capped, pg_loss)
    else:
        dual_clipped = torch.zeros_like(mask, dtype=torch.bool)

    if is_weights is not None:
        pg_loss = pg_loss * is_weights.detach()

    with torch.no_grad():
        clip_fraction = masked_mean((pg_loss2 > pg_loss1).to(mask.dtype), mask)
        dual_clip_fraction = masked_mean(dual_clipped.to(mask.dtype), mask)
        # k3 between pi_old and pi_theta: E_old[(rho - 1) - log rho]  (CleanRL's approx_kl)
        approx_kl = masked_mean((ratio - 1) - log_ratio, mask)
        ratio_mean = masked_mean(ratio, mask)

    return PolicyLossOutput(pg_loss * mask, clip_fraction, dual_clip_fraction, approx_kl, ratio_mean)


def kl_loss_term(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    kl_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    coef: float,
    is_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The KL leash as a loss term (placement "loss"), per token:  coef * w_t * k(logp_t, ref_logp_t).

    The term's gradient is meant to be E_{x ~ pi_old}[grad k(x)] (see kl.py), but the tokens were drawn by the
    sampler. The truncated importance weights w_t = min(pi_old / pi_sampler, C) that correct the policy term
    correct this one the same way: in async mode (samples one update old) the KL gradient would otherwise follow
    the previous policy's samples; on-policy w_t is ~1.

    logp: [B, T] current policy, differentiable; ref_logp: [B, T]; mask: [B, T]; is_weights: [B, T] or None.
    Returns [B, T], 0 at padding.
    """
    term = coef * kl_fn(logp, ref_logp.detach()) * mask
    return term * is_weights.detach() if is_weights is not None else term


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    value_clip: float | None = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss (the PPO2 baselines / CleanRL form), per token.

        V_clip = V_old + clip(V - V_old, -eps_v, eps_v)
        L_t    = 1/2 * max((V - R)^2, (V_clip - R)^2)          (1/2 * (V - R)^2 when value_clip is None)

    values: [B, T] current critic, differentiable; old_values: [B, T] at rollout time;
    returns: [B, T] targets R from the advantage estimator; mask: [B, T].
    Returns (loss_per_token [B, T], 0 at padding; clip_fraction: scalar, share of tokens where the
    clipped term is the larger one).
    """
    returns = returns.detach()
    v_loss_unclipped = (values - returns) ** 2
    if value_clip is None:
        return 0.5 * v_loss_unclipped * mask, torch.zeros((), dtype=values.dtype, device=values.device)
    old_values = old_values.detach()
    v_clipped = old_values + torch.clamp(values - old_values, -value_clip, value_clip)
    v_loss_clipped = (v_clipped - returns) ** 2
    v_loss = 0.5 * torch.max(v_loss_unclipped, v_loss_clipped)
    with torch.no_grad():
        clip_fraction = masked_mean((v_loss_clipped > v_loss_unclipped).to(mask.dtype), mask)
    return v_loss * mask, clip_fraction


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[R - V] / Var[R] over real tokens: 1 is a perfect critic, 0 no better than a constant,
    negative worse than one. NaN when the returns have no variance (CleanRL's convention).

    values, returns, mask: [B, T]. Returns a float.
    """
    var_returns = masked_var(returns.detach(), mask)
    if float(var_returns) == 0.0:
        return float("nan")
    return float(1.0 - masked_var((returns - values).detach(), mask) / var_returns)
