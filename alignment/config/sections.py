"""Recipe sections shared by several stages: model, LoRA, data, cleaning, training, output."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from alignment.config.schema import option, required

recipe = dataclass(kw_only=True)


@recipe
class LoraSection:
    r: int = option(8, help="LoRA rank", min=1)
    alpha: int = option(16, help="LoRA alpha (scale = alpha / r)", min=1)
    dropout: float = option(0.05, help="dropout on the LoRA branch", min=0.0, max=1.0)
    target_modules: str | list[str] = option("all-linear", help="module names to adapt, or 'all-linear'")


@recipe
class ModelSection:
    name_or_path: str = required(help="local checkpoint directory or hub id", path="model")
    dtype: Literal["float32", "bfloat16", "float16"] = option("float32", help="weights dtype for training (fp32 on CPU)")
    lora: LoraSection | None = option(None, help="train LoRA adapters instead of all weights")
    trust_remote_code: bool = option(False, help="allow model code from the hub")


@recipe
class CleanSection:
    strip_html: bool = option(False, help="remove HTML tags from text fields")
    strip_control_chars: bool = option(True, help="remove control characters (keeps newlines and tabs)")
    normalize_whitespace: bool = option(True, help="collapse runs of spaces and trim each text field")
    deduplicate: bool = option(True, help="drop exact duplicate rows")
    max_tokens: int | None = option(None, help="drop rows whose full sequence (chat template applied, prompt + longest answer) exceeds this many tokens", min=1)


@recipe
class DataSource:
    path: str = required(help="hub dataset id, or a local .jsonl/.json/.parquet/.csv file or directory", path="data")
    split: str = option("train", help="split to read (hub datasets)")
    name: str | None = option(None, help="hub dataset configuration name")
    weight: float = option(1.0, help="mixture weight: rows sampled in proportion to it", min=0.0)
    max_rows: int | None = option(None, help="read at most this many rows", min=1)
    columns: dict = option({}, help="rename this source's columns to the stage's, e.g. {question: prompt, answer: completion}")


@recipe
class DataSection:
    sources: list[DataSource] = required(help="one or more datasets, mixed by weight")
    eval_sources: list[DataSource] = option([], help="held-out datasets; if empty, eval_fraction of the mixture is held out")
    eval_fraction: float = option(0.05, help="share of rows held out for evaluation (deterministic)", min=0.0, max=0.5)
    seed: int = option(0, help="seed of the mixture sampling and the train/eval split")
    clean: CleanSection = option(CleanSection(), help="cleaning and filtering")
    on_malformed: Literal["error", "skip"] = option("error", help="a malformed row stops the run, or is skipped and counted")


@recipe
class TrainSection:
    learning_rate: float = option(1e-4, help="peak learning rate", min=0.0)
    num_epochs: float = option(1.0, help="passes over the training data", min=0.0)
    max_steps: int = option(-1, help="stop after this many optimizer steps (-1: use num_epochs)", min=-1)
    per_device_batch_size: int = option(8, help="micro-batch size per process", min=1)
    grad_accum_steps: int = option(1, help="micro-batches per optimizer step", min=1)
    max_length: int = option(512, help="maximum tokens per sequence", min=8)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = option("cosine", help="schedule after warmup")
    warmup_ratio: float = option(0.0, help="share of steps spent warming up", min=0.0, max=1.0)
    weight_decay: float = option(0.0, help="AdamW weight decay", min=0.0)
    max_grad_norm: float = option(1.0, help="gradient clipping norm", min=0.0)
    gradient_checkpointing: bool = option(False, help="recompute activations to save memory")
    seed: int = option(0, help="training seed")
    eval_steps: int | None = option(None, help="evaluate every N steps (default: once at the end)", min=1)
    early_stopping_patience: int | None = option(None, help="stop after N evaluations without eval-loss improvement", min=1)


@recipe
class OutputSection:
    dir: str = required(help="where checkpoints, metrics and the final model go")
    save_steps: int = option(100, help="checkpoint every N optimizer steps", min=1)
    save_total_limit: int = option(2, help="keep the last K checkpoints", min=1)
    logging_steps: int = option(10, help="log metrics every N steps", min=1)
    resume: bool = option(True, help="resume from the latest complete checkpoint in dir if there is one")
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = option(
        ["tensorboard"], help="experiment trackers fed the metrics of metrics.jsonl (always written); [] for none")


@recipe
class GoldEvalSection:
    """Generate on held-out prompts and score with a rule (the task's gold metric)."""

    prompts: str = required(help="held-out prompt dataset (same formats as PPO prompts)", path="data")
    reward_function: str = option("alignment.tiny.task:gold_reward", help="'module:function' or 'file.py:function' (TRL reward signature)")
    num_prompts: int = option(128, help="evaluate on at most this many prompts", min=1)
    max_new_tokens: int = option(32, help="generation budget per answer", min=1)
    temperature: float = option(1.0, help="sampling temperature: 1.0 scores the policy as it samples, 0 = greedy", min=0.0)
    samples_per_prompt: int = option(1, help="answers sampled per prompt (the metric averages over all; the RM's gold "
                                     "agreement compares them in pairs, at least one pair per prompt)", min=1)


@recipe
class SamplingSection:
    """How completions are sampled (PPO rollouts, evaluation, label export)."""

    samples_per_prompt: int = option(1, help="completions per prompt (PPO: the group size of GRPO/RLOO)", min=1)
    temperature: float = option(1.0, help="sampling temperature (0 = greedy)", min=0.0)
    top_p: float = option(1.0, help="nucleus sampling (PPO rollouts need 1.0: the trainer scores tokens under the full softmax)", min=0.0, max=1.0)
    top_k: int = option(-1, help="top-k sampling (-1: off)", min=-1)
    max_new_tokens: int = option(32, help="completion budget; longer answers are truncated (and counted)", min=1)
    stop: list[str] = option([], help="extra stop strings (EOS always stops)")
    seed: int = option(0, help="sampling seed: sample k of prompt i uses seed + i * samples_per_prompt + k (PPO "
                       "continues the count from step to step: no two samples of a run share a stream)")

    def to_config(self, seed_offset: int = 0):
        from rollout import SamplingConfig

        return SamplingConfig(n=self.samples_per_prompt, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_new_tokens=self.max_new_tokens, stop=list(self.stop), seed=self.seed + seed_offset)


@recipe
class MultiTurnSection:
    """Multi-turn rollouts (rollout/multi_turn.py): the model acts over several turns, calling tools or playing an
    environment, and trains on its own tokens only. Give `tools` or an `environment`."""

    max_turns: int = option(4, help="model turns per trajectory", min=1)
    max_tokens: int = option(256, help="tokens after the prompt per trajectory, the model's and the environment's "
                             "(rollout.sampling.max_new_tokens bounds each model turn)", min=1)
    tools: list[str] = option([], help="tools the model may call: 'module:function' or 'file.py:function', Python "
                              "functions with type hints and a Google-style docstring (their JSON schema goes to the "
                              "chat template's tools=); a turn without a call is the final answer")
    call_format: str = option("auto", help="how the model's tool calls are read: auto (the tokenizer's response "
                              "parser: Qwen2.5/3, Llama 3.1/3.2, GLM-4.5, gpt-oss, LFM2, Nemotron, Gemma 4), hermes "
                              "(<tool_call> JSON blocks), or 'module:function' returning rollout.tool_calls.ToolCall "
                              "objects")
    tool_timeout_s: float = option(10.0, help="one tool call's time limit; past it the model reads an error", min=0.01)
    max_tool_output_chars: int = option(2000, help="a tool's output is cut to this many characters", min=1)
    environment: str | None = option(None, help="instead of tools: an environment class 'module:Class' with OpenEnv's "
                                     "reset(**row)/step(action) (one per trajectory, built with environment_kwargs)")
    environment_kwargs: dict = option({}, help="keyword arguments of the environment class")
    step_timeout_s: float = option(60.0, help="an environment's reset or step (a tools turn: all its calls) not done "
                                   "by then ends the trajectory as a scored failure", min=0.01)
    action_from_text: str | None = option(None, help="'module:function' turning the model's text into the "
                                          "environment's action (OpenEnv's typed actions); None: the text")
    observation_to_text: str | None = option(None, help="'module:function' turning an observation into text or chat "
                                             "messages (OpenEnv's typed observations); None: it is already")

    def check(self, key: str) -> list[str]:
        if bool(self.tools) == bool(self.environment):
            return [f"{key}: give either tools or an environment"]
        if self.tools and self.tool_timeout_s >= self.step_timeout_s:
            return [f"{key}.tool_timeout_s ({self.tool_timeout_s:g}) must be below step_timeout_s "
                    f"({self.step_timeout_s:g}), which bounds a whole turn of tool calls: else the model never reads "
                    "the timeout"]
        return []
