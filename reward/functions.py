"""Rule-based reward functions, loaded by reference: 'package.module:function' or 'path/to/file.py:function'.

A reward function has TRL's signature: fn(prompts, completions, **columns) -> list[float], where
`columns` are the prompt dataset's extra columns (gold labels), each a list aligned with `prompts`.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Callable

from alignment.errors import UserError


def load_reward_function(spec: str) -> Callable[..., list[float]]:
    if ":" not in spec:
        raise UserError(f"reward function '{spec}' must look like 'module:function' or 'file.py:function'")
    where, name = spec.rsplit(":", 1)
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise UserError(f"reward function file '{where}' does not exist")
        module_spec = importlib.util.spec_from_file_location(f"reward_fn_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:  # the user's file: report its error in one line
            raise UserError(f"reward function file '{where}' failed to import: {type(exc).__name__}: {exc}") from None
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise UserError(f"cannot import module '{where}' for reward function '{spec}': {exc}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"'{name}' is not a function in '{where}'")
    return fn


def completion_text(completion: str | list[dict]) -> str:
    """The text a rule reward reads: the completion itself, or its last assistant message's content."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)):
        replies = [m for m in completion if isinstance(m, dict) and m.get("role", "assistant") == "assistant"]
        content = replies[-1].get("content") if replies else None
        return content if isinstance(content, str) else ""
    raise TypeError(f"completion must be text or chat messages, got {type(completion).__name__}")
