"""PPO stage end to end on the tiny default: the gold metric rises, runs resume, rewards compose, errors are clear.

Runs in this process share the session's vLLM engine (`vllm_engine`); the stage syncs the policy into it.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from alignment.config.ppo import ADVANTAGE_CHOICES, PPORecipe
from alignment.config.schema import load_recipe
from alignment.errors import RecipeError, UserError
from conftest import read_metrics, stage_env, tiny_ppo_overrides

REPO = Path(__file__).resolve().parents[1]
TINY_PPO = REPO / "recipes" / "tiny" / "ppo.yaml"


def tiny_recipe(tiny_paths, sft, rm, out: Path, *overrides: str) -> PPORecipe:
    """The shipped tiny PPO recipe, pointed at this run's SFT and RM checkpoints (fixtures) and data."""
    return load_recipe(TINY_PPO, PPORecipe, [*tiny_ppo_overrides(tiny_paths, sft, rm, out), *overrides])


def test_schema_advantage_choices_match_registry():
    from typing import get_args

    from alignment.ppo import ADVANTAGE_ESTIMATORS

    assert set(get_args(ADVANTAGE_CHOICES)) == set(ADVANTAGE_ESTIMATORS)


def assert_gold_rises(metrics: list[dict], sft_gold: float, label: str) -> None:
    final_gold = metrics[-1]["eval/gold"]
    print(f"{label}: SFT gold {sft_gold:.3f} -> PPO gold {final_gold:.3f}; final KL {metrics[-1]['ppo/kl']:.3f}")
    # 128 held-out prompts x 4 samples: the standard error of the mean gold is ~0.02, so +0.10 is a clear gain.
    assert final_gold > sft_gold + 0.10, (sft_gold, final_gold)
    assert all(m["ppo/kl"] < 10.0 for m in metrics), "KL to the reference must stay bounded"
    # On-policy steps: the sampler's log-probs are the trainer's (fp32) after every sync. (Async steps' samples are
    # one update old, so there the metric also measures that update.)
    on_policy = [m["ppo/logprob_mismatch"] for m in metrics if m["rollout/staleness"] == 0]
    assert on_policy and all(x < 1.02 for x in on_policy), "vLLM and trainer log-probs must agree after every sync"


@pytest.mark.e2e
def test_gae_ppo_raises_gold_over_sft(tiny_sft, tiny_ppo):
    """recipes/tiny/ppo.yaml (GAE with a critic initialised from the RM, learned RM reward) beats SFT on the rule."""
    assert_gold_rises(tiny_ppo.metrics, tiny_sft.summary["gold_after"], "gae")
    assert not any(m["ppo/overoptimization"] for m in tiny_ppo.metrics)  # reward and gold rise together: no warning
    # The exported policy and every checkpoint's policy are plain HF checkpoints.
    assert (tiny_ppo.final / "model.safetensors").is_file() and (tiny_ppo.final / "tokenizer.json").is_file()
    assert (tiny_ppo.dir / "checkpoints" / "checkpoint-20" / "policy_hf" / "model.safetensors").is_file()


@pytest.mark.e2e
def test_grpo_raises_gold_over_sft(tiny_paths, tiny_sft, tiny_rm, vllm_engine, tmp_path):
    """recipes/tiny/ppo_grpo.yaml (critic-free, KL in the loss) beats SFT on the rule too."""
    from alignment.stages.ppo import run

    out = tmp_path / "grpo"
    recipe = load_recipe(TINY_PPO.parent / "ppo_grpo.yaml", PPORecipe, tiny_ppo_overrides(tiny_paths, tiny_sft, tiny_rm, out, critic=False))
    run(recipe, engine=vllm_engine)
    assert_gold_rises(read_metrics(out), tiny_sft.summary["gold_after"], "grpo")


@pytest.mark.e2e
def test_async_generation_is_one_step_stale_and_raises_gold(tiny_paths, tiny_sft, tiny_rm, vllm_engine, tmp_path):
    """recipes/tiny/ppo_async.yaml: each step trains on samples the previous policy generated while the step before
    trained (the version tags say so, and the log-probs differ by one update), and the gold metric still rises."""
    from alignment.stages.ppo import run

    out = tmp_path / "async"
    recipe = load_recipe(TINY_PPO.parent / "ppo_async.yaml", PPORecipe, tiny_ppo_overrides(tiny_paths, tiny_sft, tiny_rm, out))
    assert recipe.rollout.async_generation
    run(recipe, engine=vllm_engine)
    metrics = read_metrics(out)
    assert [m["rollout/staleness"] for m in metrics] == [0.0] + [1.0] * (len(metrics) - 1)
    assert all(m["rollout/generate_seconds"] > 0 for m in metrics)
    # once the actor moves (after 2 critic warm-up steps), samples differ from the policy by one real update
    assert all(m["ppo/logprob_mismatch"] > 1.02 for m in metrics[3:]), [m["ppo/logprob_mismatch"] for m in metrics]
    assert_gold_rises(metrics, tiny_sft.summary["gold_after"], "gae, async generation")


def test_async_generation_needs_the_importance_sampling_correction(tiny_paths, tiny_sft, tiny_rm, tmp_path):
    with pytest.raises(RecipeError, match="algorithm.tis_cap: required when rollout.async_generation"):
        load_recipe(TINY_PPO, PPORecipe, tiny_ppo_overrides(tiny_paths, tiny_sft, tiny_rm, tmp_path)
                    + ["rollout.async_generation=true", "algorithm.tis_cap=null"])


@pytest.mark.parametrize("advantage", ["dr_grpo", "rloo", "reinforce++", "reinforce++_baseline"])
def test_other_estimators_run_and_move_the_policy(advantage, tiny_paths, tiny_sft, tiny_rm, vllm_engine, tmp_path):
    """The critic-free estimators share the loop: two steps each, the policy moves, vLLM stays in sync."""
    from alignment.stages.ppo import run

    out = tmp_path / advantage
    recipe = load_recipe(TINY_PPO.parent / "ppo_grpo.yaml", PPORecipe,
                         [*tiny_ppo_overrides(tiny_paths, tiny_sft, tiny_rm, out, critic=False),
                          f"algorithm.advantage={advantage}", "train.steps=2", "eval=null",
                          f"train.gradient_checkpointing={advantage == 'rloo'}"])  # the stage runs with checkpointing too
    run(recipe, engine=vllm_engine)
    metrics = read_metrics(out)
    assert metrics[-1]["ppo/kl"] > 0 and all(m["ppo/logprob_mismatch"] < 1.02 for m in metrics)
    assert all(m["sync/probe_mult_prob_error"] < 1.001 for m in metrics)  # fp32 engine and trainer: the same weights


def test_importance_weights_compare_the_trainers_logprobs_with_the_samplers(tiny_paths, tiny_sft, tiny_rm, vllm_engine,
                                                                          tmp_path, monkeypatch):
    """TIS weights min(pi_old / pi_sampler, cap) get, in the stage, the trainer's log-probs before the update (from
    scoring) as pi_old and vLLM's sampled log-probs as pi_sampler. Async mode makes the two differ by one update."""
    import torch

    import alignment.stages.ppo as stage

    steps: list[dict] = []
    latest: dict = {}  # the samples of the last batch built (the step's, then the sync check's probe)
    from_samples, score_tokens, tis = stage.RolloutBatch.from_samples, stage._score_tokens, stage.truncated_is_weights

    def spy_from_samples(samples, rows):
        latest["samples"] = samples
        return from_samples(samples, rows)

    def spy_score_tokens(batch, *args, **kwargs):  # right after the step's batch is built
        score_tokens(batch, *args, **kwargs)
        steps.append({"samples": latest["samples"], "trainer_logp": batch.old_logp.clone()})

    def spy_tis(old_logp, sampler_logp, cap):
        steps[-1]["tis_inputs"] = (old_logp.clone(), sampler_logp.clone())
        return tis(old_logp, sampler_logp, cap)

    monkeypatch.setattr(stage.RolloutBatch, "from_samples", staticmethod(spy_from_samples))
    monkeypatch.setattr(stage, "_score_tokens", spy_score_tokens)
    monkeypatch.setattr(stage, "truncated_is_weights", spy_tis)
    out = tmp_path / "tis"
    stage.run(load_recipe(TINY_PPO.parent / "ppo_async.yaml", PPORecipe,
                          [*tiny_ppo_overrides(tiny_paths, tiny_sft, tiny_rm, out), "train.steps=3", "eval=null",
                           "algorithm.critic_warmup_steps=0"]), engine=vllm_engine)
    assert len(steps) == 3
    for k, step in enumerate(steps):
        old_logp, sampler_logp = step["tis_inputs"]
        samples = step["samples"]
        vllm_logp = torch.zeros_like(sampler_logp)
        for i, s in enumerate(samples):
            vllm_logp[i, : len(s.logprobs)] = torch.tensor(s.logprobs)
        assert torch.equal(old_logp, step["trainer_logp"])
        assert torch.equal(sampler_logp, vllm_logp)
        if k > 0:  # sampled by the weights before the last update
            assert (old_logp - sampler_logp).abs().max() > 0.01


def test_sync_check_stops_a_run_whose_engine_misses_the_trainers_weights(tiny_paths, tiny_sft, tiny_rm, vllm_engine,
                                                                         tmp_path, monkeypatch):
    """Break the weight sync on purpose (one tensor arrives wrong): the probe after each sync sees it, warns, and the
    run stops with a clear error after `rollout.sync_check_max_bad` bad syncs in a row."""
    import rollout.weight_sync as weight_sync
    from alignment.stages.ppo import run

    named_tensors = weight_sync.named_tensors

    def one_tensor_wrong(model, dtype=None):
        for name, tensor in named_tensors(model, dtype):
            yield name, (tensor * 1.5 if name == "model.norm.weight" else tensor)

    monkeypatch.setattr(weight_sync, "named_tensors", one_tensor_wrong)
    out = tmp_path / "broken_sync"
    recipe = tiny_recipe(tiny_paths, tiny_sft, tiny_rm, out, "algorithm.advantage=grpo", "train.steps=4", "eval=null",
                         "rollout.sync_check_max_bad=2")
    with pytest.raises(UserError, match=r"2 consecutive weight syncs left the rollout engine sampling from other weights"):
        run(recipe, engine=vllm_engine)
    metrics = read_metrics(out)  # the initial sync was the first bad one, step 1's the second
    assert len(metrics) == 0


def test_truncated_sampling_is_refused_for_ppo():
    for override, key in (("rollout.sampling.top_p=0.9", "top_p"), ("rollout.sampling.top_k=20", "top_k")):
        with pytest.raises(RecipeError, match=rf"rollout.sampling.{key}: PPO rollouts need .* full softmax"):
            load_recipe(TINY_PPO, PPORecipe, [override], check_paths=False)


def test_greedy_rollouts_are_refused_for_ppo():
    """Temperature 0 makes every answer to a prompt the same: group advantages are all zero and nothing is learned."""
    with pytest.raises(RecipeError, match=r"rollout.sampling.temperature: PPO needs sampled answers.*advantages are all zero"):
        load_recipe(TINY_PPO, PPORecipe, ["rollout.sampling.temperature=0"], check_paths=False)


def test_answers_longer_than_the_reward_model_reads_are_refused_at_start(tiny_paths, tiny_sft, tiny_rm, tmp_path):
    from alignment.stages.ppo import run

    out = tmp_path / "too_long"
    recipe = tiny_recipe(tiny_paths, tiny_sft, tiny_rm, out, "rollout.engine=hf", "rollout.sampling.max_new_tokens=60",
                         "train.steps=1", "eval=null")
    with pytest.raises(UserError, match=r"rewards.0: the reward model .* reads at most 64 tokens.*max_new_tokens=60"):
        run(recipe)


def _write_reward_file(path: Path) -> Path:
    path.write_text(
        "def count_great(prompts, completions, **columns):\n"
        "    return [float(c.split().count('great')) for c in completions]\n"
    )
    return path


class _RewardHandler(BaseHTTPRequestHandler):
    calls = 0
    fail_first = 0

    def do_POST(self):  # noqa: N802 (http.server's naming)
        type(self).calls += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if type(self).calls <= type(self).fail_first:
            self.send_response(503)
            self.end_headers()
            return
        payload = json.dumps({"rewards": [float(len(c.split())) for c in body["completions"]]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def reward_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _RewardHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def test_rule_file_and_http_rewards_compose(tiny_paths, tiny_sft, tiny_rm, vllm_engine, tmp_path, reward_server):
    from alignment.stages.ppo import run

    _RewardHandler.calls, _RewardHandler.fail_first = 0, 1  # one transient failure, then answers: retried
    reward_file = _write_reward_file(tmp_path / "my_reward.py")
    url = f"http://127.0.0.1:{reward_server.server_address[1]}/reward"
    out = tmp_path / "composite"
    recipe = tiny_recipe(
        tiny_paths, tiny_sft, tiny_rm, out, "algorithm.advantage=grpo", "train.steps=2", "eval=null",
        f"rewards=[{{kind: function, function: '{reward_file}:count_great', weight: 1.0}}, {{kind: http, url: '{url}', weight: 0.5, retries: 3}}]",
    )
    run(recipe, engine=vllm_engine)
    metrics = read_metrics(out)
    assert len(metrics) == 2 and _RewardHandler.calls == 3  # 1 failed + 2 steps
    for m in metrics:
        # total = 1.0 * count_great + 0.5 * words (GRPO needs no critic, the reward is the composite)
        assert m["ppo/reward"] == pytest.approx(m["reward/0_function"] + 0.5 * m["reward/1_http"], rel=1e-5)
        assert m["reward/1_http"] > 0


def test_failing_reward_endpoint_gives_clear_error_after_retries():
    from reward.remote import RemoteReward

    reward = RemoteReward("http://127.0.0.1:9/none", timeout_s=0.5, retries=3, backoff_s=0.01)
    started = time.perf_counter()
    with pytest.raises(UserError, match=r"failed 3 times"):
        reward(prompts=["p"], completions=["c"])
    assert time.perf_counter() - started < 10


def test_nan_rewards_skip_steps_then_stop(tiny_paths, tiny_sft, tiny_rm, vllm_engine, tmp_path):
    from alignment.stages.ppo import run

    nan_file = tmp_path / "nan_reward.py"
    nan_file.write_text("def nan(prompts, completions, **kw):\n    return [float('nan')] * len(completions)\n")
    out = tmp_path / "nan"
    recipe = tiny_recipe(
        tiny_paths, tiny_sft, tiny_rm, out, "algorithm.advantage=grpo", "train.steps=5", "train.max_bad_steps=2", "eval=null",
        f"rewards=[{{kind: function, function: '{nan_file}:nan'}}]",
    )
    with pytest.raises(UserError, match="stopping: 2 consecutive steps had NaN"):  # train.max_bad_steps
        run(recipe, engine=vllm_engine)
    assert not (out / "final").exists()


def _launch(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """`alignment <args>` with its output in `log` (a pipe nobody reads while the test waits could fill and block it)."""
    return subprocess.Popen([sys.executable, "-m", "alignment", *args], cwd=REPO, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.e2e
def test_resume_after_kill_matches_uninterrupted_run(tiny_paths, tiny_sft, tiny_rm, tmp_path):
    """kill -9 after a checkpoint, run the same command again: it resumes and its metrics match a run never killed."""
    env = stage_env(PYTHONUNBUFFERED="1")
    common = ["ppo", str(TINY_PPO), "rollout.engine=hf", "train.steps=6", "output.save_steps=2", "eval=null",
              "train.prompts_per_step=8", "algorithm.micro_batch_size=16"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = lambda out: [*common, *tiny_ppo_overrides(tiny_paths, tiny_sft, tiny_rm, out)]  # noqa: E731

    assert _launch(args(straight), env, tmp_path / "straight.log").wait(timeout=600) == 0

    proc = _launch(args(resumed), env, tmp_path / "killed.log")
    deadline = time.time() + 600
    while not (resumed / "checkpoints" / "checkpoint-4").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its checkpoint at step 4"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    rerun = _launch(args(resumed), env, tmp_path / "rerun.log")
    rerun.wait(timeout=600)
    output = (tmp_path / "rerun.log").read_text()
    assert rerun.returncode == 0, output[-3000:]
    assert "resumed at step 4" in output

    expected = {m["step"]: m for m in read_metrics(straight)}
    got = {m["step"]: m for m in read_metrics(resumed)}  # steps 5 and 6 come from the resumed process
    for step in (5, 6):
        for key in ("ppo/reward", "ppo/kl", "ppo/policy_loss", "ppo/value_loss", "ppo/response_length"):
            assert got[step][key] == pytest.approx(expected[step][key], rel=1e-3, abs=1e-4), (step, key)


@pytest.mark.e2e
def test_zero3_two_processes_with_rollout_server(tiny_paths, tiny_sft, tiny_rm, tmp_path):
    """2 training processes under DeepSpeed ZeRO-3 + a rollout server in its own process, synced every step over gloo
    (vLLM's weight-transfer API: rank 0 streams the layers the ranks gather together). No ALIGNMENT_ROLLOUT_SECRET
    is set: the run makes one that it and its server share."""
    from conftest import run_stage
    from transformers import AutoModelForCausalLM

    out = tmp_path / "zero3"
    env = stage_env()
    del env["ALIGNMENT_ROLLOUT_SECRET"]
    run_stage(
        "ppo", TINY_PPO,
        [*tiny_ppo_overrides(tiny_paths, tiny_sft, tiny_rm, out), "rollout.engine=remote", "rollout.launch_servers=1",
         "rollout.weight_sync=gloo", "train.steps=4", "output.save_steps=2", "eval=null"],  # steps 1-2 warm up the critic, 3-4 move the actor
        accelerate_config=REPO / "recipes" / "accelerate" / "cpu_zero3.yaml", timeout=900, env=env,
    )
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(m["ppo/logprob_mismatch"] < 1.02 for m in metrics), [m["ppo/logprob_mismatch"] for m in metrics]
    assert all(m["sync/bytes"] > 0 for m in metrics)
    assert metrics[-1]["ppo/kl"] > 0, "the policy must have moved away from the reference"
    # Full (gathered) weights, in HF format, in the checkpoint and the final export.
    for model_dir in (out / "checkpoints" / "checkpoint-2" / "policy_hf", out / "final"):
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        assert sum(p.numel() for p in model.parameters()) == 351_616


def test_lora_policy_syncs_merged_weights_and_exports_plain_hf(tiny_paths, tiny_sft, tiny_rm, vllm_engine, tmp_path):
    """A LoRA policy: vLLM serves base + merged adapters (its log-probs match the trainer's LoRA model after an
    update), and the export is a plain HF checkpoint with the adapters merged in."""
    import torch
    from transformers import AutoModelForCausalLM

    from alignment.stages.ppo import run

    out = tmp_path / "lora"
    recipe = tiny_recipe(tiny_paths, tiny_sft, tiny_rm, out, "algorithm.advantage=grpo", "train.steps=2", "eval=null",
                         "policy.lora.r=8", "policy.lora.alpha=16")
    run(recipe, engine=vllm_engine)
    metrics = read_metrics(out)
    # k1 is exactly 0 while the policy is the reference (LoRA's B starts at 0); an estimate, it may go below 0 after
    assert abs(metrics[-1]["ppo/kl"]) > 1e-6, "the adapters must have changed the policy"
    assert all(m["ppo/logprob_mismatch"] < 1.02 for m in metrics), [m["ppo/logprob_mismatch"] for m in metrics]
    assert not (out / "final" / "adapter_config.json").exists()
    exported = AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
    sft = AutoModelForCausalLM.from_pretrained(tiny_sft.final).state_dict()
    assert exported.keys() == sft.keys()
    changed = [k for k in sft if not torch.equal(exported[k], sft[k])]
    assert changed and all(k.endswith("proj.weight") for k in changed), changed  # only the adapted linear layers moved


def test_running_reward_normalization(tiny_paths, tiny_sft, tiny_rm, vllm_engine, tmp_path):
    """reward_normalization: running standardises the total reward with its running moments (saved for resume)."""
    from alignment.stages.ppo import run

    out = tmp_path / "running"
    recipe = load_recipe(TINY_PPO.parent / "ppo_grpo.yaml", PPORecipe,
                         [*tiny_ppo_overrides(tiny_paths, tiny_sft, tiny_rm, out, critic=False), "train.steps=2",
                          "eval=null", "algorithm.reward_normalization=running", "output.save_steps=2"])
    run(recipe, engine=vllm_engine)
    first = read_metrics(out)[0]
    assert first["ppo/reward"] != pytest.approx(0.0, abs=1e-3)
    assert first["ppo/score"] == pytest.approx(0.0, abs=1e-5)  # step 1 is standardised by its own moments
    saved = json.loads((out / "checkpoints" / "checkpoint-2" / "loop_state.json").read_text())["running_reward"]
    assert saved["count"] == 2 * 32 * 4  # every sample of both steps


def _train_phase_record(monkeypatch, stage) -> list[dict]:
    """Spy on the PPO stage's training phase: per call of `_train_on_batch`, the policy's and critic's module modes,
    the forwards of each decoder layer's MLP (module hooks do not see a checkpointed layer's recompute, a patched
    forward does), the micro-batches each model trained on, and every gradient right before each optimizer step."""
    from transformers.models.llama import modeling_llama

    import alignment.training as training

    records: list[dict] = []
    mlp_forward = modeling_llama.LlamaMLP.forward

    def counting_mlp(self, x):
        if records and records[-1]["open"]:
            records[-1]["mlp_calls"][id(self)] = records[-1]["mlp_calls"].get(id(self), 0) + 1
        return mlp_forward(self, x)

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            if records and records[-1]["open"]:
                records[-1][name] += 1
            return fn(*args, **kwargs)
        return wrapper

    train_on_batch, window_step = stage._train_on_batch, training.AccumulationWindow.step

    def spy_train(batch, policy, critic, *args, **kwargs):
        models = {"policy": policy.module, "critic": critic.module}
        records.append({"open": True, "mlp_calls": {}, "policy_forward": 0, "critic_forward": 0, "grads": [],
                        "not_training": [f"{role}:{n}" for role, m in models.items() for n, mod in m.named_modules()
                                         if not mod.training],
                        "mlps": {role: [id(mod) for mod in m.modules() if isinstance(mod, modeling_llama.LlamaMLP)]
                                 for role, m in models.items()}})
        try:
            return train_on_batch(batch, policy, critic, *args, **kwargs)
        finally:
            records[-1]["open"] = False

    def spy_step(window):
        records[-1]["grads"].append({n: p.grad.clone() for n, p in window.engine.module.named_parameters()
                                     if p.grad is not None})
        return window_step(window)

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", counting_mlp)
    monkeypatch.setattr(stage, "policy_forward", counting("policy_forward", stage.policy_forward))
    monkeypatch.setattr(stage, "critic_forward", counting("critic_forward", stage.critic_forward))
    monkeypatch.setattr(stage, "_train_on_batch", spy_train)
    monkeypatch.setattr(training.AccumulationWindow, "step", spy_step)
    return records


def test_gradient_checkpointing_recomputes_every_layer_in_the_stage(tiny_paths, tiny_sft, tiny_rm, vllm_engine,
                                                                    tmp_path, monkeypatch):
    """train.gradient_checkpointing through the real stage: policy and critic train with every submodule in training
    mode (the only mode in which transformers recomputes), each decoder layer runs its forward twice per training
    micro-batch (once without), and losses and gradients are those of the run without checkpointing."""
    import torch

    import alignment.stages.ppo as stage

    runs = {}
    for checkpointing in (False, True):
        records = _train_phase_record(monkeypatch, stage)
        out = tmp_path / f"checkpointing-{checkpointing}"
        stage.run(tiny_recipe(tiny_paths, tiny_sft, tiny_rm, out, "train.steps=1", "eval=null",
                              "algorithm.critic_warmup_steps=0", "algorithm.epochs=1", "algorithm.micro_batch_size=32",
                              f"train.gradient_checkpointing={checkpointing}"), engine=vllm_engine)
        monkeypatch.undo()
        (record,) = records
        assert record["not_training"] == [], record["not_training"][:5]
        assert record["policy_forward"] > 1 and record["critic_forward"] > 1  # several micro-batches each
        runs[checkpointing] = record, read_metrics(out)[0]
    for checkpointing, (record, _) in runs.items():
        for role in ("policy", "critic"):
            calls = [record["mlp_calls"].get(mlp, 0) for mlp in record["mlps"][role]]
            assert calls == [(2 if checkpointing else 1) * record[f"{role}_forward"]] * len(calls), (role, calls)
    (plain, plain_metrics), (recomputed, recomputed_metrics) = runs[False], runs[True]
    for key in ("ppo/policy_loss", "ppo/value_loss", "ppo/clip_fraction"):
        assert recomputed_metrics[key] == pytest.approx(plain_metrics[key], rel=1e-6, abs=1e-9), key
    assert len(plain["grads"]) == len(recomputed["grads"]) == 4  # 2 minibatches x (policy, critic)
    for plain_grads, recomputed_grads in zip(plain["grads"], recomputed["grads"]):
        assert plain_grads.keys() == recomputed_grads.keys() and len(plain_grads) > 10
        for name in plain_grads:
            torch.testing.assert_close(recomputed_grads[name], plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def _children(pid: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@pytest.mark.e2e
def test_ranks_die_with_a_killed_launcher_and_the_rerun_resumes(tiny_paths, tiny_sft, tiny_rm, tmp_path):
    """SIGKILL of `accelerate launch` (and its process group) of a 2-rank ZeRO-3 run: the ranks, which torch's agent
    starts in sessions of their own, are gone seconds later, and the command run again (fewer steps, so the test
    ends soon) resumes on its first try."""
    import psutil

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "recipes/accelerate/cpu_zero3.yaml"),
           "-m", "alignment", "ppo", str(TINY_PPO), *tiny_ppo_overrides(tiny_paths, tiny_sft, tiny_rm, out), "rollout.engine=hf",
           "output.save_steps=2", "eval=null", "algorithm.critic_warmup_steps=1"]
    env = stage_env(PYTHONUNBUFFERED="1")
    # 40 steps: far more than the seconds below allow, so ranks that outlive the launcher are still there
    launcher = subprocess.Popen([*cmd, "train.steps=40"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while not (out / "checkpoints" / "checkpoint-2").exists():
        assert launcher.poll() is None and time.time() < deadline, "run ended before its checkpoint at step 2"
        time.sleep(0.2)
    ranks = [p for p in _children(launcher.pid) if "alignment" in " ".join(psutil.Process(p).cmdline())]
    assert len(ranks) == 2, ranks
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()
    def alive() -> list[int]:
        return [p for p in ranks if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]

    gone_by = time.time() + 15
    while alive() and time.time() < gone_by:
        time.sleep(0.2)
    survivors = alive()
    for pid in survivors:  # never leave them running past the test
        os.kill(pid, signal.SIGKILL)
    assert not survivors, "ranks outlived the launcher"

    rerun = subprocess.run([*cmd, "train.steps=4"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "resumed at step" in rerun.stdout
    assert [m["step"] for m in read_metrics(out)][-1] == 4


class SleepRecorder:
    """A colocated engine stand-in around the HF engine that records the PPO loop's calls and refuses any work while
    asleep (a sleeping vLLM engine has no weights or KV cache on the GPU)."""

    def __init__(self, inner):
        self.inner, self.calls, self.asleep = inner, [], set()

    @property
    def weight_version(self):
        return self.inner.weight_version

    def _record(self, call: str) -> None:
        # vLLM generates only when wholly awake; a sync needs the weights' memory mapped back
        needs = {"generate": {"weights", "kv_cache"}, "update": {"weights"}}.get(call, set())
        assert not (needs & self.asleep), f"{call} while {self.asleep} sleep (calls so far: {self.calls})"
        self.calls.append(call)

    def generate(self, prompts, sampling):
        self._record("generate")
        return self.inner.generate(prompts, sampling)

    def update_weights(self, weights, version):
        self._record("update")
        return self.inner.update_weights(weights, version)

    def sleep(self):
        self._record("sleep")
        self.asleep = {"weights", "kv_cache"}

    def wake_up(self, tags=None):
        self._record(f"wake {' '.join(tags) if tags else 'all'}")
        self.asleep -= set(tags or self.asleep)

    def close(self):
        pass


def test_a_sleeping_engine_is_woken_for_every_sync_and_generation(tiny_paths, tiny_sft, tiny_rm, tmp_path, monkeypatch):
    """rollout.sleep: the real PPO loop puts the colocated engine to sleep once its rollouts are in; after training it
    empties PyTorch's cache (else the training peak stays reserved where vLLM's allocator cannot use it), wakes the
    weights alone for the sync, then the KV cache; the sync check's probe and the next generation find it awake."""
    import torch

    from alignment.stages.ppo import run
    from rollout.hf_engine import HFEngine

    engine = SleepRecorder(HFEngine(str(tiny_sft.final)))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: engine.calls.append("empty_cache"))
    run(tiny_recipe(tiny_paths, tiny_sft, tiny_rm, tmp_path / "run", "rollout.sleep=true", "train.steps=2", "eval=null",
                    "train.prompts_per_step=4"), engine=engine)
    start = ["update", "generate"]  # the first sync, then its probe
    # rollouts, sleep through training, free the cache, weights, sync, KV cache, probe
    step = ["generate", "sleep", "empty_cache", "wake weights", "update", "wake kv_cache", "generate"]
    assert engine.calls == start + step + step


def test_vllm_engine_sleeps_at_level_2_and_wakes_by_tags():
    """Level 2 drops the weights (every sync rewrites them) instead of copying them to host memory and back each step;
    the tags reach vLLM's wake_up as given."""
    from rollout.vllm_engine import VLLMEngine

    class RecordingLLM:
        def __init__(self):
            self.calls = []

        def sleep(self, level=1):
            self.calls.append(("sleep", level))

        def wake_up(self, tags=None):
            self.calls.append(("wake_up", tags))

    engine = object.__new__(VLLMEngine)  # the engine's methods around a recording vllm.LLM
    engine.llm = RecordingLLM()
    engine.sleep()
    engine.wake_up(["weights"])
    engine.wake_up(["kv_cache"])
    assert engine.llm.calls == [("sleep", 2), ("wake_up", ["weights"]), ("wake_up", ["kv_cache"])]


def test_sleep_needs_a_colocated_synchronous_engine(tiny_paths, tiny_sft, tiny_rm, tmp_path):
    with pytest.raises(RecipeError, match="rollout.sleep: cannot be combined with rollout.async_generation"):
        tiny_recipe(tiny_paths, tiny_sft, tiny_rm, tmp_path, "rollout.sleep=true", "rollout.async_generation=true")
    with pytest.raises(RecipeError, match="rollout.sleep: only a colocated engine"):
        tiny_recipe(tiny_paths, tiny_sft, tiny_rm, tmp_path, "rollout.sleep=true", "rollout.engine=hf")


@pytest.mark.parametrize("settings, message", [
    (["rollout.engine=hf", "rollout.weight_sync=gloo"], "gloo cannot reach the hf engine"),
    (["rollout.engine=remote", "rollout.servers=[http://h:1]", "rollout.weight_sync=ipc"], "ipc .* reaches only an engine on"),
    (["rollout.weight_sync=nccl"], "nccl cannot connect the trainer to an engine on its own GPU"),
])
def test_weight_sync_must_reach_the_engine(tiny_paths, tiny_sft, tiny_rm, tmp_path, settings, message):
    with pytest.raises(RecipeError, match=f"rollout.weight_sync: {message}"):
        tiny_recipe(tiny_paths, tiny_sft, tiny_rm, tmp_path, *settings)


@pytest.mark.parametrize("settings, message", [
    (["rollout.weight_sync=ipc"], "rollout.weight_sync: ipc needs GPUs"),
    (["rollout.engine=remote", "rollout.servers=[http://h:1]", "rollout.weight_sync=nccl"], "rollout.weight_sync: nccl needs GPUs"),
    (["rollout.sleep=true"], "rollout.sleep: needs the engine on a GPU"),
])
def test_gpu_only_rollout_settings_stop_a_cpu_run_before_anything_loads(tiny_paths, tiny_sft, tiny_rm, tmp_path,
                                                                        settings, message):
    from alignment.errors import UserError
    from alignment.stages.ppo import run

    with pytest.raises(UserError, match=message):
        run(tiny_recipe(tiny_paths, tiny_sft, tiny_rm, tmp_path / "run", *settings))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("where, settings, expected", [
    # rollout.dtype unset: the engine runs the policy's dtype, never a float32 default that would double its memory
    ("rollout.launch.launch_servers", ["rollout.engine=remote", "rollout.launch_servers=1", "policy.dtype=bfloat16"],
     {"dtype": "bfloat16"}),
    ("rollout.launch.launch_servers", ["rollout.engine=remote", "rollout.launch_servers=1", "policy.dtype=bfloat16",
                                       "rollout.dtype=float32", "rollout.server_devices=['3']", "rollout.max_model_len=200",
                                       "rollout.timeout_s=55", "rollout.weight_sync=gloo"],
     {"dtype": "float32", "devices": ["3"], "max_model_len": 200, "timeout_s": 55, "weight_sync": "gloo"}),
    ("rollout.make_engine", ["rollout.max_model_len=200", "rollout.gpu_memory_utilization=0.4", "rollout.timeout_s=55",
                             "rollout.weight_sync=gloo", "policy.trust_remote_code=true"],
     {"kind": "vllm", "dtype": "float32", "max_model_len": 200, "gpu_memory_utilization": 0.4, "transfer_timeout_s": 55,
      "weight_transport": "gloo", "enable_sleep_mode": False, "trust_remote_code": True}),
    ("rollout.make_engine", ["rollout.engine=hf", "policy.dtype=float16", "train.seed=3"],
     {"kind": "hf", "dtype": "float16", "seed": 3}),
    ("rollout.make_engine", ["rollout.engine=remote", "rollout.servers=[http://10.1.2.3:8100]",
                             "rollout.trainer_address=10.1.2.9", "rollout.timeout_s=55", "rollout.weight_sync=gloo"],
     {"kind": "remote", "urls": ["http://10.1.2.3:8100"], "master_address": "10.1.2.9", "timeout": 55, "weight_sync": "gloo"}),
])
def test_engine_settings_reach_the_engine_the_stage_builds(tiny_paths, tiny_sft, tiny_rm, tmp_path, monkeypatch, where,
                                                           settings, expected):
    """The rollout section's keys reach the engine (or the servers) the stage starts: recorded at the call, which
    then stops the run (nothing is started). The colocated engine's call comes after the models load."""
    import importlib

    from alignment.stages.ppo import run

    called = {}

    class Called(Exception):
        pass

    def record(*args, **kwargs):
        if where == "rollout.make_engine":
            called["kind"] = args[0]
        else:
            called["devices"] = args[2]
        called.update(kwargs)
        raise Called

    module, name = where.rsplit(".", 1)
    monkeypatch.setattr(importlib.import_module(module), name, record)
    with pytest.raises(Called):
        run(tiny_recipe(tiny_paths, tiny_sft, tiny_rm, tmp_path / "run", "eval=null", *settings))
    assert {k: called.get(k) for k in expected} == expected


@pytest.mark.parametrize("settings, message", [
    (["value.lora={r: 4}"], "value.lora: only the policy trains LoRA adapters in PPO"),
    (["reference={name_or_path: REF, lora: {r: 4}}"], "reference.lora: only the policy trains LoRA adapters in PPO"),
    (["prompts.eval_fraction=0.1"], "prompts.eval_fraction / prompts.eval_sources: PPO trains on every prompt"),
])
def test_settings_ppo_would_ignore_are_refused(tiny_paths, tiny_sft, tiny_rm, tmp_path, settings, message):
    settings = [s.replace("REF", str(tiny_sft.final)) for s in settings]
    with pytest.raises(RecipeError, match=message):
        tiny_recipe(tiny_paths, tiny_sft, tiny_rm, tmp_path, *settings)


def test_ppo_prompts_hold_nothing_out_by_default(tiny_paths, tiny_sft, tiny_rm, tmp_path):
    """Unlike SFT and RM data, PPO's prompts default to no held-out share (the old 5% was dropped unused)."""
    recipe = load_recipe(TINY_PPO, PPORecipe, [*tiny_ppo_overrides(tiny_paths, tiny_sft, tiny_rm, tmp_path),
                                               "prompts={sources: [{path: " + str(tiny_paths.prompts) + "}]}"])
    assert recipe.prompts.eval_fraction == 0.0


class RecordingEngine:
    """The session's vLLM engine, recording the sampling settings and samples of every generation the stage asks for."""

    def __init__(self, inner):
        self.inner, self.sampling, self.samples = inner, [], []

    @property
    def weight_version(self):
        return self.inner.weight_version

    def generate(self, prompts, sampling):
        self.sampling.append(sampling)
        self.samples.append(self.inner.generate(prompts, sampling))
        return self.samples[-1]

    def update_weights(self, weights, version):
        return self.inner.update_weights(weights, version)

    def close(self):
        pass


def test_every_algorithm_and_training_key_reaches_the_code_that_uses_it(tiny_paths, tiny_sft, tiny_rm, vllm_engine,
                                                                          tmp_path, monkeypatch):
    """Two steps of the real stage with every algorithm, training and sampling key set away from its default, each
    observed where it acts: the arguments the PPO math receives, the engines' optimizers, the engine's sampling, the
    models loaded, the counts of windows and micro-batches. A key the stage dropped on the way fails here."""
    import alignment.stages.ppo as stage
    import reward.scoring

    seen: dict[str, list] = {}

    def spy(name, fn, record=lambda *a, **k: (a, k)):
        def wrapper(*args, **kwargs):
            seen.setdefault(name, []).append(record(*args, **kwargs))
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(stage, "init_distributed", spy("init_distributed", stage.init_distributed))
    monkeypatch.setattr(stage, "AdvantageParams", spy("advantage_params", stage.AdvantageParams))
    monkeypatch.setattr(stage, "AdaptiveKLController", spy("kl_controller", stage.AdaptiveKLController))
    monkeypatch.setattr(stage, "KL_ESTIMATORS", {k: spy(f"kl:{k}", f) for k, f in stage.KL_ESTIMATORS.items()})
    monkeypatch.setattr(stage, "clipped_policy_loss", spy("policy_loss", stage.clipped_policy_loss))
    monkeypatch.setattr(stage, "clipped_value_loss", spy("value_loss", stage.clipped_value_loss))
    monkeypatch.setattr(stage, "kl_loss_term", spy("kl_loss", stage.kl_loss_term))
    monkeypatch.setattr(stage, "aggregate_loss", spy("aggregate", stage.aggregate_loss))
    monkeypatch.setattr(stage, "truncated_is_weights", spy("tis", stage.truncated_is_weights))
    monkeypatch.setattr(stage, "clip_scores", spy("clip_scores", stage.clip_scores))
    monkeypatch.setattr(stage, "penalize_truncated", spy("penalize", stage.penalize_truncated))
    training = []  # true while the stage trains (PPO epochs), false while it scores

    def train_on_batch(*args, **kwargs):
        training.append(True)
        try:
            return train(*args, **kwargs)
        finally:
            training.append(False)

    train = spy("train", stage._train_on_batch)
    monkeypatch.setattr(stage, "_train_on_batch", train_on_batch)
    monkeypatch.setattr(stage, "policy_forward", spy("policy_forward", stage.policy_forward,
                                                     lambda model, inputs, temperature, with_entropy=False:
                                                     (training[-1:] == [True], inputs.input_ids.shape[0], temperature,
                                                      with_entropy)))
    monkeypatch.setattr(stage, "load_causal_lm", spy("load_causal_lm", stage.load_causal_lm, lambda s: s.name_or_path))
    monkeypatch.setattr(stage, "SyncCheck", spy("sync_check", stage.SyncCheck))
    monkeypatch.setattr(reward.scoring.RewardModelScorer, "__init__", spy("rm", reward.scoring.RewardModelScorer.__init__))
    engines, make_train_engine = [], stage.make_train_engine
    monkeypatch.setattr(stage, "make_train_engine", lambda *a, **k: engines.append(make_train_engine(*a, **k)) or engines[-1])
    monkeypatch.setattr(stage.AccumulationWindow, "step", spy("window", stage.AccumulationWindow.step,
                                                              lambda window: (id(window.engine), window.engine.get_lr()[0])))
    engine = RecordingEngine(vllm_engine)
    out = tmp_path / "run"
    stage.run(tiny_recipe(
        tiny_paths, tiny_sft, tiny_rm, out, "train.steps=2", "train.prompts_per_step=8",
        "rollout.sampling.samples_per_prompt=3", "rollout.sampling.temperature=0.9", "rollout.sampling.seed=5",
        "rollout.sampling.stop=[zzz]", "rollout.sync_check_tolerance=1.5", "rollout.timeout_s=77",
        f"reference.name_or_path={tiny_paths.base}", "rewards.0.normalize=false",
        "algorithm.gamma=0.97", "algorithm.lam=0.9", "algorithm.epochs=2", "algorithm.minibatches=2",
        "algorithm.micro_batch_size=5", "algorithm.clip_low=0.15", "algorithm.clip_high=0.25", "algorithm.dual_clip=3.0",
        "algorithm.entropy_coef=0.01", "algorithm.loss_aggregation=seq_mean_token_sum", "algorithm.value_clip=0.3",
        "algorithm.vf_coef=0.7", "algorithm.critic_warmup_steps=1", "algorithm.reward_clip=4.0",
        "algorithm.truncation_penalty=0.5", "algorithm.tis_cap=1.5", "algorithm.kl.estimator=k3",
        "algorithm.kl.placement=loss", "algorithm.kl.coef=0.07", "algorithm.kl.target=5.0", "algorithm.kl.horizon=777",
        "train.learning_rate=1e-4", "train.critic_learning_rate=2e-4", "train.weight_decay=0.013",
        "train.max_grad_norm=0.7", "train.warmup_steps=4", "eval_every=1", "eval.num_prompts=8"), engine=engine)

    # rollout sampling (the sync check's probe asks for one 8-token answer per prompt)
    rollouts = [s for s in engine.sampling if s.n == 3]
    assert len(rollouts) == 2 and {(s.temperature, tuple(s.stop)) for s in rollouts} == {(0.9, ("zzz",))}
    assert [s.seed for s in rollouts] == [5, 5 + 8 * 3]  # step 1's seeds follow step 0's 8 prompts x 3 samples
    assert seen["sync_check"][0][0][1] == 1.5
    assert seen["init_distributed"][0][1]["timeout_s"] == 77 * (5 + 1 + 1)
    assert str(tiny_paths.base) in seen["load_causal_lm"]  # the reference
    assert [k.get("normalize") for _, k in seen["rm"]] == [False]
    # advantages, losses, KL
    assert {(k["gamma"], k["lam"], k["kl_coef"], k["group_size"]) for _, k in seen["advantage_params"]} == {(0.97, 0.9, 0.0, 3)}
    assert seen["kl_controller"][0][0] == (0.07, 5.0, 777) and seen.get("kl:k3") and not seen.get("kl:k1")
    assert {a[4:7] for a, _ in seen["policy_loss"]} == {(0.15, 0.25, 3.0)}
    assert all(a[7] is not None for a, _ in seen["policy_loss"]) and {a[2] for a, _ in seen["tis"]} == {1.5}
    assert {a[4] for a, _ in seen["value_loss"]} == {0.3} and {a[2] for a, _ in seen["aggregate"]} == {"seq_mean_token_sum"}
    # the adaptive controller (horizon 777) moved the coefficient by at most 0.2 x 24 samples / 777 after step 0
    kl_coefs = {a[4] for a, _ in seen["kl_loss"]}
    assert len(kl_coefs) == 1 and kl_coefs != {0.07} and kl_coefs.pop() == pytest.approx(0.07, rel=0.2 * 24 / 777 + 1e-9)
    assert {a[1] for a, _ in seen["clip_scores"]} == {4.0} and {a[2] for a, _ in seen["penalize"]} == {0.5}
    # critic warm-up: the actor trains from step 1 on; epochs x minibatches windows per trained model and step
    assert [k["train_actor"] for _, k in seen["train"]] == [False, True]
    policy, critic = engines
    lrs = {e: [lr for engine_id, lr in seen["window"] if engine_id == id(e)] for e in (policy, critic)}
    assert len(lrs[policy]) == 2 * 2 and len(lrs[critic]) == 2 * 2 * 2
    # minibatches of 12 samples in micro-batches of 5, 5, 2; with the entropy (entropy_coef) at the sampling temperature
    assert [f[1:] for f in seen["policy_forward"] if f[0]] == [(5, 0.9, True), (5, 0.9, True), (2, 0.9, True)] * 4
    # optimizers: learning rates warming up over 4 steps, weight decay, clipping
    assert lrs[policy] == pytest.approx([1e-4 * k / 4 for k in (1, 2, 3, 4)])
    assert lrs[critic] == pytest.approx([2e-4 * min(1.0, k / 4) for k in range(1, 9)])
    assert policy.optimizer.param_groups[0]["weight_decay"] == 0.013 and policy.gradient_clipping() == 0.7
    metrics = read_metrics(out)
    assert [("eval/gold" in m) for m in metrics] == [True, True]  # eval_every=1


def test_a_critic_from_the_reward_model_starts_on_the_normalised_scale(tiny_paths, tiny_sft, tiny_rm, vllm_engine,
                                                                        tmp_path, monkeypatch):
    """recipes/tiny/ppo.yaml initialises the critic from the RM whose `normalize: true` term scores
    (r - mean) / std: before any update the critic's value of each state equals that normalised score of the same
    tokens (the value before the last token is the RM's score of everything before it), not the raw RM score."""
    import torch

    import alignment.stages.ppo as stage
    from reward.scoring import RewardModelScorer

    batches = []
    score_tokens = stage._score_tokens

    def keep_first_batch(batch, *args, **kwargs):
        score_tokens(batch, *args, **kwargs)
        batches.append(batch)

    monkeypatch.setattr(stage, "_score_tokens", keep_first_batch)
    stage.run(tiny_recipe(tiny_paths, tiny_sft, tiny_rm, tmp_path / "run", "train.steps=1", "eval=null",
                          "train.prompts_per_step=8"), engine=vllm_engine)
    batch = batches[0]
    scorer = RewardModelScorer(tiny_rm.final, normalize=True)
    last = [len(c) - 1 for c in batch.completion_ids]  # value of the state before the last sampled token
    before_last = [p + c[:-1] for p, c in zip(batch.prompt_ids, batch.completion_ids)]
    expected = scorer.score_ids(before_last)
    got = torch.stack([batch.values[i, t] for i, t in enumerate(last)])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    raw = RewardModelScorer(tiny_rm.final).score_ids(before_last)
    assert (raw - expected).abs().min() > 0.1  # unscaled, the critic would have started elsewhere


def test_one_nan_reward_skips_one_step_and_leaves_the_running_statistics_alone(tiny_paths, tiny_sft, tiny_rm,
                                                                                vllm_engine, tmp_path):
    """A reward that is NaN once (a parse failure, a timed-out judge) in a run with running reward normalisation: that
    step is skipped before the statistics see it, and the run goes on (before, the running mean became NaN for good
    and the run stopped after max_bad_steps)."""
    from alignment.stages.ppo import run

    flaky = tmp_path / "flaky_reward.py"
    flaky.write_text("calls = []\n"
                     "def reward(prompts, completions, **kw):\n"
                     "    calls.append(1)\n"
                     "    return [float('nan') if len(calls) == 2 else float(len(c) % 7) for c in completions]\n")
    out = tmp_path / "run"
    run(tiny_recipe(tiny_paths, tiny_sft, tiny_rm, out, "algorithm.advantage=grpo", "value=null", "train.steps=4",
                    "eval=null", "train.prompts_per_step=8", "algorithm.reward_normalization=running",
                    "output.save_steps=4", f"rewards=[{{kind: function, function: '{flaky}:reward'}}]"), engine=vllm_engine)
    assert [m["step"] for m in read_metrics(out)] == [1, 3, 4]  # step 2 skipped, logged nowhere
    saved = json.loads((out / "checkpoints" / "checkpoint-4" / "loop_state.json").read_text())
    assert saved["running_reward"]["count"] == 3 * 8 * 4 and math.isfinite(saved["running_reward"]["mean"])
    assert saved["loop"]["bad_steps"] == 0 and (out / "final").is_dir()


def test_every_sample_of_a_run_draws_its_own_stream(tiny_paths, tiny_sft, tiny_rm, vllm_engine, tmp_path):
    """Copies of one prompt in a step (the tiny recipes keep duplicates on purpose) and samples of different prompts
    get streams of their own, in every step: with prompt i seeded seed + i, vLLM's seed + k for the k-th sample made
    8 copies x 4 samples draw from 11 streams, so a step had at most 11 distinct answers."""
    from alignment.stages.ppo import run

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text((tiny_paths.prompts.read_text().splitlines()[0] + "\n") * 8)
    engine = RecordingEngine(vllm_engine)
    run(tiny_recipe(tiny_paths, tiny_sft, tiny_rm, tmp_path / "run", f"prompts.sources.0.path={prompts}",
                    "train.steps=2", "train.prompts_per_step=8", "eval=null"), engine=engine)
    steps = [(cfg, samples) for cfg, samples in zip(engine.sampling, engine.samples) if cfg.n == 4]
    seeds = [cfg.prompt_seed(i) + k for cfg, _ in steps for i in range(8) for k in range(4)]
    assert len(steps) == 2 and len(set(seeds)) == len(seeds) == 64
    for _, samples in steps:
        assert len({tuple(s.completion_ids) for s in samples}) > 20, [s.text for s in samples]


def test_a_run_that_over_optimises_is_told_and_stopped_at_the_best_gold(tiny_paths, tiny_sft, tiny_rm, vllm_engine,
                                                                         tmp_path):
    """A reward that is the gold metric's opposite: the reward rises and the gold falls step after step. The watch
    reports it (ppo/overoptimization), `on_detect: stop` ends the run there with its final export, and `keep_best`
    kept the policy of the best held-out eval/gold, which is the SFT policy's neighbourhood, not the end's."""
    from alignment.stages.ppo import run

    opposite = tmp_path / "opposite.py"
    opposite.write_text("from alignment.tiny.task import gold_reward\n"
                        "def reward(prompts, completions, **kw):\n"
                        "    return [-g for g in gold_reward(prompts=prompts, completions=completions, **kw)]\n")
    out = tmp_path / "run"
    recipe = load_recipe(TINY_PPO.parent / "ppo_grpo.yaml", PPORecipe, [
        *tiny_ppo_overrides(tiny_paths, tiny_sft, tiny_rm, out, critic=False), "train.steps=16",
        f"rewards=[{{kind: function, function: '{opposite}:reward'}}]", "algorithm.kl.coef=0.0",
        "overoptimization.window=3", "overoptimization.on_detect=stop", "overoptimization.keep_best=true",
        "eval_every=1", "eval.num_prompts=32", "eval.samples_per_prompt=2"])
    run(recipe, engine=vllm_engine)
    metrics = read_metrics(out)
    summary = json.loads((out / "summary.json").read_text())
    print(f"\nreward {[round(m['ppo/reward'], 2) for m in metrics]}\ngold {[round(m['ppo/gold'], 2) for m in metrics]}")
    assert [m["ppo/overoptimization"] for m in metrics] == [0.0] * (len(metrics) - 1) + [1.0]
    assert len(metrics) < 16 and summary["stopped_at_step"]["step"] == metrics[-1]["step"]
    assert (out / "final" / "model.safetensors").is_file()
    best = max(metrics, key=lambda m: m["eval/gold"])
    assert summary["best"]["step"] == best["step"] and summary["best"]["eval/gold"] == best["eval/gold"]
    assert best["eval/gold"] > metrics[-1]["eval/gold"] and (out / "best" / "model.safetensors").is_file()


def test_token_budget_micro_batches_and_old_logprobs_from_training_in_the_stage(tiny_paths, tiny_sft, tiny_rm,
                                                                               vllm_engine, tmp_path, monkeypatch):
    """GRPO, one epoch of one minibatch, KL in the loss: exactly on-policy, so the policy is forwarded by training alone
    (its log-probs before the update come from there) and `algorithm.micro_batch_tokens` caps every forward's padded
    tokens; with `algorithm.packing` every forward is one row of real tokens (the reward model's too). Each run equals
    one that scores the policy first, in row micro-batches, up to float noise."""
    import torch
    from safetensors.torch import load_file

    import alignment.stages.ppo as stage

    forwards: list[tuple[bool, int, int, int]] = []  # (training, rows, padded tokens, model) of every stage forward
    training = [False]
    train, forward = stage._train_on_batch, stage.policy_forward

    def train_on_batch(*args, **kwargs):
        training[0] = True
        try:
            return train(*args, **kwargs)
        finally:
            training[0] = False

    def policy_forward(model, inputs, *args, **kwargs):
        forwards.append((training[0], inputs.input_ids.shape[0], inputs.input_ids.numel(), id(model)))
        return forward(model, inputs, *args, **kwargs)

    monkeypatch.setattr(stage, "_train_on_batch", train_on_batch)
    monkeypatch.setattr(stage, "policy_forward", policy_forward)
    common = ["train.steps=2", "train.prompts_per_step=8", "algorithm.epochs=1", "algorithm.minibatches=1",
              "algorithm.micro_batch_size=8"]
    runs = {}
    for name, extra in (("budget", ["algorithm.micro_batch_tokens=60"]),
                        ("packed", ["algorithm.micro_batch_tokens=60", "algorithm.packing=true"]), ("rows", [])):
        if name == "rows":  # the same run, its policy scored before the update as with several epochs
            monkeypatch.setattr(stage, "old_logprobs_come_from_training", lambda recipe: False)
        forwards.clear()
        out = tmp_path / name
        stage.run(load_recipe(TINY_PPO.parent / "ppo_grpo.yaml", PPORecipe,
                              [*tiny_ppo_overrides(tiny_paths, tiny_sft, tiny_rm, out, critic=False), *common, *extra]),
                  engine=vllm_engine)
        runs[name] = (list(forwards), read_metrics(out), load_file(str(out / "final" / "model.safetensors")))
    budget_forwards, rows_forwards = runs["budget"][0], runs["rows"][0]
    # scoring forwards: the reference only (budget run) vs the policy and the reference (rows run)
    for forwards_of_run, models_scored in ((budget_forwards, 1), (rows_forwards, 2)):
        policy = {model for trains, _, _, model in forwards_of_run if trains}
        scored = {model for trains, _, _, model in forwards_of_run if not trains}
        assert len(policy) == 1 and len(scored) == models_scored and (policy <= scored) == (models_scored == 2)
    assert all(tokens <= 60 or rows == 1 for _, rows, tokens, _ in budget_forwards)
    assert all(rows == 8 for _, rows, _, _ in rows_forwards) and len(budget_forwards) > len(rows_forwards)
    packed_forwards = runs["packed"][0]
    assert all(rows == 1 for _, rows, _, _ in packed_forwards) and len(packed_forwards) < len(budget_forwards)
    assert sum(tokens for *_, tokens, _ in packed_forwards) < sum(tokens for *_, tokens, _ in budget_forwards)
    for name in ("budget", "packed"):
        for got, want in zip(runs[name][1], runs["rows"][1]):
            for key in ("ppo/reward", "ppo/policy_loss", "ppo/kl", "ppo/entropy", "ppo/logprob_mismatch",
                        "ppo/clip_fraction"):
                assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), (name, got["step"], key)
        for key, weight in runs["rows"][2].items():
            torch.testing.assert_close(runs[name][2][key], weight, rtol=1e-4, atol=1e-5)


def test_packing_stops_a_run_whose_model_ignores_packed_sequences(tiny_paths, tiny_sft, tiny_rm, vllm_engine, tmp_path,
                                                                  monkeypatch):
    """A model whose attention does not read packed position ids as separate sequences (transformers' detection
    switched off here, as in an architecture without it) fails the first sync check packed but not padded: the run
    stops before training, naming algorithm.packing."""
    import transformers.masking_utils

    import alignment.stages.ppo as stage
    from alignment.errors import UserError

    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    out = tmp_path / "out"
    recipe = load_recipe(TINY_PPO.parent / "ppo_grpo.yaml", PPORecipe,
                         [*tiny_ppo_overrides(tiny_paths, tiny_sft, tiny_rm, out, critic=False), "algorithm.packing=true"])
    with pytest.raises(UserError, match=r"algorithm.packing: the policy scores packed sequences differently .* "
                                        r"LlamaForCausalLM \(attn_implementation 'sdpa'\)"):
        stage.run(recipe, engine=vllm_engine)
    assert not (out / "metrics.jsonl").exists()
