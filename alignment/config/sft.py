"""Recipe schema of the SFT stage (`alignment sft`)."""

from __future__ import annotations

from typing import Literal

from alignment.config.schema import option, required
from alignment.config.sections import DataSection, GoldEvalSection, ModelSection, OutputSection, TrainSection, recipe


@recipe
class SFTOptions:
    loss_on: Literal["auto", "completion", "assistant", "all"] = option(
        "auto", help="tokens that carry loss: the completion only (prompt/completion data), assistant turns only "
        "(messages; no {% generation %} markers needed), or every token; auto: completion, assistant or all by format"
    )
    packing: bool = option(False, help="pack several examples into each sequence")
    overlong: Literal["truncate", "drop"] = option(
        "truncate", help="rows longer than train.max_length (each row alone, also with packing) keep their first "
        "max_length tokens or are dropped; always counted, and a truncated row left with no token that carries loss "
        "is dropped. truncate, unlike rm/dpo.overlong: the tokens a cut row keeps are still right targets, while a "
        "cut pair can lose what tells its answers apart"
    )
    merge_lora_on_export: bool = option(True, help="merge LoRA adapters into the base weights in the final export")
    probe_examples: int = option(16, help="held-out examples whose loss the trained model reports in summary.json (export check)", min=0)


@recipe
class SFTRecipe:
    stage: Literal["sft"] = option("sft", help="stage this recipe is for")
    model: ModelSection = required(help="policy to fine-tune")
    data: DataSection = required(help="demonstrations: text, prompt/completion or messages")
    train: TrainSection = option(TrainSection(), help="optimisation")
    output: OutputSection = required(help="outputs")
    sft: SFTOptions = option(SFTOptions(), help="SFT-specific options")
    gold_eval: GoldEvalSection | None = option(None, help="score generations on held-out prompts with a rule before and after training")

    def check(self) -> list[str]:
        from alignment.config.rm import _check_early_stopping

        return _check_early_stopping(self.train)
