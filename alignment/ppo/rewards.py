"""From one scalar score per completion to the token-level rewards PPO optimises.

scores: [B], one per completion (reward model, rule or remote reward). Token tensors are [B, T]
with a float `mask` [B, T], 1 for real tokens up to and including EOS, 0 for padding, and
right-padded (real tokens first); a multi-turn trajectory's mask is 0 on the environment's tokens too.
"""

import math
from collections.abc import Sequence
from typing import Any

import torch


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token.   mask: [B, T] -> [B] (long).

    Not mask.sum(1) - 1: a multi-turn trajectory's mask has holes (the environment's turns), so the last 1 is found
    from the right. Raises ValueError for a row with no real token (nothing to put the score on).
    """
    real = mask > 0
    if bool((~real.any(dim=1)).any()):
        raise ValueError("a completion has no real token (mask row all zero); cannot place its score")
    return mask.shape[1] - 1 - real.flip(1).int().argmax(dim=1)


def token_level_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """r_t = score * [t == last real token] - beta * KL_t   (Ziegler et al. 2019; Ouyang et al. 2022).

    scores: [B]; kl: [B, T] per-token KL estimate (see kl.py), detached; mask: [B, T].
    Returns rewards [B, T], 0 at padding.
    """
    rewards = -kl_coef * kl * mask
    last = last_token_index(mask)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards


def normalize_scores(scores: torch.Tensor, mean: float, std: float, eps: float = 1e-8) -> torch.Tensor:
    """(score - mean) / (std + eps), with the mean and std of the reward model's training scores
    or of a RunningMoments.   scores: [B] -> [B]."""
    return (scores - mean) / (std + eps)


def clip_scores(scores: torch.Tensor, clip: float) -> torch.Tensor:
    """clamp(score, -clip, clip).   scores: [B] -> [B]."""
    return scores.clamp(min=-clip, max=clip)


def penalize_truncated(scores: torch.Tensor, finish_reasons: Sequence[str], penalty: float) -> torch.Tensor:
    """score - penalty for every completion cut at max_new_tokens (finish_reason "length", no EOS); penalty >= 0.

    scores: [B]; finish_reasons: B strings, "stop" or "length". Returns a new [B] tensor.
    A truncated answer is usually scored on its unfinished text; the penalty teaches the policy to
    finish within the budget (TRL's `missing_eos_penalty`). A negative penalty would reward rambling to the
    token limit, so it is refused.
    """
    if penalty < 0:
        raise ValueError(f"the truncation penalty is subtracted from the score and must be >= 0, got {penalty}")
    if len(finish_reasons) != scores.shape[0]:
        raise ValueError(f"{len(finish_reasons)} finish reasons for {scores.shape[0]} scores")
    truncated = torch.tensor([reason == "length" for reason in finish_reasons], device=scores.device)
    return scores - penalty * truncated.to(scores.dtype)


class RunningMoments:
    """Running mean and (population) standard deviation of every score seen so far.

    Batches are merged with Chan et al.'s parallel update (exact, not an exponential average):
        delta = mean_b - mean_a,  n = n_a + n_b
        mean  = mean_a + delta * n_b / n
        M2    = M2_a + M2_b + delta^2 * n_a * n_b / n,   var = M2 / n
    Held as Python floats (float64). Under data parallelism, gather the scores of all ranks first.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.var = 0.0
        self.count = 0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def update(self, xs: torch.Tensor) -> None:
        """Fold in a batch of scores xs (any shape, every entry counts)."""
        xs = xs.detach().double().flatten()
        n_b = xs.numel()
        if n_b == 0:
            return
        mean_b = float(xs.mean())
        m2_b = float(((xs - mean_b) ** 2).sum())
        n_a, n = self.count, self.count + n_b
        delta = mean_b - self.mean
        m2 = self.var * n_a + m2_b + delta**2 * n_a * n_b / n
        self.mean += delta * n_b / n
        self.var = m2 / n
        self.count = n

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean = float(state["mean"])
        self.var = float(state["var"])
        self.count = int(state["count"])
