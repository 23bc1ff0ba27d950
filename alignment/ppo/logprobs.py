"""Trainer-side log-probabilities of completion tokens: the quantity PPO compares with vLLM's.

At real vocabularies the full-vocabulary tensors dominate a PPO step's memory: [B, T, V] at batch 4 x 1024 tokens x
152k vocabulary is 2.5 GB per fp32 copy, and a plain `log_softmax(logits.float() / T)` followed by the entropy keeps
four or five of them (the upcast, the scaled logits, the log-softmax saved for backward, its exp, their product).
`token_logprobs` instead walks the vocabulary dimension in chunks of rows, in both directions: forward keeps only
the per-row log-normaliser, backward recomputes each chunk's softmax. Beyond the logits and their gradient (which
the LM head needs anyway), memory is one chunk of about CHUNK_ELEMENTS values.
"""

import torch

CHUNK_ELEMENTS = 1 << 24  # 16M values, 64 MB of float32 per chunk temporary: a few temporaries live at once


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype


def _chunks(logits: torch.Tensor, chunk_elements: int):
    """(batch slice, time slice) pieces of [B, T, V] logits of about `chunk_elements` values each (views, no copies):
    several whole rows at a time when a row fits, else pieces of one row."""
    B, T, V = logits.shape
    positions = max(1, chunk_elements // max(V, 1))  # (b, t) positions per chunk
    if positions >= T:
        rows = positions // max(T, 1)
        for start in range(0, B, rows):
            yield slice(start, min(start + rows, B)), slice(0, T)
        return
    for b in range(B):
        for start in range(0, T, positions):
            yield slice(b, b + 1), slice(start, min(start + positions, T))


def _neg_p_log_p(log_p: torch.Tensor) -> torch.Tensor:
    """-p log p per entry, 0 where p = 0 (a -inf logit: xlogy's convention, where p * log p would be NaN)."""
    p = log_p.exp()
    return -torch.special.xlogy(p, p)


class _TokenLogprobs(torch.autograd.Function):
    """logp[b, t] = log softmax(logits[b, t] / T)[targets[b, t]] and entropy H[b, t], chunked over (b, t).

    Gradients, with z = logits / T, p = softmax(z), y the target:
        d logp / d z_j = [j = y] - p_j
        d H / d z_j    = -p_j (log p_j + H)
    and d / d logits = (d / d z) / T.
    """

    @staticmethod
    def forward(ctx, logits, targets, temperature, with_entropy, chunk_elements):
        B, T, _ = logits.shape
        dtype = _compute_dtype(logits)
        log_norm = torch.empty(B, T, dtype=dtype, device=logits.device)
        logp = torch.empty(B, T, dtype=dtype, device=logits.device)
        entropy = torch.empty(B, T, dtype=dtype, device=logits.device) if with_entropy else None
        for bs, ts in _chunks(logits, chunk_elements):
            z = logits[bs, ts].to(dtype) / temperature
            log_norm[bs, ts] = torch.logsumexp(z, dim=-1)
            logp[bs, ts] = z.gather(-1, targets[bs, ts].unsqueeze(-1)).squeeze(-1) - log_norm[bs, ts]
            if with_entropy:
                entropy[bs, ts] = _neg_p_log_p(z - log_norm[bs, ts].unsqueeze(-1)).sum(-1)
        ctx.save_for_backward(logits, targets, log_norm, entropy)
        ctx.temperature, ctx.chunk_elements = temperature, chunk_elements
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, targets, log_norm, entropy = ctx.saved_tensors
        temperature = ctx.temperature
        grad_logits = torch.empty_like(logits)
        for bs, ts in _chunks(logits, ctx.chunk_elements):
            log_p = logits[bs, ts].to(log_norm.dtype) / temperature - log_norm[bs, ts].unsqueeze(-1)
            p = log_p.exp()
            g_logp = grad_logp[bs, ts].unsqueeze(-1).to(p.dtype)
            g = (-p * g_logp).scatter_add_(-1, targets[bs, ts].unsqueeze(-1), g_logp)
            if entropy is not None and grad_entropy is not None:
                g += (_neg_p_log_p(log_p) - p * entropy[bs, ts].unsqueeze(-1)) * grad_entropy[bs, ts].unsqueeze(-1).to(p.dtype)
            grad_logits[bs, ts] = (g / temperature).to(logits.dtype)
        return grad_logits, None, None, None, None


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability of each target token under softmax(logits / temperature), and optionally the entropy.

    logits: [B, T, V], row t predicting targets[:, t] (a view such as `logits[:, :-1]` is fine: nothing is copied
    whole); targets: [B, T]. Returns (logp [B, T], entropy [B, T] or None), in float32 for half-precision logits,
    else in the logits' dtype; both differentiable. Computed in chunks of about `chunk_elements` logits (see the
    module docstring).
    """
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(f"logits [B, T, V] and targets [B, T] expected, got {tuple(logits.shape)} and {tuple(targets.shape)}")
    logp, entropy = _TokenLogprobs.apply(logits, targets, float(temperature), with_entropy, chunk_elements)
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
