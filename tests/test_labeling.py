"""Labelers: export formats, import of hand-made Label Studio / Argilla / JSONL files (ties, skips, malformed
rows), the LLM judge's position-bias handling, and the round trip export -> auto label -> import -> RM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignment.cli import main
from alignment.config.label import ImportRecipe, LabelFile
from alignment.errors import DataError
from reward.labeling import formats, importer
from reward.labeling.judge import PairwiseJudge, parse_verdict

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes" / "tiny"




def item(i: int, texts=("the lamp is great .", "the lamp is awful ."), prompt=None) -> dict:
    comps = [{"text": t, "policy": "sft", "policy_path": "/ckpt/sft", "policy_step": None, "weight_version": 0,
              "sample_index": k, "finish_reason": "stop", "num_tokens": 5} for k, t in enumerate(texts)]
    return {"id": f"p{i}/0-1", "kind": "pair" if len(texts) == 2 else "kwise", "prompt_id": f"p{i}",
            "prompt": prompt or [{"role": "user", "content": f"review the lamp {i}"}], "columns": {"item": "lamp"},
            "completions": comps, "sampling": {"temperature": 1.0, "n": 2, "seed": 0}, "seed": 0, "label": None}


def ls_annotation(choice=None, cancelled=False, ratings=None) -> dict:
    if ratings is not None:
        result = [{"from_name": f"rating_{k}", "to_name": f"answer_{k}", "type": "rating", "value": {"rating": r}} for k, r in enumerate(ratings)]
    else:
        result = [{"from_name": "preference", "to_name": "prompt", "type": "choices", "value": {"choices": [choice]}}] if choice else []
    return {"id": 1, "completed_by": 1, "result": result, "was_cancelled": cancelled, "created_at": "2026-11-20T10:00:00Z"}


def run_import(tmp_path, inputs, **kw) -> tuple[dict, list[dict]]:
    out = tmp_path / "prefs.jsonl"
    recipe = ImportRecipe(inputs=[LabelFile(path=str(p)) for p in inputs], output=str(out), **kw)
    report = importer.run(recipe)
    return report, importer.read_preferences(out)


# ---------------------------------------------------------------------------------------------- import


def test_label_studio_export_with_ties_skips_and_several_annotators(tmp_path):
    tasks = [formats.label_studio_task(item(i)) for i in range(6)]
    tasks[0]["annotations"] = [ls_annotation("A")]
    tasks[1]["annotations"] = [ls_annotation("B")]
    tasks[2]["annotations"] = [ls_annotation("Tie")]
    tasks[3]["annotations"] = [ls_annotation(cancelled=True)]
    tasks[4]["annotations"] = [ls_annotation("A"), ls_annotation("B"), ls_annotation("B")]  # majority B, a disagreement
    # tasks[5]: not annotated
    for t in tasks:
        t.update({"id": 100, "created_at": "2026-11-20T10:00:00Z", "predictions": []})  # as Label Studio exports them
    path = tmp_path / "project-1-at-2026.json"
    path.write_text(json.dumps(tasks))
    report, prefs = run_import(tmp_path, [path])
    assert report["counts"] == {"annotator_disagreements": 1, "items": 6, "pairs": 3, "skipped": 1, "ties": 1, "unlabelled": 1}
    assert [p["chosen"][0]["content"] for p in prefs] == ["the lamp is great .", "the lamp is awful .", "the lamp is awful ."]
    assert prefs[0]["prompt"] == [{"role": "user", "content": "review the lamp 0"}]
    prov = prefs[2]["provenance"]
    assert prov["item_id"] == "p4/0-1" and prov["annotators"] == 3 and prov["chosen"]["policy_path"] == "/ckpt/sft"
    assert prov["source"].endswith("row 5")


def test_kwise_ratings_become_pairs_with_margins_and_rm_data_reads_them(tmp_path):
    from alignment.config.sections import DataSection, DataSource
    from alignment.data import load_stage_data

    three = item(0, texts=("a great lamp", "an awful lamp", "a red lamp"))
    task = formats.label_studio_task(three)
    task["annotations"] = [ls_annotation(ratings=[5, 1, 3])]
    tie_task = formats.label_studio_task(item(1, texts=("x one", "x two", "x three")))
    tie_task["annotations"] = [ls_annotation(ratings=[2, 2, 4])]
    path = tmp_path / "ls.json"
    path.write_text(json.dumps([task, tie_task]))
    report, prefs = run_import(tmp_path, [path], with_margin=True)
    assert report["counts"]["pairs"] == 5 and report["counts"]["ties"] == 1
    margins = sorted((p["chosen"][0]["content"], p["rejected"][0]["content"], p["margin"]) for p in prefs)
    assert ("a great lamp", "an awful lamp", 4.0) in margins and ("a red lamp", "an awful lamp", 2.0) in margins
    data = load_stage_data(DataSection(sources=[DataSource(path=str(tmp_path / "prefs.jsonl"))], eval_fraction=0.0), "preference")
    assert len(data.train) == 5 and set(data.train.column_names) == {"prompt", "chosen", "rejected", "margin"}


def test_argilla_records_nested_flat_discarded_and_ranking(tmp_path):
    recs = [formats.argilla_record(item(i)) for i in range(4)]
    recs[0]["responses"] = {"preference": [{"value": "A", "user_id": "u1", "status": "submitted"}]}
    recs[1]["preference.responses"] = ["tie"]
    recs[1]["preference.responses.status"] = ["submitted"]
    recs[2]["responses"] = {"preference": [{"value": "B", "user_id": "u1", "status": "discarded"}]}
    recs[3]["responses"] = {"preference": [{"value": "B", "user_id": "u1", "status": "submitted"}]}
    k = item(9, texts=("one lamp", "two lamp", "three lamp"))
    rank = formats.argilla_record(k)
    rank["responses"] = {"ranking": [{"value": [{"value": "response_2", "rank": 1}, {"value": "response_0", "rank": 2},
                                                {"value": "response_1", "rank": 3}], "status": "submitted"}]}
    rank["responses"]["ranking"] = [{"value": rank["responses"]["ranking"][0]["value"], "status": "submitted"}]
    path = tmp_path / "argilla.json"
    path.write_text(json.dumps(recs + [rank]))
    report, prefs = run_import(tmp_path, [path])
    assert report["counts"]["ties"] == 1 and report["counts"]["skipped"] == 1
    assert report["counts"]["pairs"] == 2 + 3
    best = [p for p in prefs if p["provenance"]["item_id"] == "p9/0-1"]
    assert {(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in best} == {
        ("three lamp", "one lamp"), ("three lamp", "two lamp"), ("one lamp", "two lamp")}


def test_malformed_rows_name_file_and_row(tmp_path):
    good = {**item(0), "label": {"choice": "A"}}
    bad_choice = {**item(1), "label": {"choice": "maybe"}}
    path = tmp_path / "labelled.jsonl"
    path.write_text(json.dumps(good) + "\n" + "{not json\n" + json.dumps(bad_choice) + "\n" + json.dumps({"id": "x"}) + "\n")
    with pytest.raises(DataError, match=r"labelled.jsonl row 2: not valid JSON"):
        run_import(tmp_path, [path])
    report, prefs = run_import(tmp_path, [path], on_malformed="skip")
    assert report["counts"]["malformed"] == 3 and len(prefs) == 1
    assert any("row 3" in p and "label.choice" in p for p in report["problems"])
    assert any("row 4" in p and "'prompt' is missing" in p for p in report["problems"])
    only_good = tmp_path / "only_good.jsonl"
    only_good.write_text(json.dumps(good) + "\n")
    with pytest.raises(DataError, match=r"only_good.jsonl row 1: with_margin is set but this label has no margin"):
        run_import(tmp_path, [only_good], with_margin=True)


def test_import_cli_reports_a_missing_file_in_one_line(tmp_path, capsys):
    recipe = tmp_path / "imp.yaml"
    recipe.write_text(f"stage: label_import\ninputs:\n  - path: {tmp_path}/nope.json\noutput: {tmp_path}/p.jsonl\n")
    assert main(["label", "import", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "inputs.0.path" in err[0] and "does not exist" in err[0]


# ---------------------------------------------------------------------------------------------- judge


class _Tok:
    chat_template = None

    def __call__(self, text, **kw):
        return {"input_ids": [ord(c) for c in text]}


def _decode(ids) -> str:
    return "".join(chr(i) for i in ids)


def test_judge_cancels_position_bias():
    prompts = ["review the lamp"] * 3
    a = ["the lamp is great .", "the lamp is dull .", "the lamp is red ."]
    b = ["the lamp is awful .", "the lamp is bright .", "the lamp is red ."]

    def fair(batch):  # prefers the answer holding a positive word; answers "A" when it cannot tell
        out = []
        for ids in batch:
            text = _decode(ids)
            ans_a = text.split("Answer A:")[1].split("Answer B:")[0]
            ans_b = text.split("Answer B:")[1].split("Which answer")[0]
            pos = ("great", "bright")
            out.append("B" if any(w in ans_b for w in pos) and not any(w in ans_a for w in pos) else "A")
        return out

    res = PairwiseJudge(fair, _Tok()).compare(prompts, a, b)
    assert res.values == [1.0, 0.0, 0.5]  # third pair: "A" in both orders -> position bias cancels to a tie
    assert res.choices() == ["A", "B", "tie"]
    assert res.counts["order_consistency"] == pytest.approx(2 / 3)
    always_a = PairwiseJudge(lambda batch: ["A"] * len(batch), _Tok()).compare(prompts, a, b)
    assert always_a.values == [0.5, 0.5, 0.5] and always_a.counts["first_position_rate"] == 1.0
    nonsense = PairwiseJudge(lambda batch: ["lamp lamp"] * len(batch), _Tok()).compare(prompts, a, b)
    assert nonsense.values == [0.5] * 3 and nonsense.counts["invalid_verdicts"] == 6
    assert parse_verdict("Answer: B.") == "B" and parse_verdict("ABBA") == "invalid"


# ---------------------------------------------------------------------------------------------- export / auto


def test_export_auto_import_through_the_cli(tiny_paths, tmp_path):
    """Untrained tiny policy, transformers engine: every file format is written with provenance; the gold
    rule labels the pairs; a judge labels them too (the untrained judge's verdicts are unreadable: ties)."""
    out = tmp_path / "export"
    common = [f"prompts.path={tiny_paths.eval_prompts}", "rollout.engine=hf"]
    assert main(["label", "export", str(RECIPES / "label_export.yaml"), f"policies.0.path={tiny_paths.base}", "prompts.num_prompts=8",
                 "sampling.max_new_tokens=12", f"output_dir={out}", *common]) == 0
    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert 0 < len(items) <= 8 * 3
    first = items[0]
    assert first["prompt_id"] == "eval_prompts-00000" and first["sampling"]["seed"] == 0 and first["sampling"]["n"] == 4
    assert first["completions"][0]["policy_path"] == str(tiny_paths.base) and first["columns"]["item"]
    tasks = json.loads((out / "label_studio_tasks.json").read_text())
    assert tasks[0]["data"]["meta"]["item"] == first and "answer_a" in tasks[0]["data"]
    assert '<Choices name="preference"' in (out / "label_studio_config.xml").read_text()
    records = json.loads((out / "argilla_records.json").read_text())
    assert json.loads(records[0]["metadata"]["item_json"]) == first and set(records[0]["fields"]) == {"prompt", "response_a", "response_b"}
    assert json.loads((out / "argilla_settings.json").read_text())["questions"][0]["name"] == "preference"

    auto = tmp_path / "auto"
    assert main(["label", "auto", str(RECIPES / "label_auto.yaml"), f"input={out / 'items.jsonl'}", f"output_dir={auto}",
                 "reference.kind=judge", f"reference.judge.model={tiny_paths.base}", "reference.path=null", "rollout.engine=hf"]) == 0
    agreement = json.loads((auto / "agreement.json").read_text())
    assert agreement["agreement"]["n"] == len(items)
    labelled = [json.loads(line) for line in (auto / "labelled.jsonl").read_text().splitlines()]
    assert all(r["label"]["labeler"] == "gold" and r["label"]["choice"] in ("A", "B", "tie") for r in labelled)

    prefs = tmp_path / "prefs.jsonl"
    decisive = sum(r["label"]["choice"] != "tie" for r in labelled)
    if decisive == 0:
        pytest.skip("the untrained policy produced no pair with different gold scores")
    assert main(["label", "import", str(RECIPES / "label_import.yaml"), f"inputs.0.path={auto / 'labelled.jsonl'}", f"output={prefs}"]) == 0
    report = json.loads((tmp_path / "prefs.report.json").read_text())
    assert report["pairs_written"] + report["counts"].get("ties", 0) + report["counts"].get("empty_completion", 0) == len(items)


@pytest.mark.e2e
def test_round_trip_trains_a_reward_model_above_chance(tiny_paths, tmp_path):
    """SFT briefly -> export pairs -> label with the gold rule -> import -> `alignment rm` -> held-out accuracy, and
    the same pairs straight into `alignment dpo`, whose implicit reward ranks held-out pairs too."""
    sft = tmp_path / "sft"
    assert main(["sft", str(RECIPES / "sft.yaml"), f"model.name_or_path={tiny_paths.base}", f"data.sources.0.path={tiny_paths.sft}",
                 f"output.dir={sft}", "train.max_steps=150", "gold_eval=null", "data.eval_fraction=0.0"]) == 0
    out = tmp_path / "labels"
    assert main(["label", "export", str(RECIPES / "label_export.yaml"), f"policies.0.path={sft / 'final'}", f"prompts.path={tiny_paths.prompts}",
                 "prompts.num_prompts=160", "rollout.engine=hf", "formats=[jsonl]", f"output_dir={out / 'export'}"]) == 0
    assert main(["label", "auto", str(RECIPES / "label_auto.yaml"), f"input={out / 'export' / 'items.jsonl'}", "reference=null",
                 f"output_dir={out / 'auto'}"]) == 0
    prefs = out / "preferences.jsonl"
    assert main(["label", "import", str(RECIPES / "label_import.yaml"), f"inputs.0.path={out / 'auto' / 'labelled.jsonl'}", f"output={prefs}"]) == 0
    n_pairs = len(prefs.read_text().splitlines())
    assert n_pairs >= 150, n_pairs
    rm = tmp_path / "rm"
    assert main(["rm", str(RECIPES / "rm.yaml"), f"model.name_or_path={sft / 'final'}", f"data.sources.0.path={prefs}", "data.eval_fraction=0.2",
                 f"output.dir={rm}", "gold_agreement=null", "train.num_epochs=8", "train.per_device_batch_size=16"]) == 0
    summary = json.loads((rm / "summary.json").read_text())
    assert summary["eval"]["accuracy"] > 0.75, summary["eval"]
    dpo = tmp_path / "dpo"
    assert main(["dpo", str(RECIPES / "dpo.yaml"), f"model.name_or_path={sft / 'final'}", f"data.sources.0.path={prefs}",
                 "data.eval_fraction=0.2", f"output.dir={dpo}", "gold_eval=null", "train.num_epochs=8",
                 "train.per_device_batch_size=16"]) == 0
    summary = json.loads((dpo / "summary.json").read_text())
    assert summary["eval"]["accuracy"] > 0.65, summary["eval"]


def test_a_judge_labeler_refuses_a_prompt_limit_it_would_ignore(tmp_path):
    """judge.max_prompts limits `alignment eval`'s judge; a labeler labels every exported item, so the key there would
    do nothing: it is refused, naming what to do instead."""
    from alignment.config.label import AutoLabelRecipe
    from alignment.config.schema import load_recipe
    from alignment.errors import RecipeError

    (tmp_path / "items.jsonl").write_text("")
    with pytest.raises(RecipeError, match=r"labeler.judge.max_prompts: a labeler labels every exported item"):
        load_recipe(RECIPES / "label_auto.yaml", AutoLabelRecipe,
                    [f"input={tmp_path / 'items.jsonl'}", "labeler.kind=judge", "labeler.function=null",
                     f"labeler.judge={{model: {tmp_path}, max_prompts: 3}}", "reference=null", f"output_dir={tmp_path}"])
