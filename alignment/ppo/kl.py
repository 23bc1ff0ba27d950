"""KL divergence to the reference policy: per-token estimators and the coefficient's controllers.

Estimators follow J. Schulman, "Approximating KL Divergence" (2020). Tokens are sampled from the
policy pi, so with r = pi_ref(x) / pi(x) and log r = ref_logp - logp, each estimator's expectation
under pi is (or approximates) KL(pi || pi_ref):
    k1 = -log r                 unbiased, high variance, can be negative per token
    k2 = 1/2 (log r)^2          biased (low bias when pi ~ pi_ref), always >= 0
    k3 = (r - 1) - log r        unbiased, always >= 0 (since log r <= r - 1), low variance
All take and return [B, T]; they are differentiable, so the same functions serve a KL penalty in
the reward (detached) and a KL term in the loss (GRPO-style).
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
