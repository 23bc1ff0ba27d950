"""Report figures as PNG files (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

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


def training_curves(title: str, series: dict[str, tuple[list[int], list[float]]],
                    panels: list[tuple[str, list[str], list[str]]], path: Path) -> Path:
    """One small panel per metric group against the training step; `panels` as `curves.panels` gives them."""
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.9 * rows), squeeze=False)
    for ax, (name, left, right) in zip(axes.ravel(), panels):
        _draw(ax, series, left, "tab:blue", "-")
        if right:
            twin = ax.twinx() if left else ax
            _draw(twin, series, right, "tab:red", "--")
            if left:
                twin.legend(loc="lower right", fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if left:
            ax.legend(loc="upper left", fontsize=7)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _draw(ax, series, keys: list[str], color: str, style: str) -> None:
    shades = [color, "tab:orange", "tab:green", "tab:purple"]
    for key, shade in zip(keys, shades):
        steps, values = series[key]
        ax.plot(steps, values, style, color=shade, marker="o" if len(steps) <= 12 else None, markersize=3, label=key)
    ax.tick_params(labelsize=7)
    ax.ticklabel_format(axis="y", useOffset=False)  # a mismatch of 1.0000003 reads as such, not as "3 + 1e-7"
