"""DAPO's sample-efficiency devices (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at
Scale", sec. 3.2 and 3.4) as pure functions: which groups carry a learning signal (dynamic sampling), which samples
were cut at the token budget (overlong filtering), and the length penalty of soft overlong punishment (eq. 13).

Groups are the `group_size` samples of one prompt, consecutive in the batch (rows g*G .. g*G+G-1), as the rollout
engines return them and as alignment/ppo/advantages.py expects.

Dynamic sampling. With a group-relative advantage (GRPO, Dr. GRPO, RLOO) a group whose samples all scored the same
has advantage 0 at every token: it costs a forward and a backward and adds no policy gradient (with the KL in the
loss or an entropy bonus, those terms are all it adds; with the KL in the reward, its advantage is that penalty
alone). The PPO loop drops such groups and generates more prompts until the step has `prompts_per_step` groups
with signal, or a bound on the extra rounds is hit (alignment/stages/ppo.py, `_draw_groups_with_signal`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# Estimators whose advantage is exactly 0 for a group of equal scores (the group baseline is the score itself, and
# nothing is whitened over the batch afterwards). REINFORCE++(-baseline) whiten over the whole batch, which shifts
# such a group's advantage away from 0; GAE has a critic: its advantages never vanish with the group's variance.
ZERO_ADVANTAGE_FOR_EQUAL_GROUPS = ("grpo", "dr_grpo", "rloo")


def keep_groups(scores: torch.Tensor, trainable: torch.Tensor | None = None) -> torch.Tensor:
    """Which groups carry a learning signal: those whose scores are not all equal (exactly: the group-relative
    advantage is exactly 0 only then), and, with `trainable`, that have at least one sample that can be trained on
    (overlong filtering gives cut samples no loss weight, so a group of cut samples only is as useless).

    scores: [n_groups, G] the scores the advantage compares; trainable: [n_groups, G] bool or None.
    Returns [n_groups] bool.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [n_groups, group_size], got shape {tuple(scores.shape)}")
    varied = (scores != scores[:, :1]).any(dim=1)
    if trainable is None:
        return varied
    if trainable.shape != scores.shape:
        raise ValueError(f"trainable {tuple(trainable.shape)} and scores {tuple(scores.shape)} differ in shape")
    return varied & trainable.bool().any(dim=1)


def refill_size(missing: int, kept: int, generated: int, cap: int, multiple: int) -> int:
    """Prompts to generate in the next round of dynamic sampling, `missing` groups short of the target after
    `generated` groups of which `kept` had signal.

    The rate seen so far in this step estimates how many candidates the missing groups need:
    ceil(missing * generated / kept) (the whole `cap` while nothing was kept), at least `missing`, rounded up to a
    multiple of `multiple` (the world size: every rank scores an equal share of the candidates) and at most `cap`
    (the step's prompts_per_step, itself a multiple of the world size).
    """
    if missing < 1 or cap < 1 or multiple < 1 or cap % multiple:
        raise ValueError(f"refill_size: missing={missing}, cap={cap}, multiple={multiple}")
    wanted = cap if kept == 0 else math.ceil(missing * generated / kept)
    wanted = max(wanted, missing)
    wanted = -(-wanted // multiple) * multiple
    return min(wanted, cap)


def groups_to_train(kept: int, target: int, world: int) -> int:
    """How many of the `kept` groups with signal a step trains on: the first `target` (prompts_per_step) when there
    are enough, else the largest multiple of the world size not above `kept` (every rank must train on the same
    number of samples: ZeRO-3's collectives and the loss normaliser need equal shapes). 0: the step has nothing to
    train on."""
    if kept >= target:
        return target
    return kept // world * world


def refill_seed_offset(step: int, round_: int, steps: int, max_rounds: int, prompts_per_step: int, group_size: int) -> int:
    """The sampling seed offset of extra round `round_` (1..max_rounds) of step `step`. A step's first round takes
    step * prompts_per_step * group_size (alignment/stages/rollout_schedule.py); extra rounds take the blocks after the
    last step's, one block of prompts_per_step * group_size seeds per (step, round), so every sample of a run still
    draws a stream of its own and a resumed run samples the same refills."""
    if not 1 <= round_ <= max_rounds:
        raise ValueError(f"extra round {round_} is not in 1..{max_rounds}")
    block = prompts_per_step * group_size
    return (steps + step * max_rounds + round_ - 1) * block


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (eq. 13), times `factor`, with L_max = max_len and L_cache = buffer:

        R(y) = 0                                   |y| <= L_max - L_cache
               ((L_max - L_cache) - |y|) / L_cache  L_max - L_cache < |y| <= L_max
               -1                                  |y| > L_max

    A linear ramp from 0 to -1 over the last `buffer` tokens of the budget (an answer cut at max_new_tokens has
    |y| = L_max and gets -factor). lengths: [B] completion tokens (EOS included). Returns [B] float, <= 0.
    """
    if not 0 < buffer <= max_len:
        raise ValueError(f"the overlong buffer must be in 1..max_len ({max_len}), got {buffer}")
    if factor < 0:
        raise ValueError(f"the overlong penalty factor must be >= 0, got {factor}")
    lengths = lengths.to(torch.float32)
    start = max_len - buffer
    ramp = (start - lengths) / buffer
    penalty = torch.where(lengths <= start, torch.zeros_like(lengths), ramp)
    penalty = torch.where(lengths > max_len, torch.full_like(lengths, -1.0), penalty)
    return factor * penalty


def uncut_weights(finish_reasons: Sequence[str]) -> torch.Tensor:
    """DAPO's overlong filtering: loss weight 1 for answers that finished, 0 for answers cut at max_new_tokens
    (finish_reason "length"). Returns [B] float."""
    return torch.tensor([reason != "length" for reason in finish_reasons], dtype=torch.float32)


def validate_dynamic_sampling(advantage: str, group_size: int) -> list[str]:
    """Config-time check of dynamic sampling with an advantage estimator and group size; returns error messages."""
    errors = []
    if advantage not in ZERO_ADVANTAGE_FOR_EQUAL_GROUPS:
        errors.append(f"needs a group-relative advantage ({', '.join(ZERO_ADVANTAGE_FOR_EQUAL_GROUPS)}), got "
                      f"{advantage!r}: only there does a group of equal rewards have zero advantage (gae has a critic, "
                      "reinforce++ whitens over the whole batch)")
    if group_size < 2:
        errors.append(f"needs rollout.sampling.samples_per_prompt >= 2 (a group of one sample never varies), got {group_size}")
    return errors
