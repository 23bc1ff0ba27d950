"""What a multi-turn rollout talks to: an environment with OpenEnv's `reset`/`step` shape, and the built-in one that
runs Python tools.

An environment is made fresh for each trajectory. `reset(**row)` gets the prompt row's extra columns (its labels:
a hidden answer, test cases); `step(action)` gets the text of the model's turn and returns a `StepResult`: the
observation (text of the next user turn, or chat messages to append, e.g. tool results), a reward, and whether the
episode is done. OpenEnv environments and clients (`openenv`'s `Environment`, its HTTP `EnvClient`s) have this
shape; their typed actions and observations meet text through two converters the recipe names
(rollout.multi_turn.action_from_text, observation_to_text). An environment may list `tools` (Python callables),
which the chat template renders into the prompt (its `tools=`).
"""

from __future__ import annotations

import inspect
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from alignment.errors import UserError
from rollout.tool_calls import MalformedToolCall, ToolCall


@dataclass
class StepResult:
    """One environment step, in OpenEnv's shape. `info["error"]` names what ended the episode badly (counted in the
    metrics); `info["tool_errors"]` lists reasons of failed tool calls the model was told about."""

    observation: Any = None  # str: a user turn; list[dict]: chat messages; None: nothing to add
    reward: float | None = None
    done: bool = False
    info: dict = field(default_factory=dict)


def as_step_result(result: Any) -> StepResult:
    """Our StepResult from what an environment's `step` returned: ours, OpenEnv's client-side StepResult
    (observation, reward, done), or OpenEnv's server-side Observation (which carries done and reward itself)."""
    if isinstance(result, StepResult):
        step = result
    elif hasattr(result, "observation") and hasattr(result, "done"):
        step = StepResult(result.observation, getattr(result, "reward", None), bool(result.done))
    elif hasattr(result, "done"):
        step = StepResult(result, getattr(result, "reward", None), bool(result.done))
    else:
        raise TypeError(f"an environment's step returned {type(result).__name__}, not a StepResult (observation, "
                        "reward, done)")
    return step


def observation_messages(observation: Any) -> list[dict]:
    """The chat messages an observation adds: a text is a user turn, a list of messages is taken as it is."""
    if observation is None:
        return []
    if isinstance(observation, str):
        return [{"role": "user", "content": observation}]
    if isinstance(observation, list) and all(isinstance(m, dict) and "role" in m for m in observation):
        return observation
    raise TypeError(f"an observation of type {type(observation).__name__} is neither text nor chat messages; name a "
                    "converter in rollout.multi_turn.observation_to_text")


class ToolEnvironment:
    """The environment of `rollout.multi_turn.tools`: a turn that calls tools gets their results as `tool` messages;
    a turn without a call is the final answer (done; the reward functions score it). A call that cannot be parsed
    ends the episode as a failure (info error `malformed_call_<reason>`). A tool that raises, times out, is unknown or
    gets bad arguments answers with an error message the model reads, and the reason is counted."""

    def __init__(self, tools: list[Callable], call_parser: Callable[[str], list[ToolCall]], timeout_s: float,
                 max_output_chars: int):
        self.tools = tools
        self._by_name = {fn.__name__: fn for fn in tools}
        self._parse = call_parser
        self._timeout_s = timeout_s
        self._max_output_chars = max_output_chars

    def reset(self, **row) -> None:
        return None

    def step(self, action: str) -> StepResult:
        try:
            calls = self._parse(action)
        except MalformedToolCall as exc:
            return StepResult(done=True, info={"error": f"malformed_call_{exc.reason}"})
        if not calls:
            return StepResult(done=True)
        messages, errors = [], []
        for call in calls:
            content, error = self._run(call)
            if error:
                errors.append(error)
            messages.append({"role": "tool", "tool_call_id": call.id, "name": call.name, "content": content})
        return StepResult(messages, info={"tool_calls": len(calls), "tool_errors": errors})

    def _run(self, call: ToolCall) -> tuple[str, str | None]:
        """(the tool message's content, the error reason or None)."""
        fn = self._by_name.get(call.name)
        if fn is None:
            return f"error: no tool named '{call.name}' (tools: {', '.join(self._by_name)})", "unknown_tool"
        try:
            inspect.signature(fn).bind(**call.arguments)
        except TypeError as exc:
            return f"error: bad arguments for {call.name}: {exc}", "bad_arguments"
        value = run_concurrently([lambda: fn(**call.arguments)], self._timeout_s)[0]
        if isinstance(value, TimeoutError):
            return f"error: {call.name} took longer than {self._timeout_s:g} s", "tool_timeout"
        if isinstance(value, BaseException):
            return f"error: {call.name} failed: {type(value).__name__}: {value}", "tool_raised"
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        if len(text) > self._max_output_chars:
            text = text[: self._max_output_chars] + " [truncated]"
        return text, None


def run_concurrently(calls: list[Callable[[], Any]], timeout_s: float) -> list[Any]:
    """Run every call in a daemon thread of its own at once; each outcome is its value, its exception, or a
    TimeoutError when it had not returned `timeout_s` after the start. A call that never returns is abandoned (Python
    cannot kill a thread) and never blocks the run's exit; code that must be killed runs in reward.sandbox's
    processes instead."""
    outcomes: list[Any] = [TimeoutError(f"no answer within {timeout_s:g} s")] * len(calls)

    def target(k: int, call: Callable[[], Any]) -> None:
        try:
            outcomes[k] = call()
        except BaseException as exc:  # handed back as the outcome
            outcomes[k] = exc

    threads = [threading.Thread(target=target, args=(k, call), daemon=True, name="env-call")
               for k, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return [outcome if not thread.is_alive() else TimeoutError(f"no answer within {timeout_s:g} s")
            for outcome, thread in zip(outcomes, threads)]


def check_environment(env: Any, where: str) -> None:
    for method in ("reset", "step"):
        if not callable(getattr(env, method, None)):
            raise UserError(f"{where}: the environment has no {method}() method (an environment follows OpenEnv's "
                            "reset/step)")
