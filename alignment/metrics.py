"""Metrics to TensorBoard, a plain JSONL file and periodic console lines (main process only)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from alignment import distributed


class MetricsLogger:
    """`log(step, {"ppo/reward": 0.5, ...})` appends to `<dir>/metrics.jsonl` and TensorBoard under `<dir>/tensorboard`.

    Only rank 0 writes. Console lines show `console_keys` (all keys if None) every `console_every` steps, without
    the `console_namespace` prefix (e.g. "ppo/").
    """

    def __init__(self, out_dir: str | Path, console_every: int = 1, console_keys: list[str] | None = None,
                 console_namespace: str = ""):
        self.enabled = distributed.is_main()
        self.console_every = console_every
        self.console_keys = console_keys
        self.console_namespace = console_namespace
        self._writer = None
        if not self.enabled:
            return
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(out / "metrics.jsonl", "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(out / "tensorboard"))
        except ImportError:  # tensorboard is a core dependency; keep logging to the file if it is broken
            self._writer = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **clean}) + "\n")
        if self._writer is not None:
            for key, value in clean.items():
                if math.isfinite(value):
                    self._writer.add_scalar(key, value, step)
        if step % self.console_every == 0:
            keys = self.console_keys or list(clean)
            # Keys keep their namespace (eval/gold vs ppo/gold) except the stage's own, which every line has.
            shown = " ".join(f"{k.removeprefix(self.console_namespace)}={clean[k]:.4g}" for k in keys if k in clean)
            print(f"[step {step}] {shown}", flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        if self._writer is not None:
            self._writer.close()


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
