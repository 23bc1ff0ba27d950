"""Two "nodes" on one machine: two `accelerate launch` commands of the multi-node template, one process each,
joined over loopback as a real 2-rank ZeRO-3 PPO run.

- With one output directory (a shared filesystem) the run trains, is killed after a checkpoint, and both commands
  run again resume from rank 0's choice of checkpoint and finish.
- With a directory per node (no shared filesystem) both nodes stop with the clear error before training, and
  nothing is trained into either directory.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO, read_metrics, stage_env, tiny_ppo_overrides

TINY_PPO = REPO / "recipes" / "tiny" / "ppo.yaml"
MULTINODE = REPO / "recipes" / "accelerate" / "multinode_zero3.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node(machine_rank: int, port: int, out: Path, tiny, sft, rm, steps: int) -> subprocess.Popen:
    """One "node": the multi-node template with one process on this machine (CPU: no bf16). Its output goes to a
    file (`node.log`, read by `_finish`): a pipe nobody reads while the test waits would fill and block the ranks."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(MULTINODE),
           "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(machine_rank),
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "--mixed_precision", "no",
           "-m", "alignment", "ppo", str(TINY_PPO), *tiny_ppo_overrides(tiny, sft, rm, out), "rollout.engine=hf",
           f"train.steps={steps}", "output.save_steps=2", "eval=null", "algorithm.critic_warmup_steps=1"]
    log = tempfile.NamedTemporaryFile("w+", suffix=f"-node{machine_rank}.log", delete=False)
    node = subprocess.Popen(cmd, cwd=REPO, env=stage_env(PYTHONUNBUFFERED="1"), stdout=log, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    node.log = Path(log.name)
    return node


def _both(outs: tuple[Path, Path], tiny, sft, rm, steps: int) -> list[subprocess.Popen]:
    port = _free_port()
    return [_node(r, port, outs[r], tiny, sft, rm, steps) for r in (0, 1)]


def _finish(nodes: list[subprocess.Popen], timeout: float = 900) -> list[tuple[int, str]]:
    results = []
    for node in nodes:
        try:
            node.wait(timeout=timeout)
        finally:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
        results.append((node.returncode, node.log.read_text()))
    return results


@pytest.mark.e2e
def test_two_nodes_sharing_the_output_dir_train_and_resume_after_a_kill(tiny_paths, tiny_sft, tiny_rm, tmp_path):
    out = tmp_path / "shared"
    nodes = _both((out, out), tiny_paths, tiny_sft, tiny_rm, steps=40)  # far more than the kill below allows
    deadline = time.time() + 600
    try:
        while not (out / "checkpoints" / "checkpoint-2").exists():
            assert all(n.poll() is None for n in nodes) and time.time() < deadline, "a node ended before checkpoint 2"
            time.sleep(0.2)
    finally:
        for node in nodes:  # the whole job is killed (both launchers; their ranks die with them)
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()

    results = _finish(_both((out, out), tiny_paths, tiny_sft, tiny_rm, steps=4))
    assert all(code == 0 for code, _ in results), "\n".join(o[-3000:] for _, o in results)
    assert "resumed at step" in results[0][1]
    steps = [m["step"] for m in read_metrics(out)]
    assert steps[-1] == 4 and steps == sorted(set(steps)), steps
    assert (out / "final" / "model.safetensors").exists()
    assert not list((out / "checkpoints").glob(".tmp-*")), "a node's shards were left unpublished"


@pytest.mark.e2e
def test_a_directory_per_node_stops_before_training(tiny_paths, tiny_sft, tiny_rm, tmp_path):
    outs = (tmp_path / "node0", tmp_path / "node1")
    results = _finish(_both(outs, tiny_paths, tiny_sft, tiny_rm, steps=4), timeout=600)
    for code, output in results:
        assert code != 0, output[-3000:]
        assert "is not the same directory on every rank: rank 1" in output, output[-3000:]
        assert "shared by all nodes" in output
        # one line from our ranks, no traceback of ours (torch's launcher prints its own ChildFailedError after it)
        assert f'File "{REPO / "alignment"}' not in output, output[-3000:]
    for out in outs:  # nothing trained, checkpointed or logged on either node
        assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
