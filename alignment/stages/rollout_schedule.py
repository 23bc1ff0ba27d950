"""When the PPO loop's rollouts are generated: on demand (synchronous), or one step ahead (asynchronous).

Asynchronous mode overlaps generation with training. While step k scores and trains on its rollouts, a
background thread has the engine generate step k+1's rollouts with the weights it holds, those of step k-1's
update; the loop waits for them before it syncs step k's weights (an engine never takes new weights while it
generates). Every rollout is therefore exactly one update old, except step 0's (and the first step after a
resume), which are generated on demand. The PPO loss corrects for the staleness through the importance
weights min(pi_old / pi_sampler, tis_cap), pi_old being the policy at the start of the step.

Only rank 0 holds an engine and uses this class. The thread only generates (`draw`: one engine.generate call, or
the turns of multi-turn rollouts), and never while the main thread calls the engine for anything else.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from alignment.config.sections import SamplingSection
from rollout import Sample, SamplingConfig


@dataclass
class StepRollouts:
    samples: list[Sample]
    generate_seconds: float  # the engine's time to generate them, wherever that time was spent


class RolloutSchedule:
    """Hands the loop each step's rollouts; with `ahead`, generates the next step's in the background."""

    def __init__(self, draw: Callable[[list[int], SamplingConfig], list[Sample]], sampling: SamplingSection, *,
                 ahead: bool):
        self.draw = draw  # (prompt rows, sampling) -> their samples, group after group
        self.sampling = sampling
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollouts") if ahead else None
        self._pending: tuple[int, list[int], Future] | None = None

    def sampling_for(self, step: int, prompts: int) -> SamplingConfig:
        """Step `step`'s sampling for a step of `prompts` prompts: its seeds follow the last step's, so every sample of
        the run draws a stream of its own (`SamplingConfig.prompt_seed`) and a resumed run samples what the original
        would have."""
        return self.sampling.to_config(seed_offset=step * prompts * self.sampling.samples_per_prompt)

    def get(self, step: int, rows: list[int]) -> StepRollouts:
        """Rollouts of `step` for the prompt rows `rows`: the prefetched ones if they are these, else generated now."""
        if self._pending is None:
            return self._generate(step, rows)
        pending_step, pending_rows, future = self._pending
        self._pending = None
        if (pending_step, pending_rows) != (step, rows):
            raise RuntimeError(f"prefetched rollouts are for step {pending_step}, the loop asked for step {step}")
        return future.result()

    def prefetch(self, step: int, rows: list[int]) -> None:
        """Start generating `step`'s rollouts in the background (asynchronous mode only)."""
        if self._pool is None:
            return
        if self._pending is not None:
            raise RuntimeError("a rollout prefetch is already running")
        self._pending = (step, rows, self._pool.submit(self._generate, step, rows))

    def wait(self) -> float:
        """Block until a running prefetch is done (before the engine gets new weights); returns the seconds waited."""
        if self._pending is None:
            return 0.0
        start = time.perf_counter()
        self._pending[2].exception()  # waits; an error surfaces when the loop takes the rollouts
        return time.perf_counter() - start

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending = None

    def _generate(self, step: int, rows: list[int]) -> StepRollouts:
        start = time.perf_counter()
        samples = self.draw(rows, self.sampling_for(step, len(rows)))
        return StepRollouts(samples, time.perf_counter() - start)
