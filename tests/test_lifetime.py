"""No process outlives its run: SIGKILL of a trainer's main process (what the OOM killer does) leaves none of the
processes it started alive seconds later: neither a colocated vLLM engine's engine-core process nor a launched
rollout server with its engine. (Ranks and their killed launcher: tests/test_ppo.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import REPO, stage_env, tiny_ppo_overrides


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.e2e
@pytest.mark.parametrize("engine", [["rollout.engine=vllm"], ["rollout.engine=remote", "rollout.launch_servers=1"]],
                         ids=["colocated", "launched_server"])
def test_sigkill_of_the_trainer_leaves_no_process_behind(engine, tiny_paths, tiny_sft, tiny_rm, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "alignment", "ppo", str(REPO / "recipes/tiny/ppo_grpo.yaml"),
           *tiny_ppo_overrides(tiny_paths, tiny_sft, tiny_rm, out, critic=False), *engine, "train.steps=200", "eval=null"]
    trainer = subprocess.Popen(cmd, cwd=REPO, env=stage_env(VLLM_CPU_KVCACHE_SPACE="1"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    started = []
    try:
        deadline = time.time() + 600
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip():
            assert trainer.poll() is None and time.time() < deadline, "the run ended before its first step"
            time.sleep(0.5)
        started = _descendants(trainer.pid)
        assert started, "the engine runs in processes of its own"
        os.kill(trainer.pid, signal.SIGKILL)  # the main process only, as the OOM killer would
        trainer.wait()
        gone_by = time.time() + 30
        while _alive(started) and time.time() < gone_by:
            time.sleep(0.5)
        survivors = [(p.pid, " ".join(p.cmdline())[:120]) for p in _alive(started)]
        assert not survivors, f"processes outlived the killed trainer: {survivors}"
    finally:
        for p in _alive(started):  # never leave them running past the test
            p.kill()
        if trainer.poll() is None:
            os.killpg(trainer.pid, signal.SIGKILL)
