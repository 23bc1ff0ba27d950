"""Beside the reward PPO optimises, the gold metric the recipe names: over-optimisation and the best policy by gold.

Each step logs `ppo/overoptimization` (1 while the reward's recent mean rises and the gold's falls, see
alignment.ppo.overoptimization) and warns when that begins; `overoptimization.on_detect: stop` ends training there.
With `overoptimization.keep_best`, the loop exports the policy whenever the held-out `eval/gold` beats every earlier
evaluation (the peak of Gao et al.'s gold-vs-proxy curve is then kept whatever happens after it).
"""

from __future__ import annotations

import math

from alignment import console
from alignment.distributed import broadcast_from_main
from alignment.ppo.overoptimization import OveroptimizationWatch


class GoldWatch:
    """Call `after_step` on every rank once the step's metrics are reduced, and `new_best` after its evaluation."""

    def __init__(self, section, rank: int):
        self.section, self.rank = section, rank
        self.watch = OveroptimizationWatch(section.window)
        self.best_gold = -math.inf
        self.best_step: int | None = None
        self.holding = False  # the pattern held at the last step: warn when it begins, not at every step

    def after_step(self, step: int, metrics: dict[str, float]) -> bool:
        """Add `ppo/overoptimization` to the metrics; returns whether the run should stop here."""
        finding = self.watch.update(metrics["ppo/reward"], metrics["ppo/gold"])
        metrics["ppo/overoptimization"] = float(finding is not None)
        stop = finding is not None and self.section.on_detect == "stop"
        if finding is not None and not self.holding and self.rank == 0:
            then = ("stopping here (overoptimization.on_detect: stop)" if stop else
                    "raise algorithm.kl.coef, clip or ensemble the reward, or stop at the best gold "
                    "(overoptimization.keep_best, on_detect: stop)")
            console.say(f"WARNING: step {step}: {finding.describe()}; {then}")
        self.holding = finding is not None
        return stop

    def new_best(self, step: int, metrics: dict[str, float]) -> bool:
        """Whether this step's held-out eval/gold beats every earlier one (rank 0's evaluation decides for all)."""
        gold = metrics.get("eval/gold")
        better = broadcast_from_main(gold is not None and gold > self.best_gold)
        if better:
            self.best_gold, self.best_step = (gold if gold is not None else self.best_gold), step
        return better

    def state_dict(self) -> dict:
        return {"watch": self.watch.state_dict(), "best_gold": self.best_gold, "best_step": self.best_step,
                "holding": self.holding}

    def load_state_dict(self, state: dict) -> None:
        self.watch.load_state_dict(state["watch"])
        self.best_gold, self.best_step, self.holding = state["best_gold"], state["best_step"], state["holding"]
