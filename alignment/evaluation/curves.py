"""Training curves of the runs the evaluated policies come from, read from each run's metrics.jsonl.

A policy at `<run>/final` or `<run>/checkpoints/checkpoint-N[/policy_hf]` belongs to the run `<run>` when that
directory holds the run's metrics.jsonl; the report draws one figure per run (see PANELS).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from alignment.evaluation.generation import CHECKPOINT_NAME

# (title, keys on the left axis, keys on the right axis). Reward and gold share a panel on two axes: a reward that
# climbs while the gold metric falls (over-optimisation) shows at a glance. Panels without data are left out.
PANELS: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = [
    ("reward (left) and gold (right)", ("ppo/reward",), ("ppo/gold", "eval/gold")),
    ("KL to the reference", ("ppo/kl",), ()),
    ("entropy", ("ppo/entropy",), ()),
    ("response length (tokens)", ("ppo/response_length",), ()),
    ("logprob mismatch (engine vs trainer)", ("ppo/logprob_mismatch",), ()),
    ("clip fraction", ("ppo/clip_fraction",), ()),
    ("loss", ("train/loss", "eval/loss"), ()),
    ("accuracy", ("train/accuracy", "eval/accuracy", "train/rewards/accuracies", "eval/rewards/accuracies"), ()),
    ("gold metric", ("gold/mean",), ()),
]


def run_dir_of(path: str | Path) -> Path | None:
    """The training run a policy checkpoint belongs to (a directory with metrics.jsonl), or None."""
    path = Path(path)
    candidates = [path.parent]  # <run>/final
    for up in (path, path.parent):  # <run>/checkpoints/checkpoint-N[/policy_hf]
        if CHECKPOINT_NAME.search(up.name) and up.parent.name == "checkpoints":
            candidates.insert(0, up.parent.parent)
    return next((c for c in candidates if (c / "metrics.jsonl").is_file()), None)


def training_runs(policies: list[dict]) -> list[dict]:
    """[{"dir", "stage", "policies"}] for the runs of `policies` (Policy.to_dict() rows), in policy order."""
    runs: dict[str, dict] = {}
    for p in policies:
        run = run_dir_of(p["path"])
        if run is None:
            continue
        entry = runs.setdefault(str(run), {"dir": str(run), "stage": _stage(run), "policies": []})
        entry["policies"].append(p["name"])
    return list(runs.values())


def _stage(run: Path) -> str | None:
    """The stage that wrote the run (its saved recipe's `stage:`), None if the run has no readable recipe."""
    from alignment.config.schema import read_recipe_yaml
    from alignment.errors import RecipeError

    try:
        return read_recipe_yaml(run / "recipe.yaml").get("stage")
    except RecipeError:
        return None


def read_series(run_dir: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """key -> (steps, values) of the finite values in `<run_dir>/metrics.jsonl` (a line cut by a kill is skipped)."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        step = row.get("step")
        for key, value in row.items():
            if key in ("step", "time") or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(step)
            values.append(float(value))
    return series


def panels(series: dict[str, tuple[list[int], list[float]]]) -> list[tuple[str, list[str], list[str]]]:
    """The PANELS that have data in `series`, each with the keys it has."""
    out = []
    for title, left, right in PANELS:
        have_left, have_right = [k for k in left if k in series], [k for k in right if k in series]
        if have_left or have_right:
            out.append((title, have_left, have_right))
    return out
