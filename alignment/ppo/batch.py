"""Typed containers for one PPO step's rollouts, and their packing into model inputs.

Per-token fields are [B, T] over completion tokens, T = the longest completion of the batch, with
`mask` 1 for real completion tokens (up to and including EOS) and 0 for padding. A multi-turn trajectory's
completion is every token after its prompt; its mask is 1 on the model's tokens only, 0 on the environment's turns
between them (they are model inputs, never trained on). Model inputs are built
per micro-batch, in one of two layouts:
* padded (the default): prompts left-padded to the micro-batch's longest prompt, completions right-padded to
  its longest completion, so sorting micro-batches by length keeps padding small;
* packed (`algorithm.packing`): the micro-batch's sequences back to back in one row, no padding at all, position
  ids restarting at 0 for each and no attention mask. transformers reads such position ids as packed sequences:
  a block-diagonal causal mask with sdpa/eager attention (masking_utils.find_packed_sequence_indices), varlen
  kernels with flash_attention_2 (modeling_flash_attention_utils._is_packed_sequence).
Either way the forwards return [b, T_mb] per-token results, so the losses never see the layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignment.micro_batches import budget_groups, index_within_segment, same_count_on_every_rank


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # padded: [b, P + T_mb]; packed: [1, N], N = the sequences' total length
    attention_mask: torch.Tensor | None  # padded: [b, P + T_mb]; packed: None (the position ids delimit sequences)
    position_ids: torch.Tensor  # 0 at each sequence's first real token (as vLLM numbers them)
    completion_start: int  # padded: P, index of the first completion token
    completion_len: int  # T_mb: completion positions in this micro-batch (<= T of the batch)
    indices: torch.Tensor  # [b] rows of the batch these inputs hold
    # Packed only: the position in the row whose output predicts each real completion token [K], and where that token
    # sits in the micro-batch's [b, T_mb] layout (rows [K], columns [K]).
    logit_positions: torch.Tensor | None = None
    completion_slots: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def packed(self) -> bool:
        return self.logit_positions is not None

    def unpack(self, per_token: torch.Tensor) -> torch.Tensor:
        """[K] results at `logit_positions` -> [b, T_mb], zero at padding (differentiable)."""
        out = per_token.new_zeros(len(self.indices), self.completion_len)
        return out.index_put(self.completion_slots, per_token)


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
            # multi-turn: only the model's tokens count (the environment's sit between them, mask 0)
            mask[i, :n] = 1.0 if s.completion_mask is None else torch.tensor(s.completion_mask, dtype=torch.float32)
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

    def micro_batches(self, indices: torch.Tensor, micro_batch_size: int, max_tokens: int | None = None,
                      packed: bool = False) -> list[torch.Tensor]:
        """Split `indices`, sorted by length, into micro-batches.

        Without `max_tokens`: ceil(n / micro_batch_size) micro-batches of similar length; the count depends only on
        n, so every rank runs the same number of forwards (ZeRO-3 needs that). With `max_tokens`: as many rows as fit
        in that many model-input tokens (`input_tokens`: padded rows x (longest prompt + longest completion), packed
        the sum of the lengths; a longer row alone), at most `micro_batch_size`: short answers share a forward, long
        ones do not drag padding along. The count then depends on the lengths: `distributed_micro_batches` makes it
        the same on every rank.
        """
        rows = indices.tolist()
        order = sorted(range(len(rows)), key=lambda k: self._length(rows[k]))  # stable
        ordered = indices[torch.tensor(order, dtype=torch.long)] if rows else indices
        if max_tokens is None:
            return list(torch.split(ordered, micro_batch_size))
        groups = budget_groups(len(rows), lambda a, b: self.input_tokens(ordered[a:b], packed), micro_batch_size,
                               max_tokens)
        return [ordered[g[0]:g[-1] + 1] for g in groups]

    def distributed_micro_batches(self, indices: torch.Tensor, micro_batch_size: int,
                                  max_tokens: int | None = None, packed: bool = False) -> list[torch.Tensor]:
        """`micro_batches`, with the same count on every rank (with `max_tokens`; without, it is already)."""
        groups = self.micro_batches(indices, micro_batch_size, max_tokens, packed)
        if max_tokens is None:
            return groups
        return same_count_on_every_rank(groups, lambda g: self.input_tokens(g, packed))

    def _length(self, row: int) -> int:
        return len(self.prompt_ids[row]) + len(self.completion_ids[row])

    def input_tokens(self, indices: torch.Tensor, packed: bool = False) -> int:
        """Tokens `model_inputs` feeds the model for these rows (padding included)."""
        rows = indices.tolist()
        if packed:
            return sum(self._length(i) for i in rows)
        return _padded_size(len(rows), max(len(self.prompt_ids[i]) for i in rows),
                            max(len(self.completion_ids[i]) for i in rows))

    def model_inputs(self, indices: torch.Tensor, pad_id: int, device: torch.device, packed: bool = False) -> ModelInputs:
        rows = indices.tolist()
        prompts, completions = [self.prompt_ids[i] for i in rows], [self.completion_ids[i] for i in rows]
        prompt_len = torch.tensor([len(p) for p in prompts])
        completion_len = torch.tensor([len(c) for c in completions])
        seq_len = prompt_len + completion_len
        T = max(1, int(completion_len.max()))
        tokens = torch.tensor([t for p, c in zip(prompts, completions) for t in (*p, *c)], dtype=torch.long)
        first = torch.cumsum(seq_len, 0) - seq_len  # index in `tokens` of each row's first token
        if packed:
            return _packed_inputs(tokens, first, prompt_len, completion_len, T, indices, device)
        P = int(prompt_len.max())
        # One scatter instead of a tensor per row: token k of row r goes to column (P - prompt_len[r]) + k.
        row = torch.repeat_interleave(torch.arange(len(rows)), seq_len)
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


def _packed_inputs(tokens: torch.Tensor, first: torch.Tensor, prompt_len: torch.Tensor, completion_len: torch.Tensor,
                   T: int, indices: torch.Tensor, device: torch.device) -> ModelInputs:
    """The sequences `tokens` holds back to back (row r from `first[r]`) as one packed row."""
    seq_len = prompt_len + completion_len
    position_ids = index_within_segment(seq_len)
    # Completion token t of row r sits at first[r] + prompt_len[r] + t; the position before it predicts it.
    slot_rows = torch.repeat_interleave(torch.arange(len(indices)), completion_len)
    slot_cols = index_within_segment(completion_len)
    logit_positions = torch.repeat_interleave(first + prompt_len - 1, completion_len) + slot_cols
    return ModelInputs(tokens[None].to(device), None, position_ids[None].to(device), 0, T, indices,
                       logit_positions.to(device), (slot_rows.to(device), slot_cols.to(device)))
