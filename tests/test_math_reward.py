r"""reward/math.py: answers equivalent to the gold score 1, anything else 0, never an exception, within a time bound in
any thread; the math dataset (tests/data/math) and recipe (recipes/tiny/math_grpo.yaml) that use it."""

from __future__ import annotations

import json
import multiprocessing
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from alignment.config.ppo import PPORecipe
from alignment.config.schema import load_recipe
from alignment.errors import RecipeError, UserError
from reward.functions import load_reward_function
from reward.math import TIMEOUT_S, math_reward

ROOT = Path(__file__).resolve().parents[1]
PROBLEMS = ROOT / "tests" / "data" / "math" / "problems.jsonl"
RECIPE = ROOT / "recipes" / "tiny" / "math_grpo.yaml"
STARTUP_SLACK_S = 20.0  # a restarted helper imports sympy again: seconds on a loaded machine


def score(completion, gold) -> float:
    return math_reward(prompts=["q"], completions=[completion], answer=[gold])[0]


@pytest.mark.parametrize("completion, gold", [
    (r"So the answer is $\boxed{1/2}$.", "0.5"),
    (r"\boxed{\frac{1}{2}}", "0.5"),
    (r"$\frac{1}{2}$", 0.5),
    ("x = 3", 3),
    ("Adding the two, the total is 42.", "42"),
    ("The final answer is 7. Check: 3 + 4 = 7, and 9 is not.", "7"),
    (r"\boxed{(x+1)^2}", "x^2 + 2x + 1"),
    (r"\boxed{3, 2}", "2, 3"),
    (r"First 5, then \boxed{-4} after all.", -4),
    ("0.0000001", 1e-7),
    (r"\boxed{7}", np.int64(7)),
    (r"\boxed{0.25}", np.float32(0.25)),
    ("50%", "1/2"),
])
def test_equivalent_answers_score_one(completion, gold):
    assert score(completion, gold) == 1.0


@pytest.mark.parametrize("completion, gold", [
    ("The answer is 41.", "42"),
    (r"\boxed{1/3}", "0.5"),
    (r"\boxed{3} or maybe \boxed{5}", "5"),  # hedging: both boxes are read as the set {3, 5}
    ("", "42"),
    ("I do not know.", "42"),
    (r"\boxed{", "42"),
    (r"$$\frac{{}^^", "1"),
    ("42", ""),
    ("42", None),
    ("nan", float("nan")),
])
def test_wrong_or_unreadable_answers_and_unusable_golds_score_zero(completion, gold):
    assert score(completion, gold) == 0.0


def test_chat_completions_are_read_from_the_last_assistant_message():
    completions = [
        [{"role": "assistant", "content": r"It is \boxed{12}."}],
        [{"role": "assistant", "content": r"\boxed{11}"}, {"role": "user", "content": "sure?"},
         {"role": "assistant", "content": "Yes: 12."}],
        [{"role": "assistant", "content": r"\boxed{11}"}],
        [],
    ]
    assert math_reward(prompts=["q"] * 4, completions=completions, answer=["12"] * 4) == [1.0, 1.0, 0.0, 0.0]


def test_a_missing_answer_column_is_a_user_error_naming_it():
    with pytest.raises(UserError, match="'answer' column"):
        math_reward(prompts=["q"], completions=["1"], item=["lamp"])


def test_works_from_worker_threads():
    batches = [([rf"\boxed{{{n}}}", str(n + 1)], [n, n]) for n in range(8)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda b: math_reward(prompts=["q", "q"], completions=b[0], answer=b[1]), batches))
    assert results == [[1.0, 0.0]] * 8


def test_a_pathological_answer_is_cut_at_the_time_bound_in_a_worker_thread():
    # sympy would evaluate 9^(9^(9^9)) for good; the completion after it needs the restarted helper
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=1) as pool:
        scores = pool.submit(math_reward, prompts=["q", "q"], completions=[r"\boxed{9^{9^{9^9}}}", r"\boxed{1}"],
                             answer=["1", "1"]).result()
    assert scores == [0.0, 1.0]
    assert time.monotonic() - start < TIMEOUT_S + STARTUP_SLACK_S


def test_a_forked_process_scores_with_a_helper_of_its_own():
    assert score(r"\boxed{2}", 2) == 1.0  # the parent's helper runs, driven by a thread the fork does not copy
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply_async(score, (r"\boxed{2}", 2)).get(timeout=60) == 1.0


def problems() -> list[dict]:
    return [json.loads(line) for line in PROBLEMS.read_text(encoding="utf-8").splitlines()]


def test_every_problem_scores_its_own_answer_and_not_another_rows():
    rows = problems()
    assert len(rows) >= 40 and all(isinstance(r["answer"], str) and r["prompt"][0]["role"] == "user" for r in rows)
    answers = [r["answer"] for r in rows]
    others = answers[1:] + answers[:1]
    completions = [rf"The final answer is $\boxed{{{a}}}$." for a in answers + others]
    assert math_reward(prompts=[r["prompt"] for r in rows] * 2, completions=completions, answer=answers * 2) == \
        [1.0] * len(rows) + [0.0] * len(rows)


def test_the_math_recipe_loads_and_its_reward_resolves(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)  # the recipe's paths are relative to the repository root
    recipe = load_recipe(RECIPE, PPORecipe, [f"policy.name_or_path={tmp_path}"])
    assert recipe.prompts.sources[0].path == "tests/data/math/problems.jsonl"
    assert load_reward_function(recipe.rewards[0].function) is math_reward
    with pytest.raises(RecipeError, match="policy.name_or_path: path .* does not exist"):
        load_recipe(RECIPE, PPORecipe)  # the placeholder is a missing local path, never a hub download
