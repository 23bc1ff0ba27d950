"""Processes that end with the process that started them, however it ends (exception, SIGTERM, SIGKILL, the OOM
killer): Linux's parent-death signal (PR_SET_PDEATHSIG), set by the child on itself.

- Ranks of a launched run (`accelerate launch`, torchrun: RANK is set) get SIGTERM when the launcher's agent
  dies: torch's agent starts each rank in a session of its own, so a killed launcher left them training.
- Rollout servers we launch (`EXIT_WITH_PARENT` in their environment) get SIGTERM, and close their engine.
- vLLM's own processes (engine core, workers) get SIGKILL when their parent dies, through our vLLM plugin
  (rollout/vllm_plugin.py): a SIGKILLed trainer otherwise left its colocated engine holding gigabytes.

The signal fires when the thread that started the process exits; all of ours start processes from the main
thread. Elsewhere than Linux this does nothing.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h
EXIT_WITH_PARENT = "ALIGNMENT_EXIT_WITH_PARENT"  # environment variable: "1" makes `alignment` die with its parent


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Have Linux send this process `sig` when its parent dies (and now, if it already has)."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        return  # not fatal: the process merely outlives a killed parent, as without this
    if os.getppid() != parent:  # the parent died before the signal was armed
        os.kill(os.getpid(), sig)


def exit_with_launcher_or_parent() -> None:
    """At the start of `alignment`: die with the launcher's agent (a rank of a launched run) or with the process
    that asked for it through EXIT_WITH_PARENT (a rollout server we launched)."""
    if "RANK" in os.environ or os.environ.get(EXIT_WITH_PARENT) == "1":
        die_with_parent(signal.SIGTERM)
