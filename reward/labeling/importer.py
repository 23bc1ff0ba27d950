"""`alignment label import recipe.yaml`: labelled files -> a preference dataset for `alignment rm`.

Output rows (jsonl) look like the tiny default's preferences.jsonl -- conversational when the prompt is a
message list, plain strings otherwise -- plus the pair's provenance:

    {"prompt": [{"role": "user", ...}], "chosen": [{"role": "assistant", "content": ...}],
     "rejected": [...], "margin": 0.5?, "provenance": {"item_id", "prompt_id", "chosen": {policy...}, ...}}

A pair label gives one row (A/B) or none (tie, skip); a k-wise label (scores or ranking) gives a row for
every pair of completions with different scores (equal scores are ties). Ties, skips, unlabelled items,
empty or identical completions and annotator disagreements are counted in `<output>.report.json`.
A malformed row is a DataError naming file and row (or, with on_malformed: skip, counted and listed).
"""

from __future__ import annotations

import json
from collections import Counter
from itertools import combinations
from pathlib import Path

from alignment import console
from alignment.config.label import ImportRecipe
from alignment.errors import DataError
from reward.labeling import formats
from reward.labeling.formats import MalformedItem, Row

PROVENANCE_KEYS = ("policy", "policy_path", "policy_step", "weight_version", "sample_index", "finish_reason")


def run(recipe: ImportRecipe) -> dict:
    counts: Counter = Counter()
    problems: list[str] = []
    prefs: list[dict] = []
    for source in recipe.inputs:
        result = formats.read_labelled(source.path, source.format, recipe.on_malformed, recipe.multiple_annotations)
        problems += result.problems
        counts["malformed"] += len(result.problems)
        for row in result.rows:
            try:
                rows, outcome = preferences_from_row(row, recipe.with_margin, source.path)
            except MalformedItem as exc:
                if recipe.on_malformed == "error":
                    raise DataError(f"{row.where}: {exc}") from None
                problems.append(f"{row.where}: {exc}")
                counts["malformed"] += 1
                continue
            counts.update(outcome)
            prefs += rows
    if not prefs:
        raise DataError(f"no preference pairs in {', '.join(s.path for s in recipe.inputs)} ({_describe(counts)})")
    out = Path(recipe.output)
    formats.write_jsonl(out, prefs)
    console.keep_log_in(out.parent)
    report = {"pairs_written": len(prefs), "counts": {k: v for k, v in sorted(counts.items()) if v}, "problems": problems[:20], "output": str(out),
              "inputs": [s.path for s in recipe.inputs]}
    formats.write_json(out.with_name(out.stem + ".report.json"), report)
    console.say(f"label import: {len(prefs)} preference pairs -> {out} ({_describe(counts)})")
    return report


def _describe(counts: Counter) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if v) or "nothing read"


def preferences_from_row(row: Row, with_margin: bool, source: str = "") -> tuple[list[dict], Counter]:
    """Preference rows from one labelled item, and what happened to it (counts)."""
    item, label = row.item, row.label
    counts: Counter = Counter(items=1)
    if row.disagreement:
        counts["annotator_disagreements"] += 1
    if label is None:
        counts["unlabelled"] += 1
        return [], counts
    if label.get("choice") == "skip":
        counts["skipped"] += 1
        return [], counts
    comps = item["completions"]
    if "choice" in label:
        if label["choice"] == "tie":
            counts["ties"] += 1
            return [], counts
        winner, loser = (0, 1) if label["choice"] == "A" else (1, 0)
        pairs = [(winner, loser, label.get("margin"))]
    else:
        scores = label["scores"] if "scores" in label else _ranking_scores(label["ranking"])
        pairs = []
        for i, j in combinations(range(len(comps)), 2):
            if scores[i] == scores[j]:
                counts["ties"] += 1
            elif scores[i] > scores[j]:
                pairs.append((i, j, scores[i] - scores[j]))
            else:
                pairs.append((j, i, scores[j] - scores[i]))
    out = []
    for w, l, margin in pairs:
        chosen, rejected = comps[w]["text"], comps[l]["text"]
        if not chosen.strip() or not rejected.strip():
            counts["empty_completion"] += 1
            continue
        if chosen == rejected:
            counts["identical_completions"] += 1
            continue
        conversational = isinstance(item["prompt"], list)
        pref = {"prompt": item["prompt"],
                "chosen": [{"role": "assistant", "content": chosen}] if conversational else chosen,
                "rejected": [{"role": "assistant", "content": rejected}] if conversational else rejected}
        if with_margin:
            if margin is None:
                raise MalformedItem("with_margin is set but this label has no margin (A/B choices carry none; use ratings, scores or auto labels)")
            pref["margin"] = float(margin)
        pref["provenance"] = {
            "item_id": item["id"], "prompt_id": item.get("prompt_id"), "source": f"{row.where}" or source,
            "labeler": label.get("labeler"), "annotators": row.annotators or None,
            "sampling": item.get("sampling"), "seed": item.get("seed"),
            "chosen": {k: comps[w].get(k) for k in PROVENANCE_KEYS}, "rejected": {k: comps[l].get(k) for k in PROVENANCE_KEYS},
        }
        out.append(pref)
    counts["pairs"] += len(out)
    return out, counts


def _ranking_scores(ranking: list[int]) -> list[float]:
    scores = [0.0] * len(ranking)
    for position, index in enumerate(ranking):
        scores[index] = float(len(ranking) - position)
    return scores


def read_preferences(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
