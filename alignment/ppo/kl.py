"""KL divergence to the reference policy: per-token estimators, where each may be placed, and the coefficient's controllers.

Estimators follow J. Schulman, "Approximating KL Divergence" (2020). Tokens are sampled from the
policy pi, so with r = pi_ref(x) / pi(x) and log r = ref_logp - logp, each estimator's *value* has
expectation under pi equal to (or near) KL(pi || pi_ref):
    k1 = -log r                 unbiased value, high variance, can be negative per token
    k2 = 1/2 (log r)^2          biased value (low bias when pi ~ pi_ref), always >= 0
    k3 = (r - 1) - log r        unbiased value, always >= 0 (since log r <= r - 1), low variance
All take and return [B, T] and are differentiable.

An unbiased value does not make an unbiased *gradient* (Tang & Munos 2025, "On a few pitfalls in KL
divergence gradient estimation for RL"). On-policy, with g = grad log pi(x), for one token x:
  in the reward (a detached penalty, gradient through the score function):  E_pi[k(x) g]
      k1: E_pi[log(pi/ref) g] = grad KL(pi || ref)                      exact
      k2, k3: no divergence's gradient                                  biased
  in the loss (differentiated through log pi):                             E_pi[grad k(x)]
      k1: E_pi[g] = 0                                                   the leash vanishes
      k2: E_pi[log(pi/ref) g] = grad KL(pi || ref)                      per token
      k3: E_pi[(1 - ref/pi) g] = -sum_x ref(x) g = grad KL(ref || pi)   per token, reverse KL (GRPO's choice)
Over a whole answer only k1 in the reward is exact: it enters the returns, so each token's KL also moves the earlier
tokens that led to it, which is the gradient of the sequence-level KL(pi || ref). k2 and k3 in the loss sum the
gradient of each token's KL at the states the policy visits and ignore how a token changes the states after it:
exact for one-token answers, an approximation otherwise (relative error 0.28-0.44 against the sequence-level
gradient, measured by enumeration for answers of 2 to 6 tokens). They remain a leash, not that gradient.
`KL_PLACEMENTS` lists the pairs a recipe may use and the divergence each one's per-token gradient follows; the
others are refused at recipe-check time (`validate_kl`).
"""

from collections.abc import Callable
from typing import Any

import torch

KLEstimator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = log pi(x) - log pi_ref(x).   logp, ref_logp: [B, T] -> [B, T]."""
    return logp - ref_logp


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = 1/2 (log pi(x) - log pi_ref(x))^2.   logp, ref_logp: [B, T] -> [B, T]."""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = exp(log r) - log r - 1, log r = log pi_ref(x) - log pi(x).   [B, T] -> [B, T].

    Non-negative for every token. exp(log r) overflows only when the reference gives a token
    e^88 times the policy's probability, which a policy trained from the reference does not reach.
    """
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


KL_ESTIMATORS: dict[str, KLEstimator] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}

# (estimator, placement) -> the divergence whose gradient the pair gives, on-policy (see the module docstring).
KL_PLACEMENTS: dict[tuple[str, str], str] = {
    ("k1", "reward"): "KL(pi || ref)",
    ("k2", "loss"): "KL(pi || ref)",
    ("k3", "loss"): "KL(ref || pi)",
}
_WHY_NOT = {
    ("k1", "loss"): "the gradient of k1 = log pi - log ref is grad log pi, whose expectation under pi is 0: the leash vanishes",
    ("k2", "reward"): "as a reward, k2 weighs grad log pi by (log r)^2 / 2, which is no divergence's gradient (biased)",
    ("k3", "reward"): "as a reward, k3 weighs grad log pi by (r - 1) - log r, which is no divergence's gradient (biased)",
}


def validate_kl(estimator: str, placement: str) -> list[str]:
    """Config-time check of an (estimator, placement) pair; returns error messages (empty when fine)."""
    if (estimator, placement) in KL_PLACEMENTS:
        return []
    sound = ", ".join(f"{e} in the {p} (gradient of {d})" for (e, p), d in KL_PLACEMENTS.items())
    return [f"estimator {estimator} with placement {placement} gives a wrong KL gradient: {_WHY_NOT[(estimator, placement)]}. "
            f"Use one of: {sound}"]


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, init_kl_coef: float):
        self.coef = float(init_kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Constant: nothing to update."""

    def state_dict(self) -> dict[str, Any]:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.coef = float(state["coef"])


class AdaptiveKLController:
    """Adaptive beta of Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences" (eq. 2).

    e_t      = clip(KL_t / KL_target - 1, -0.2, 0.2)     proportional error, clipped
    beta_t+1 = beta_t * (1 + K_beta * e_t),  K_beta = n_steps / horizon
    beta grows when the measured KL exceeds the target and shrinks when it falls short.
    `n_steps` is the number of samples (episodes) since the last update, as in the paper.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"AdaptiveKLController needs target > 0 and horizon > 0, got {target=}, {horizon=}")
        self.coef = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        """The adapted coefficient; target and horizon are configuration and come from the recipe."""
        return {"coef": self.coef}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.coef = float(state["coef"])
