"""Recipe schema of the evaluation stage (`alignment eval`), and the sections the labelers share with it.

N policies x one held-out prompt set: every policy samples with the same sampling parameters and seeds,
every sample is scored by every scorer (reward models, rule functions, the task's gold metric), and
policies are compared pairwise (win rates with bootstrap CIs; optionally an LLM judge).
"""

from __future__ import annotations

from typing import Literal

from alignment.config.schema import option, required
from alignment.config.sections import MultiTurnSection, SamplingSection, recipe


@recipe
class PolicySpec:
    path: str = required(help="policy checkpoint: HF-format directory or hub id", path="model")
    name: str | None = option(None, help="label in reports and files (default: derived from the path)")
    step: int | None = option(None, help="training step of this checkpoint, for curves (default: read from a 'checkpoint-N' path)", min=0)


@recipe
class RunSection:
    """Every saved checkpoint of one training run (PPO or SFT output dir) becomes a policy."""

    dir: str = required(help="output dir of a run: its checkpoints/checkpoint-N (and final/) are evaluated", path="dir")
    every: int = option(1, help="take every N-th checkpoint (the last one is always taken)", min=1)
    include_final: bool = option(True, help="also evaluate <dir>/final when it exists")


@recipe
class PromptSection:
    path: str = required(help="held-out prompts: jsonl/json/parquet/csv or hub id, with a `prompt` column (text or messages)", path="data")
    num_prompts: int = option(128, help="use the first N prompts (file order)", min=1)
    split: str = option("train", help="split to read (hub datasets)")


@recipe
class EngineSection:
    engine: Literal["vllm", "hf"] = option("vllm", help="vllm: one engine, policies swapped in by weight sync; hf: transformers generate")
    dtype: Literal["float32", "bfloat16", "float16"] = option("float32", help="weights dtype for generation and log-probs")
    max_model_len: int = option(512, help="vLLM context length", min=16)
    batch_size: int = option(32, help="sequences per forward pass (KL log-probs, hf generation)", min=1)


@recipe
class ScorerSpec:
    kind: Literal["model", "function"] = required(help="a reward-model checkpoint or a Python reward function")
    name: str | None = option(None, help="column name in the report (default: derived from path/function)")
    path: str | None = option(None, help="kind=model: reward-model checkpoint directory", path="model")
    function: str | None = option(None, help="kind=function: 'module:function' or 'file.py:function' (TRL reward signature)")
    normalize: bool = option(False, help="kind=model: standardise scores with the RM's reward_stats.json")

    def check(self, key: str) -> list[str]:
        needed = {"model": "path", "function": "function"}[self.kind]
        return [] if getattr(self, needed) else [f"{key}.{needed}: required when kind is '{self.kind}'"]

    def label(self) -> str:
        if self.name:
            return self.name
        if self.kind == "model":
            return "rm:" + str(self.path).rstrip("/").split("/")[-1]
        return str(self.function).rsplit(":", 1)[-1]


@recipe
class JudgeSection:
    """A local LLM as pairwise judge; each pair is judged in both orders to cancel position bias."""

    model: str = required(help="judge checkpoint (HF directory or hub id)", path="model")
    template: str | None = option(None, help="text file with the pairwise prompt template ({prompt}, {answer_a}, {answer_b}); default built in", path="file")
    chat: bool = option(True, help="wrap the filled template in the judge's chat template (if it has one)")
    max_new_tokens: int = option(4, help="tokens the judge may write; its first 'A'/'B' decides", min=1)
    max_prompts: int | None = option(None, help="judge at most this many prompts per pair of policies", min=1)


@recipe
class PerplexitySection:
    """Perplexity of each policy on held-out text: exp(mean negative log-likelihood per token)."""

    path: str = required(help="held-out texts: jsonl/json/parquet/csv or hub id with `text`, `prompt`/`completion` or `messages` "
                         "columns; the completion (or the last assistant turn) is scored given its prompt, a text whole",
                         path="data")
    num_texts: int = option(256, help="use the first N rows (file order)", min=1)
    split: str = option("train", help="split to read (hub datasets)")
    max_length: int = option(1024, help="longer sequences keep their first max_length tokens (counted in the report)", min=8)


@recipe
class StatsSection:
    bootstrap_samples: int = option(1000, help="bootstrap resamples of the prompt set", min=10)
    confidence: float = option(0.95, help="confidence level of the intervals", min=0.5, max=0.999)
    seed: int = option(0, help="seed of the bootstrap")


@recipe
class EvalRecipe:
    stage: Literal["eval"] = option("eval", help="stage this recipe is for")
    policies: list[PolicySpec] = option([], help="policies to compare (checkpoint dirs or hub ids)")
    run: RunSection | None = option(None, help="add every checkpoint of a training run as a policy (after `policies`)")
    reference: str | None = option(None, help="KL reference: a policy name or a checkpoint path (default: the first policy)")
    prompts: PromptSection = required(help="held-out prompt set")
    sampling: SamplingSection = option(SamplingSection(), help="sampling, identical for every policy")
    rollout: EngineSection = option(EngineSection(), help="generation engine")
    scorers: list[ScorerSpec] = option([], help="reward models and rule functions that score every sample")
    gold_metric: str | None = option(None, help="the task's gold metric ('module:function'), reported as scorer 'gold'")
    primary: str | None = option(None, help="scorer used for the headline table and the reward-vs-KL curve (default: gold, else the first scorer)")
    judge: JudgeSection | None = option(None, help="LLM judge for pairwise win rates")
    kl: bool = option(True, help="estimate KL(policy || reference) on each policy's own samples")
    perplexity: PerplexitySection | None = option(None, help="perplexity of each policy on a held-out text set")
    reference_column: str = option("reference", help="prompt column with reference answers (a string or a list of "
                                   "strings); when the prompts carry it, every sample is scored against them")
    reference_metrics: list[Literal["bleu", "rouge1", "rouge2", "rougeL"]] = option(
        ["bleu", "rougeL"], help="metrics against the reference answers: sentence BLEU (sacrebleu, 0-100) and ROUGE F1 "
        "(rouge-score, 0-1), best over a prompt's references; reported like scorers, with CIs")
    stats: StatsSection = option(StatsSection(), help="bootstrap settings")
    multi_turn: MultiTurnSection | None = option(
        None, help="evaluate multi-turn episodes with tools or an environment (the section of PPO's rollout.multi_turn): "
        "scorers read each episode's last turn (and `env_reward`); the report adds turns, tool calls and errors per "
        "policy. sampling.max_new_tokens bounds each turn")
    output_dir: str = required(help="where report.md, report.html, results.json, samples.jsonl and plots/ go")

    def check(self) -> list[str]:
        errors = [e for i, s in enumerate(self.scorers) for e in s.check(f"scorers.{i}")]
        if not self.policies and self.run is None:
            errors.append("policies: give at least one policy (or a run: section)")
        if not self.scorers and self.gold_metric is None and self.judge is None:
            errors.append("scorers: give at least one scorer, a gold_metric or a judge")
        names = [p.name for p in self.policies if p.name]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            errors.append(f"policies: names must be unique; repeated: {', '.join(dupes)}")
        scorer_names = [s.label() for s in self.scorers] + (["gold"] if self.gold_metric else [])
        if len(set(scorer_names)) != len(scorer_names):
            errors.append(f"scorers: names must be unique; got {', '.join(scorer_names)} (set `name:`)")
        if self.multi_turn is not None:
            errors += self.multi_turn.check("multi_turn")
            if self.multi_turn.max_tokens >= self.rollout.max_model_len:
                errors.append(f"multi_turn.max_tokens ({self.multi_turn.max_tokens}): must leave room for the prompt in "
                              f"rollout.max_model_len ({self.rollout.max_model_len})")
        if self.primary is not None and self.primary not in scorer_names:
            errors.append(f"primary: '{self.primary}' is not a scorer name; choose one of {', '.join(scorer_names) or '(none)'}")
        return errors

    def scorer_names(self) -> list[str]:
        return (["gold"] if self.gold_metric else []) + [s.label() for s in self.scorers]

    def primary_scorer(self) -> str | None:
        names = self.scorer_names()
        return self.primary or (names[0] if names else None)
