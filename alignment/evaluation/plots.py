"""Report figures as PNG files (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# No timestamps or versions in the files: the same numbers give the same bytes.
PNG_METADATA = {"Software": None}


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata=PNG_METADATA)
    plt.close(fig)
    return path


def score_distributions(scores: dict[str, list[float]], scorer: str, path: Path) -> Path:
    """One box + strip per policy: the distribution of one scorer's per-sample scores."""
    names = list(scores)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.3 * len(names) + 2), 3.6))
    data = [np.asarray(scores[n], dtype=float) for n in names]
    ax.boxplot(data, showmeans=True, widths=0.5)
    rng = np.random.default_rng(0)  # fixed jitter
    for i, d in enumerate(data, 1):
        ax.scatter(i + rng.uniform(-0.15, 0.15, d.size), d, s=6, alpha=0.35, color="tab:blue")
    ax.set_xticks(range(1, len(names) + 1), names, rotation=20, ha="right")
    ax.set_ylabel(scorer)
    ax.set_title(f"{scorer}: score per sample")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def reward_vs_kl(curve: list[dict], scorer: str, path: Path) -> Path:
    """Mean score against KL to the reference, one point per checkpoint, in step order."""
    fig, ax = plt.subplots(figsize=(5, 3.6))
    kl = [c["kl"] for c in curve]
    score = [c["score"] for c in curve]
    ax.plot(kl, score, marker="o")
    for c in curve:
        ax.annotate(f"step {c['step']}", (c["kl"], c["score"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("KL(policy || reference), nats per sample")
    ax.set_ylabel(f"mean {scorer}")
    ax.set_title(f"{scorer} vs KL over training")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def win_rate_matrix(names: list[str], pairs: list[dict], scorer: str, path: Path) -> Path:
    """Heat map: row policy's win rate over column policy (ties count half)."""
    k = len(names)
    m = np.full((k, k), np.nan)
    index = {n: i for i, n in enumerate(names)}
    for p in pairs:
        i, j = index[p["a"]], index[p["b"]]
        m[i, j], m[j, i] = p["value"], 1 - p["value"]
    fig, ax = plt.subplots(figsize=(1.1 * k + 2.5, 1.0 * k + 1.8))
    im = ax.imshow(m, vmin=0, vmax=1, cmap="RdBu")
    for i in range(k):
        for j in range(k):
            if not np.isnan(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=9)
    ax.set_xticks(range(k), names, rotation=30, ha="right")
    ax.set_yticks(range(k), names)
    ax.set_title(f"win rate of row over column ({scorer})")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)
