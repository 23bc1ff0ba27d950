"""Typed containers for one PPO step's rollouts, and their packing into model inputs.

Per-token fields are [B, T] over completion tokens, T = the longest completion of the batch, with
`mask` 1 for real completion tokens (up to and including EOS) and 0 for padding. Model inputs are built
per micro-batch: prompts left-padded to the micro-batch's longest prompt, completions right-padded to
its longest completion, so sorting micro-batches by length keeps padding small.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignment.distributed import all_reduce_max


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # [b, P + T_mb]
    attention_mask: torch.Tensor  # [b, P + T_mb]
    position_ids: torch.Tensor  # [b, P + T_mb], 0 at each sequence's first real token (as vLLM numbers them)
    completion_start: int  # P: index of the first completion token
    completion_len: int  # T_mb: completion positions in this micro-batch (<= T of the batch)
    indices: torch.Tensor  # [b] rows of the batch these inputs hold


@dataclass
class RolloutBatch:
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    finish_reasons: list[str]  # "stop" | "length"
    prompt_rows: list[int]  # index of each sample's prompt in the prompt dataset
    mask: torch.Tensor  # [B, T] float
    sampler_logp: torch.Tensor  # [B, T] log-probs of the sampled tokens under the rollout engine
    weight_version: int
    # Filled in by scoring (all [B, T] except scores [B]):
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    values: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    entropy: torch.Tensor | None = None  # policy entropy per token before the update (a diagnostic)

    @classmethod
    def from_samples(cls, samples: list, prompt_rows: list[int]) -> RolloutBatch:
        """samples: rollout.Sample list; prompt_rows[i]: dataset row of samples[i]'s prompt."""
        T = max(1, max(len(s.completion_ids) for s in samples))
        mask = torch.zeros(len(samples), T)
        sampler_logp = torch.zeros(len(samples), T)
        for i, s in enumerate(samples):
            n = len(s.completion_ids)
            mask[i, :n] = 1.0
            sampler_logp[i, :n] = torch.tensor(s.logprobs[:n], dtype=torch.float32)
        versions = {s.weight_version for s in samples}
        if len(versions) != 1:
            raise RuntimeError(f"rollouts of one step came from several weight versions: {sorted(versions)}")
        return cls(
            prompt_ids=[list(s.prompt_ids) for s in samples],
            completion_ids=[list(s.completion_ids) for s in samples],
            finish_reasons=[s.finish_reason for s in samples],
            prompt_rows=prompt_rows,
            mask=mask,
            sampler_logp=sampler_logp,
            weight_version=versions.pop(),
        )

    def __len__(self) -> int:
        return len(self.completion_ids)

    def micro_batches(self, indices: torch.Tensor, micro_batch_size: int, max_tokens: int | None = None) -> list[torch.Tensor]:
        """Split `indices`, sorted by length, into micro-batches.

        Without `max_tokens`: ceil(n / micro_batch_size) micro-batches of similar length; the count depends only on
        n, so every rank runs the same number of forwards (ZeRO-3 needs that). With `max_tokens`: as many rows as fit
        in that many padded tokens (rows x (longest prompt + longest completion), as `model_inputs` pads them; a
        longer row alone), at most `micro_batch_size`: short answers share a forward, long ones do not drag padding
        along. The count then depends on the lengths: `distributed_micro_batches` makes it the same on every rank.
        """
        rows = indices.tolist()
        prompt_len = [len(self.prompt_ids[i]) for i in rows]
        completion_len = [len(self.completion_ids[i]) for i in rows]
        order = sorted(range(len(rows)), key=lambda k: prompt_len[k] + completion_len[k])  # stable
        ordered = indices[torch.tensor(order, dtype=torch.long)] if rows else indices
        if max_tokens is None:
            return list(torch.split(ordered, micro_batch_size))
        groups, start, longest_prompt, longest_completion = [], 0, 0, 0
        for pos, k in enumerate(order):
            p, c = max(longest_prompt, prompt_len[k]), max(longest_completion, completion_len[k])
            if pos > start and (_padded_size(pos - start + 1, p, c) > max_tokens or pos - start == micro_batch_size):
                groups.append(ordered[start:pos])
                start, p, c = pos, prompt_len[k], completion_len[k]
            longest_prompt, longest_completion = p, c
        if rows:
            groups.append(ordered[start:])
        return groups

    def distributed_micro_batches(self, indices: torch.Tensor, micro_batch_size: int,
                                  max_tokens: int | None = None) -> list[torch.Tensor]:
        """`micro_batches`, with the same count on every rank: a rank with fewer splits its largest micro-batches
        (by padded tokens) in two until it has as many as the rank with the most. Every rank holds as many rows, so
        the count never needs to exceed them."""
        groups = self.micro_batches(indices, micro_batch_size, max_tokens)
        if max_tokens is None:
            return groups
        target = all_reduce_max(len(groups))
        while len(groups) < target:
            k = max((g for g in range(len(groups)) if len(groups[g]) > 1), key=lambda g: self.padded_tokens(groups[g]))
            half = len(groups[k]) // 2
            groups[k:k + 1] = [groups[k][:half], groups[k][half:]]
        return groups

    def padded_tokens(self, indices: torch.Tensor) -> int:
        """Tokens `model_inputs` feeds the model for these rows (padding included)."""
        rows = indices.tolist()
        return _padded_size(len(rows), max(len(self.prompt_ids[i]) for i in rows),
                            max(len(self.completion_ids[i]) for i in rows))

    def model_inputs(self, indices: torch.Tensor, pad_id: int, device: torch.device) -> ModelInputs:
        rows = indices.tolist()
        prompts, completions = [self.prompt_ids[i] for i in rows], [self.completion_ids[i] for i in rows]
        prompt_len = torch.tensor([len(p) for p in prompts])
        completion_len = torch.tensor([len(c) for c in completions])
        seq_len = prompt_len + completion_len
        P = int(prompt_len.max())
        T = max(1, int(completion_len.max()))
        # One scatter instead of a tensor per row: token k of row r goes to column (P - prompt_len[r]) + k.
        tokens = torch.tensor([t for p, c in zip(prompts, completions) for t in (*p, *c)], dtype=torch.long)
        row = torch.repeat_interleave(torch.arange(len(rows)), seq_len)
        first = torch.cumsum(seq_len, 0) - seq_len  # index in `tokens` of each row's first token
        col = torch.repeat_interleave(P - prompt_len - first, seq_len) + torch.arange(len(tokens))
        input_ids = torch.full((len(rows), P + T), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), P + T), dtype=torch.long)
        input_ids[row, col] = tokens
        attention_mask[row, col] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return ModelInputs(
            input_ids.to(device), attention_mask.to(device), position_ids.to(device), P, T, indices
        )


def _padded_size(rows: int, longest_prompt: int, longest_completion: int) -> int:
    """Tokens of a micro-batch as `RolloutBatch.model_inputs` pads it: prompts left-padded to the longest, completions
    right-padded to the longest (at least one position)."""
    return rows * (longest_prompt + max(longest_completion, 1))
