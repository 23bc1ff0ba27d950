"""Statistics of the evaluation harness and the labelers: bootstrap CIs, win rates with ties, agreement.

Everything is a pure function of numpy arrays and a seed, so a report is reproducible number for number.
Scores come as a matrix `[P, n]`: P prompts, n samples per prompt. The prompt is the unit of resampling
(the bootstrap draws prompts with replacement and keeps all of a prompt's samples), because samples of
one prompt are correlated and the held-out prompt set is what we want to generalise over.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a bootstrap percentile confidence interval [low, high]."""

    value: float
    low: float
    high: float
    n: int  # number of resampling units (prompts)

    def to_dict(self) -> dict:
        return asdict(self)

    def fmt(self, digits: int = 3) -> str:
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def as_matrix(scores: Sequence[float] | Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """Scores as a float matrix [P, n] (a flat sequence is one sample per prompt)."""
    a = np.asarray(scores, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"scores must be a non-empty [prompts, samples] matrix, got shape {a.shape}")
    return a


def bootstrap_mean(values: Sequence[float] | np.ndarray, samples: int = 1000, confidence: float = 0.95, seed: int = 0) -> Estimate:
    """Mean of per-unit `values` [P] with a percentile bootstrap CI over the P units.

    The B resamples draw P indices with replacement each (B x P index matrix from `default_rng(seed)`);
    the CI is the (alpha/2, 1 - alpha/2) quantiles of the B resampled means, alpha = 1 - confidence.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("bootstrap_mean needs at least one value")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(samples, v.size))
    means = v[idx].mean(axis=1)
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return Estimate(float(v.mean()), float(low), float(high), int(v.size))


def perplexity(nll_sums: Sequence[float], token_counts: Sequence[int], samples: int = 1000, confidence: float = 0.95,
               seed: int = 0) -> Estimate:
    """exp(sum of NLL / sum of tokens) over texts, CI by resampling texts (the ratio is recomputed per resample, so
    long texts weigh by their tokens as in the point estimate)."""
    nll, tokens = np.asarray(nll_sums, dtype=np.float64), np.asarray(token_counts, dtype=np.float64)
    if nll.size == 0 or tokens.sum() <= 0:
        raise ValueError("perplexity needs at least one text with a scored token")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, nll.size, size=(samples, nll.size))
    resampled = np.exp(nll[idx].sum(axis=1) / np.maximum(tokens[idx].sum(axis=1), 1.0))
    alpha = 1.0 - confidence
    low, high = np.quantile(resampled, [alpha / 2, 1 - alpha / 2])
    return Estimate(float(np.exp(nll.sum() / tokens.sum())), float(low), float(high), int(nll.size))


def mean_score(scores, samples: int = 1000, confidence: float = 0.95, seed: int = 0) -> Estimate:
    """Mean score of a policy, CI by resampling prompts: per-prompt means [P] are bootstrapped."""
    return bootstrap_mean(as_matrix(scores).mean(axis=1), samples, confidence, seed)


def win_values(a, b) -> np.ndarray:
    """Per-prompt win value of A over B, in [0, 1].

    For prompt p with samples a_p1..a_pn and b_p1..b_pm, every (i, j) pair is one comparison:
        w_p = mean_ij( 1[a_pi > b_pj] + 0.5 * 1[a_pi == b_pj] )
    so a tie counts half. With one sample each this is 1 (win), 0.5 (tie) or 0 (loss).
    """
    a, b = as_matrix(a), as_matrix(b)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"A has {a.shape[0]} prompts but B has {b.shape[0]}")
    diff = a[:, :, None] - b[:, None, :]  # [P, n, m]
    return ((diff > 0) + 0.5 * (diff == 0)).mean(axis=(1, 2))


@dataclass(frozen=True)
class WinRate:
    """Win rate of A over B (ties count half) with its bootstrap CI, and the raw counts of comparisons."""

    rate: Estimate
    wins: int
    ties: int
    losses: int

    def to_dict(self) -> dict:
        return {**self.rate.to_dict(), "wins": self.wins, "ties": self.ties, "losses": self.losses}


def win_rate(a, b, samples: int = 1000, confidence: float = 0.95, seed: int = 0) -> WinRate:
    """Win rate of A over B on the same prompts: mean of `win_values`, CI by resampling prompts."""
    a, b = as_matrix(a), as_matrix(b)
    diff = a[:, :, None] - b[:, None, :]
    est = bootstrap_mean(win_values(a, b), samples, confidence, seed)
    return WinRate(est, int((diff > 0).sum()), int((diff == 0).sum()), int((diff < 0).sum()))


def preference_values(verdicts: Sequence[str]) -> np.ndarray:
    """Judge verdicts 'A' / 'B' / 'tie' -> win values of A: 1 / 0 / 0.5."""
    table = {"A": 1.0, "B": 0.0, "tie": 0.5}
    try:
        return np.array([table[v] for v in verdicts], dtype=np.float64)
    except KeyError as exc:
        raise ValueError(f"verdict must be 'A', 'B' or 'tie', got {exc.args[0]!r}") from None


# ---------------------------------------------------------------------------------------- agreement


def accuracy(labels: Sequence, reference: Sequence) -> float:
    """Share of items where `labels` equals `reference`."""
    if len(labels) != len(reference):
        raise ValueError(f"{len(labels)} labels but {len(reference)} reference labels")
    if not labels:
        return float("nan")
    return float(np.mean([x == y for x, y in zip(labels, reference)]))


def cohen_kappa(labels_a: Sequence, labels_b: Sequence) -> float:
    """Cohen's kappa between two labelers over the same items (any hashable categories).

        p_o = observed agreement = (1/N) sum_i 1[a_i == b_i]
        p_e = chance agreement   = sum_c (n_a(c)/N) * (n_b(c)/N)
        kappa = (p_o - p_e) / (1 - p_e)
    When p_e == 1 (both labelers always give the same single category) kappa is 1 if they agree, else nan.
    """
    if len(labels_a) != len(labels_b):
        raise ValueError(f"{len(labels_a)} labels but {len(labels_b)} reference labels")
    n = len(labels_a)
    if n == 0:
        return float("nan")
    categories = sorted(set(labels_a) | set(labels_b), key=str)
    p_o = sum(x == y for x, y in zip(labels_a, labels_b)) / n
    p_e = sum((list(labels_a).count(c) / n) * (list(labels_b).count(c) / n) for c in categories)
    if p_e >= 1.0:
        return 1.0 if p_o == 1.0 else float("nan")
    return float((p_o - p_e) / (1.0 - p_e))


def agreement(labels: Sequence, reference: Sequence) -> dict:
    """Accuracy and Cohen's kappa of `labels` against `reference`, plus accuracy on the items where
    the reference is decisive (not 'tie'), and the confusion counts."""
    decisive = [(x, y) for x, y in zip(labels, reference) if y != "tie"]
    confusion: dict[str, int] = {}
    for x, y in zip(labels, reference):
        key = f"{y}->{x}"
        confusion[key] = confusion.get(key, 0) + 1
    return {
        "n": len(labels),
        "accuracy": accuracy(list(labels), list(reference)),
        "cohen_kappa": cohen_kappa(list(labels), list(reference)),
        "n_reference_decisive": len(decisive),
        "accuracy_on_decisive": accuracy([x for x, _ in decisive], [y for _, y in decisive]) if decisive else float("nan"),
        "confusion_reference_to_labeler": dict(sorted(confusion.items())),
    }


# ---------------------------------------------------------------------------------------- per-sample summaries


def truncation_rate(finish_reasons: Sequence[str]) -> float:
    """Share of samples cut at the token budget (finish reason 'length')."""
    return float(np.mean([r == "length" for r in finish_reasons])) if finish_reasons else float("nan")


def episode_summary(episodes: list[dict], prompts: int, n: int, samples: int = 1000, confidence: float = 0.95,
                    seed: int = 0) -> dict:
    """Multi-turn episodes of one policy (prompt-major, n per prompt): mean turns, tool calls, and the share of
    episodes with an error (any reason), with CIs over prompts; and the share of each error reason."""
    boot = dict(samples=samples, confidence=confidence, seed=seed)

    def per_prompt(values: list[float]) -> np.ndarray:
        return np.reshape(np.asarray(values, dtype=float), (prompts, n))

    reasons = sorted({r for e in episodes for r in e["errors"]})
    return {
        "turns": mean_score(per_prompt([e["turns"] for e in episodes]), **boot).to_dict(),
        "tool_calls": mean_score(per_prompt([e["tool_calls"] for e in episodes]), **boot).to_dict(),
        "error_rate": mean_score(per_prompt([float(bool(e["errors"])) for e in episodes]), **boot).to_dict(),
        "errors": {r: sum(bool(e["errors"].get(r)) for e in episodes) / len(episodes) for r in reasons},
    }
