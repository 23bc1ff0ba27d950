"""`alignment label export recipe.yaml`: sample k completions per prompt from one or more policies and
write them as items for labelling (see `reward.labeling.formats` for the item and file layouts).

Reads top to bottom: prompts -> generation (one engine, policies swapped in by weight sync; the same
sampling parameters and seeds for every policy) -> items (pairs or k-wise sets; a pair's A/B order is
a seeded coin flip so no policy always shows first) -> files -> export_summary.json.
"""

from __future__ import annotations

import random
from collections import Counter
from itertools import combinations
from pathlib import Path

from alignment import console
from alignment.config.label import ExportRecipe
from alignment.config.schema import save_resolved
from alignment.evaluation.generation import PolicyGenerator, completion_text, load_policy, load_prompt_rows, resolve_policies
from reward.labeling import formats


def run(recipe: ExportRecipe, engine=None) -> dict:
    from alignment.models import render_prompt

    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(recipe, out, "label_export")
    console.keep_log_in(out)

    # ---- prompts and generation
    rows = load_prompt_rows(recipe.prompts)
    policies = resolve_policies(recipe.policies)
    sampling = recipe.sampling.to_config()
    per_prompt: list[list[dict]] = [[] for _ in rows]
    per_policy: dict[str, dict] = {}
    generator = PolicyGenerator(recipe.rollout, seed=recipe.sampling.seed, engine=engine)
    try:
        for policy in policies:
            model, tokenizer = load_policy(policy.path, recipe.rollout.dtype)
            samples = generator.generate(policy, model, tokenizer, [render_prompt(tokenizer, r.prompt) for r in rows], sampling)
            index_in_prompt: Counter = Counter()
            for s in samples:
                per_prompt[s.prompt_index].append({
                    "text": completion_text(s), "policy": policy.name, "policy_path": policy.path, "policy_step": policy.step,
                    "weight_version": s.weight_version, "sample_index": index_in_prompt[s.prompt_index],
                    "finish_reason": s.finish_reason, "num_tokens": len(s.completion_ids),
                })
                index_in_prompt[s.prompt_index] += 1
            per_policy[policy.name] = {"path": policy.path, "samples": len(samples),
                                       "truncated": sum(s.finish_reason == "length" for s in samples)}
            del model
    finally:
        generator.close()

    # ---- items
    items, counts = build_items(rows, per_prompt, recipe)
    sampling_dict = sampling.to_dict()
    for item in items:
        item["sampling"], item["seed"] = sampling_dict, recipe.sampling.seed

    # ---- files
    written = {}
    k = max(len(i["completions"]) for i in items) if items else 2
    kind = "pair" if recipe.group == "pairs" else "kwise"
    if "jsonl" in recipe.formats:
        written["jsonl"] = str(formats.write_jsonl(out / "items.jsonl", items))
    if "label_studio" in recipe.formats:
        written["label_studio_tasks"] = str(formats.write_json(out / "label_studio_tasks.json", [formats.label_studio_task(i) for i in items]))
        (out / "label_studio_config.xml").write_text(formats.label_studio_config(kind, k), encoding="utf-8")
        written["label_studio_config"] = str(out / "label_studio_config.xml")
    if "argilla" in recipe.formats:
        written["argilla_records"] = str(formats.write_json(out / "argilla_records.json", [formats.argilla_record(i) for i in items]))
        written["argilla_settings"] = str(formats.write_json(out / "argilla_settings.json", formats.argilla_settings(kind, k)))
    summary = {"prompts": len(rows), "policies": per_policy, "items": len(items), "group": recipe.group, **counts, "files": written}
    formats.write_json(out / "export_summary.json", summary)
    console.say(f"label export: {len(items)} {'pair' if recipe.group == 'pairs' else 'k-wise'} items from {len(rows)} prompts x {len(policies)} policies -> {out}"
          + (f" ({counts['identical_pairs_dropped']} identical pairs left out)" if counts.get("identical_pairs_dropped") else ""))
    return summary


def build_items(rows, per_prompt: list[list[dict]], recipe: ExportRecipe) -> tuple[list[dict], dict]:
    """Pairs (all, or a seeded subset of `pairs_per_prompt`, A/B order a seeded coin flip) or one k-wise item per prompt."""
    items, dropped = [], 0
    seed = recipe.sampling.seed
    for row, comps in zip(rows, per_prompt):
        base = {"prompt_id": row.id, "prompt": row.prompt, "columns": row.columns, "label": None}
        if recipe.group == "kwise":
            items.append({"id": f"{row.id}/all", "kind": "kwise", **base, "completions": comps})
            continue
        rng = random.Random(f"export:{seed}:{row.id}")
        pairs = []
        for i, j in combinations(range(len(comps)), 2):
            if recipe.drop_identical and comps[i]["text"] == comps[j]["text"]:
                dropped += 1
                continue
            pairs.append((i, j))
        if recipe.pairs_per_prompt is not None and len(pairs) > recipe.pairs_per_prompt:
            pairs = sorted(rng.sample(pairs, recipe.pairs_per_prompt))
        for i, j in pairs:
            a, b = (j, i) if rng.random() < 0.5 else (i, j)
            items.append({"id": f"{row.id}/{i}-{j}", "kind": "pair", **base, "completions": [comps[a], comps[b]]})
    return items, {"identical_pairs_dropped": dropped}
