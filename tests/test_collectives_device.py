"""Every collective our code issues in a real PPO run sends tensors on the process group's device.

On GPUs the group is NCCL, which takes only CUDA tensors; CI has none. So 2 real ranks (gloo) run the PPO stage with
`alignment.distributed.group_device()` pointed at the `meta` device, and a spy on torch.distributed records the device
of every tensor that a call from our packages (alignment/, rollout/, reward/) hands it. A tensor built on the CPU and
sent as is (the bug this guards against) is recorded as `cpu` and fails the test. DeepSpeed's own collectives pass
through untouched.

Meta tensors hold no data, so the spy keeps the run going: `_to_group` also keeps a CPU copy of what it placed, the
spy runs the real collective on those copies, and `_from_group` hands the results back.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import traceback
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OURS = tuple(str(REPO / package) + os.sep for package in ("alignment", "rollout", "reward"))
SPIED = ("all_reduce", "all_gather", "broadcast", "reduce", "all_gather_into_tensor", "reduce_scatter_tensor",
         "broadcast_object_list", "scatter", "gather")


def _caller_is_ours() -> bool:
    """Whether the first frame outside torch (and this file) that reached the collective is in our packages."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/torch/" in frame.filename or frame.filename == __file__:
            continue
        return frame.filename.startswith(OURS)
    return False


def _install_spy(records: list) -> None:
    import torch
    import torch.distributed as dist

    from alignment import distributed

    meta = torch.device("meta")
    data: dict[int, tuple] = {}  # id(meta tensor) -> (the meta tensor, its CPU data)
    real_to_group, real_from_group = distributed._to_group, distributed._from_group

    def to_group(t):
        placed = real_to_group(t)
        data[id(placed)] = (placed, t.detach().to("cpu", copy=True).contiguous())
        return placed

    def from_group(t, like):
        if t.device == meta:
            return data.pop(id(t))[1].to(like.device)
        return real_from_group(t, like)

    def cpu_of(t):
        if t.device != meta:
            return t
        if id(t) not in data:  # an output buffer made on the group's device (all_gather's parts)
            data[id(t)] = (t, torch.empty(t.shape, dtype=t.dtype))
        return data[id(t)][1]

    def spy(name, real):
        def call(*args, **kwargs):
            if not _caller_is_ours():
                return real(*args, **kwargs)
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            tensors += [t for a in args if isinstance(a, list) for t in a if isinstance(t, torch.Tensor)]
            devices = [str(t.device) for t in tensors]
            if name == "broadcast_object_list":
                devices.append(str(kwargs.get("device")))
                kwargs["device"] = torch.device("cpu")
            records.append({"op": name, "devices": devices})
            args = [cpu_of(a) if isinstance(a, torch.Tensor) else [cpu_of(t) for t in a] if isinstance(a, list)
                    and a and isinstance(a[0], torch.Tensor) else a for a in args]
            return real(*args, **kwargs)

        return call

    distributed.group_device = lambda: meta
    distributed._to_group, distributed._from_group = to_group, from_group
    for name in SPIED:
        setattr(dist, name, spy(name, getattr(dist, name)))


def _worker(rank: int, port: int, recipe_args: list[str], result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      OMP_NUM_THREADS="1")
    sys.path.insert(0, str(REPO))
    from alignment.config.ppo import PPORecipe
    from alignment.config.schema import load_recipe
    from alignment.stages import ppo

    records: list = []
    _install_spy(records)
    ppo.run(load_recipe(REPO / "recipes/tiny/ppo.yaml", PPORecipe, recipe_args))
    Path(result_dir, f"rank{rank}.json").write_text(json.dumps(records))


@pytest.mark.e2e
def test_every_collective_of_a_ppo_run_is_on_the_groups_device(tiny_paths, tiny_sft, tiny_rm, tmp_path):
    import torch.multiprocessing as mp

    from conftest import read_metrics, tiny_ppo_overrides

    out = tmp_path / "run"
    args = [*tiny_ppo_overrides(tiny_paths, tiny_sft, tiny_rm, out), "rollout.engine=hf", "train.steps=2",
            "output.save_steps=2", "eval=null", "train.prompts_per_step=4", "algorithm.critic_warmup_steps=0",
            "algorithm.reward_normalization=running"]  # running statistics gather the raw rewards of all ranks
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(port, args, str(tmp_path)), nprocs=2, start_method="spawn")

    assert [m["step"] for m in read_metrics(out)] == [1, 2]  # the run went through, with real values
    for rank in (0, 1):
        records = json.loads((tmp_path / f"rank{rank}.json").read_text())
        ops = {r["op"] for r in records}
        assert {"all_reduce", "all_gather", "broadcast_object_list"} <= ops, ops
        off_device = [r for r in records if any(d != "meta" for d in r["devices"])]
        assert not off_device, f"rank {rank}: collectives sent tensors off the group's device: {off_device[:5]}"
