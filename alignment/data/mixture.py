"""Deterministic train/eval split and weighted mixing of sources.

Split (only when `data.eval_sources` is empty and `eval_fraction > 0`): each source holds out
round(n_i * eval_fraction) of its rows (at least 1 when it has 2 or more rows), chosen by a
permutation seeded with (`data.seed`, source index). Splitting before mixing keeps a row that the
mixture repeats out of the eval set.

Mixture rule: with n_i train rows and weight w_i per source (W = sum of weights), the mixture has
T = sum n_i rows -- as many as the sources hold together -- and source i contributes
c_i = T * w_i / W rows (largest-remainder rounding, so the c_i sum to T exactly). A source with
c_i <= n_i gives c_i distinct rows (a seeded sample without replacement); a source with
c_i > n_i gives all its rows floor(c_i / n_i) times plus a seeded sample of the rest, so rows repeat
only when the weight asks for more rows than the source has. A weight of 0 leaves a source out.
The rows of two or more sources are then shuffled (seeded), so sources interleave; a single source
is used whole and keeps its file order (trainers shuffle on their own; evaluation reads "the first
N prompts").
All randomness comes from `random.Random` seeded with strings, identical on every machine and run.
"""

from __future__ import annotations

import random


def _rng(*parts: object) -> random.Random:
    return random.Random(":".join(map(str, parts)))


def holdout_count(n: int, fraction: float) -> int:
    if fraction <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, round(n * fraction)))


def split_rows(rows: list, fraction: float, seed: int, index: int) -> tuple[list, list]:
    """(train, eval) rows of one source; eval rows keep their original order."""
    k = holdout_count(len(rows), fraction)
    if k == 0:
        return rows, []
    order = list(range(len(rows)))
    _rng("split", seed, index).shuffle(order)
    held = set(order[:k])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def mixture_counts(sizes: list[int], weights: list[float]) -> list[int]:
    """Rows each source contributes: largest-remainder apportionment of sum(sizes) by weight."""
    total, wsum = sum(sizes), sum(weights)
    if wsum <= 0:
        return [0] * len(sizes)
    exact = [total * w / wsum for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def take(rows: list, count: int, seed: int, index: int) -> list:
    """`count` rows of one source: whole passes over it, then a seeded sample without replacement."""
    if not rows or count <= 0:
        return []
    rng = _rng("mix", seed, index)
    full, rest = divmod(count, len(rows))
    out = list(rows) * full
    out.extend(rng.sample(rows, rest))
    return out


def mix(pools: list[list], weights: list[float], seed: int) -> tuple[list, list[int]]:
    """Mix the train rows of several sources by weight; returns (rows, rows taken per source)."""
    active = [i for i, w in enumerate(weights) if w > 0]
    if len(active) == 1:
        counts = [len(pools[i]) if i in active else 0 for i in range(len(pools))]
        return list(pools[active[0]]), counts
    else:
        sub = mixture_counts([len(pools[i]) for i in active], [weights[i] for i in active])
        counts = [0] * len(pools)
        for i, c in zip(active, sub):
            counts[i] = c
    rows: list = []
    for i, pool in enumerate(pools):
        rows.extend(take(pool, counts[i], seed, i))
    _rng("shuffle", seed).shuffle(rows)
    return rows, counts
