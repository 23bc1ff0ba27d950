"""Recipe schemas of the labelling commands: `alignment label export | import | auto`.

export: sample k completions per prompt from one or more policies -> pairs or k-wise sets for labelling,
        as plain JSONL, Label Studio tasks and Argilla records (each item with its provenance).
import: labelled files (any of those formats, Label Studio's export included) -> a preference dataset
        (prompt / chosen / rejected [/ margin]) that `alignment rm` reads as is.
auto:   label exported items with a rule function, a reward model or an LLM judge (writes the same
        labelled JSONL that `import` reads); agreement with a reference labeler.
"""

from __future__ import annotations

from typing import Literal

from alignment.config.eval import EngineSection, JudgeSection, PolicySpec, PromptSection
from alignment.config.sections import SamplingSection
from alignment.config.schema import option, required
from alignment.config.sections import recipe

FORMATS = ("jsonl", "label_studio", "argilla")


@recipe
class ExportRecipe:
    stage: Literal["label_export"] = option("label_export", help="stage this recipe is for")
    policies: list[PolicySpec] = required(help="policies to sample from (completions of all of them are mixed per prompt)")
    prompts: PromptSection = required(help="prompts to answer")
    sampling: SamplingSection = option(SamplingSection(samples_per_prompt=2), help="k = samples_per_prompt completions per prompt and policy")
    rollout: EngineSection = option(EngineSection(), help="generation engine")
    group: Literal["pairs", "kwise"] = option("pairs", help="pairs: items of two completions (A/B); kwise: one item with all completions of a prompt")
    pairs_per_prompt: int | None = option(None, help="group=pairs: keep at most this many pairs per prompt (seeded choice; default all)", min=1)
    drop_identical: bool = option(True, help="leave out pairs whose two completions are the same text (counted)")
    formats: list[Literal["jsonl", "label_studio", "argilla"]] = option(list(FORMATS), help="files to write")
    output_dir: str = required(help="where items.jsonl, label_studio_*.json/xml, argilla_*.json go")

    def check(self) -> list[str]:
        errors = []
        names = [p.name for p in self.policies if p.name]
        if len(set(names)) != len(names):
            errors.append("policies: names must be unique")
        if self.group == "pairs" and self.sampling.samples_per_prompt * len(self.policies) < 2:
            errors.append("sampling.samples_per_prompt: pairs need at least 2 completions per prompt (raise it or add a policy)")
        if not self.formats:
            errors.append("formats: give at least one of " + ", ".join(FORMATS))
        return errors


@recipe
class LabelFile:
    path: str = required(help="a labelled file: items jsonl, Label Studio export JSON, or Argilla records JSON", path="file")
    format: Literal["auto", "jsonl", "label_studio", "argilla"] = option("auto", help="auto: detected from the content")


@recipe
class ImportRecipe:
    stage: Literal["label_import"] = option("label_import", help="stage this recipe is for")
    inputs: list[LabelFile] = required(help="labelled files to read")
    output: str = required(help="preference dataset to write (.jsonl: prompt, chosen, rejected [, margin], provenance)")
    on_malformed: Literal["error", "skip"] = option("error", help="a malformed row stops the import, or is skipped and counted")
    with_margin: bool = option(False, help="write a `margin` column (every label must then carry one: ratings or auto-label scores)")
    multiple_annotations: Literal["majority", "latest"] = option("majority", help="Label Studio / Argilla items labelled by several people")


@recipe
class LabelerSpec:
    kind: Literal["function", "model", "judge"] = required(help="rule function, reward model, or LLM judge")
    name: str | None = option(None, help="labeler name recorded with each label")
    function: str | None = option(None, help="kind=function: 'module:function' or 'file.py:function' (TRL reward signature)")
    path: str | None = option(None, help="kind=model: reward-model checkpoint", path="model")
    normalize: bool = option(False, help="kind=model: standardise with the RM's reward_stats.json")
    judge: JudgeSection | None = option(None, help="kind=judge: the judge model and template")
    tie_threshold: float = option(0.0, help="kind=function/model: |score difference| <= this is a tie", min=0.0)

    def check(self, key: str) -> list[str]:
        needed = {"function": "function", "model": "path", "judge": "judge"}[self.kind]
        errors = [] if getattr(self, needed) else [f"{key}.{needed}: required when kind is '{self.kind}'"]
        if self.judge is not None and self.judge.max_prompts is not None:
            errors.append(f"{key}.judge.max_prompts: a labeler labels every exported item (the key limits `alignment "
                          "eval`'s judge); export fewer items (prompts.num_prompts) instead")
        return errors

    def label(self) -> str:
        if self.name:
            return self.name
        if self.kind == "function":
            return "function:" + str(self.function).rsplit(":", 1)[-1]
        if self.kind == "model":
            return "rm:" + str(self.path).rstrip("/").split("/")[-1]
        return "judge:" + str(self.judge.model).rstrip("/").split("/")[-1]


@recipe
class AutoLabelRecipe:
    stage: Literal["label_auto"] = option("label_auto", help="stage this recipe is for")
    input: str = required(help="items exported by `alignment label export` (items.jsonl)", path="file")
    labeler: LabelerSpec = required(help="who labels")
    reference: LabelerSpec | None = option(None, help="a second labeler to measure agreement against (accuracy, Cohen's kappa)")
    reference_labels: str | None = option(None, help="or: a labelled file (e.g. human labels) to measure agreement against", path="file")
    rollout: EngineSection = option(EngineSection(), help="engine for an LLM judge")
    output_dir: str = required(help="where labelled.jsonl and agreement.json go")

    def check(self) -> list[str]:
        errors = self.labeler.check("labeler")
        if self.reference is not None:
            errors += self.reference.check("reference")
        if self.reference is not None and self.reference_labels is not None:
            errors.append("reference_labels: give either reference or reference_labels, not both")
        return errors
