"""LLM-as-judge for pairwise comparisons, run through a rollout engine (greedy).

Every pair is judged twice, once in each order (A|B, then B|A), to cancel position bias: a judge that
always answers "A" gives each answer one win and one loss, i.e. a tie. Per pair the value for the first
answer is

    v = ( s(A first) + s(A second) ) / 2,   s = 1 if the judge picks that answer, 0 if the other, 0.5 if unreadable

so v is in {0, .25, .5, .75, 1}; v > .5 means the first answer wins, v == .5 a tie.
The judge's verdict is the first standalone "A" or "B" in its reply.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from reward.labeling.formats import prompt_as_text

DEFAULT_TEMPLATE = """You are judging two answers to the same request.

Request:
{prompt}

Answer A:
{answer_a}

Answer B:
{answer_b}

Which answer is better? Reply with one letter, A or B."""

VERDICT = re.compile(r"\b([AB])\b")


def parse_verdict(text: str) -> str:
    """'A', 'B' or 'invalid' from a judge reply."""
    m = VERDICT.search(text)
    return m.group(1) if m else "invalid"


@dataclass
class JudgeResult:
    values: list[float]                 # per pair: value for the first answer, see module docstring
    verdicts_ab: list[str]              # judge's answer with the first answer shown as A
    verdicts_ba: list[str]              # ... shown as B
    counts: dict = field(default_factory=dict)

    def choices(self) -> list[str]:
        return ["A" if v > 0.5 else "B" if v < 0.5 else "tie" for v in self.values]


class PairwiseJudge:
    """`generate(list of prompt token ids) -> list of reply texts` runs the judge model (greedy)."""

    def __init__(self, generate: Callable[[list[list[int]]], list[str]], tokenizer, template: str = DEFAULT_TEMPLATE, chat: bool = True):
        for key in ("{prompt}", "{answer_a}", "{answer_b}"):
            if key not in template:
                raise ValueError(f"judge template must contain {key}")
        self.generate, self.tokenizer, self.template, self.chat = generate, tokenizer, template, chat

    def render(self, prompt, answer_a: str, answer_b: str) -> list[int]:
        text = self.template.replace("{prompt}", prompt_as_text(prompt)).replace("{answer_a}", answer_a).replace("{answer_b}", answer_b)
        if self.chat and getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(text)["input_ids"]

    def compare(self, prompts: list, first: list[str], second: list[str]) -> JudgeResult:
        if not (len(prompts) == len(first) == len(second)):
            raise ValueError("prompts, first and second answers must have the same length")
        ab = [self.render(p, a, b) for p, a, b in zip(prompts, first, second)]
        ba = [self.render(p, b, a) for p, a, b in zip(prompts, first, second)]
        replies = self.generate(ab + ba) if prompts else []
        v_ab = [parse_verdict(t) for t in replies[: len(prompts)]]
        v_ba = [parse_verdict(t) for t in replies[len(prompts) :]]
        score_ab = {"A": 1.0, "B": 0.0, "invalid": 0.5}
        score_ba = {"A": 0.0, "B": 1.0, "invalid": 0.5}
        values = [(score_ab[x] + score_ba[y]) / 2 for x, y in zip(v_ab, v_ba)]
        valid = [v for v in v_ab + v_ba if v != "invalid"]
        both_valid = [(x, y) for x, y in zip(v_ab, v_ba) if x != "invalid" and y != "invalid"]
        counts = {
            "pairs": len(prompts),
            "invalid_verdicts": len(v_ab) + len(v_ba) - len(valid),
            # share of readable verdicts that picked whatever was shown first (0.5 = no position bias)
            "first_position_rate": (sum(v == "A" for v in valid) / len(valid)) if valid else None,
            # share of pairs judged the same way in both orders
            "order_consistency": (sum(x != y for x, y in both_valid) / len(both_valid)) if both_valid else None,
        }
        return JudgeResult(values, v_ab, v_ba, counts)


def engine_generate(generator, policy, model, tokenizer, max_new_tokens: int, seed: int = 0) -> Callable[[list[list[int]]], list[str]]:
    """A `generate` callable for PairwiseJudge over a PolicyGenerator holding the judge's weights (greedy)."""
    from alignment.evaluation.generation import completion_text
    from rollout import SamplingConfig

    sampling = SamplingConfig(n=1, temperature=0.0, max_new_tokens=max_new_tokens, seed=seed)

    def generate(prompt_ids: list[list[int]]) -> list[str]:
        return [completion_text(s) for s in generator.generate(policy, model, tokenizer, prompt_ids, sampling)]

    return generate


def load_judge(section, generator, seed: int = 0) -> PairwiseJudge:
    """A PairwiseJudge for a JudgeSection, generating through `generator` (weights swapped in on each call)."""
    from pathlib import Path

    from alignment.evaluation.generation import Policy, load_policy

    model, tokenizer = load_policy(section.model, generator.section.dtype)
    template = Path(section.template).read_text(encoding="utf-8") if section.template else DEFAULT_TEMPLATE
    policy = Policy("judge", section.model)
    return PairwiseJudge(engine_generate(generator, policy, model, tokenizer, section.max_new_tokens, seed), tokenizer, template, section.chat)
