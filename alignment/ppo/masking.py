"""Masked reductions over completion tokens, whitening, and loss aggregation.

Every tensor is [B, T] (B sequences, T completion tokens) with a float `mask` [B, T]: 1 for real
tokens (up to and including EOS), 0 for padding. Padding never contributes to a reduction.
"""

from collections.abc import Callable
from typing import Literal, get_args

import torch

LossAggregation = Literal["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"]
LOSS_AGGREGATIONS: tuple[str, ...] = get_args(LossAggregation)

# Sums a tensor over every data-parallel rank (an all-reduce); None: this process's batch is the whole batch.
SumAcrossRanks = Callable[[torch.Tensor], torch.Tensor]


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum_{b,t} mask * values (over all entries, or over `dim`).

    values, mask: [B, T]. Returns a scalar, or [B] for dim=1, [T] for dim=0.
    """
    if dim is None:
        return (values * mask).sum()
    return (values * mask).sum(dim)


def masked_mean(
    values: torch.Tensor, mask: torch.Tensor, dim: int | None = None, sum_across_ranks: SumAcrossRanks | None = None
) -> torch.Tensor:
    """sum(mask * values) / sum(mask) (over all entries, or over `dim`).

    values, mask: [B, T]. Returns a scalar, or [B] for dim=1. A row (or batch) with no real tokens
    gives 0, not NaN (the denominator is clamped to 1). With `sum_across_ranks` (over all entries only)
    both sums are taken over every data-parallel rank's batch: the mean of all ranks' real tokens.
    """
    if dim is not None:
        return masked_sum(values, mask, dim) / masked_sum(torch.ones_like(values), mask, dim).clamp(min=1)
    totals = torch.stack([masked_sum(values, mask), masked_sum(torch.ones_like(values), mask)])
    if sum_across_ranks is not None:
        totals = sum_across_ranks(totals)
    return totals[0] / totals[1].clamp(min=1)


def masked_var(
    values: torch.Tensor, mask: torch.Tensor, unbiased: bool = False, sum_across_ranks: SumAcrossRanks | None = None
) -> torch.Tensor:
    """Variance over real tokens: sum(mask * (x - mean)^2) / (N or N - 1), N = sum(mask).

    values, mask: [B, T]. Returns a scalar. `unbiased=False` (default) is the population variance,
    numpy's `np.var(x)`; `unbiased=True` applies Bessel's correction, `np.var(x, ddof=1)`.
    With `sum_across_ranks`, mean, sums and N are over every data-parallel rank's real tokens.
    """
    mean = masked_mean(values, mask, sum_across_ranks=sum_across_ranks)
    totals = torch.stack([masked_sum((values - mean) ** 2, mask), masked_sum(torch.ones_like(values), mask)])
    if sum_across_ranks is not None:
        totals = sum_across_ranks(totals)
    squares, n = totals[0], totals[1]
    var = squares / n.clamp(min=1)
    if unbiased:
        # Bessel: var * N / (N - 1)
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    sum_across_ranks: SumAcrossRanks | None = None,
) -> torch.Tensor:
    """Normalise over all real tokens of the batch: (x - mean) / sqrt(var + eps).

    values, mask: [B, T]. Returns [B, T], 0 at padding.
    With `shift_mean=False` the mean is added back: x' = (x - mean) / std + mean, which rescales
    without re-centring (used for rewards, whose sign carries meaning).
    The variance is the population variance over real tokens (no Bessel correction).
    Under data parallelism pass `sum_across_ranks` (an all-reduce sum): the statistics are then those of
    the global batch, so every rank whitens alike and results do not depend on the number of processes.
    """
    mean = masked_mean(values, mask, sum_across_ranks=sum_across_ranks)
    var = masked_var(values, mask, sum_across_ranks=sum_across_ranks)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def aggregate_loss(
    loss_per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: LossAggregation = "token_mean",
    num_tokens_in_window: float | torch.Tensor | None = None,
    num_seqs_in_window: float | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss [B, T] to the scalar this micro-batch contributes to the gradient.

    loss_per_token, mask: [B, T]. Returns a scalar.

    With gradient accumulation a step sees a *window* of several micro-batches; summing the
    scalars this returns for every micro-batch of the window gives the loss of the whole window
    (call backward on each, step once, no extra division by the number of micro-batches).
    Pass the window's totals; left as None they default to this micro-batch's own (window = 1).

    - "token_mean":         L = sum_{i,t} m_it l_it / N_tokens(window)
        Every token of the window weighs the same, so long answers weigh more than short ones.
        (DAPO's token-level loss; OpenRLHF's and TRL's default.) Dividing each micro-batch by its
        own token count instead would weigh the tokens of a short micro-batch more.
    - "seq_mean_token_sum": L = sum_i (sum_t m_it l_it) / N_seqs(window)
        Token losses summed per sequence, then averaged over sequences: no length normalisation
        at all. With GRPO without std scaling this is Dr. GRPO (Liu et al. 2025); their constant
        1 / max_len factor is a learning-rate rescale.
    - "seq_mean_token_mean": L = sum_i (sum_t m_it l_it / sum_t m_it) / N_seqs(window)
        Each sequence's mean token loss, averaged over sequences: every sequence weighs the same,
        so a token of a short answer weighs more (the original GRPO loss; biased towards long
        wrong answers and short right ones, Liu et al. 2025).

    Under data parallelism, where gradients are averaged over R ranks, pass the window total over
    all ranks divided by R (so each rank's share is weighed by the global count).
    """
    if mode == "token_mean":
        n_tokens = mask.sum() if num_tokens_in_window is None else num_tokens_in_window
        return masked_sum(loss_per_token, mask) / n_tokens
    n_seqs = loss_per_token.shape[0] if num_seqs_in_window is None else num_seqs_in_window
    if mode == "seq_mean_token_sum":
        per_seq = masked_sum(loss_per_token, mask, dim=1)  # [B]
    elif mode == "seq_mean_token_mean":
        per_seq = masked_mean(loss_per_token, mask, dim=1)  # [B]
    else:
        raise ValueError(f"loss aggregation {mode!r} is not one of {LOSS_AGGREGATIONS}")
    return per_seq.sum() / n_seqs
