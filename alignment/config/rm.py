"""Recipe schema of the reward-model stage (`alignment rm`)."""

from __future__ import annotations

from typing import Literal

from alignment.config.schema import option, required
from alignment.config.sections import DataSection, GoldEvalSection, ModelSection, OutputSection, TrainSection, recipe


@recipe
class RMOptions:
    use_margin: bool = option(True, help="use the dataset's `margin` column when present")
    center_rewards_coefficient: float | None = option(None, help="weight of the term that pulls rewards towards zero mean", min=0.0)
    overlong: Literal["truncate", "drop"] = option("drop", help="pairs longer than train.max_length are truncated or dropped (always counted)")
    stats_max_pairs: int = option(4096, help="training pairs scored for the reward mean/std saved in reward_stats.json", min=1)
    probe_pairs: int = option(32, help="held-out pairs scored by the trained model in memory (summary.json), to check the export", min=0)


@recipe
class RMRecipe:
    stage: Literal["rm"] = option("rm", help="stage this recipe is for")
    model: ModelSection = required(help="base model for the reward model (usually the SFT checkpoint)")
    data: DataSection = required(help="preference pairs: prompt + chosen/rejected (explicit or implicit prompt)")
    train: TrainSection = option(TrainSection(), help="optimisation")
    output: OutputSection = required(help="outputs")
    rm: RMOptions = option(RMOptions(), help="reward-model options")
    gold_agreement: GoldEvalSection | None = option(
        None, help="sample fresh completions with the base model and report how often the RM agrees with the gold rule"
    )

    def check(self) -> list[str]:
        return _check_early_stopping(self.train)


def _check_early_stopping(train) -> list[str]:
    if train.early_stopping_patience is not None and train.eval_steps is None:
        return ["train.early_stopping_patience: needs train.eval_steps (evaluations to compare)"]
    return []
