"""The total reward of a PPO recipe: a weighted sum of reward-model, Python-function and HTTP terms.

A reward function may be `async def`: the async terms of a call are awaited together, so slow verifiers (remote
sandboxes, judges) overlap.
"""

from __future__ import annotations

import asyncio
import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from reward.functions import load_reward_function
from reward.remote import RemoteReward

RewardFn = Callable[..., list[float]]  # TRL signature: fn(prompts, completions, **columns) -> list[float]


@dataclass
class RewardTerm:
    name: str
    fn: RewardFn
    weight: float
    scorer: object | None = None  # kind=model: the RewardModelScorer behind fn


class CompositeReward:
    """`scores(prompts, completions, columns)` -> (total [B], per-term raw scores {name: [B]}).

    After each call `trimmed` holds, per reward-model term, how many sequences had their prompt trimmed to fit the
    model's max_length."""

    def __init__(self, terms: list[RewardTerm]):
        self.terms = terms
        self.trimmed: dict[str, int] = {}

    @property
    def scorers(self) -> dict[str, object]:
        """The reward-model scorers of the model terms, by term name."""
        return {t.name: t.scorer for t in self.terms if t.scorer is not None}

    @classmethod
    def from_recipe(cls, sources, device: torch.device, default_dtype: str = "float32", place=None,
                    batch_size: int = 32, max_tokens: int | None = None, packed: bool = False) -> CompositeReward:
        """Terms of the recipe's `rewards`. Reward models load in their term's dtype (else `default_dtype`, the
        policy's), are put in place by `place` and score `batch_size` sequences at a time, within `max_tokens`
        model-input tokens, `packed` or padded (see RewardModelScorer)."""
        from alignment.models import DTYPES

        terms = []
        for i, src in enumerate(sources):
            scorer = None
            if src.kind == "model":
                from reward.scoring import RewardModelScorer

                scorer = RewardModelScorer(src.path, device=device, normalize=src.normalize, batch_size=batch_size,
                                           dtype=DTYPES[src.dtype or default_dtype], place=place,
                                           max_tokens=max_tokens, packed=packed)
                fn: RewardFn = lambda prompts, completions, _s=scorer, **_: _s.score(prompts, completions).tolist()
            elif src.kind == "function":
                fn = load_reward_function(src.function)
            else:
                fn = RemoteReward(src.url, timeout_s=src.timeout_s, retries=src.retries)
            terms.append(RewardTerm(f"{i}_{src.kind}", fn, src.weight, scorer))
        return cls(terms)

    def __call__(self, prompts: list, completions: list[str], columns: dict[str, list]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        values = {t.name: t.fn(prompts=prompts, completions=completions, **columns) for t in self.terms}
        values.update(_awaited({name: v for name, v in values.items() if inspect.isawaitable(v)}))
        parts = {name: torch.tensor(v, dtype=torch.float32) for name, v in values.items()}
        total = sum(t.weight * parts[t.name] for t in self.terms)
        self.trimmed = {name: scorer.last_trimmed for name, scorer in self.scorers.items()}
        return total, parts


def _awaited(pending: dict[str, object]) -> dict[str, list[float]]:
    """The results of async reward functions (`async def`: a remote verifier, a judge), awaited together."""
    if not pending:
        return {}

    async def gather():
        return await asyncio.gather(*pending.values())

    return dict(zip(pending, asyncio.run(gather())))
