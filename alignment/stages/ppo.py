"""PPO stage: prompts -> rollouts (vLLM) -> rewards, reference log-probs, values -> advantages -> PPO epochs
-> weight sync -> metrics, checkpoints, evaluation.

Reads top to bottom: `run` sets everything up and loops over `ppo_step`. The math lives in
`alignment.ppo` (pure functions); DeepSpeed set-up in `alignment.training`; generation and weight sync in
`rollout`. Every rank trains on its own share of each step's prompts; rank 0 owns the rollout engine and
broadcasts the samples. Collectives (ZeRO-3 gathers, all-reduces) are always reached by every rank in the
same order: every data-dependent branch goes through `any_rank`.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from alignment import checkpoint as ckpt, console
from alignment import memory_plan
from alignment.config.ppo import PPORecipe
from alignment.config.schema import save_resolved
from alignment.data import load_stage_data
from alignment.distributed import (
    all_reduce_mean,
    all_reduce_sum,
    any_rank,
    barrier,
    broadcast_from_main,
    gather_across_ranks,
    sum_across_ranks,
)
from alignment.errors import UserError
from alignment.metrics import MetricsLogger, truncate_metrics
from alignment.models import (
    DTYPES,
    enable_gradient_checkpointing,
    load_causal_lm,
    load_tokenizer,
    load_value_model,
    lora_config,
    render_prompt,
)
from alignment.ppo import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    AdaptiveKLController,
    AdvantageParams,
    FixedKLController,
    RunningMoments,
    aggregate_loss,
    clip_scores,
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance,
    kl_loss_term,
    masked_mean,
    normalize_scores,
    penalize_truncated,
    token_mult_prob_error,
    truncated_is_weights,
)
from alignment.ppo.batch import RolloutBatch
from alignment.ppo.dynamic_sampling import (
    groups_to_train,
    keep_groups,
    overlong_penalty,
    refill_seed_offset,
    refill_size,
    uncut_weights,
)
from alignment.ppo.forward import TokenValueModel, critic_forward, critic_output_affine, policy_forward
from alignment.run_lock import claim_output_dir, unlock_output_dir
from alignment.stages.gold_watch import GoldWatch
from alignment.stages.rollout_schedule import RolloutSchedule
from alignment.stages.sync_check import SyncCheck
from alignment.training import (
    AccumulationWindow,
    ZeroSettings,
    device,
    finite,
    ignored_accelerate_settings,
    init_distributed,
    make_inference_model,
    make_train_engine,
    zero3_init,
)
from reward.composite import CompositeReward
from reward.functions import load_reward_function
from rollout import SamplingConfig
from rollout.multi_turn import episode_metrics, multi_turn_rollouts
from rollout.turn_tokens import end_of_turn_tokens
from rollout.weight_sync import named_tensors, sync_weights

CONSOLE_KEYS = ["ppo/reward", "ppo/gold", "eval/gold", "ppo/kl", "ppo/entropy", "ppo/clip_fraction", "ppo/value_loss",
                "ppo/logprob_mismatch", "time/step"]  # every metric goes to metrics.jsonl and the trackers


@dataclass
class LoopState:
    """Everything besides model/optimizer states that a resumed run needs to continue the same run."""

    step: int = 0
    data_epoch: int = 0
    data_offset: int = 0
    bad_steps: int = 0


def run(recipe: PPORecipe, engine=None) -> None:
    """Run PPO as the recipe says. `engine`: an already running rollout engine to use on rank 0 instead of
    the recipe's (tests share one vLLM engine this way); its weights are replaced by the policy's."""
    if engine is None and (errors := recipe.rollout.device_errors(cuda=torch.cuda.is_available())):
        raise UserError("; ".join(errors))
    init_distributed(timeout_s=recipe.rank0_alone_s())
    rank, world = dist.get_rank(), dist.get_world_size()
    zero = ZeroSettings.from_accelerate_env()
    dev = device()
    out = Path(recipe.output.dir)
    algo, sampling_cfg, train = recipe.algorithm, recipe.rollout.sampling, recipe.train
    estimator = ADVANTAGE_ESTIMATORS[algo.advantage]
    _seed_everything(train.seed + rank)

    # ---- sizes: every rank gets the same number of prompts, so ZeRO-3 collectives stay in lockstep
    if train.prompts_per_step % world:
        raise UserError(f"train.prompts_per_step ({train.prompts_per_step}) must be divisible by the number of processes ({world})")
    group = sampling_cfg.samples_per_prompt
    local_samples = train.prompts_per_step // world * group
    if local_samples % algo.minibatches:
        raise UserError(f"algorithm.minibatches ({algo.minibatches}) must divide the samples per process ({local_samples})")
    micro_per_minibatch = math.ceil(local_samples // algo.minibatches / algo.micro_batch_size)

    # ---- data
    tokenizer = load_tokenizer(recipe.policy)
    prompts = load_stage_data(recipe.prompts, "prompt", tokenizer).train
    # Servers we launch start now (the data is good): their start-up overlaps the loading of the training models.
    launched = _launch_servers(recipe) if rank == 0 and engine is None and recipe.rollout.launch_servers else None
    # Multi-turn: the tools (or environment) are loaded now, so a bad one stops the run before any model loads; their
    # schemas go into the prompts through the chat template.
    episodes = (multi_turn_rollouts(recipe.rollout.multi_turn, tokenizer,
                                    end_of_turn_tokens(recipe.policy.name_or_path, tokenizer), recipe.rollout.max_model_len)
                if recipe.rollout.multi_turn else None)
    prompt_ids = [episodes.prompt_ids(p) if episodes else render_prompt(tokenizer, p) for p in prompts["prompt"]]
    if episodes and (longest := max(len(ids) for ids in prompt_ids)) + episodes.limits.max_tokens > recipe.rollout.max_model_len:
        raise UserError(f"rollout.multi_turn.max_tokens ({episodes.limits.max_tokens}) after the longest prompt ({longest} "
                        f"tokens with the tool list) exceeds rollout.max_model_len ({recipe.rollout.max_model_len})")
    # Plain lists, read once: indexing a `datasets.Dataset` row by row decodes a row per access, every step.
    prompt_columns = prompts.to_dict()
    label_columns = [c for c in prompts.column_names if c != "prompt"]

    # ---- models: policy and critic train under DeepSpeed; reference and reward models only score
    def train_engine(model, lr):
        return make_train_engine(
            model, zero, lr, train.weight_decay, train.warmup_steps, algo.micro_batch_size, micro_per_minibatch, train.max_grad_norm
        )

    plan = None
    if rank == 0:
        for warning in ignored_accelerate_settings(recipe.policy.dtype):
            console.say(f"warning: the accelerate config's {warning}")
        if recipe.policy.lora is not None and recipe.policy.lora.dropout > 0:
            console.say(f"warning: policy.lora.dropout={recipe.policy.lora.dropout} is not applied: PPO trains with every "
                        "dropout off (the ratio to the old policy and the rollout engine's log-probs need a deterministic "
                        "policy)")
        plan = memory_plan.announce("ppo", recipe, prompt_tokens=max(len(ids) for ids in prompt_ids))
    with zero3_init(zero, DTYPES[recipe.policy.dtype]):  # models built sharded when the config asks (zero3_init_flag)
        policy_model = _policy_model(recipe, zero)
        value_model = (TokenValueModel(load_value_model(recipe.value), *critic_output_affine(recipe))
                       if estimator.needs_critic else None)
        reference_model = load_causal_lm(recipe.reference or recipe.policy)
        # The RM is sharded like the reference under ZeRO-3, in the policy's dtype unless its term says otherwise, and
        # scores micro-batches as the other models do (32 whole sequences at once took 6.8 GiB at 7B).
        reward = CompositeReward.from_recipe(recipe.rewards, dev, recipe.policy.dtype,
                                             place=lambda model: make_inference_model(model, zero),
                                             batch_size=algo.micro_batch_size, max_tokens=algo.micro_batch_tokens,
                                             packed=algo.packing)
    if train.gradient_checkpointing:
        enable_gradient_checkpointing(policy_model)
        if value_model is not None:
            enable_gradient_checkpointing(value_model.inner)
    policy = train_engine(policy_model, train.learning_rate)
    critic = train_engine(value_model, train.critic_learning_rate) if value_model is not None else None
    reference = make_inference_model(reference_model, zero)
    for name, scorer in reward.scorers.items():
        scorer.check_rendering(conversational=not isinstance(prompt_columns["prompt"][0], str))
        # a whole answer must fit the RM: it is never scored on a prefix
        if sampling_cfg.max_new_tokens > (room := scorer.answer_room()):  # multi-turn: it scores the last turn
            raise UserError(f"rewards.{name.split('_')[0]}: the reward model '{scorer.path}' reads at most {scorer.max_length} "
                            f"tokens, room for answers of {room} beside its template, so answers of "
                            f"rollout.sampling.max_new_tokens={sampling_cfg.max_new_tokens} could not be scored whole; lower "
                            "max_new_tokens or train the reward model with a larger train.max_length")
    gold = load_reward_function(recipe.gold_metric) if recipe.gold_metric else None
    kl_ctl = AdaptiveKLController(algo.kl.coef, algo.kl.target, algo.kl.horizon) if algo.kl.target is not None else FixedKLController(algo.kl.coef)
    kl_fn = KL_ESTIMATORS[algo.kl.estimator]
    running_reward = RunningMoments() if algo.reward_normalization == "running" else None
    gold_watch = GoldWatch(recipe.overoptimization, rank) if gold is not None else None
    temperature = sampling_cfg.temperature  # the trainer scores tokens at the temperature they were sampled at

    # ---- resume, rollout engine, outputs
    state = LoopState()
    # Models and data are good: from here on this run owns output.dir (a second run there stops now).
    claim_output_dir(out)
    console.keep_log_in(out)
    # Rank 0 decides: a rank that looked on its own disk could pick another checkpoint (or none) and hang the others.
    latest = broadcast_from_main(ckpt.latest_checkpoint(out / "checkpoints") if recipe.output.resume and rank == 0 else None)
    if latest is not None:
        state = _load_checkpoint(latest, policy, critic, kl_ctl, running_reward, gold_watch, rank)
    owns_engine = engine is None
    if rank == 0 and engine is None:
        engine = launched.wait_until_ready(recipe.rollout.timeout_s) if launched else _make_rollout_engine(recipe)
    # The engine may hold other weights (a resumed run, a shared engine): make it serve the policy's.
    sync_weights(engine, policy, version=state.step)
    sync_check = SyncCheck(prompt_ids, recipe.rollout.sync_check_tolerance_for(recipe.policy.dtype),
                           recipe.rollout.sync_check_max_bad, seed=train.seed, packed=algo.packing)
    sync_check(engine, policy, tokenizer.pad_token_id, dev, state.step, rank)
    if rank == 0:
        save_resolved(recipe, out, "ppo")
        ckpt.clean_partial(out / "checkpoints")
        truncate_metrics(out / "metrics.jsonl", state.step)
        console.say(f"ppo: {len(prompts)} prompts, {world} process(es), ZeRO stage {zero.stage}, advantage {algo.advantage}"
                    + (f", resumed at step {state.step} from {latest}" if latest else ""))
        if recipe.rollout.async_generation and algo.kl.placement == "reward" and algo.kl.coef > 0:
            console.say("warning: with rollout.async_generation the KL leash in the reward acts one step late (advantages come "
                        "from the previous policy's samples); algorithm.kl.placement: loss is steadier (recipes/tiny/ppo_async.yaml)")
    logger = MetricsLogger(out, console_every=recipe.output.logging_steps, console_keys=CONSOLE_KEYS,
                           console_namespace="ppo/", report_to=recipe.output.report_to, resumed=latest is not None)
    progress = console.progress(train.steps, "ppo", initial=state.step, disable=rank != 0)
    last_metrics: dict[str, float] = {}
    stopped_at = None  # the step at which overoptimization.on_detect: stop ended training
    warned_trim = False
    skipped_without_signal = 0  # steps skipped for want of anything to learn from (dynamic sampling, overlong filter)
    def draw(rows: list[int], sampling: SamplingConfig) -> list:
        """The samples of these prompt rows (rank 0): one completion each, or multi-turn trajectories."""
        if episodes is None:
            return engine.generate([prompt_ids[r] for r in rows], sampling)
        return episodes.generate(engine, [prompt_ids[r] for r in rows],
                                 [{c: prompt_columns[c][r] for c in label_columns} for r in rows], sampling)

    rollouts = RolloutSchedule(draw, sampling_cfg, ahead=recipe.rollout.async_generation) if rank == 0 else None

    while state.step < train.steps:
        step = state.step
        timings: dict[str, float] = {}
        t0 = time.perf_counter()

        # ---- 1. rollouts: rank 0 generates for all ranks, each rank keeps its own prompts' samples.
        # Async mode: rank 0 then starts the next step's generation, which runs while this step scores and trains.
        step_metrics: dict[str, float] = {}  # the DAPO options' metrics (none while they are off)
        if algo.dynamic_sampling.enabled:
            # Dynamic sampling: the keep/drop decision needs the rewards of every candidate group, but rewards are
            # scored by every rank (reward models are sharded like the reference under ZeRO-3, so scoring is a
            # collective, and each rank scores an equal share). So: rank 0 generates a round of candidates, all ranks
            # get all of them (the broadcast the loop makes anyway), each scores its equal slice, and the raw rewards
            # (and reward terms) are all-gathered. Every rank then holds the same rewards bit for bit and takes the
            # same decision without another message; the kept groups are dealt out to the ranks with their rewards
            # (never scored twice). Refill rounds take the next prompts of the same stream (`state`), so a resumed run
            # draws the same prompts.
            drawn = _draw_groups_with_signal(step, state, rank, world, rollouts, reward, recipe, prompt_ids,
                                             prompt_columns, label_columns)
            generate_seconds = drawn.generate_seconds
            if not drawn.finite:  # before anything learns from it (the running statistics included)
                _skip_step(state, progress, train.max_bad_steps, rank, "NaN/inf rewards")
                continue
            if drawn.groups < train.prompts_per_step and rank == 0:
                console.say(f"warning: step {step}: dynamic sampling found {drawn.groups_with_signal} of "
                            f"{train.prompts_per_step} groups with varied rewards in "
                            f"{algo.dynamic_sampling.max_rounds} extra round(s) (algorithm.dynamic_sampling.max_rounds); "
                            + (f"training on {drawn.groups}" if drawn.groups else "the step is skipped"))
            if drawn.groups == 0:  # fewer groups with signal than processes: nothing every rank could train on alike
                skipped_without_signal += 1
                _skip_step_without_signal(state, progress, rank, skipped_without_signal)
                continue
            if rank == 0 and recipe.rollout.sleep:  # as below: the GPU is the trainer's until the sync
                engine.sleep()
            step_metrics.update(drawn.metrics)
            step_metrics["dynamic/skipped_steps"] = float(skipped_without_signal)  # in this run, so far
            per_rank = drawn.groups // world
            local = slice(rank * per_rank * group, (rank + 1) * per_rank * group)
            local_samples, local_rows = drawn.samples[local], drawn.rows[local]
            step_metrics.update(episode_metrics(drawn.samples))  # from all samples: the same on every rank
        else:
            rows = _next_prompt_rows(state, len(prompts), train.prompts_per_step, train.seed)
            samples, generate_seconds = None, 0.0
            if rank == 0:
                step_rollouts = rollouts.get(step, rows)
                samples, generate_seconds = step_rollouts.samples, step_rollouts.generate_seconds
                if recipe.rollout.sleep:  # the GPU is the trainer's until the sync (the engine's weights are dropped)
                    engine.sleep()
                if step + 1 < train.steps:  # peek at the next rows; `state` moves on when that step takes them
                    rollouts.prefetch(step + 1, _next_prompt_rows(replace(state), len(prompts), train.prompts_per_step, train.seed))
            samples = broadcast_from_main(samples)
            per_rank = train.prompts_per_step // world
            local = slice(rank * per_rank * group, (rank + 1) * per_rank * group)
            local_samples = samples[local]
            local_rows = [rows[s.prompt_index] for s in local_samples]
            step_metrics.update(episode_metrics(samples))  # from all samples: the same on every rank
        batch = RolloutBatch.from_samples(local_samples, local_rows)
        timings["generate"] = time.perf_counter() - t0  # with dynamic sampling, the candidates' rewards included

        # ---- 2. scoring: rewards (with dynamic sampling, those of the draw), log-probs before the update, reference
        # log-probs, values
        t1 = time.perf_counter()
        texts = [s.text for s in local_samples]
        columns = _reward_columns(local_samples, local_rows, prompt_columns, label_columns)
        local_prompts = [prompt_columns["prompt"][r] for r in local_rows]
        if algo.dynamic_sampling.enabled:
            raw, parts = drawn.raw[local], {k: v[local] for k, v in drawn.parts.items()}
            trimmed, scored = drawn.trimmed, drawn.scored
        else:
            raw, parts = reward(local_prompts, texts, columns)
            if any_rank(not finite(raw)):  # before anything learns from it (the running statistics included)
                _skip_step(state, progress, train.max_bad_steps, rank, "NaN/inf rewards")
                continue
            trimmed, scored = reward.trimmed, len(texts)
        if any(trimmed.values()) and not warned_trim:
            warned_trim = True
            console.say(f"warning: rank {rank}, step {step}: {sum(trimmed.values())} rollout(s) exceed the reward model's "
                        "max_length; their prompts were trimmed from the left so the whole answer is scored (share per step: "
                        "reward/*_prompt_trimmed)")
        if algo.overlong.filter and all_reduce_sum(float(uncut_weights(batch.finish_reasons).sum())) == 0:
            # Every answer of the step was cut: overlong filtering leaves no loss weight at all (token_mean would divide
            # by zero tokens). No update, so a sleeping engine needs its weights back before the next generation.
            if recipe.rollout.sleep:
                if rank == 0:
                    engine.wake_up(["weights"])
                sync_weights(engine, policy, version=step + 1)
                if rank == 0:
                    engine.wake_up(["kv_cache"])
            skipped_without_signal += 1
            _skip_step_without_signal(state, progress, rank, skipped_without_signal, "every answer was cut at "
                                      "max_new_tokens and algorithm.overlong.filter leaves them no loss weight")
            continue
        if running_reward is not None:
            running_reward.update(gather_across_ranks(raw))  # the same statistics on every rank
        # DAPO's soft overlong punishment, next to the truncation penalty (see shape_scores)
        length_penalty = _overlong_penalty_of(batch.completion_ids, algo, sampling_cfg.max_new_tokens)
        if length_penalty is not None:
            step_metrics["ppo/overlong_penalty"] = float(length_penalty.mean())
        batch.scores = scores = shape_scores(raw, batch.finish_reasons, algo, running_reward, length_penalty)
        train_actor = critic is None or step >= algo.critic_warmup_steps
        # Exactly on-policy and nothing needs them before the update: the log-probs of the policy before it are those
        # of its one training forward, which provides them (no scoring forward of the policy).
        old_logp_from_training = train_actor and old_logprobs_come_from_training(recipe)
        _score_tokens(batch, policy, reference, critic, tokenizer.pad_token_id, dev, temperature, algo,
                      with_policy=not old_logp_from_training)
        mask = batch.mask
        # The per-token KL of the reward (zero when the policy's log-probs come from training: KL is in the loss then)
        kl_tokens = kl_fn(batch.old_logp, batch.ref_logp) * mask if not old_logp_from_training else torch.zeros_like(mask)
        timings["score"] = time.perf_counter() - t1

        # ---- 3. advantages (KL in the reward: subtracted per token; in the loss: added to the policy loss)
        kl_in_reward = kl_ctl.coef if algo.kl.placement == "reward" else 0.0
        params = AdvantageParams(gamma=algo.gamma, lam=algo.lam, kl_coef=kl_in_reward, group_size=group,
                                 sum_across_ranks=sum_across_ranks if world > 1 else None)
        batch.advantages, batch.returns = estimator.compute(batch.scores, kl_tokens, mask, batch.values, params)
        healthy = finite(batch.scores, batch.advantages, batch.ref_logp, *([] if old_logp_from_training else [batch.old_logp]))
        if any_rank(not healthy):
            _skip_step(state, progress, train.max_bad_steps, rank, "NaN/inf in scores, log-probs or advantages")
            continue
        if algo.overlong.filter:
            # DAPO's overlong filtering: answers cut at max_new_tokens get no loss weight. Their rows of the loss mask
            # are zeroed now, after scoring and advantages: they still counted in their group's baseline (their reward
            # is real, if unfinished) and in the metrics below (which read `mask`, the unfiltered mask). In training,
            # the zeroed rows drop out of every term that reads batch.mask: the policy loss, KL in the loss (no leash
            # on a sample that teaches nothing), the entropy bonus and, with a critic, the value loss (an unfinished
            # answer's score is no return of its states). The normaliser: token_mean counts the kept tokens only;
            # seq_mean_* still count the cut sequences (zero loss), as the window's sequence count is fixed per rank.
            uncut = uncut_weights(batch.finish_reasons)
            step_metrics["ppo/overlong_filtered"] = float(1.0 - uncut.mean())
            batch.mask = batch.mask * uncut[:, None]

        # ---- 4. PPO epochs over minibatches (one optimizer step each), micro-batched
        t2 = time.perf_counter()
        train_stats = _train_on_batch(batch, policy, critic, recipe, kl_ctl.coef, kl_fn, tokenizer.pad_token_id, dev,
                                      temperature, train_actor=train_actor, generator_seed=train.seed * 7919 + step,
                                      old_logp_from_training=old_logp_from_training)
        if old_logp_from_training:
            kl_tokens = kl_fn(batch.old_logp, batch.ref_logp) * mask  # for the metrics
        bad_micro_batches = train_stats.pop("bad_micro_batches")
        if bad_micro_batches > 0:
            _count_bad_step(state, train.max_bad_steps, rank,
                            f"NaN/inf losses in {bad_micro_batches:.0f} micro-batch(es), which added no gradient; "
                            f"{train_stats['ppo/skipped_optimizer_steps']:.0f} optimizer step(s) had nothing left and were skipped")
        else:
            state.bad_steps = 0
        timings["train"] = time.perf_counter() - t2

        # ---- 5. weight sync: every rank takes part in the ZeRO-3 gather, rank 0 sends (after a prefetch ends)
        if rank == 0:
            timings["generate_wait"] = rollouts.wait()
            if recipe.rollout.sleep:
                # PyTorch's cache still holds the training peak, which vLLM's own allocator cannot use: hand it back
                # first. Only the weights wake for the sync; the KV cache after it, when the training state has room.
                torch.cuda.empty_cache()
                engine.wake_up(["weights"])
        t3 = time.perf_counter()
        sync_stats = sync_weights(engine, policy, version=step + 1)
        timings["sync"] = time.perf_counter() - t3
        if rank == 0 and recipe.rollout.sleep:
            engine.wake_up(["kv_cache"])
        probe_error = sync_check(engine, policy, tokenizer.pad_token_id, dev, step + 1, rank)

        # ---- 6. metrics, KL controller, checkpoint, evaluation
        seq_kl = float(kl_tokens.sum(1).mean())
        metrics = {
            "ppo/reward": float(raw.mean()),
            "ppo/score": float(scores.mean()),
            **{f"reward/{k}": float(v.mean()) for k, v in parts.items()},
            **{f"reward/{k}_prompt_trimmed": n / scored for k, n in trimmed.items()},
            "ppo/kl": seq_kl,
            "ppo/kl_coef": kl_ctl.coef,
            "ppo/entropy": float(masked_mean(batch.entropy, mask)),
            "ppo/response_length": float(mask.sum(1).mean()),
            "ppo/truncation_rate": sum(r == "length" for r in batch.finish_reasons) / len(batch),
            "ppo/logprob_mismatch": token_mult_prob_error(batch.sampler_logp, batch.old_logp, mask),
            "sync/probe_mult_prob_error": probe_error,
            "rollout/staleness": float(step - batch.weight_version),
            "memory/peak_gib": memory_plan.peak_bytes() / memory_plan.GiB,
            **train_stats,
            **step_metrics,
        }
        if gold is not None:
            metrics["ppo/gold"] = float(np.mean(gold(prompts=local_prompts, completions=texts, **columns)))
        if critic is not None:
            metrics["ppo/explained_variance"] = explained_variance(batch.values, batch.returns, mask)
        metrics = all_reduce_mean(metrics)
        kl_ctl.update(metrics["ppo/kl"], train.prompts_per_step * group)
        timings["step"] = time.perf_counter() - t0
        metrics.update({f"time/{k}": v for k, v in timings.items()})
        if rank == 0:
            metrics["rollout/generate_seconds"] = generate_seconds
        tokens = all_reduce_sum(float(mask.sum()))
        metrics["perf/tokens_per_s"] = tokens / timings["step"]
        if sync_stats is not None:
            metrics.update({"sync/seconds": sync_stats.seconds, "sync/bytes": float(sync_stats.bytes),
                            "sync/tensors": float(sync_stats.tensors)})

        state.step += 1
        evaluate = recipe.eval is not None and (state.step % recipe.eval_every == 0 or state.step == train.steps)
        if evaluate:
            metrics.update(_evaluate(recipe, engine, tokenizer, episodes) if rank == 0 else {})
        stop = gold_watch.after_step(state.step, metrics) if gold_watch is not None else False
        if stop:
            stopped_at = state.step
        logger.log(state.step, metrics)
        last_metrics = metrics
        progress.update(1)
        if evaluate and recipe.overoptimization.keep_best and gold_watch.new_best(state.step, metrics):
            _publish_policy(policy, tokenizer, out / "best", rank)
        if stop or state.step % recipe.output.save_steps == 0 or state.step == train.steps:
            _save_checkpoint(out / "checkpoints", state, policy, critic, kl_ctl, running_reward, gold_watch, tokenizer,
                             rank, recipe.output.save_total_limit)
        if stop:
            break

    progress.close()
    if rollouts is not None:
        rollouts.close()
    _publish_policy(policy, tokenizer, out / "final", rank)
    if rank == 0:
        summary = {"steps": state.step, "final_metrics": last_metrics,
                   "memory_gib": {"planned_per_rank": plan.per_rank / memory_plan.GiB if plan else None,
                                  "peak_rank0": memory_plan.peak_bytes() / memory_plan.GiB}}
        if stopped_at is not None:
            summary["stopped_at_step"] = {"step": stopped_at, "reason": "overoptimization (reward up, gold down)"}
        if gold_watch is not None and gold_watch.best_step is not None:
            summary["best"] = {"step": gold_watch.best_step, "eval/gold": gold_watch.best_gold, "dir": str(out / "best")}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        _print_summary(summary, out)
    barrier()
    logger.close()
    unlock_output_dir(out)
    if rank == 0 and owns_engine:
        engine.close()


def _print_summary(summary: dict, out: Path) -> None:
    last = summary["final_metrics"]
    shown = {"reward": "ppo/reward", "gold": "ppo/gold", "eval gold": "eval/gold", "KL": "ppo/kl"}
    lines = [f"PPO done: {summary['steps']} steps; policy written to {out / 'final'}",
             "  last step: " + ", ".join(f"{name} {last[key]:.4g}" for name, key in shown.items() if key in last)]
    if "stopped_at_step" in summary:
        lines.append(f"  stopped at step {summary['stopped_at_step']['step']}: {summary['stopped_at_step']['reason']}")
    if "best" in summary:
        lines.append(f"  best eval gold {summary['best']['eval/gold']:.4f} at step {summary['best']['step']}, kept in "
                     f"{summary['best']['dir']}")
    console.say(*lines)


def _policy_model(recipe: PPORecipe, zero: ZeroSettings) -> torch.nn.Module:
    """The policy to train: all weights, or LoRA adapters on frozen base weights (merged in for each weight sync)."""
    if recipe.policy.lora is not None and zero.stage == 3:
        raise UserError("policy.lora: LoRA policies need ZeRO stage 0-2 (weight sync merges the adapters into whole "
                        "weights on each rank); launch with a stage-2 config such as recipes/accelerate/cpu_zero2.yaml")
    model = load_causal_lm(recipe.policy)
    if recipe.policy.lora is None:
        return model
    from peft import get_peft_model

    return get_peft_model(model, lora_config(recipe.policy.lora, "CAUSAL_LM"))


def _skip_step(state: LoopState, progress, max_bad_steps: int, rank: int, what: str) -> None:
    """Leave this step out (no update, no sync): count it as bad and move on to the next."""
    _count_bad_step(state, max_bad_steps, rank, f"{what}; step skipped")
    state.step += 1
    progress.update(1)


def _count_bad_step(state: LoopState, max_bad_steps: int, rank: int, what: str) -> None:
    """Warn about a step with NaN/inf values; stop the run once `max_bad_steps` such steps come in a row."""
    state.bad_steps += 1
    if rank == 0:
        console.say(f"warning: step {state.step}: {what} ({state.bad_steps} in a row)")
    if state.bad_steps >= max_bad_steps:
        raise UserError(f"stopping: {state.bad_steps} consecutive steps had NaN/inf rewards or losses (see metrics.jsonl)")


def _skip_step_without_signal(state: LoopState, progress, rank: int, skipped: int,
                              what: str = "dynamic sampling kept fewer groups with varied rewards than processes") -> None:
    """Leave out a step that has nothing to learn from (not a bad step: nothing was NaN): no update, no sync."""
    if rank == 0:
        console.say(f"warning: step {state.step}: {what}; step skipped ({skipped} in this run; metric "
                    "dynamic/skipped_steps)")
    state.step += 1
    progress.update(1)


# --------------------------------------------------------------------------------------------- dynamic sampling


@dataclass
class _DrawnGroups:
    """What dynamic sampling drew for one step: the groups to train on (the same on every rank), with their rewards."""

    samples: list  # rollout.Sample of the groups to train on, group after group
    rows: list[int]  # the prompt row of each of those samples
    raw: torch.Tensor  # [n] their raw rewards
    parts: dict[str, torch.Tensor]  # their reward terms, [n] each
    groups: int  # groups to train on (0: none)
    groups_with_signal: int  # groups with varied scores found (those beyond `groups` are left unused)
    trimmed: dict[str, int]  # this rank's candidates whose prompt a reward model trimmed, per term
    scored: int  # candidates this rank scored
    generate_seconds: float
    metrics: dict[str, float]
    finite: bool  # false: some reward was NaN/inf (the draw stopped there)


def _draw_groups_with_signal(step: int, state: LoopState, rank: int, world: int, rollouts: RolloutSchedule | None,
                             reward, recipe: PPORecipe, prompt_ids: list[list[int]], prompt_columns: dict,
                             label_columns: list[str]) -> _DrawnGroups:
    """DAPO's dynamic sampling for step `step`: round 0 generates the step's prompts as the plain loop does (same rows,
    same seeds); while fewer than prompts_per_step groups have varied scores, up to `max_rounds` extra rounds draw
    more prompts from the stream. Every rank takes part in every round (the reward scoring and the gather are
    collectives) and returns the same draw. See the comment at the call for the cross-rank design."""
    algo, train, sampling = recipe.algorithm, recipe.train, recipe.rollout.sampling
    group, target, max_rounds = sampling.samples_per_prompt, train.prompts_per_step, algo.dynamic_sampling.max_rounds
    kept_samples: list = []
    kept_rows: list[int] = []
    kept_raw: list[torch.Tensor] = []
    kept_parts: dict[str, list[torch.Tensor]] = {}
    trimmed: dict[str, int] = {}
    generated = kept = scored = 0
    all_raw: list[torch.Tensor] = []
    generate_seconds = 0.0
    finite_rewards = True
    extra_rounds = 0
    for round_ in range(max_rounds + 1):
        if round_ == 0:
            rows = _next_prompt_rows(state, len(prompt_ids), target, train.seed)
        else:
            extra_rounds = round_
            rows = _next_prompt_rows(state, len(prompt_ids), refill_size(target - kept, kept, generated, target, world),
                                     train.seed)
        samples = None
        if rank == 0:
            if round_ == 0:  # the step's own rows and seeds, exactly as without dynamic sampling
                step_rollouts = rollouts.get(step, rows)
                samples, seconds = step_rollouts.samples, step_rollouts.generate_seconds
            else:
                start = time.perf_counter()
                offset = refill_seed_offset(step, round_, train.steps, max_rounds, target, group)
                samples = rollouts.draw(rows, sampling.to_config(seed_offset=offset))
                seconds = time.perf_counter() - start
            generate_seconds += seconds
        samples = broadcast_from_main(samples)
        sample_rows = [rows[s.prompt_index] for s in samples]
        # This rank scores its equal slice of the candidates; the gather gives every rank all their rewards.
        per_rank = len(rows) // world * group
        local = slice(rank * per_rank, (rank + 1) * per_rank)
        local_rows = sample_rows[local]
        raw, parts = reward([prompt_columns["prompt"][r] for r in local_rows], [s.text for s in samples[local]],
                            _reward_columns(samples[local], local_rows, prompt_columns, label_columns))
        for name, n in reward.trimmed.items():
            trimmed[name] = trimmed.get(name, 0) + n
        scored += per_rank
        raw = gather_across_ranks(raw)
        parts = {name: gather_across_ranks(values) for name, values in parts.items()}
        generated += len(rows)
        all_raw.append(raw)
        if not finite(raw):  # the same on every rank: the rewards are the gathered ones
            finite_rewards = False
            break
        # The scores the advantage compares, up to the running normalisation (an affine map, the same for the whole
        # step, which neither makes equal scores differ nor different ones equal): the raw reward with the length
        # penalties. The reward clip is left out (it can only make more groups equal).
        finish_reasons = [s.finish_reason for s in samples]
        scores = _with_length_terms(raw.clone(), finish_reasons, algo,
                                    _overlong_penalty_of([s.completion_ids for s in samples], algo, sampling.max_new_tokens))
        trainable = uncut_weights(finish_reasons).bool().view(-1, group) if algo.overlong.filter else None
        keep = keep_groups(scores.view(-1, group), trainable)
        for g in keep.nonzero().flatten().tolist():
            members = slice(g * group, (g + 1) * group)
            kept_samples += samples[members]
            kept_rows += sample_rows[members]
            kept_raw.append(raw[members])
            for name, values in parts.items():
                kept_parts.setdefault(name, []).append(values[members])
        kept += int(keep.sum())
        if kept >= target:
            break
    n_train = groups_to_train(kept, target, world) if finite_rewards else 0
    n = n_train * group
    candidates = torch.cat(all_raw)
    metrics = {
        "dynamic/kept_groups": float(n_train),
        "dynamic/dropped_groups": float(generated - kept),  # no signal: all scores equal (or, filtered, all cut)
        "dynamic/unused_groups": float(kept - n_train),  # with signal, beyond the step's batch
        "dynamic/extra_rounds": float(extra_rounds),
        "dynamic/generated_samples": float(generated * group),
        "dynamic/candidate_reward": float(candidates.mean()),  # the policy's reward, before the filter picks
    }
    return _DrawnGroups(
        samples=kept_samples[:n], rows=kept_rows[:n],
        raw=torch.cat(kept_raw)[:n] if kept_raw else torch.zeros(0),
        parts={name: torch.cat(values)[:n] for name, values in kept_parts.items()},
        groups=n_train, groups_with_signal=kept, trimmed=trimmed, scored=scored, generate_seconds=generate_seconds,
        metrics=metrics, finite=finite_rewards)


# --------------------------------------------------------------------------------------------- scoring


def _reward_columns(samples: list, rows: list[int], prompt_columns: dict, label_columns: list[str]) -> dict[str, list]:
    """The columns reward functions get beside prompts and completions: the prompt rows' labels, and for multi-turn
    trajectories `env_reward` (the environment's reward, None where it gave none)."""
    columns = {c: [prompt_columns[c][r] for r in rows] for c in label_columns}
    if samples and samples[0].episode is not None:
        columns["env_reward"] = [s.episode["env_reward"] for s in samples]
    return columns


def shape_scores(raw: torch.Tensor, finish_reasons: list[str], algo, running_reward: RunningMoments | None,
                 length_penalty: torch.Tensor | None = None) -> torch.Tensor:
    """From the reward's raw scores [B] to the scores PPO optimises: standardised by the running moments (when on),
    minus the truncation penalty for answers cut at max_new_tokens, plus `length_penalty` [B] (<= 0: DAPO's soft
    overlong punishment, algorithm.overlong.buffer), then clipped. Both length terms are in score units after the
    normalisation, and both apply to a cut answer; the clip bounds their sum with the reward."""
    scores = raw.clone()
    if running_reward is not None:
        scores = normalize_scores(scores, running_reward.mean, running_reward.std)
    scores = _with_length_terms(scores, finish_reasons, algo, length_penalty)
    if algo.reward_clip is not None:
        scores = clip_scores(scores, algo.reward_clip)
    return scores


def _with_length_terms(scores: torch.Tensor, finish_reasons: list[str], algo,
                       length_penalty: torch.Tensor | None) -> torch.Tensor:
    """`scores` minus the truncation penalty of answers cut at max_new_tokens, plus `length_penalty` (if any)."""
    if algo.truncation_penalty is not None:
        scores = penalize_truncated(scores, finish_reasons, algo.truncation_penalty)
    if length_penalty is not None:
        scores = scores + length_penalty.to(scores.dtype)
    return scores


def _overlong_penalty_of(completion_ids: list[list[int]], algo, max_new_tokens: int) -> torch.Tensor | None:
    """DAPO's soft overlong punishment [B] of these answers; None when algorithm.overlong.buffer is unset."""
    if algo.overlong.buffer is None:
        return None
    return overlong_penalty(torch.tensor([len(ids) for ids in completion_ids]), max_new_tokens, algo.overlong.buffer,
                            algo.overlong.penalty_factor)


def old_logprobs_come_from_training(recipe: PPORecipe) -> bool:
    """Whether the policy's log-probs before the update can come from its training forward: one epoch of one
    minibatch on samples of the current weights (synchronous generation) is exactly on-policy, and nothing reads them
    before training when KL sits in the loss (or has no weight)."""
    algo = recipe.algorithm
    kl_in_reward = algo.kl.placement == "reward" and (algo.kl.coef > 0 or algo.kl.target is not None)
    return algo.epochs == 1 and algo.minibatches == 1 and not recipe.rollout.async_generation and not kl_in_reward


@torch.no_grad()
def _score_tokens(batch, policy, reference, critic, pad_id, dev, temperature, algo, with_policy: bool = True) -> None:
    """Fill old_logp (policy before the update) and the policy's entropy (unless `with_policy` is False: training
    fills them), ref_logp and values, micro-batched."""
    B, T = batch.mask.shape
    batch.old_logp, batch.ref_logp, entropy = torch.zeros(B, T), torch.zeros(B, T), torch.zeros(B, T)
    batch.values = torch.zeros(B, T) if critic is not None else None
    for idx in batch.distributed_micro_batches(torch.arange(B), algo.micro_batch_size, algo.micro_batch_tokens,
                                               algo.packing):
        inputs = batch.model_inputs(idx, pad_id, dev, algo.packing)
        n = inputs.completion_len
        if with_policy:
            logp, ent = policy_forward(policy, inputs, temperature, with_entropy=True)
            batch.old_logp[idx, :n], entropy[idx, :n] = logp.cpu(), ent.cpu()
        batch.ref_logp[idx, :n] = policy_forward(reference, inputs, temperature)[0].cpu()
        if critic is not None:
            batch.values[idx, :n] = critic_forward(critic, inputs).cpu()
    batch.entropy = entropy
    if batch.values is not None:
        batch.values *= batch.mask


# --------------------------------------------------------------------------------------------- training


def _train_on_batch(batch, policy, critic, recipe, kl_coef, kl_fn, pad_id, dev, temperature, train_actor, generator_seed,
                    old_logp_from_training: bool = False) -> dict:
    """PPO epochs: each epoch shuffles this rank's samples into `minibatches` optimizer steps.

    Losses are reduced over the whole accumulation window (all micro-batches of a minibatch, on all
    ranks), so `engine.backward(loss, scale_wrt_gas=False)` sums exactly to the window's loss.
    `old_logp_from_training` (one epoch, one minibatch: see `old_logprobs_come_from_training`): the policy's forward
    gives the log-probs before the update (ratio 1, the on-policy gradient) and fills `batch.old_logp` and
    `batch.entropy` with them.
    """
    algo = recipe.algorithm
    world = dist.get_world_size()
    gen = torch.Generator().manual_seed(generator_seed)
    stats: dict[str, list[tuple[float, float]]] = {}
    bad_micro_batches = skipped_steps = 0
    is_weights = (
        truncated_is_weights(batch.old_logp, batch.sampler_logp, algo.tis_cap)
        if algo.tis_cap is not None and not old_logp_from_training else None
    )
    for _ in range(algo.epochs):
        for minibatch in torch.randperm(len(batch), generator=gen).chunk(algo.minibatches):
            window_tokens = all_reduce_sum(float(batch.mask[minibatch].sum())) / world
            window_seqs = all_reduce_sum(float(len(minibatch))) / world
            # One optimizer step per model per minibatch; a window whose micro-batches were all NaN/inf takes none.
            actor_window = AccumulationWindow(policy) if train_actor else None
            critic_window = AccumulationWindow(critic) if critic is not None else None
            for idx in batch.distributed_micro_batches(minibatch, algo.micro_batch_size, algo.micro_batch_tokens,
                                                       algo.packing):
                inputs = batch.model_inputs(idx, pad_id, dev, algo.packing)
                n = inputs.completion_len
                mask = batch.mask[idx, :n].to(dev)

                def window_loss(per_token):
                    return aggregate_loss(per_token, mask, algo.loss_aggregation, window_tokens, window_seqs)

                if actor_window is not None:
                    logp, entropy = policy_forward(policy, inputs, temperature,
                                                   with_entropy=algo.entropy_coef > 0 or old_logp_from_training)
                    if old_logp_from_training:
                        old_logp = logp.detach()
                        batch.old_logp[idx, :n], batch.entropy[idx, :n] = old_logp.cpu(), entropy.detach().cpu()
                        weights = (truncated_is_weights(old_logp, batch.sampler_logp[idx, :n].to(dev), algo.tis_cap)
                                   if algo.tis_cap is not None else None)
                    else:
                        old_logp = batch.old_logp[idx, :n].to(dev)
                        weights = is_weights[idx, :n].to(dev) if is_weights is not None else None
                    out = clipped_policy_loss(
                        logp, old_logp, batch.advantages[idx, :n].to(dev), mask,
                        algo.clip_low, algo.clip_high, algo.dual_clip, weights,
                    )
                    per_token = out.loss_per_token
                    if algo.kl.placement == "loss":
                        per_token = per_token + kl_loss_term(logp, batch.ref_logp[idx, :n].to(dev), mask, kl_fn, kl_coef, weights)
                    if algo.entropy_coef > 0:
                        per_token = per_token - algo.entropy_coef * entropy * mask
                    actor_window.backward(window_loss(per_token))
                    _append(stats, {"ppo/policy_loss": float(masked_mean(out.loss_per_token.detach(), mask)),
                                    "ppo/clip_fraction": float(out.clip_fraction), "ppo/approx_kl": float(out.approx_kl)},
                            tokens=float(mask.sum()))
                if critic_window is not None:
                    values = critic_forward(critic, inputs)
                    v_per_token, v_clipfrac = clipped_value_loss(
                        values, batch.values[idx, :n].to(dev), batch.returns[idx, :n].to(dev), mask, algo.value_clip
                    )
                    critic_window.backward(algo.vf_coef * window_loss(v_per_token))
                    _append(stats, {"ppo/value_loss": float(masked_mean(v_per_token.detach(), mask)),
                                    "ppo/value_clip_fraction": float(v_clipfrac)}, tokens=float(mask.sum()))
            for window in (w for w in (actor_window, critic_window) if w is not None):
                bad_micro_batches += window.skipped
                skipped_steps += not window.step()
    result = {k: sum(v * w for v, w in pairs) / max(sum(w for _, w in pairs), 1.0) for k, pairs in stats.items()}
    result["ppo/skipped_optimizer_steps"] = float(skipped_steps)
    result["bad_micro_batches"] = float(bad_micro_batches)
    return result


def _append(stats: dict[str, list[tuple[float, float]]], values: dict[str, float], tokens: float) -> None:
    """Record per-token means of one micro-batch with its token count: the step's figure is their token-weighted
    mean, the same whatever the micro-batching."""
    for k, v in values.items():
        stats.setdefault(k, []).append((v, tokens))


# --------------------------------------------------------------------------------------------- plumbing


def _next_prompt_rows(state: LoopState, n_rows: int, count: int, seed: int) -> list[int]:
    """The next `count` prompt rows of a per-epoch permutation; (epoch, offset) in `state` makes resume exact."""
    rows: list[int] = []
    while len(rows) < count:
        order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed + state.data_epoch)).tolist()
        take = order[state.data_offset : state.data_offset + count - len(rows)]
        rows.extend(take)
        state.data_offset += len(take)
        if state.data_offset >= n_rows:
            state.data_epoch, state.data_offset = state.data_epoch + 1, 0
    return rows


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _make_rollout_engine(recipe: PPORecipe):
    from rollout import make_engine

    r = recipe.rollout
    policy_path, dtype = recipe.policy.name_or_path, r.engine_dtype(recipe.policy.dtype)
    if r.engine == "vllm":
        return make_engine("vllm", model=policy_path, dtype=dtype, max_model_len=r.max_model_len, seed=recipe.train.seed,
                           weight_transport=r.weight_sync, transfer_timeout_s=r.timeout_s,
                           gpu_memory_utilization=r.gpu_memory_utilization, enable_sleep_mode=r.sleep,
                           trust_remote_code=recipe.policy.trust_remote_code)
    if r.engine == "hf":
        return make_engine("hf", model=policy_path, dtype=dtype, seed=recipe.train.seed)
    return make_engine("remote", urls=r.servers, timeout=r.timeout_s, wait_ready=r.timeout_s, weight_sync=r.weight_sync,
                       master_address=r.trainer_address, tokenizer=policy_path)


def _launch_servers(recipe: PPORecipe):
    """Start the recipe's rollout servers without waiting for them (`wait_until_ready` does). Their logs go to a
    directory of their own: output.dir is not this run's until it holds its lock."""
    import tempfile

    from rollout.launch import launch_servers

    r = recipe.rollout
    log_dir = tempfile.mkdtemp(prefix="alignment-rollout-servers-")
    console.say(f"ppo: starting {r.launch_servers} rollout server(s), logs in {log_dir}")
    return launch_servers(recipe.policy.name_or_path, r.launch_servers, r.server_devices,
                          dtype=r.engine_dtype(recipe.policy.dtype),
                          max_model_len=r.max_model_len, seed=recipe.train.seed, timeout_s=r.timeout_s,
                          ready_timeout_s=None, log_dir=log_dir, weight_sync=r.weight_sync)


def _evaluate(recipe: PPORecipe, engine, tokenizer, episodes) -> dict[str, float]:
    """Answers to held-out prompts from the rollout engine (greedy by default), scored by the rule; with multi-turn
    rollouts, whole episodes, scored on their last turn (and `env_reward`)."""
    from alignment.evaluation.gold import load_prompts, score

    section = recipe.eval
    prompts, columns = load_prompts(section)
    n = section.samples_per_prompt
    sampling = SamplingConfig(n=n, temperature=section.temperature, max_new_tokens=section.max_new_tokens, seed=recipe.train.seed)
    if episodes is None:
        samples = engine.generate([render_prompt(tokenizer, p) for p in prompts], sampling)
    else:
        rows = [{k: v[i] for k, v in columns.items()} for i in range(len(prompts))]
        samples = episodes.generate(engine, [episodes.prompt_ids(p) for p in prompts], rows, sampling)
    repeat = lambda values: [v for v in values for _ in range(n)]  # noqa: E731 (samples come n per prompt, prompt-major)
    columns = {k: repeat(v) for k, v in columns.items()}
    if episodes is not None:
        columns["env_reward"] = [s.episode["env_reward"] for s in samples]
    scores = score(section.reward_function, repeat(prompts), [s.text.strip() for s in samples], columns)
    return {"eval/gold": float(np.mean(scores))}


def _save_checkpoint(root: Path, state: LoopState, policy, critic, kl_ctl, running_reward, gold_watch, tokenizer,
                     rank: int, keep_last: int) -> None:
    """Every rank writes its DeepSpeed shards into a staging directory; rank 0 publishes it by rename.

    Besides the DeepSpeed states needed to resume, `policy_hf/` holds the policy in HF format, so the
    evaluation harness (and vLLM) can load any checkpoint of the run as is.
    """
    staging = root / f".tmp-checkpoint-{state.step}"
    if rank == 0:
        ckpt.clean_partial(root)
        staging.mkdir(parents=True)
    barrier()
    _write_hf_policy(policy, tokenizer, staging / "policy_hf", rank)
    policy.save_checkpoint(str(staging / "policy"), tag="ds")
    if critic is not None:
        critic.save_checkpoint(str(staging / "critic"), tag="ds")
    torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}, staging / f"rng-rank{rank}.pt")
    if rank == 0:
        saved = {"loop": asdict(state), "kl_controller": kl_ctl.state_dict(),
                 "running_reward": running_reward.state_dict() if running_reward is not None else None,
                 "gold_watch": gold_watch.state_dict() if gold_watch is not None else None}
        (staging / "loop_state.json").write_text(json.dumps(saved))
    barrier()
    if rank == 0:
        ckpt.publish(staging, root / f"checkpoint-{state.step}")
        ckpt.prune(root, keep_last)
    barrier()


def _load_checkpoint(path: Path, policy, critic, kl_ctl, running_reward, gold_watch, rank: int) -> LoopState:
    policy.load_checkpoint(str(path / "policy"), tag="ds")
    if critic is not None:
        critic.load_checkpoint(str(path / "critic"), tag="ds")
    saved = json.loads((path / "loop_state.json").read_text())
    kl_ctl.load_state_dict(saved["kl_controller"])
    if running_reward is not None and saved.get("running_reward"):
        running_reward.load_state_dict(saved["running_reward"])
    if gold_watch is not None and saved.get("gold_watch"):
        gold_watch.load_state_dict(saved["gold_watch"])
    rng = torch.load(path / f"rng-rank{rank}.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    return LoopState(**saved["loop"])


def _write_hf_policy(policy, tokenizer, target: Path, rank: int) -> None:
    """Full policy weights in HF format (safetensors) that vLLM loads as is; under ZeRO-3 every rank takes
    part in the gathers and rank 0 writes."""
    # Streamed to host memory one gathered module at a time (the whole model never sits on rank 0's GPU). LoRA:
    # merged into the base weights, under the base model's names.
    state_dict = dict(named_tensors(policy, device="cpu"))
    if rank == 0:
        model = policy.module
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.save_pretrained(target, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(target)


def _publish_policy(policy, tokenizer, target: Path, rank: int) -> None:
    """The policy in HF format at `target` (`final`, `best`), written beside it and published by rename (every rank
    takes part in the gathers)."""
    staging = target.with_name(f".tmp-{target.name}")
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
    _write_hf_policy(policy, tokenizer, staging, rank)
    if rank == 0:
        ckpt.publish(staging, target)
    barrier()
