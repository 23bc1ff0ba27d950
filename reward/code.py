"""A unit-test reward for code: each completion's program runs with its row's tests in the sandbox (reward/sandbox.py).

Recipe: `kind: function, function: reward.code:unit_test_reward`. The prompt dataset needs a `tests` column: per row
a string of Python (typically asserts) or a list of such strings, run after the completion's code.

The program is the last ```python (or ```py, ```python3, bare ```) fenced block of the completion, else its whole
text; a chat completion ([{"role": "assistant", "content": ...}]) gives its last assistant message's content.

Reward: 1.0 when the program and all its tests run to the end, else 0.0: a failed assert, an exception, a syntax
error, a crash, a timeout, the memory or process limit. Binary, one run per completion, not a fraction of asserts.
Running to the end means more than exit status 0: a last line appended after the tests prints a fresh random token,
and the token must be in the output, so a program that exits early with status 0 (sys.exit(0), os._exit(0) before
the asserts) scores 0.0. The token is in the program's own source file, so a program that reads its source and
prints it could forge it; this check stops early exits, not a program written to read the harness.

Limits, read from environment variables at each call (default in brackets):
  ALIGNMENT_CODE_TIMEOUT_S [10]       wall-clock seconds per program, then its whole process tree is killed
  ALIGNMENT_CODE_MEMORY_MB [512]      address space per process
  ALIGNMENT_CODE_MAX_PROCESSES [32]   processes and threads per program
  ALIGNMENT_CODE_CONCURRENCY [8]      programs run at once
"""

from __future__ import annotations

import os
import re
import secrets

from alignment.errors import DataError
from reward import sandbox
from reward.functions import completion_text

FENCED = re.compile(r"```(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL)
_sandbox_checked = False


def unit_test_reward(prompts: list, completions: list, **columns) -> list[float]:
    """TRL reward signature: 1.0 per completion whose program passes its row's `tests`, else 0.0 (module docstring)."""
    if "tests" not in columns:
        raise DataError("reward.code:unit_test_reward needs a 'tests' column in the prompt dataset "
                        "(Python asserts run after each completion's code)")
    _check_sandbox_once()
    tokens = [secrets.token_hex(16) for _ in completions]
    programs = [build_program(extract_code(c), t, token) for c, t, token in zip(completions, columns["tests"], tokens)]
    results = sandbox.run_many(programs, max_concurrent=_env_int("ALIGNMENT_CODE_CONCURRENCY", sandbox.DEFAULT_CONCURRENCY),
                               timeout_s=float(os.environ.get("ALIGNMENT_CODE_TIMEOUT_S", sandbox.DEFAULT_TIMEOUT_S)),
                               memory_mb=_env_int("ALIGNMENT_CODE_MEMORY_MB", sandbox.DEFAULT_MEMORY_MB),
                               max_processes=_env_int("ALIGNMENT_CODE_MAX_PROCESSES", sandbox.DEFAULT_MAX_PROCESSES))
    return [1.0 if r.ok and token in r.stdout else 0.0 for r, token in zip(results, tokens)]


def extract_code(completion: str | list[dict]) -> str:
    """The last fenced Python block of the completion, else its whole text; chat completions give their last
    assistant message's content."""
    text = completion_text(completion)
    blocks = FENCED.findall(text)
    return blocks[-1] if blocks else text


def build_program(code: str, tests: str | list[str], token: str) -> str:
    """The code, then the tests, then a line printing `token`: reached only if everything before it ran."""
    tests = "\n".join(tests) if isinstance(tests, list) else tests
    return f"{code}\n\n{tests}\n\nprint({token!r})\n"


def _check_sandbox_once() -> None:
    """A machine that cannot sandbox fails the run at its first scoring with the reason, instead of scoring 0.0."""
    global _sandbox_checked
    if not _sandbox_checked:
        sandbox.check_sandbox()
        _sandbox_checked = True


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))
