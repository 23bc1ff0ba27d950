"""Strict recipes: every problem is one line naming the file and the key, all reported together."""

from __future__ import annotations

import pytest

from alignment.config.rm import RMRecipe
from alignment.config.schema import load_recipe, read_recipe_yaml
from alignment.config.sft import SFTRecipe
from alignment.errors import RecipeError
from helpers_data import sft_recipe, write_jsonl, write_yaml


@pytest.fixture
def recipe_file(tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", [{"text": "hello"}])

    def make(**changes):
        raw = sft_recipe(data, tmp_path / "out")
        for dotted, value in changes.items():
            node = raw
            *parents, last = dotted.split("__")
            for p in parents:
                node = node.setdefault(p, {})
            node[last] = value
        return write_yaml(tmp_path / "recipe.yaml", raw)

    return make


def errors_of(path, schema=SFTRecipe, overrides=(), check_paths=True) -> list[str]:
    with pytest.raises(RecipeError) as exc:
        load_recipe(path, schema, list(overrides), check_paths=check_paths)
    return str(exc.value).splitlines()


def test_valid_recipe_fills_defaults(recipe_file):
    recipe = load_recipe(recipe_file(), SFTRecipe)
    assert recipe.train.learning_rate == 1e-4 and recipe.data.clean.deduplicate is True
    assert recipe.data.sources[0].weight == 1.0


def test_unknown_key_suggests_the_close_one(recipe_file):
    (line,) = errors_of(recipe_file(train__learnig_rate=1e-5))
    assert "unknown key 'train.learnig_rate'" in line and "did you mean 'train.learning_rate'" in line
    assert line.startswith(str(recipe_file()))


def test_unknown_key_without_close_match_lists_valid_keys(recipe_file):
    (line,) = errors_of(recipe_file(train__zzz=1))
    assert "unknown key 'train.zzz'" in line and "valid keys:" in line and "learning_rate" in line


def test_wrong_type(recipe_file):
    (line,) = errors_of(recipe_file(train__per_device_batch_size="eight"))
    assert "train.per_device_batch_size: expected an integer, got 'eight'" in line


def test_out_of_range(recipe_file):
    (line,) = errors_of(recipe_file(data__eval_fraction=0.9))
    assert "data.eval_fraction: must be <= 0.5, got 0.9" in line


def test_missing_required(recipe_file, tmp_path):
    raw = read_recipe_yaml(recipe_file())
    del raw["output"]
    (line,) = errors_of(write_yaml(tmp_path / "r.yaml", raw))
    assert "output: missing required key" in line


def test_bad_literal_suggests(recipe_file):
    (line,) = errors_of(recipe_file(train__lr_scheduler="cosin"))
    assert "train.lr_scheduler: must be one of" in line and "did you mean 'cosine'" in line


def test_unknown_tracker_lists_the_allowed_ones(recipe_file):
    (line,) = errors_of(recipe_file(), overrides=["output.report_to=[tensorboard, mlfow]"])
    assert line.endswith("output.report_to.1: must be one of tensorboard, wandb, mlflow, trackio; got 'mlfow' "
                         "(did you mean 'mlflow'?)")
    assert load_recipe(recipe_file(), SFTRecipe, ["output.report_to=[]"]).output.report_to == []


def test_missing_local_path(recipe_file, tmp_path):
    (line,) = errors_of(recipe_file(data__sources=[{"path": str(tmp_path / "nope.jsonl")}]))
    assert "data.sources.0.path: path" in line and "nope.jsonl" in line and "does not exist" in line


def test_relative_data_file_typo_is_not_taken_for_a_hub_id(recipe_file):
    (line,) = errors_of(recipe_file(data__sources=[{"path": "data/sft.jsonl"}]))
    assert "data.sources.0.path: path 'data/sft.jsonl' does not exist" in line


def test_hub_ids_pass_validation_without_download(recipe_file):
    recipe = load_recipe(recipe_file(data__sources=[{"path": "HuggingFaceH4/ultrachat_200k", "split": "train_sft"}]), SFTRecipe)
    assert recipe.data.sources[0].path == "HuggingFaceH4/ultrachat_200k"
    assert recipe.model.name_or_path == "org/tiny-model"


def test_no_path_check_skips_missing_paths(recipe_file, tmp_path):
    path = recipe_file(data__sources=[{"path": str(tmp_path / "later.jsonl")}])
    assert load_recipe(path, SFTRecipe, check_paths=False).data.sources[0].path.endswith("later.jsonl")


def test_bad_yaml_names_line(tmp_path):
    path = write_yaml(tmp_path / "bad.yaml", "stage: sft\nmodel:\n  name_or_path: [unclosed\n")
    (line,) = errors_of(path)
    assert "not valid YAML (line" in line and str(path) in line


def test_recipe_not_a_mapping(tmp_path):
    (line,) = errors_of(write_yaml(tmp_path / "list.yaml", "- a\n- b\n"))
    assert "a recipe must be a mapping" in line and "got list" in line


def test_recipe_file_missing(tmp_path):
    (line,) = errors_of(tmp_path / "absent.yaml")
    assert "recipe file" in line and "does not exist" in line


def test_all_problems_reported_together(recipe_file):
    lines = errors_of(recipe_file(train__learning_rate=-1, train__warmup_ratio=2.0, sft__packin=True))
    assert len(lines) == 3
    assert any("train.learning_rate: must be >= 0.0" in l for l in lines)
    assert any("train.warmup_ratio: must be <= 1.0" in l for l in lines)
    assert any("did you mean 'sft.packing'" in l for l in lines)


def test_override_changes_values(recipe_file):
    recipe = load_recipe(recipe_file(), SFTRecipe, ["train.learning_rate=1e-5", "train.lr_scheduler=linear", "data.seed=7"])
    assert recipe.train.learning_rate == 1e-5 and recipe.train.lr_scheduler == "linear" and recipe.data.seed == 7


def test_override_list_index(recipe_file, tmp_path):
    other = write_jsonl(tmp_path / "b.jsonl", [{"text": "x"}])
    path = recipe_file(data__sources=[{"path": str(other)}, {"path": str(other), "weight": 2.0}])
    recipe = load_recipe(path, SFTRecipe, ["data.sources.1.weight=0.5", "data.sources.0.max_rows=10"])
    assert recipe.data.sources[1].weight == 0.5 and recipe.data.sources[0].max_rows == 10


def test_override_into_empty_section(recipe_file):
    recipe = load_recipe(recipe_file(model__lora=None), SFTRecipe, ["model.lora.r=4"])
    assert recipe.model.lora.r == 4 and recipe.model.lora.alpha == 16


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.learning_rate", "must look like key.sub=value"),
        ("=3", "must look like key.sub=value"),
        ("train..learning_rate=1", "must look like key.sub=value"),
        ("train.learning_rate.value=1", "'learning_rate' holds a value, not a section"),
        ("data.sources.5.weight=1", "'5' is not an index of the list"),
        ("data.sources.x=1", "'x' is not an index of the list"),
    ],
)
def test_bad_overrides(recipe_file, override, expected):
    (line,) = errors_of(recipe_file(train__learning_rate=0.001), overrides=[override])
    assert expected in line and override in line


def test_override_into_a_default_scalar_is_a_type_error(recipe_file):
    (line,) = errors_of(recipe_file(), overrides=["train.max_grad_norm.value=1"])
    assert "train.max_grad_norm: expected a number, got {'value': 1}" in line


def test_override_with_wrong_type_is_checked_like_the_file(recipe_file):
    (line,) = errors_of(recipe_file(), overrides=["train.max_steps=many"])
    assert "train.max_steps: expected an integer, got 'many'" in line


def test_rm_recipe_accepts_preference_sources(tmp_path):
    prefs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    raw = {"stage": "rm", "model": {"name_or_path": "org/m"}, "data": {"sources": [{"path": str(prefs)}]},
           "output": {"dir": str(tmp_path / "o")}, "rm": {"overlong": "truncate"}}
    assert load_recipe(write_yaml(tmp_path / "rm.yaml", raw), RMRecipe).rm.overlong == "truncate"
