"""Metrics to a plain JSONL file, the experiment trackers of `output.report_to` and periodic console lines (main
process only).

Every tracker is fed exactly the rows of metrics.jsonl: the same names (`train/loss`, `eval/loss`, `ppo/reward`) at
the same steps. Each is one small class (`log(step, metrics)`, `close()`) in TRACKERS, under the name a recipe uses.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

from alignment import console, distributed
from alignment.errors import UserError

TRACKER_RUNS = "tracker_runs.json"  # in the output dir: the run id each tracker gave it, for resumed stages


class MetricsLogger:
    """`log(step, {"ppo/reward": 0.5, ...})` appends to `<dir>/metrics.jsonl` and feeds the trackers in `report_to`
    (TRACKERS: TensorBoard under `<dir>/tensorboard` by default).

    Only rank 0 writes. `resumed`: the stage resumes from a checkpoint, so trackers log on into the run they started.
    Console lines show `console_keys` (all keys if None) every `console_every` steps (never if None), without the
    `console_namespace` prefix (e.g. "ppo/").
    """

    def __init__(self, out_dir: str | Path, console_every: int | None = 1, console_keys: list[str] | None = None,
                 console_namespace: str = "", report_to: Sequence[str] = ("tensorboard",), resumed: bool = False):
        self.enabled = distributed.is_main()
        self.console_every = console_every
        self.console_keys = console_keys
        self.console_namespace = console_namespace
        names = list(dict.fromkeys(report_to))
        # Every rank checks, so that a missing package stops them all before training (rank 0 alone would leave the
        # others waiting in a collective).
        check_installed(names)
        self._trackers = []
        if not self.enabled:
            return
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(out / "metrics.jsonl", "a", buffering=1)
        self._trackers = [TRACKERS[name](out, resumed) for name in names]

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **clean}) + "\n")
        for tracker in self._trackers:
            tracker.log(step, clean)
        if self.console_every and step % self.console_every == 0:
            keys = self.console_keys or list(clean)
            # Keys keep their namespace (eval/gold vs ppo/gold) except the stage's own, which every line has.
            shown = " ".join(f"{k.removeprefix(self.console_namespace)}={clean[k]:.4g}" for k in keys if k in clean)
            console.say(f"[step {step}] {shown}")

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        for tracker in self._trackers:
            tracker.close()


def check_installed(names: Sequence[str]) -> None:
    """UserError (one line) naming the pip packages that a tracker in `names` needs and this environment lacks."""
    for name in names:
        packages = TRACKERS[name].packages()
        missing = [pip for module, pip in packages.items() if importlib.util.find_spec(module) is None]
        if missing:
            raise UserError(f"output.report_to: {name} needs the Python package{'s' if len(missing) > 1 else ''} "
                            f"{', '.join(missing)}: pip install {' '.join(missing)} (or pip install -e '.[trackers]')")


def _run_name(out: Path) -> str:
    """Trackers name the project (experiment) and the run after the output directory: `outputs/tiny/sft` -> `sft`."""
    return out.resolve().name


def _saved_run_id(out: Path, tracker: str) -> str | None:
    try:
        return json.loads((out / TRACKER_RUNS).read_text()).get(tracker)
    except (OSError, ValueError):  # none saved yet (or a file cut by a kill): the stage starts a new run
        return None


def _save_run_id(out: Path, tracker: str, run_id: str) -> None:
    path = out / TRACKER_RUNS
    try:
        ids = json.loads(path.read_text())
    except (OSError, ValueError):
        ids = {}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**ids, tracker: run_id}, indent=2) + "\n")
    os.replace(tmp, path)


class TensorBoardTracker:
    """Event files under `<output.dir>/tensorboard` (`tensorboard --logdir <output.dir>`)."""

    @staticmethod
    def packages() -> dict[str, str]:
        return {"tensorboard": "tensorboard"}  # import name -> pip package

    def __init__(self, out: Path, resumed: bool):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(out / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            # NaN and inf are left out: one inf stretches a chart's axis till its curve is flat (metrics.jsonl has them)
            if math.isfinite(value):
                self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        self._writer.close()


class MLflowTracker:
    """An MLflow run in the store of MLFLOW_TRACKING_URI, else in a local SQLite store that needs no server,
    `<output.dir>/mlruns/mlflow.db` (MLflow 3 refuses its old `file:` store unless told to). The experiment is
    MLFLOW_EXPERIMENT_NAME or the output directory's name; the run is named after the directory."""

    @staticmethod
    def packages() -> dict[str, str]:
        # mlflow-skinny brings no SQL layer: the local SQLite store needs SQLAlchemy, and Alembic to create its tables
        local = {} if os.environ.get("MLFLOW_TRACKING_URI") else {"sqlalchemy": "sqlalchemy", "alembic": "alembic"}
        return {"mlflow": "mlflow-skinny", **local}

    def __init__(self, out: Path, resumed: bool):
        from mlflow import MlflowClient
        from mlflow.entities import Metric
        from mlflow.exceptions import MlflowException

        self._metric = Metric
        uri, artifacts = os.environ.get("MLFLOW_TRACKING_URI"), None
        if not uri:
            store = (out / "mlruns").resolve()
            store.mkdir(exist_ok=True)
            uri, artifacts = f"sqlite:///{store / 'mlflow.db'}", (store / "artifacts").as_uri()
        self._client = MlflowClient(tracking_uri=uri)
        name = _run_name(out)
        experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or name
        experiment = self._client.get_experiment_by_name(experiment_name)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self._client.create_experiment(experiment_name, artifact_location=artifacts))
        run_id = _saved_run_id(out, "mlflow") if resumed else None
        if run_id is not None:
            try:
                self._client.update_run(run_id, status="RUNNING")  # log on into the run the stage started
            except MlflowException:  # not in this store (deleted, or another MLFLOW_TRACKING_URI): start a new one
                run_id = None
        if run_id is None:
            run_id = self._client.create_run(experiment_id, run_name=name).info.run_id
            _save_run_id(out, "mlflow", run_id)
        self._run_id = run_id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        # NaN and inf are left out: MLflow's SQL store writes inf as 1.8e308, a value no run produced
        batch = [self._metric(key, value, now, step) for key, value in metrics.items() if math.isfinite(value)]
        if batch:
            self._client.log_batch(self._run_id, metrics=batch)

    def close(self) -> None:
        self._client.set_terminated(self._run_id)


class WandbTracker:
    """A Weights & Biases run, files under `<output.dir>/wandb`; project WANDB_PROJECT or the output directory's
    name, the run named after the directory. Nothing goes on the network without a secret: with neither
    WANDB_API_KEY nor WANDB_MODE set the run is offline (`wandb sync` uploads it later)."""

    @staticmethod
    def packages() -> dict[str, str]:
        return {"wandb": "wandb"}

    def __init__(self, out: Path, resumed: bool):
        import wandb

        mode = os.environ.get("WANDB_MODE")
        if mode is None and not os.environ.get("WANDB_API_KEY"):
            mode = "offline"
            console.say(f"wandb: offline, as neither WANDB_API_KEY nor WANDB_MODE is set (WANDB_MODE=online uses your "
                        f"`wandb login`); `wandb sync {out / 'wandb'}/offline-run-*` uploads the run later")
        run_id = _saved_run_id(out, "wandb") if resumed else None
        name = _run_name(out)
        self._run = wandb.init(project=os.environ.get("WANDB_PROJECT") or name, name=name, dir=str(out), mode=mode,
                               id=run_id, resume="allow" if run_id else None)
        _save_run_id(out, "wandb", self._run.id)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._run.log(metrics, step=step)  # W&B takes NaN and inf

    def close(self) -> None:
        self._run.finish()


class TrackioTracker:
    """A local trackio run: a SQLite database under TRACKIO_DIR, `<output.dir>/trackio` unless the user set it
    (`TRACKIO_DIR=<output.dir>/trackio trackio show` serves the dashboard). Project and run are named after the
    output directory; a resumed stage logs on into the latest run of that name."""

    @staticmethod
    def packages() -> dict[str, str]:
        return {"trackio": "trackio"}

    def __init__(self, out: Path, resumed: bool):
        # trackio reads TRACKIO_DIR once, at its first import: a later stage in this process logs where the first did
        os.environ.setdefault("TRACKIO_DIR", str((out / "trackio").resolve()))
        import trackio

        name = _run_name(out)
        # No hardware samplers: they would add system metrics that metrics.jsonl does not have
        self._run = trackio.init(project=name, name=name, resume="allow" if resumed else "never", embed=False,
                                 auto_log_cpu=False, auto_log_gpu=False)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._run.log(metrics, step=step)  # trackio stores NaN and inf (as strings) and reads them back as floats

    def close(self) -> None:
        self._run.finish()


TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MLflowTracker,
            "trackio": TrackioTracker}


def truncate_metrics(path: str | Path, last_step: int) -> None:
    """Keep only rows logged at or before `last_step`: a resumed run drops what its killed predecessor logged
    after the checkpoint it resumes from (and a line cut by the kill); a fresh run (0) starts an empty file."""
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if 0 < row.get("step", 0) <= last_step:
            kept.append(line + "\n")
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
