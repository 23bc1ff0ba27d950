"""`alignment label auto recipe.yaml`: label exported items automatically, on the same path as people.

Labelers:
  function -- a rule (TRL reward signature; the item's `columns` are passed as keyword lists)
  model    -- a reward-model checkpoint (reward.scoring.RewardModelScorer)
  judge    -- a local LLM judging pairs in both orders (reward.labeling.judge)
Score labelers give each completion a score: a pair's choice is the higher score (|difference| <=
tie_threshold: tie) with margin = |difference|; k-wise items keep the scores. The judge labels pairs
directly; k-wise items get each completion's number of pairwise wins as its score.
Writes `labelled.jsonl` (the items with `label` filled in, what `alignment label import` reads) and
`agreement.json` (accuracy and Cohen's kappa against a reference labeler or a labelled file, over the
pairwise decisions A / B / tie of every item).
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

from alignment import console
from alignment.config.eval import EngineSection
from alignment.config.label import AutoLabelRecipe, LabelerSpec
from alignment.config.schema import save_resolved
from alignment.errors import UserError
from alignment.evaluation import stats
from reward.labeling import formats


def run(recipe: AutoLabelRecipe, engine=None) -> dict:
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(recipe, out, "label_auto")
    console.keep_log_in(out)
    items = [r.item for r in formats.read_labelled(recipe.input, "jsonl").rows]
    if not items:
        raise UserError(f"input: '{recipe.input}' holds no items")

    labels = label_items(items, recipe.labeler, recipe.rollout, engine)
    labelled = [{**item, "label": label} for item, label in zip(items, labels)]
    formats.write_jsonl(out / "labelled.jsonl", labelled)

    summary: dict = {"items": len(items), "labeler": recipe.labeler.label(), "choices": _choice_counts(labels)}
    reference = None
    if recipe.reference is not None:
        reference = {i["id"]: lab for i, lab in zip(items, label_items(items, recipe.reference, recipe.rollout, engine))}
        summary["reference"] = recipe.reference.label()
    elif recipe.reference_labels is not None:
        reference = {r.item["id"]: r.label for r in formats.read_labelled(recipe.reference_labels).rows}
        summary["reference"] = recipe.reference_labels
    if reference is not None:
        summary["agreement"] = compare(labelled, reference)
    formats.write_json(out / "agreement.json" if reference is not None else out / "label_summary.json", summary)
    line = f"label auto: {len(items)} items labelled by {summary['labeler']} -> {out / 'labelled.jsonl'} ({summary['choices']})"
    if reference is not None:
        a = summary["agreement"]
        line += f"; vs {summary['reference']}: accuracy {a['accuracy']:.3f}, kappa {a['cohen_kappa']:.3f} over {a['n']} decisions"
    console.say(line)
    return summary


def label_items(items: list[dict], spec: LabelerSpec, engine_section: EngineSection, engine=None) -> list[dict]:
    if spec.kind == "judge":
        return _judge_labels(items, spec, engine_section, engine)
    scores = _scores(items, spec)
    labels = []
    for item, s in zip(items, scores):
        if item["kind"] == "pair":
            diff = s[0] - s[1]
            choice = "tie" if abs(diff) <= spec.tie_threshold else ("A" if diff > 0 else "B")
            labels.append({"choice": choice, "margin": abs(diff), "scores": s, "labeler": spec.label()})
        else:
            labels.append({"scores": s, "labeler": spec.label()})
    return labels


def _scores(items: list[dict], spec: LabelerSpec) -> list[list[float]]:
    """Per item, one score per completion (all items scored in one batch)."""
    prompts = [i["prompt"] for i in items for _ in i["completions"]]
    texts = [c["text"] for i in items for c in i["completions"]]
    if spec.kind == "function":
        from reward.functions import load_reward_function

        names = sorted({k for i in items for k in (i.get("columns") or {})})
        columns = {k: [(i.get("columns") or {}).get(k) for i in items for _ in i["completions"]] for k in names}
        try:
            flat = [float(x) for x in load_reward_function(spec.function)(prompts=prompts, completions=texts, **columns)]
        except TypeError as exc:
            raise UserError(f"labeler function '{spec.function}' failed on the items' columns ({', '.join(names) or 'none'}): {exc}") from None
    else:
        from reward.scoring import RewardModelScorer

        flat = RewardModelScorer(spec.path, normalize=spec.normalize).score(prompts, texts).tolist()
    out, at = [], 0
    for item in items:
        k = len(item["completions"])
        out.append(flat[at : at + k])
        at += k
    return out


def _judge_labels(items: list[dict], spec: LabelerSpec, engine_section: EngineSection, engine=None) -> list[dict]:
    from alignment.evaluation.generation import PolicyGenerator
    from reward.labeling.judge import load_judge

    generator = PolicyGenerator(engine_section, engine=engine)
    try:
        judge = load_judge(spec.judge, generator)
        jobs = [(n, i, j) for n, item in enumerate(items) for i, j in combinations(range(len(item["completions"])), 2)]
        result = judge.compare([items[n]["prompt"] for n, _, _ in jobs],
                               [items[n]["completions"][i]["text"] for n, i, _ in jobs],
                               [items[n]["completions"][j]["text"] for n, _, j in jobs])
    finally:
        generator.close()
    wins = [[0.0] * len(item["completions"]) for item in items]
    for (n, i, j), v in zip(jobs, result.values):
        wins[n][i] += v
        wins[n][j] += 1 - v
    labels = []
    for item, w in zip(items, wins):
        if item["kind"] == "pair":
            v = w[0]
            choice = "A" if v > 0.5 else "B" if v < 0.5 else "tie"
            labels.append({"choice": choice, "margin": abs(2 * v - 1), "labeler": spec.label()})
        else:
            labels.append({"scores": w, "labeler": spec.label()})
    return labels


def decisions(item: dict, label: dict | None) -> list[str] | None:
    """A label as pairwise decisions over the item's completion pairs (i < j): 'A' (i better), 'B', 'tie';
    None for unlabelled or skipped items."""
    if label is None or label.get("choice") == "skip":
        return None
    if "choice" in label:
        return [label["choice"]]
    scores = label.get("scores")
    if scores is None:
        ranking = label["ranking"]
        scores = [0.0] * len(ranking)
        for pos, idx in enumerate(ranking):
            scores[idx] = -float(pos)
    return ["A" if scores[i] > scores[j] else "B" if scores[i] < scores[j] else "tie" for i, j in combinations(range(len(scores)), 2)]


def compare(labelled: list[dict], reference: dict[str, dict | None]) -> dict:
    """Agreement of the items' labels with reference labels (by item id), over pairwise decisions."""
    ours, theirs, missing = [], [], 0
    for item in labelled:
        if item["id"] not in reference:
            missing += 1
            continue
        a, b = decisions(item, item["label"]), decisions(item, reference[item["id"]])
        if a is None or b is None or len(a) != len(b):
            continue
        ours += a
        theirs += b
    result = stats.agreement(ours, theirs)
    result["items_without_reference"] = missing
    return result


def _choice_counts(labels: list[dict]) -> dict:
    counts: dict = {}
    for lab in labels:
        key = lab.get("choice", "scored")
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))
