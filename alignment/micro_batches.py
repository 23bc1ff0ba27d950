"""Token-budget micro-batches: rows sorted by length, grouped into forwards of at most so many model-input tokens.

Shared by PPO's policy, reference and critic forwards (alignment/ppo/batch.py) and the reward model's
(reward/scoring.py). The count of micro-batches then depends on the lengths, while ZeRO-3 gathers every layer in each
forward on all ranks together: `same_count_on_every_rank` evens it out.
"""

from __future__ import annotations

from typing import Callable

import torch

from alignment.distributed import all_reduce_max

Group = list[int]  # positions in the caller's length-sorted order


def budget_groups(n: int, input_tokens: Callable[[int, int], int], max_rows: int, max_tokens: int) -> list[Group]:
    """Consecutive groups of the items 0..n-1 (sorted by length): each as many as fit in `max_tokens` model-input
    tokens, `input_tokens(start, end)` being those of the items start..end-1, and at most `max_rows`; an item over the
    budget on its own goes alone."""
    groups, start = [], 0
    for end in range(2, n + 1):
        if input_tokens(start, end) > max_tokens or end - start > max_rows:
            groups.append(list(range(start, end - 1)))
            start = end - 1
    if n:
        groups.append(list(range(start, n)))
    return groups


def same_count_on_every_rank(groups: list, input_tokens: Callable[[object], int]) -> list:
    """`groups` with as many as the rank with the most: the largest (by `input_tokens`) split in two until then. Every
    rank holds as many rows, so the count never needs to exceed them. A collective: every rank must call it."""
    target = all_reduce_max(len(groups))
    groups = list(groups)
    while len(groups) < target:
        k = max((g for g in range(len(groups)) if len(groups[g]) > 1), key=lambda g: input_tokens(groups[g]))
        half = len(groups[k]) // 2
        groups[k:k + 1] = [groups[k][:half], groups[k][half:]]
    return groups


def index_within_segment(lengths: torch.Tensor) -> torch.Tensor:
    """For segments of `lengths` laid back to back, each element's index within its own segment [sum(lengths)]:
    the position ids of a packed row (0 at each sequence's first token), or a token's column within its answer."""
    starts = torch.cumsum(lengths, 0) - lengths
    return torch.arange(int(lengths.sum())) - torch.repeat_interleave(starts, lengths)
