"""How far the sampler's (vLLM's) token probabilities drift from the trainer's for the same tokens."""

import torch


def token_mult_prob_error(logp_sampler: torch.Tensor, logp_trainer: torch.Tensor, mask: torch.Tensor) -> float:
    """exp(mean over real tokens of |logp_sampler - logp_trainer|): 1.0 means identical probabilities.

    All tensors are [B, T]; `mask` is 1 for real completion tokens and 0 for padding. A value of 1.02
    means the two assign probabilities that differ by a factor of about 2% per token on average.
    (NeMo-RL's metric of the same name asserts < 1.05 in its end-to-end tests; we hold fp32 to 1.02.)
    """
    mask = mask.to(logp_trainer.dtype)
    abs_diff = (logp_sampler.to(logp_trainer.dtype) - logp_trainer).abs() * mask
    return float(torch.exp(abs_diff.sum() / mask.sum().clamp(min=1)))
