"""Multi-turn rollouts: the model acts, the environment answers, until the episode is done.

Every trajectory of a call is in flight at once: each turn is one `engine.generate` call over all unfinished
trajectories (token-id prompts: the prompt and everything so far, so the engine's prefix cache reuses the shared
start), then every environment steps concurrently, each bounded by `step_timeout_s`. Any engine works (colocated
vLLM, remote servers, transformers): they all take token-id prompts.

A trajectory's `Sample` holds, after the prompt, the model's sampled tokens and the environment's tokens in order,
with `completion_mask` 1 on the model's tokens only (loss, KL and advantages cover those) and the engine's log-probs
on them (0 on the environment's). An episode ends when the environment says done, after `max_turns` model turns,
when a turn is cut at the per-turn max_new_tokens, or when the trajectory reaches `max_tokens` (finish_reason
"length" for those two), or when the environment fails: an exception or no answer within the timeout is a scored
failure (the reward functions score what the model wrote), counted by reason in `episode["errors"]`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from alignment.errors import UserError
from rollout.environments import as_step_result, observation_messages, run_concurrently
from rollout.turn_tokens import TurnTokenizer
from rollout.types import Sample, SamplingConfig

# Turn t of a call samples with seed + t * stride: beyond any seed a run's steps and refills reach, so every turn of
# every episode draws a stream of its own.
TURN_SEED_STRIDE = 1_000_000_007


@dataclass
class EpisodeLimits:
    max_turns: int  # model turns per trajectory
    max_tokens: int  # tokens after the prompt per trajectory, the model's and the environment's
    step_timeout_s: float  # one environment's making and reset, or one step
    max_model_len: int | None = None  # the engine's context: a trajectory that fills it ends ("length")


@dataclass
class _Trajectory:
    prompt_index: int
    prompt_ids: list[int]
    env: Any = None
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""  # the model's last turn, as the engine decoded it (for the reward functions)
    action: str = ""  # the same turn as the environment reads it (TurnTokenizer.turn_text)
    finish_reason: str = "stop"
    turns: int = 0
    tool_calls: int = 0
    env_reward: float | None = None
    errors: Counter = field(default_factory=Counter)
    done: bool = False
    env_failed: bool = False  # made or reset in vain: the model still answers once (a trajectory needs a model token)

    def add(self, ids: list[int], logprobs: list[float] | None) -> None:
        self.ids += ids
        self.mask += [1 if logprobs is not None else 0] * len(ids)
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)

    def end(self, finish_reason: str = "stop", error: str | None = None) -> None:
        self.done, self.finish_reason = True, finish_reason
        if error:
            self.errors[error] += 1


class MultiTurnRollouts:
    """`generate(engine, prompt_ids, rows, sampling)`: `sampling.n` trajectories per prompt, group after group (as
    `engine.generate` orders samples), each with an environment of its own from `make_environment()` that is reset
    with its prompt's row (the dataset's extra columns)."""

    def __init__(self, turn_tokens: TurnTokenizer, make_environment: Callable[[], Any], limits: EpisodeLimits,
                 action_from_text: Callable[[str], Any] | None = None,
                 observation_to_text: Callable[[Any], Any] | None = None):
        self.turn_tokens = turn_tokens
        self.make_environment = make_environment
        self.limits = limits
        self.action_from_text = action_from_text or (lambda text: text)
        self.observation_to_text = observation_to_text

    def prompt_ids(self, prompt: str | list[dict]) -> list[int]:
        """A prompt's token ids with the tool list rendered in (a text prompt is one user turn)."""
        return self.turn_tokens.prompt_ids([{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt)

    def generate(self, engine, prompt_ids: list[list[int]], rows: list[dict], sampling: SamplingConfig) -> list[Sample]:
        trajectories = [_Trajectory(i, list(ids)) for i, ids in enumerate(prompt_ids) for _ in range(sampling.n)]
        # Made and reset in the bounded threads: an environment server that is down or hangs fails its episode only.
        starts = run_concurrently([lambda t=t: self._start(t, rows[t.prompt_index]) for t in trajectories],
                                  self.limits.step_timeout_s)
        for t, outcome in zip(trajectories, starts):
            if isinstance(outcome, BaseException):
                t.env_failed = True
                t.errors[_failure("reset", outcome)] += 1
        # The engine stops on every end-of-turn token (vLLM does on the generation config's; the HF engine needs them)
        stop_ids = sorted(set(sampling.stop_token_ids) | set(self.turn_tokens.end_token_ids()))
        versions = set()
        try:
            for turn in range(self.limits.max_turns):
                for t in trajectories:
                    if not t.done and self._context_left(t) <= 0:
                        t.end("length")
                active = [t for t in trajectories if not t.done]
                if not active:
                    break
                seed = None if sampling.seed is None else sampling.seed + turn * TURN_SEED_STRIDE
                samples = engine.generate([t.prompt_ids + t.ids for t in active],
                                          replace(sampling, n=1, seed=seed, stop_token_ids=stop_ids))
                versions |= {s.weight_version for s in samples}
                for t, sample in zip(active, samples):
                    self._take_turn(t, sample)
                    if t.env_failed and not t.done:
                        t.end()
                self._step_environments([t for t in active if not t.done], last_turn=turn + 1 == self.limits.max_turns)
        finally:
            run_concurrently([lambda t=t: _close(t.env) for t in trajectories], self.limits.step_timeout_s)
        if len(versions) > 1:  # an engine never takes new weights while it generates; a mix means a broken schedule
            raise RuntimeError(f"one multi-turn call sampled with several weight versions: {sorted(versions)}")
        version = versions.pop() if versions else engine.weight_version
        return [Sample(prompt_index=t.prompt_index, prompt_ids=t.prompt_ids, completion_ids=t.ids, text=t.text,
                       logprobs=t.logprobs, finish_reason=t.finish_reason, weight_version=version,
                       completion_mask=t.mask,
                       episode={"turns": t.turns, "tool_calls": t.tool_calls, "env_reward": t.env_reward,
                                "errors": dict(t.errors)})
                for t in trajectories]

    def _start(self, t: _Trajectory, row: dict) -> None:
        t.env = self.make_environment()
        t.env.reset(**row)

    def _context_left(self, t: _Trajectory) -> int:
        """Tokens the trajectory may still take: its budget, and the engine's context (a prompt must be shorter)."""
        left = self.limits.max_tokens - len(t.ids)
        if self.limits.max_model_len is not None:
            left = min(left, self.limits.max_model_len - 1 - len(t.prompt_ids) - len(t.ids))
        return left

    def _take_turn(self, t: _Trajectory, sample: Sample) -> None:
        t.turns += 1
        room = self._context_left(t)
        kept = sample.completion_ids[:room]
        t.add(kept, sample.logprobs[:room])
        if len(kept) < len(sample.completion_ids):  # over the budget: cut, and the rewards read what was kept
            t.text = self.turn_tokens.tokenizer.decode(kept, skip_special_tokens=True)
            t.end("length")
            return
        t.text = sample.text
        t.action = self.turn_tokens.turn_text(sample.completion_ids)
        if sample.finish_reason == "length":  # cut at the per-turn max_new_tokens: no turn to answer
            t.end("length")

    def _step_environments(self, stepping: list[_Trajectory], last_turn: bool) -> None:
        outcomes = run_concurrently([lambda t=t: t.env.step(self.action_from_text(t.action)) for t in stepping],
                                    self.limits.step_timeout_s)
        for t, outcome in zip(stepping, outcomes):
            if isinstance(outcome, BaseException):
                t.end(error=_failure("step", outcome))
                continue
            try:
                result = as_step_result(outcome)
            except TypeError as exc:  # the environment's code returns the wrong thing: the user's to fix
                raise UserError(f"rollout.multi_turn: {exc}") from None
            try:
                if result.observation is not None and self.observation_to_text is not None:
                    result.observation = self.observation_to_text(result.observation)
                messages = [] if result.done or last_turn else observation_messages(result.observation)
                reward = None if result.reward is None else float(result.reward)
                info = dict(result.info or {})
            except Exception:  # a converter that raises, a reward that is no number: this episode fails, scored
                t.end(error="env_step_error")
                continue
            if reward is not None:
                t.env_reward = (t.env_reward or 0.0) + reward
            t.tool_calls += int(info.get("tool_calls", 0))
            t.errors.update(info.get("tool_errors", []))
            if info.get("error"):
                t.errors[info["error"]] += 1
            if result.done:
                t.end()
            elif last_turn:
                t.end(error="max_turns")
            else:
                ids = self.turn_tokens.environment_ids(messages, t.ids[-1] if t.ids else None)
                if len(ids) >= self._context_left(t):  # no room left for another model turn
                    t.end("length")
                else:
                    t.add(ids, None)


def _close(env) -> None:
    """Close an environment that can be closed (OpenEnv's clients hold a connection or a container)."""
    close = getattr(env, "close", None)
    if callable(close):
        close()


def _failure(what: str, exc: BaseException) -> str:
    return f"env_{what}_timeout" if isinstance(exc, TimeoutError) else f"env_{what}_error"


def multi_turn_rollouts(section, tokenizer, end_tokens: list[str] | None = None,
                        max_model_len: int | None = None) -> MultiTurnRollouts:
    """The rollouts a recipe's `rollout.multi_turn` section (alignment.config.sections.MultiTurnSection) asks for.
    `end_tokens`: the tokens that end a model turn (see TurnTokenizer); `max_model_len`: the engine's context."""
    from alignment.user_code import load_callable
    from rollout.environments import ToolEnvironment, check_environment
    from rollout.tool_calls import load_call_parser

    key = "rollout.multi_turn"
    if section.tools:
        tools = [load_callable(spec, f"{key}.tools") for spec in section.tools]
        parse = load_call_parser(section.call_format, tokenizer, end_tokens)

        def make_environment():
            return ToolEnvironment(tools, parse, section.tool_timeout_s, section.max_tool_output_chars)
    else:
        environment_class = load_callable(section.environment, f"{key}.environment")

        def make_environment():
            try:
                return environment_class(**section.environment_kwargs)
            except TypeError as exc:
                raise UserError(f"{key}.environment_kwargs: {section.environment} does not take them: {exc}") from None
    probe = make_environment()
    check_environment(probe, f"{key}.environment")
    convert = {name: load_callable(spec, f"{key}.{name}") if spec else None
               for name, spec in (("action_from_text", section.action_from_text),
                                  ("observation_to_text", section.observation_to_text))}
    tools = getattr(probe, "tools", None) or []
    _close(probe)
    turn_tokens = TurnTokenizer(tokenizer, tool_schemas(tools), end_tokens)
    limits = EpisodeLimits(section.max_turns, section.max_tokens, section.step_timeout_s, max_model_len)
    return MultiTurnRollouts(turn_tokens, make_environment, limits, **convert)


def tool_schemas(tools: list) -> list[dict] | None:
    """The JSON schemas of Python tools, as chat templates take them (transformers' get_json_schema reads the type
    hints and the Google-style docstring); schemas given as dicts are kept."""
    from transformers.utils import get_json_schema

    schemas = []
    for tool in tools:
        if isinstance(tool, dict):
            schemas.append(tool)
            continue
        try:
            schemas.append(get_json_schema(tool))
        except Exception as exc:  # transformers' DocstringParsingException / TypeHintParsingException
            raise UserError(f"tool '{getattr(tool, '__name__', tool)}' has no usable JSON schema: {exc}") from None
    return schemas or None


def episode_metrics(samples: list[Sample]) -> dict[str, float]:
    """Means over trajectories: turns, tool calls, the environment's reward, and the share of trajectories with each
    error reason (rollout/errors/<reason>) -- computed from every sample of the step, so every rank logs the same."""
    episodes = [s.episode for s in samples if s.episode is not None]
    if not episodes:
        return {}
    n = len(episodes)
    metrics = {"rollout/turns": sum(e["turns"] for e in episodes) / n,
               "rollout/tool_calls": sum(e["tool_calls"] for e in episodes) / n,
               "rollout/cut": sum(s.finish_reason == "length" for s in samples) / n}
    rewards = [e["env_reward"] for e in episodes if e["env_reward"] is not None]
    if rewards:
        metrics["rollout/env_reward"] = sum(rewards) / len(rewards)
    for reason in sorted({r for e in episodes for r in e["errors"]}):
        metrics[f"rollout/errors/{reason}"] = sum(e["errors"].get(reason, 0) for e in episodes) / n
    return metrics
