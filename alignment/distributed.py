"""Rank and world size as torch.distributed sees them.

Under `accelerate launch` with DeepSpeed on CPU, `Accelerator().num_processes` is 1 on every rank while
torch.distributed really has a world of N (see shared/ENVIRONMENT.md), so all our code asks here.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

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


def broadcast_from_main(obj):
    """Rank 0's `obj` on every rank (pickled: small Python objects). The pickle travels on the process group's device
    (NCCL takes only CUDA tensors)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return obj
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    holder = [obj]
    dist.broadcast_object_list(holder, src=0, device=device)
    return holder[0]


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def exit_with_launcher() -> None:
    """Under a launcher (accelerate, torchrun: RANK is set), have Linux send this rank SIGTERM when its parent, the
    launcher's agent, dies.

    torch's elastic agent starts every rank in a process group of its own, so killing `accelerate launch` (a user's
    kill, the OOM killer) left the ranks alive and still writing into the output directory; a rerun then raced
    them. Elsewhere (no launcher, not Linux) this does nothing.
    """
    if "RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return  # not fatal: the rank then merely outlives a killed launcher, as before
