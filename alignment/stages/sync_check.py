"""After every weight sync: does the rollout engine now run the trainer's weights?

A sync can be silently wrong (a tensor the engine did not take, a layer it did not re-process, a dtype it rounds
to), and then the run samples from weights the trainer does not have. `ppo/logprob_mismatch` cannot tell: in async
mode it also measures one update of staleness. So right after each sync the engine samples a few short answers to
fixed prompts and the trainer scores the same tokens with the weights it just sent: their token_mult_prob_error
must stay under a tolerance. Over it, a loud warning; `max_bad` syncs in a row, a UserError naming the likely causes.

With `algorithm.packing` the trainer scores the probe packed, as it scores rollouts: a model whose attention ignores
packed position ids (sequences would attend across each other) fails the first check; scored padded as well, the
probe then tells that from a bad sync, and the run stops naming packing.
"""

from __future__ import annotations

import torch

from alignment import console
from alignment.errors import UserError
from alignment.ppo.batch import RolloutBatch
from alignment.ppo.forward import policy_forward
from alignment.ppo.mismatch import token_mult_prob_error
from alignment.distributed import broadcast_from_main
from rollout import SamplingConfig

PROBE_PROMPTS = 4
PROBE_TOKENS = 8


class SyncCheck:
    """Call on every rank right after each sync, while the engine is idle; returns the probe's error."""

    def __init__(self, prompt_ids: list[list[int]], tolerance: float, max_bad: int, seed: int, packed: bool = False):
        self.prompt_ids = prompt_ids[:PROBE_PROMPTS]
        self.tolerance, self.max_bad, self.packed = tolerance, max_bad, packed
        self.sampling = SamplingConfig(n=1, temperature=1.0, max_new_tokens=PROBE_TOKENS, seed=seed)
        self.bad = 0

    @torch.no_grad()
    def __call__(self, engine, policy, pad_id: int, device: torch.device, version: int, rank: int) -> float:
        samples = engine.generate(self.prompt_ids, self.sampling) if rank == 0 else None
        batch = RolloutBatch.from_samples(broadcast_from_main(samples), list(range(len(self.prompt_ids))))
        error = self._probe_error(batch, policy, pad_id, device, self.packed)  # every rank: ZeRO-3 gathers
        if error <= self.tolerance:
            self.bad = 0
            return error
        if self.packed and self._probe_error(batch, policy, pad_id, device, packed=False) <= self.tolerance:
            model = getattr(policy, "module", policy)  # inside the DeepSpeed engine
            raise UserError(
                f"algorithm.packing: the policy scores packed sequences differently from padded ones (probe "
                f"token_mult_prob_error {error:.4f} packed, within rollout.sync_check_tolerance {self.tolerance} padded): "
                f"the attention of {type(model).__name__} (attn_implementation "
                f"'{getattr(model.config, '_attn_implementation', '?')}') does not read packed position ids as separate "
                "sequences. Set algorithm.packing: false, or load the model with sdpa, eager or flash_attention_2 "
                "attention")
        self.bad += 1
        if rank == 0:
            console.say(f"WARNING: after weight sync {version} the rollout engine's token probabilities differ from the "
                  f"trainer's by a factor of {error:.4f} per token on fixed probe prompts (tolerance "
                  f"{self.tolerance}); {self.bad} such sync(s) in a row")
        if self.bad >= self.max_bad:
            raise UserError(
                f"stopping: {self.bad} consecutive weight syncs left the rollout engine sampling from other weights than "
                f"the trainer's (probe token_mult_prob_error {error:.4f} > rollout.sync_check_tolerance "
                f"{self.tolerance}). Likely causes: the engine runs another dtype than the policy (rollout.dtype vs "
                "policy.dtype), the engine was started from another checkpoint or architecture than the policy, or a "
                "tensor of the policy did not reach the engine (see sync/tensors in metrics.jsonl)")
        return error

    @staticmethod
    def _probe_error(batch: RolloutBatch, policy, pad_id: int, device: torch.device, packed: bool) -> float:
        inputs = batch.model_inputs(torch.arange(len(batch)), pad_id, device, packed)
        trainer_logp = policy_forward(policy, inputs, temperature=1.0)[0].float().cpu()
        n = inputs.completion_len
        return token_mult_prob_error(batch.sampler_logp[:, :n], trainer_logp, batch.mask[:, :n])
