"""What every rollout engine takes and returns: sampling settings, samples, sync statistics."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Protocol, runtime_checkable

import torch


@dataclass
class SamplingConfig:
    """How to sample completions. Same meaning for every engine.

    temperature 0 means greedy. top_k <= 0 and top_p == 1 disable those filters. `seed` makes a call
    reproducible: every sample draws a stream of its own, seed + i * n + k for the k-th of prompt i's n samples
    (`prompt_seed`), so equal prompts still get distinct samples; None draws fresh randomness. `n` completions are
    drawn per prompt.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 64
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    n: int = 1

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        self.stop = list(self.stop or [])
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]

    def prompt_seed(self, prompt_index: int) -> int | None:
        """The seed of prompt i's request. vLLM seeds the k-th of a request's n samples `seed + k`; with requests
        seeded `seed + i` (as before) samples (i, k) and (i', k') shared a stream whenever i + k = i' + k', and a
        prompt repeated in a call got the same samples. Strided by n, every sample's stream is its own."""
        return None if self.seed is None else self.seed + prompt_index * self.n

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SamplingConfig:
        return cls(**d)


@dataclass
class Sample:
    """One completion of one prompt; or one multi-turn trajectory (rollout/multi_turn.py), whose completion is every
    token after the prompt: the model's turns as sampled and the environment's turns between them."""

    prompt_index: int  # index into the prompts passed to generate
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str  # decoded completion (a matched stop string is not included); multi-turn: the model's last turn
    logprobs: list[float]  # log p of each completion token under the distribution it was sampled from (0: environment)
    finish_reason: str  # "stop" (EOS / stop token / stop string) or "length"
    weight_version: int  # version of the weights that generated it
    # Multi-turn only (None for one completion): 1 for each completion token the model sampled, 0 for the
    # environment's; and what happened in the episode (turns, tool calls, errors by reason, the environment's reward).
    completion_mask: list[int] | None = None
    episode: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Sample:
        return cls(**d)


def tensor_bytes(dtype: torch.dtype, shape) -> int:
    """Bytes of a dense tensor of `dtype` and `shape` (from metadata: nothing materialised)."""
    return math.prod(shape) * dtype.itemsize


@dataclass
class SyncStats:
    """What one weight sync moved and how long it took (wall clock, trainer side)."""

    bytes: int
    seconds: float
    tensors: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@runtime_checkable
class RolloutEngine(Protocol):
    weight_version: int

    def generate(self, prompts: list[str] | list[list[int]], sampling: SamplingConfig) -> list[Sample]: ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> SyncStats: ...

    def close(self) -> None: ...
