"""Rule-based reward functions, loaded by reference: 'package.module:function' or 'path/to/file.py:function'.

A reward function has TRL's signature: fn(prompts, completions, **columns) -> list[float], where
`columns` are the prompt dataset's extra columns (gold labels), each a list aligned with `prompts`.
"""

from __future__ import annotations

from typing import Callable

from alignment.user_code import load_callable


def load_reward_function(spec: str) -> Callable[..., list[float]]:
    return load_callable(spec, "reward function")


def environment_reward(prompts, completions, env_reward, **columns) -> list[float]:
    """The reward a multi-turn trajectory's environment gave (summed over its steps; 0 when it gave none)."""
    return [float(r) if r is not None else 0.0 for r in env_reward]


def completion_text(completion: str | list[dict]) -> str:
    """The text a rule reward reads: the completion itself, or its last assistant message's content."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)):
        replies = [m for m in completion if isinstance(m, dict) and m.get("role", "assistant") == "assistant"]
        content = replies[-1].get("content") if replies else None
        return content if isinstance(content, str) else ""
    raise TypeError(f"completion must be text or chat messages, got {type(completion).__name__}")
