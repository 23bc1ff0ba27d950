"""Our vLLM general plugin (entry point `vllm.general_plugins` in pyproject.toml). vLLM runs it at the start of
every process it makes (engine core, workers; a stock `vllm serve` too), and in the process that builds an engine:

- "gloo" becomes a weight-transfer backend there (rollout/gloo_transfer.py);
- in vLLM's own child processes, the parent-death signal is armed (SIGKILL): a colocated engine or a server's
  engine dies with the process that started it, however that one ends (alignment/lifetime.py). The process that
  builds the engine (a trainer, a server) is never touched: it has no multiprocessing parent.
"""

from __future__ import annotations

import multiprocessing
import signal


def load() -> None:
    from alignment.lifetime import die_with_parent
    from rollout.gloo_transfer import register

    register()
    if multiprocessing.parent_process() is not None:
        die_with_parent(signal.SIGKILL)
