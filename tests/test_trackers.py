"""Experiment trackers (`output.report_to`): each is fed exactly what metrics.jsonl holds, read back here from the
tracker's own local store with its own reader; a missing package is one clear line before training."""

from __future__ import annotations

import json
import math
import sys
import typing
from types import SimpleNamespace

import pytest
from conftest import REPO, read_metrics, run_stage, stage_env, tiny_sft_overrides

from alignment.config.sections import OutputSection
from alignment.errors import UserError
from alignment.metrics import TRACKERS, MetricsLogger

TRACKER_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "TRACKIO_DIR", "TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL",
               "WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT")


@pytest.fixture(scope="module")
def sft_run(tiny_paths, tmp_path_factory):
    """The real tiny SFT stage (CLI; 4 steps, a log row each, no gold evaluation) reporting to MLflow and trackio at
    once, with none of the trackers' settings from this environment: each keeps its default local store in the
    output dir. `.metrics`: metrics.jsonl as the stage left it, {name: [(step, value), ...]}."""
    out = tmp_path_factory.mktemp("trackers") / "sft"
    overrides = [o for o in tiny_sft_overrides(tiny_paths, out) if not o.startswith("gold_eval")]
    env = {k: v for k, v in stage_env().items() if k not in TRACKER_ENV}
    run_stage("sft", REPO / "recipes/tiny/sft.yaml", [*overrides, "gold_eval=null", "data.sources.0.max_rows=512",
                                                      "train.max_steps=4", "output.logging_steps=1",
                                                      "output.report_to=[mlflow, trackio]"], env=env)
    return SimpleNamespace(dir=out, metrics=_histories(read_metrics(out)))


def _histories(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """{name: [(step, value), ...]} of metrics.jsonl rows (or a tracker's rows of the same shape), in step order."""
    out: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key not in ("step", "time", "timestamp"):
                out.setdefault(key, []).append((int(row["step"]), float(value)))
    return {key: sorted(points) for key, points in out.items()}


def _assert_same(tracked: dict[str, list[tuple[int, float]]], jsonl: dict[str, list[tuple[int, float]]]) -> None:
    assert {"train/loss", "eval/loss"} <= set(jsonl)
    assert set(tracked) == set(jsonl)
    for key, points in jsonl.items():
        assert [s for s, _ in tracked[key]] == [s for s, _ in points], key
        assert [v for _, v in tracked[key]] == pytest.approx([v for _, v in points], rel=1e-6), key


def test_recipe_tracker_names_are_the_loggers():
    (literal,) = typing.get_args(typing.get_type_hints(OutputSection)["report_to"])
    assert set(typing.get_args(literal)) == set(TRACKERS)
    assert OutputSection(dir="x").report_to == ["tensorboard"]  # today's behaviour stays the default


@pytest.mark.parametrize("tracker, hidden, env, message", [
    ("trackio", ["trackio"], {}, "output.report_to: trackio needs the Python package trackio: pip install trackio"),
    ("mlflow", ["sqlalchemy", "alembic"], {},
     "output.report_to: mlflow needs the Python packages sqlalchemy, alembic: pip install sqlalchemy alembic"),
    # with a tracking server, the SQL layer of the local store is not asked for
    ("mlflow", ["mlflow", "sqlalchemy", "alembic"], {"MLFLOW_TRACKING_URI": "http://127.0.0.1:1"},
     "output.report_to: mlflow needs the Python package mlflow-skinny: pip install mlflow-skinny "),
])
def test_a_missing_tracker_package_is_one_line_before_anything_is_written(tracker, hidden, env, message, tmp_path,
                                                                         monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for module in hidden:
        monkeypatch.setitem(sys.modules, module, None)  # how Python marks a module it must not import
    with pytest.raises(UserError) as exc:
        MetricsLogger(tmp_path / "run", report_to=["tensorboard", tracker])
    assert message in str(exc.value) and "\n" not in str(exc.value)
    assert not (tmp_path / "run").exists()


def test_sft_metrics_reach_mlflow_and_a_resumed_logger_logs_on_into_the_run(sft_run):
    """The stage's MLflow run (local SQLite store in the output dir) holds metrics.jsonl's metrics. A logger reopened
    there as a resumed stage's continues that run, leaving out a NaN that MLflow would mangle (metrics.jsonl keeps
    it)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{sft_run.dir / 'mlruns' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("sft").experiment_id])
    assert run.info.run_name == "sft" and run.info.status == "FINISHED"
    assert json.loads((sft_run.dir / "tracker_runs.json").read_text()) == {"mlflow": run.info.run_id}
    tracked = {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
               for key in run.data.metrics}
    _assert_same(tracked, sft_run.metrics)
    assert not (sft_run.dir / "tensorboard").exists()  # only what report_to names

    logger = MetricsLogger(sft_run.dir, console_every=10**9, report_to=["mlflow"], resumed=True)
    logger.log(5, {"train/loss": 0.25, "train/grad_norm": math.nan})
    logger.close()
    assert client.get_metric_history(run.info.run_id, "train/loss")[-1].step == 5
    assert ([m.step for m in client.get_metric_history(run.info.run_id, "train/grad_norm")]
            == [s for s, _ in sft_run.metrics["train/grad_norm"]])
    assert math.isnan(read_metrics(sft_run.dir)[-1]["train/grad_norm"])
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_sft_metrics_reach_trackio(sft_run, monkeypatch):
    from trackio import sqlite_storage

    # The stage ran with TRACKIO_DIR unset: trackio's database went in the output dir, where its reader now looks.
    monkeypatch.setattr(sqlite_storage, "TRACKIO_DIR", sft_run.dir / "trackio")
    (run,) = sqlite_storage.SQLiteStorage.get_run_records("sft")
    assert run["name"] == "sft"
    _assert_same(_histories(sqlite_storage.SQLiteStorage.get_logs("sft", run_id=run["id"])), sft_run.metrics)


def test_wandb_is_offline_without_a_secret(tmp_path, monkeypatch, capsys):
    """No WANDB_API_KEY and no WANDB_MODE: wandb logs offline into the output dir and says so (nothing goes on the
    network)."""
    for key in TRACKER_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    logger = MetricsLogger(out, console_every=10**9, report_to=["wandb"])
    logger.log(1, {"ppo/reward": 0.5, "ppo/kl": math.nan})
    logger.close()
    assert "wandb: offline, as neither WANDB_API_KEY nor WANDB_MODE is set" in capsys.readouterr().out
    (offline,) = (out / "wandb").glob("offline-run-*")
    assert offline.name.endswith(json.loads((out / "tracker_runs.json").read_text())["wandb"])
    assert list(offline.glob("run-*.wandb"))


def test_ppo_stage_hands_report_to_to_its_logger(tiny_paths, tmp_path, monkeypatch):
    """The PPO stage builds its logger with the recipe's trackers (recorded at the call, which then stops the run):
    policy and reference are the tiny base model, the reward a rule, the engine an in-process HF one."""
    from alignment.config.ppo import PPORecipe
    from alignment.config.schema import load_recipe
    from alignment.stages import ppo
    from rollout.hf_engine import HFEngine

    class Built(Exception):
        pass

    def record(out_dir, **kwargs):
        raise Built(kwargs)

    monkeypatch.setattr(ppo, "MetricsLogger", record)
    recipe = load_recipe(REPO / "recipes/tiny/ppo_grpo.yaml", PPORecipe, [
        f"policy.name_or_path={tiny_paths.base}", f"prompts.sources.0.path={tiny_paths.prompts}",
        "rewards=[{kind: function, function: alignment.tiny.task:gold_reward}]", "eval=null",
        f"output.dir={tmp_path / 'run'}", "output.report_to=[trackio, mlflow]"])
    with pytest.raises(Built) as exc:
        ppo.run(recipe, engine=HFEngine(str(tiny_paths.base), dtype="float32"))
    assert exc.value.args[0]["report_to"] == ["trackio", "mlflow"] and exc.value.args[0]["resumed"] is False
