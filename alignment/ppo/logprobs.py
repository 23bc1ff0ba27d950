"""Trainer-side log-probabilities of completion tokens: the quantity PPO compares with vLLM's."""

import torch
import torch.nn.functional as F


def token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability of each target token under softmax(logits / temperature), and optionally the entropy.

    logits: [B, T, V], row t predicting targets[:, t]; targets: [B, T]. Returns (logp [B, T], entropy [B, T] or
    None), in float32 or wider. One log_softmax serves both: H = -sum_v p_v log p_v with log p from it.
    """
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    # log_softmax then gather; a fused cross_entropy would be no faster on CPU and hides the math.
    logp_all = F.log_softmax(logits / temperature, dim=-1)
    logp = torch.gather(logp_all, 2, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
    return logp, entropy


def completion_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, completion_start: int, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probability of each completion token, from the logits of a causal LM over whole sequences.

    logits: [B, L, V] over `input_ids` [B, L]; position t predicts token t+1.
    completion_start: index of the first completion token (prompts left-padded to a common length).
    Returns [B, L - completion_start]: entry j is log p(input_ids[:, completion_start + j]).
    """
    return token_logprobs(logits[:, completion_start - 1 : -1, :], input_ids[:, completion_start:], temperature)[0]
