r"""A verifiable math reward on math-verify: 1.0 when a completion's final answer equals the gold answer, else 0.0.

Recipes name it `kind: function, function: reward.math:math_reward`; the prompt dataset needs an `answer` column
(the gold answer of each prompt: a string, or a number). Write a column of mixed answers as strings ("3/4", "12"):
a table column holds one type.

What is read as the answer (math-verify's extraction, by priority, then the rightmost match):
  - in a completion (text, or chat messages: the last assistant message): `\boxed{...}` wherever it stands (several
    boxes are read together as a set, so hedging between answers scores 0); else the expression after "final answer
    is" / "answer:", else the last LaTeX span (`$...$`, `\(...\)`) or plain number or expression in the text:
    "\boxed{1/2}", "The answer is 42.", "x = 3", "$\frac{1}{2}$", "0.5", "1,000", "50%", "\boxed{2, 3}".
  - the gold: a string read as if it were boxed ("0.5", "3/4", "x^2 + 2x + 1", "2\sqrt{2}", "2, 3"), or used as is
    when it holds `\boxed{}` or `$` already (a worked solution, as in the MATH dataset); a finite number.
Equivalence is math-verify's: numeric to 6 decimals ("0.5" == "1/2" == "50%"), symbolic ("(x+1)^2" ==
"x^2+2x+1"), sets and intervals, an equation against its value ("x = 3" == 3). A completion or gold that yields no
answer, or an error inside math-verify, scores 0.0: no completion makes this function raise.

Time bound: each completion gets at most TIMEOUT_S seconds (parsing it and the gold, and comparing). math-verify's own
timeout is signal.alarm, which works only in the main thread, and sympy cannot be interrupted inside a thread, while
rewards may be called from worker threads (and `\boxed{9^{9^{9^9}}}` keeps sympy busy for good). So the work runs in
a helper process (one per process that calls the reward, started on first use, ~1 s), fed one completion at a time
from a thread of its own; a completion over the bound scores 0.0, and the helper is killed and restarted.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import select
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from alignment.errors import UserError
from alignment.lifetime import die_with_parent
from reward.functions import completion_text

TIMEOUT_S = 5.0  # per completion: parsing it and its gold, and comparing them
STARTUP_TIMEOUT_S = 120.0  # the helper's imports (sympy, math-verify), on a busy machine
ROOT = Path(__file__).resolve().parents[1]  # holds the `reward` package, for the helper's imports

# \boxed{} first (priority 0, ahead of the "final answer is" anchors), then LaTeX spans and plain expressions ("x = 3",
# "42") alike, the rightmost winning.
EXTRACTION = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())


def math_reward(prompts: list, completions: list, answer: list | None = None, **unused: Any) -> list[float]:
    """TRL reward-function signature: 1.0 per completion whose final answer equals its row's `answer`, else 0.0."""
    if answer is None:
        raise UserError("reward.math:math_reward needs an 'answer' column in the prompt dataset (each prompt's gold "
                        "answer, e.g. \"3/4\"); the prompts have none")
    if len(completions) != len(answer):
        raise ValueError(f"math_reward: {len(completions)} completions but {len(answer)} answers")
    pairs = [(completion_text(c), gold_text(a)) for c, a in zip(completions, answer)]
    return _HELPER.score(pairs)


def gold_text(answer: Any) -> str | None:
    """The gold answer as LaTeX math-verify extracts: boxed, unless it is a solution holding its own box or `$`.
    Numbers (numpy's too) are written in positional notation: 1e-07 would read as 1*e*(-07). None: no usable answer."""
    if isinstance(answer, numbers.Integral) and not isinstance(answer, bool):
        answer = str(int(answer))
    elif isinstance(answer, numbers.Real) and not isinstance(answer, bool):
        answer = format(Decimal(repr(float(answer))), "f") if math.isfinite(answer) else None
    if not isinstance(answer, str) or not answer.strip():
        return None
    return answer if ("\\boxed" in answer or "$" in answer) else f"\\boxed{{{answer}}}"


def score(completion: str, gold: str) -> float:
    """1.0 if the completion's answer equals the gold's, else 0.0 (math-verify; its signal timeouts off: the helper
    process is the bound). Runs in the helper process."""
    gold_parsed = parse(gold, extraction_config=EXTRACTION, parsing_timeout=None)
    if not gold_parsed:
        return 0.0
    answer_parsed = parse(completion, extraction_config=EXTRACTION, parsing_timeout=None)
    return float(verify(gold_parsed, answer_parsed, timeout_seconds=None))


def serve() -> None:
    """The helper process: a JSON [completion, gold] per line on stdin, its score per line on stdout."""
    die_with_parent(signal.SIGKILL)  # not SIGTERM: a Python handler would wait for sympy's C loops to return
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout is disabled" warning: we bound time here
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # a library's stray print goes to stderr, not into the replies
    print("ready", file=replies)
    for line in sys.stdin:
        completion, gold = json.loads(line)
        try:
            result = score(completion, gold)
        except Exception:  # math-verify catches its own errors; anything else is still an unreadable answer
            result = 0.0
        print(result, file=replies)


class _Helper:
    """The helper process, driven by one long-lived thread: the process dies with the thread that started it
    (die_with_parent), and this thread lives as long as the interpreter, whichever threads call the reward."""

    def __init__(self):
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="math-reward")
        self._process: subprocess.Popen | None = None

    def score(self, pairs: list[tuple[str, str | None]]) -> list[float]:
        return self._thread.submit(self._score_all, pairs).result()

    def _score_all(self, pairs: list[tuple[str, str | None]]) -> list[float]:
        return [self._score_one(completion, gold) if gold is not None else 0.0 for completion, gold in pairs]

    def _score_one(self, completion: str, gold: str) -> float:
        process = self._running()
        try:
            process.stdin.write((json.dumps([completion, gold]) + "\n").encode())
            process.stdin.flush()
            reply = self._reply(process, TIMEOUT_S)
        except BrokenPipeError:
            reply = None
        if reply is None:  # over the bound, or the helper died on this completion
            self._stop()
            return 0.0
        return float(reply)

    def _running(self) -> subprocess.Popen:
        if self._process is not None and self._process.poll() is None:
            return self._process
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        # -P: no working directory on sys.path, where a math.py could shadow the standard library's
        self._process = subprocess.Popen([sys.executable, "-P", "-c", "from reward.math import serve; serve()"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, bufsize=0)
        if self._reply(self._process, STARTUP_TIMEOUT_S) != "ready":
            self._stop()
            raise RuntimeError("reward.math: the math-verify helper process failed to start (its error, if any, is on "
                               "stderr above)")
        return self._process

    @staticmethod
    def _reply(process: subprocess.Popen, timeout_s: float) -> str | None:
        """The helper's next line, or None if it has not come within `timeout_s` or the helper has exited."""
        ready, _, _ = select.select([process.stdout], [], [], timeout_s)
        line = process.stdout.readline() if ready else b""
        return line.decode().strip() if line else None

    def _stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process.stdin.close()
            self._process.stdout.close()
            self._process = None


_HELPER = _Helper()


def _new_helper_after_fork() -> None:
    """A forked child has the parent's helper pipes but not its thread (work submitted there would wait forever):
    it starts a helper of its own when it first scores."""
    global _HELPER
    _HELPER = _Helper()


os.register_at_fork(after_in_child=_new_helper_after_fork)
