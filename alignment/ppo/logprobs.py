"""Trainer-side log-probabilities of completion tokens: the quantity PPO compares with vLLM's."""

import torch
import torch.nn.functional as F


def completion_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, completion_start: int, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probability of each completion token under softmax(logits / temperature).

    logits: [B, L, V] from a causal LM over `input_ids` [B, L]; position t predicts token t+1.
    completion_start: index of the first completion token (prompts left-padded to a common length).
    Returns [B, L - completion_start]: entry j is log p(input_ids[:, completion_start + j]).
    """
    shifted = logits[:, completion_start - 1 : -1, :].float() / temperature
    targets = input_ids[:, completion_start:]
    # log_softmax then gather; a fused cross_entropy would be no faster on CPU and hides the math.
    return torch.gather(F.log_softmax(shifted, dim=-1), 2, targets.unsqueeze(-1)).squeeze(-1)
