"""Recipe schema of the DPO stage (`alignment dpo`): direct preference optimisation on TRL's DPOTrainer."""

from __future__ import annotations

from typing import Literal

from alignment.config.rm import _check_early_stopping
from alignment.config.schema import option, required
from alignment.config.sections import DataSection, GoldEvalSection, ModelSection, OutputSection, TrainSection, recipe

# TRL 1.16's DPOTrainer losses (trl/trainer/dpo_trainer.py); TRL checks the name only at the first step.
DPO_LOSSES = Literal["sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
                     "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm"]


@recipe
class DPOOptions:
    loss: DPO_LOSSES = option(
        "sigmoid", help="sigmoid: DPO (Rafailov et al. 2023); ipo: IPO (Azar et al. 2023, length-normalised); "
        "sigmoid_norm: DPO on length-normalised log-ratios; with reference: none, SimPO without its target margin "
        "(Meng et al. 2024); others as TRL names them")
    beta: float = option(0.1, help="strength of the implicit KL leash to the reference (IPO: its 1 / (2 tau))", min=0.0)
    label_smoothing: float = option(0.0, help="share of labels taken as flipped (conservative DPO, robust, exo_pair)",
                                    min=0.0, max=0.5)
    reference: Literal["model", "none"] = option(
        "model", help="model: log-ratios against the reference model (`reference`, default the starting policy), its "
        "log-probs computed once before training; none: reference-free (log-probs of the policy alone)")
    overlong: Literal["truncate", "drop"] = option("drop", help="pairs longer than train.max_length are truncated or dropped (always counted)")
    merge_lora_on_export: bool = option(True, help="with model.lora: `final` holds base + merged adapters (else the adapter)")
    probe_pairs: int = option(32, help="held-out pairs whose implicit rewards the trained model in memory records "
                              "(probe.json), to check the export", min=0)


@recipe
class DPORecipe:
    stage: Literal["dpo"] = option("dpo", help="stage this recipe is for")
    model: ModelSection = required(help="policy to optimise (usually the SFT checkpoint)")
    reference: ModelSection | None = option(None, help="reference policy of the log-ratios (default: model, as loaded)")
    data: DataSection = required(help="preference pairs: prompt + chosen/rejected (explicit or implicit prompt)")
    train: TrainSection = option(TrainSection(), help="optimisation")
    output: OutputSection = required(help="outputs")
    dpo: DPOOptions = option(DPOOptions(), help="DPO options")
    gold_eval: GoldEvalSection | None = option(None, help="gold metric of the policy before and after, on held-out prompts")

    def check(self) -> list[str]:
        errors = _check_early_stopping(self.train)
        if self.reference is not None and self.reference.lora is not None:
            errors.append("reference.lora: the reference is frozen; remove it")
        if self.reference is not None and self.dpo.reference == "none":
            errors.append("reference: a reference model is given but dpo.reference is 'none' (reference-free)")
        if self.dpo.loss in ("exo_pair",) and self.dpo.label_smoothing == 0:
            errors.append("dpo.label_smoothing: the exo_pair loss needs it > 0 (e.g. 1e-3)")
        return errors
