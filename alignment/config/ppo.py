"""Recipe schema of the PPO stage (`alignment ppo`)."""

from __future__ import annotations

from typing import Literal

from alignment.config.schema import option, required
from alignment.config.sections import (
    DataSection,
    GoldEvalSection,
    ModelSection,
    MultiTurnSection,
    OutputSection,
    SamplingSection,
    recipe,
)

# Must equal the keys of alignment.ppo.ADVANTAGE_ESTIMATORS (a test checks); kept literal so validation imports no torch.
ADVANTAGE_CHOICES = Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce++", "reinforce++_baseline"]


@recipe
class RewardSource:
    """One reward term; the total reward is the weighted sum of all terms."""

    kind: Literal["model", "function", "http"] = required(help="a reward-model checkpoint, a Python function, or an HTTP endpoint")
    path: str | None = option(None, help="kind=model: reward-model checkpoint directory", path="model")
    function: str | None = option(None, help="kind=function: 'module:function' or 'file.py:function' (TRL reward signature)")
    url: str | None = option(None, help="kind=http: endpoint that takes {prompts, completions, ...} and returns {rewards}")
    weight: float = option(1.0, help="weight of this term in the total reward")
    normalize: bool = option(True, help="kind=model: standardise scores with the RM's saved reward_stats.json")
    dtype: Literal["float32", "bfloat16", "float16"] | None = option(
        None, help="kind=model: dtype the reward model scores in (None: the policy's dtype)")
    timeout_s: float = option(30.0, help="kind=http: seconds per request", min=0.1)
    retries: int = option(3, help="kind=http: attempts before giving up", min=1)

    def check(self, key: str) -> list[str]:
        needed = {"model": "path", "function": "function", "http": "url"}[self.kind]
        return [] if getattr(self, needed) else [f"{key}.{needed}: required when kind is '{self.kind}'"]


@recipe
class RolloutSection:
    engine: Literal["vllm", "remote", "hf"] = option("vllm", help="vllm: colocated engine; remote: rollout servers; hf: transformers generate (slow)")
    servers: list[str] = option([], help="engine=remote: URLs of running `alignment rollout serve` servers")
    launch_servers: int = option(0, help="engine=remote: start this many local servers (devices below) instead of using `servers`", min=0)
    server_devices: list[str] = option([], help="engine=remote with launch_servers: CUDA_VISIBLE_DEVICES for each server, e.g. ['0,1', '2,3']")
    timeout_s: float = option(120.0, help="a rollout request not answered by then is an error", min=1.0)
    weight_sync: Literal["shm", "gloo", "nccl", "ipc"] = option(
        "shm", help="how new weights reach the engine: shm (chunked safetensors in the trainer's /dev/shm: engines on "
        "this host), gloo (vLLM's weight-transfer API over TCP: servers on any host, CPUs), nccl (the same over NCCL: "
        "servers on other GPUs), ipc (CUDA IPC: engine=vllm colocated on the trainer's GPU)")
    trainer_address: str | None = option(
        None, help="weight_sync gloo/nccl: the address rollout servers reach this trainer at (default: this host's "
        "address on the route to the first server)")
    sync_check_tolerance: float | None = option(
        None, help="after each weight sync the engine and the trainer score a probe of fixed prompts: largest allowed "
        "token_mult_prob_error (None: 1.02 when engine and policy are float32, 1.10 otherwise)", min=1.0)
    sync_check_max_bad: int = option(3, help="stop after this many consecutive syncs over the tolerance", min=1)
    max_model_len: int = option(512, help="vLLM context length", min=16)
    gpu_memory_utilization: float | None = option(
        None, help="engine=vllm on a GPU: the share of the GPU vLLM may take for weights and KV cache (None: vLLM's "
        "0.9, which leaves nothing to train with on a shared GPU)", min=0.01, max=1.0)
    sleep: bool = option(
        False, help="engine=vllm on a GPU: put the engine to sleep (weights to host memory, KV cache freed) while the "
        "trainer scores and trains, and wake it for the weight sync and generation")
    dtype: Literal["float32", "bfloat16", "float16"] | None = option(
        None, help="the rollout engine's weights dtype (None: the policy's, so that its log-probs match the trainer's)")
    sampling: SamplingSection = option(SamplingSection(samples_per_prompt=4), help="sampling parameters")
    multi_turn: MultiTurnSection | None = option(
        None, help="multi-turn rollouts with tools or an environment (None: one completion per sample)")
    async_generation: bool = option(
        False, help="generate the next step's rollouts while this step scores and trains: samples are one policy "
        "update old (algorithm.tis_cap corrects for it); a step then takes about max(generate, score + train)")

    def weight_sync_errors(self) -> list[str]:
        """Transports that cannot reach the engine."""
        sync, engine = self.weight_sync, self.engine
        if engine == "hf" and sync != "shm":
            return [f"rollout.weight_sync: {sync} cannot reach the hf engine, which runs in the trainer's process; use shm"]
        if sync == "ipc" and engine != "vllm":
            return ["rollout.weight_sync: ipc (CUDA IPC) reaches only an engine on the trainer's own GPU (engine: vllm); "
                    "rollout servers take gloo or nccl"]
        if sync == "nccl" and engine == "vllm":
            return ["rollout.weight_sync: nccl cannot connect the trainer to an engine on its own GPU (engine: vllm); "
                    "use ipc there, or gloo"]
        return []

    def device_errors(self, cuda: bool) -> list[str]:
        """What this machine cannot run (checked when the stage starts: a recipe may be validated off the GPUs)."""
        if cuda:
            return []
        errors = []
        if self.weight_sync in ("nccl", "ipc"):
            errors.append(f"rollout.weight_sync: {self.weight_sync} needs GPUs; on CPU use gloo or shm")
        if self.sleep:
            errors.append("rollout.sleep: needs the engine on a GPU (on CPU nothing is gained: turn it off)")
        return errors

    def completion_tokens(self) -> int:
        """The most tokens a sample has after its prompt: one answer, or a multi-turn trajectory's budget."""
        return self.multi_turn.max_tokens if self.multi_turn is not None else self.sampling.max_new_tokens

    def engine_dtype(self, policy_dtype: str) -> str:
        """The dtype the rollout engine runs: the recipe's, else the policy's."""
        return self.dtype or policy_dtype

    def sync_check_tolerance_for(self, policy_dtype: str) -> float:
        """The probe's tolerance: the recipe's, else tight when both sides compute in float32."""
        if self.sync_check_tolerance is not None:
            return self.sync_check_tolerance
        return 1.02 if self.engine_dtype(policy_dtype) == policy_dtype == "float32" else 1.10


@recipe
class KLSection:
    estimator: Literal["k1", "k2", "k3"] = option(
        "k1", help="KL estimator (Schulman): k1 = log-ratio, k2 = squared/2, k3 = (r-1) - log r. Sound pairs: k1 in the "
        "reward gives the gradient of the sequence-level KL(pi||ref); k2 in the loss follows each token's KL(pi||ref), "
        "k3 in the loss each token's KL(ref||pi), at the states the policy visits (exact for one-token answers only, "
        "see alignment/ppo/kl.py); others are refused")
    placement: Literal["reward", "loss"] = option("reward", help="subtract KL from the per-token reward, or add it to the policy loss")
    coef: float = option(0.05, help="initial KL coefficient", min=0.0)
    target: float | None = option(None, help="if set, adapt the coefficient towards this KL per sequence (Ziegler et al.)", min=0.0)
    horizon: int = option(10000, help="adaptive controller horizon (samples)", min=1)


@recipe
class DynamicSamplingSection:
    """DAPO's dynamic sampling (Yu et al. 2025): train only on groups whose rewards vary (alignment/ppo/dynamic_sampling.py)."""

    enabled: bool = option(
        False, help="drop the groups whose scores (reward plus the length penalties, before normalisation and "
        "clipping) are all equal, whose group-relative advantage is 0 everywhere, and generate more prompts from the "
        "same prompt stream until the step has train.prompts_per_step groups with signal. Needs advantage grpo, "
        "dr_grpo or rloo and a synchronous engine (rollout.async_generation: false)")
    max_rounds: int = option(
        3, help="extra generation rounds per step at most (each at most prompts_per_step prompts, sized by the share "
        "of groups kept so far); when they do not fill the step it trains on the groups it has, cut to a multiple of "
        "the number of processes (a step with fewer is skipped, with a warning)", min=0)


@recipe
class OverlongSection:
    """DAPO's overlong filtering and soft overlong punishment (Yu et al. 2025, sec. 3.4)."""

    filter: bool = option(
        False, help="answers cut at rollout.sampling.max_new_tokens (no EOS) get no loss weight: their rows of the "
        "loss mask are zeroed after advantages (policy loss, KL-in-loss, entropy bonus and value loss alike; they still "
        "count in their group's baseline). The loss normaliser follows algorithm.loss_aggregation: token_mean divides "
        "by the kept tokens only; seq_mean_* divide by all sequences of the window, the cut ones counting with zero "
        "loss (metric ppo/overlong_filtered: share of the step's samples filtered)")
    buffer: int | None = option(
        None, help="soft overlong punishment (DAPO eq. 13): L_cache tokens before L_max = max_new_tokens over which a "
        "penalty ramps linearly from 0 to -penalty_factor (an answer cut at max_new_tokens gets -penalty_factor); added "
        "to the score where truncation_penalty is (after reward normalisation, before the reward clip), both apply to "
        "a cut answer (metric ppo/overlong_penalty: its mean). None: off", min=1)
    penalty_factor: float = option(1.0, help="the soft penalty at max_new_tokens, in score units", min=0.0)


@recipe
class PPOAlgorithmSection:
    advantage: ADVANTAGE_CHOICES = option("gae", help="gae needs a value model; the others are critic-free")
    gamma: float = option(1.0, help="discount", min=0.0, max=1.0)
    lam: float = option(0.95, help="GAE lambda", min=0.0, max=1.0)
    epochs: int = option(1, help="PPO epochs over each batch of rollouts", min=1)
    minibatches: int = option(1, help="optimizer steps per epoch (each over a slice of the rollouts)", min=1)
    micro_batch_size: int = option(16, help="sequences per forward/backward pass", min=1)
    micro_batch_tokens: int | None = option(
        None, help="token-budget micro-batches: sequences grouped by length into forwards of at most this many padded "
        "tokens (and micro_batch_size rows; a longer sequence goes alone), for scoring, training and reward-model "
        "forwards; the loss and its gradient are those of row micro-batches (None: micro_batch_size rows each)", min=1)
    packing: bool = option(
        False, help="padding-free micro-batches for the policy, reference, critic and reward-model forwards: a "
        "micro-batch's sequences back to back in one row, position ids restarting at each (transformers' packed "
        "sequences: a block-diagonal mask with sdpa/eager attention, varlen kernels with flash_attention_2); "
        "micro_batch_tokens then counts real tokens. The weight-sync check stops a run whose model ignores it")
    clip_low: float = option(0.2, help="ratio lower clip: 1 - clip_low", min=0.0)
    clip_high: float = option(0.2, help="ratio upper clip: 1 + clip_high", min=0.0)
    dual_clip: float | None = option(None, help="dual-clip constant c > 1 for negative advantages (Ye et al. 2020)", min=1.0)
    entropy_coef: float = option(0.0, help="entropy bonus", min=0.0)
    loss_aggregation: Literal["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"] = option("token_mean", help="how per-token losses are reduced over the whole accumulation window")
    value_clip: float | None = option(0.5, help="value clipping range (None: off)", min=0.0)
    vf_coef: float = option(0.5, help="value-loss weight", min=0.0)
    critic_warmup_steps: int = option(0, help="steps that train only the critic (actor frozen)", min=0)
    reward_normalization: Literal["none", "running"] = option(
        "none", help="running: standardise the total reward with its running mean/std over the run (model terms can "
        "also use the RM's saved stats: rewards.N.normalize)")
    reward_clip: float | None = option(10.0, help="clip the (normalised) score to [-c, c]", min=0.0)
    truncation_penalty: float | None = option(
        None, help="subtracted from the (normalised, before clipping) score of answers cut at max_new_tokens (no EOS)", min=0.0)
    tis_cap: float | None = option(
        2.0, help="truncated importance-sampling cap: each token weighted min(pi_old / pi_sampler, cap), for the "
        "sampler/trainer mismatch and, with async_generation, the one-update-old sampler; per token, it corrects the "
        "action distribution, not the states the older policy led to (None: off)", min=1.0)
    kl: KLSection = option(KLSection(), help="KL leash to the reference policy")
    dynamic_sampling: DynamicSamplingSection = option(
        DynamicSamplingSection(), help="DAPO dynamic sampling: refill the step with groups whose rewards vary")
    overlong: OverlongSection = option(OverlongSection(), help="DAPO overlong filtering and soft overlong punishment")


@recipe
class PPOTrainSection:
    steps: int = required(help="PPO steps (one batch of rollouts each)", min=1)
    prompts_per_step: int = option(16, help="prompts per step, over all processes", min=1)
    learning_rate: float = option(1e-5, help="actor learning rate", min=0.0)
    critic_learning_rate: float = option(5e-5, help="critic learning rate", min=0.0)
    weight_decay: float = option(0.0, help="AdamW weight decay", min=0.0)
    max_grad_norm: float = option(1.0, help="gradient clipping norm", min=0.0)
    warmup_steps: int = option(0, help="linear warmup steps", min=0)
    seed: int = option(0, help="seed of prompt order, sampling and initialisation")
    max_bad_steps: int = option(3, help="stop after this many consecutive steps with NaN/inf losses or rewards", min=1)
    gradient_checkpointing: bool = option(
        False, help="recompute the policy's and critic's activations in backward: less memory, about a third more "
        "compute, the same loss")


@recipe
class OveroptimizationSection:
    """With a gold_metric: watch for the reward rising while gold falls (alignment.ppo.overoptimization)."""

    window: int = option(10, help="steps in each of the two windows whose means are compared", min=2)
    on_detect: Literal["warn", "stop"] = option(
        "warn", help="warn: a warning when it begins, and ppo/overoptimization = 1 in the metrics while it holds; "
        "stop: end training at that step (checkpoint and final export as at the last step)")
    keep_best: bool = option(False, help="export the policy to <output.dir>/best whenever eval/gold beats every earlier "
                             "evaluation (needs the eval section)")


@recipe
class PPOPromptsSection(DataSection):
    """PPO's training prompts: every row loaded is trained on (held-out prompts go in the `eval` section)."""

    eval_fraction: float = option(0.0, help="must stay 0: PPO holds nothing out of its training prompts", min=0.0, max=0.5)


@recipe
class PPORecipe:
    stage: Literal["ppo"] = option("ppo", help="stage this recipe is for")
    policy: ModelSection = required(help="policy to optimise (usually the SFT checkpoint)")
    reference: ModelSection | None = option(None, help="KL reference (default: the policy's initial weights)")
    value: ModelSection | None = option(None, help="critic initialisation (usually the RM or SFT checkpoint); needed by advantage: gae")
    rewards: list[RewardSource] = required(help="reward terms, summed with their weights")
    prompts: PPOPromptsSection = required(help="PPO prompts: `prompt` as text or messages; other columns go to reward functions")
    rollout: RolloutSection = option(RolloutSection(), help="generation engine and weight sync")
    algorithm: PPOAlgorithmSection = option(PPOAlgorithmSection(), help="PPO algorithm")
    train: PPOTrainSection = required(help="optimisation")
    output: OutputSection = required(help="outputs")
    gold_metric: str | None = option(None, help="rule function logged every step as ppo/gold (not optimised)")
    overoptimization: OveroptimizationSection = option(
        OveroptimizationSection(), help="with gold_metric: reward rising while gold falls, warned about or stopped at")
    eval: GoldEvalSection | None = option(None, help="periodic greedy evaluation on held-out prompts")
    eval_every: int = option(10, help="evaluate every N steps (and at the end)", min=1)

    def rank0_alone_s(self) -> float:
        """The longest the other ranks may wait in one collective while rank 0 works alone, by construction: each
        request to a rollout server has `rollout.timeout_s`, and so has a weight transfer. The worst stretch is an
        evaluation step: the sync's transfer and its three calls per server, the probe, the evaluation's requests,
        then the next step's generation, both sent at most MAX_REQUESTS_IN_FLIGHT at a time (a colocated engine is
        given the same allowance)."""
        from rollout.remote import MAX_REQUESTS_IN_FLIGHT

        def rounds(requests: int) -> int:
            return -(-requests // MAX_REQUESTS_IN_FLIGHT)

        evaluation = rounds(self.eval.num_prompts) if self.eval is not None else 0
        return self.rollout.timeout_s * (5 + evaluation + rounds(self.train.prompts_per_step))

    def check(self) -> list[str]:
        errors = [e for i, r in enumerate(self.rewards) for e in r.check(f"rewards.{i}")]
        for key, section in (("value", self.value), ("reference", self.reference)):
            if section is not None and section.lora is not None:
                errors.append(f"{key}.lora: only the policy trains LoRA adapters in PPO (the critic trains all its "
                              "weights, the reference is frozen); remove it")
        if self.prompts.eval_sources or self.prompts.eval_fraction > 0:
            errors.append("prompts.eval_fraction / prompts.eval_sources: PPO trains on every prompt it loads (held-out "
                          "rows would be dropped unused); set eval_fraction: 0 and give held-out prompts in eval.prompts")
        if self.algorithm.advantage == "gae" and self.value is None:
            errors.append("value: required when algorithm.advantage is 'gae' (or choose a critic-free estimator such as grpo)")
        from alignment.ppo.advantages import validate_advantage_estimator  # the registry knows each estimator's needs

        errors += [f"algorithm.advantage: {e}" for e in validate_advantage_estimator(self.algorithm.advantage, self.rollout.sampling.samples_per_prompt)]
        if self.rollout.engine == "remote" and not (self.rollout.servers or self.rollout.launch_servers):
            errors.append("rollout.servers: give server URLs or rollout.launch_servers when rollout.engine is 'remote'")
        from alignment.ppo.kl import validate_kl

        errors += [f"algorithm.kl: {e}" for e in validate_kl(self.algorithm.kl.estimator, self.algorithm.kl.placement)]
        if self.algorithm.dynamic_sampling.enabled:
            from alignment.ppo.dynamic_sampling import validate_dynamic_sampling

            errors += [f"algorithm.dynamic_sampling: {e}" for e in validate_dynamic_sampling(
                self.algorithm.advantage, self.rollout.sampling.samples_per_prompt)]
            if self.rollout.async_generation:
                errors.append("algorithm.dynamic_sampling: cannot be combined with rollout.async_generation (the next "
                              "step's prompts are drawn and generated before this step knows how many refills it takes, "
                              "and refills would mix weight versions in one step); turn one of them off")
        overlong = self.algorithm.overlong
        if overlong.buffer is not None and overlong.buffer >= self.rollout.sampling.max_new_tokens:
            errors.append(f"algorithm.overlong.buffer: must be below rollout.sampling.max_new_tokens "
                          f"({self.rollout.sampling.max_new_tokens}): the penalty starts at max_new_tokens - buffer "
                          f"tokens, got {overlong.buffer}")
        if self.algorithm.kl.target is not None and self.algorithm.kl.target <= 0:
            errors.append(f"algorithm.kl.target: must be > 0 for the adaptive controller, got {self.algorithm.kl.target}")
        errors += self.rollout.weight_sync_errors()
        if self.rollout.sleep and self.rollout.engine != "vllm":
            errors.append("rollout.sleep: only a colocated engine (rollout.engine: vllm) can sleep during training")
        if self.rollout.sleep and self.rollout.async_generation:
            errors.append("rollout.sleep: cannot be combined with rollout.async_generation, which generates while the "
                          "trainer trains")
        if self.rollout.async_generation and self.algorithm.tis_cap is None:
            errors.append("algorithm.tis_cap: required when rollout.async_generation is true (it corrects for "
                          "rollouts sampled by the previous policy)")
        sampling = self.rollout.sampling
        truncation = "vLLM samples from, and reports log-probs of, the truncated renormalised distribution while the " \
                     "trainer's log-probs (PPO ratio, importance weights, ppo/logprob_mismatch) use the full softmax"
        if sampling.temperature == 0:
            errors.append("rollout.sampling.temperature: PPO needs sampled answers; at 0 (greedy) every answer to a "
                          "prompt is the same, group advantages are all zero and the policy learns nothing (use 1.0)")
        if sampling.top_p < 1.0:
            errors.append(f"rollout.sampling.top_p: PPO rollouts need 1.0, got {sampling.top_p}: {truncation}")
        if sampling.top_k > 0:
            errors.append(f"rollout.sampling.top_k: PPO rollouts need -1 (off), got {sampling.top_k}: {truncation}")
        if not self.rewards:
            errors.append("rewards: give at least one reward term")
        if self.rollout.multi_turn is not None:
            from alignment.ppo.advantages import ADVANTAGE_ESTIMATORS

            errors += self.rollout.multi_turn.check("rollout.multi_turn")
            if ADVANTAGE_ESTIMATORS.get(self.algorithm.advantage) and ADVANTAGE_ESTIMATORS[self.algorithm.advantage].needs_critic:
                errors.append("algorithm.advantage: multi-turn rollouts train critic-free estimators only for now "
                              "(grpo, dr_grpo, rloo, reinforce++*): GAE would bootstrap values across the "
                              "environment's turns, which the critic never acts in")
            if self.algorithm.overlong.buffer is not None:
                errors.append("algorithm.overlong.buffer: measures one answer against max_new_tokens; a multi-turn "
                              "episode's length holds the environment's turns too (turn it off)")
            if self.rollout.multi_turn.max_tokens >= self.rollout.max_model_len:
                errors.append(f"rollout.multi_turn.max_tokens ({self.rollout.multi_turn.max_tokens}): must leave room for "
                              f"the prompt in rollout.max_model_len ({self.rollout.max_model_len})")
        if self.overoptimization.keep_best and self.eval is None:
            errors.append("overoptimization.keep_best: needs the eval section (the best policy is the best eval/gold)")
        return errors
