"""Reward over-optimisation made visible: the reward PPO optimises rises while the gold metric falls.

A learned reward model is a proxy; optimised hard enough, the policy finds what the proxy over-rates and the true
objective falls while the proxy still rises (Gao et al. 2023, "Scaling Laws for Reward Model Overoptimization":
gold first rises with KL, then falls). A run logs the proxy (`ppo/reward`) and, when the recipe names one, the gold
metric (`ppo/gold`, the rule on the step's own samples) every step; this watch compares the last `window` steps with
the `window` before them and reports when the reward's mean went up while the gold's mean went down by more than
twice the standard error of that difference (per-step gold values are noisy: 32 prompts x 4 samples on the tiny
task give a standard error of about 0.03).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Overoptimization:
    """The two windows' means: reward up by `reward_rise`, gold down by `gold_drop` (both positive)."""

    steps: int
    reward_rise: float
    gold_drop: float
    gold_standard_error: float

    def describe(self) -> str:
        return (f"over the last {self.steps} steps the reward rose by {self.reward_rise:.3f} while the gold metric fell "
                f"by {self.gold_drop:.3f} (more than twice its standard error, {self.gold_standard_error:.3f}) against "
                f"the {self.steps} steps before: the policy is over-optimising the reward")


def _mean_var(xs: list[float]) -> tuple[float, float]:
    mean = sum(xs) / len(xs)
    return mean, sum((x - mean) ** 2 for x in xs) / max(len(xs) - 1, 1)


class OveroptimizationWatch:
    """Feed it each step's reward and gold; `update` returns an Overoptimization while the pattern holds."""

    def __init__(self, window: int):
        self.window = window
        self.rewards: list[float] = []
        self.golds: list[float] = []

    def update(self, reward: float, gold: float) -> Overoptimization | None:
        self.rewards.append(reward)
        self.golds.append(gold)
        w = self.window
        if len(self.golds) < 2 * w:
            return None
        (reward_before, _), (reward_now, _) = _mean_var(self.rewards[-2 * w:-w]), _mean_var(self.rewards[-w:])
        (gold_before, var_before), (gold_now, var_now) = _mean_var(self.golds[-2 * w:-w]), _mean_var(self.golds[-w:])
        standard_error = math.sqrt((var_before + var_now) / w)
        if reward_now > reward_before and gold_before - gold_now > 2 * standard_error:
            return Overoptimization(w, reward_now - reward_before, gold_before - gold_now, standard_error)
        return None

    def state_dict(self) -> dict:
        return {"rewards": self.rewards, "golds": self.golds}

    def load_state_dict(self, state: dict) -> None:
        self.rewards, self.golds = list(state["rewards"]), list(state["golds"])
