"""Checkpoints that are never half-written: write into a temporary directory, then rename it into place.

A checkpoint directory `<root>/checkpoint-<step>` exists only once complete (rename is atomic on one
filesystem); leftovers `<root>/.tmp-checkpoint-*` from a killed run are ignored and cleaned up.
"""

from __future__ import annotations

import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    checkpoints = list_checkpoints(root)
    return checkpoints[-1] if checkpoints else None


@contextmanager
def atomic_directory(target: str | Path):
    """Yield a temporary directory beside `target`; on success rename it to `target` (replacing an old one)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = target.parent / f".old-{target.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def publish(staging: Path, target: Path) -> Path:
    """Rename a fully written staging directory to `target`, replacing an older one.

    For writers spread over several processes: each writes into `staging`, then (after a barrier) one
    process publishes. Single-process writers can use `atomic_directory` instead.
    """
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    return target


def prune(root: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints under root."""
    for stale in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(stale, ignore_errors=True)


def clean_partial(root: str | Path) -> None:
    """Remove temporary directories left by a run killed mid-save."""
    root = Path(root)
    if root.is_dir():
        for p in root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
