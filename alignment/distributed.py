"""The one module that talks to torch.distributed: rank, world size, and every collective our code issues.

Each tensor a collective sends is first placed on the process group's device (`group_device()`): NCCL takes only
CUDA tensors, gloo only CPU ones, so a collective built on the wrong device stops a GPU run at its first use while
every CPU test passes. Values come back on the caller's device. A test spies on torch.distributed with the group's
device pointed elsewhere and fails on any tensor of ours that arrives off it.

Under `accelerate launch` with DeepSpeed on CPU, `Accelerator().num_processes` is 1 on every rank while
torch.distributed really has a world of N (see shared/ENVIRONMENT.md), so all our code asks here.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def shutdown() -> None:
    """For a launched rank (RANK set) about to exit: leave the process group once every rank is done. A rank that
    simply exits while another still works (rank 0 writing the final export) could abort in the group's threads at
    exit ("terminate called without an active exception", seen once in CI with a 2-rank ZeRO-3 RM run). A stage run
    inside a longer-lived process (tests, notebooks) keeps its group: DeepSpeed holds on to it for the next run."""
    if "RANK" in os.environ and is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def group_device() -> torch.device:
    """Where the tensors of a collective must live: the CPU for gloo (and outside a process group), else the rank's
    accelerator (NCCL: this rank's CUDA device)."""
    if not is_initialized() or dist.get_backend() in ("gloo", "mpi"):
        return torch.device("cpu")
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", 0))))


def _to_group(t: torch.Tensor) -> torch.Tensor:
    """A private copy of `t` on the group's device, ready to send."""
    return t.detach().to(group_device(), copy=True).contiguous()


def _from_group(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A collective's result back on the caller's device."""
    return t.to(like.device)


def broadcast_from_main(obj):
    """Rank 0's `obj` on every rank (pickled: small Python objects), sent on the group's device."""
    if not is_initialized() or dist.get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0, device=group_device())
    return holder[0]


def gather_objects(obj) -> list:
    """Every rank's `obj` (small, picklable), in rank order, on every rank."""
    if not is_initialized() or dist.get_world_size() == 1:
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)  # torch pickles onto the group's device itself (current CUDA device on NCCL)
    return gathered


def map_shares(items: list, fn) -> list:
    """`fn` over `items` with every rank taking a share (rank r: items r, r + W, ..., so that lengths spread evenly),
    the results gathered back in order on every rank. `fn` maps a list to a list of the same length; no rank waits for
    another to do all the work."""
    world, this = world_size(), rank()
    shares = gather_objects(list(fn(items[this::world])))
    results = [None] * len(items)
    for r, share in enumerate(shares):
        results[r::world] = share
    return results


def sum_across_ranks(t: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of `t` over every rank, on t's device; nothing is sent in a world of one."""
    if world_size() == 1:
        return t
    on_group = _to_group(t)
    dist.all_reduce(on_group)
    return _from_group(on_group, t)


def all_reduce_sum(value: float) -> float:
    return float(sum_across_ranks(torch.tensor([float(value)], dtype=torch.float64)))


def all_reduce_max(value: int) -> int:
    if world_size() == 1:
        return value
    on_group = _to_group(torch.tensor([value], dtype=torch.int64))
    dist.all_reduce(on_group, op=dist.ReduceOp.MAX)
    return int(on_group.item())


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Average scalar metrics over ranks (one collective for the whole dict)."""
    if world_size() == 1 or not values:
        return values
    keys = sorted(values)
    summed = sum_across_ranks(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64))
    return {k: float(v) / world_size() for k, v in zip(keys, summed)}


def gather_across_ranks(t: torch.Tensor) -> torch.Tensor:
    """Same-shaped `t` of every rank, concatenated in rank order along dim 0, on t's device."""
    if world_size() == 1:
        return t
    on_group = _to_group(t)
    parts = [torch.empty_like(on_group) for _ in range(world_size())]
    dist.all_gather(parts, on_group)
    return torch.cat([_from_group(part, t) for part in parts])


def any_rank(flag: bool) -> bool:
    """True if `flag` is true on any rank: keeps every rank on the same branch (ZeRO-3 needs lockstep)."""
    return all_reduce_sum(1.0 if flag else 0.0) > 0
