"""DAPO's dynamic sampling, overlong filtering and soft overlong punishment (alignment/ppo/dynamic_sampling.py):
hand-computed checks of the pure functions, the recipe checks, and the real PPO stage with each option.

Stage runs share the session's vLLM engine (`vllm_engine`) and the tiny SFT policy, with rule rewards (no reward
model), 2 steps of 8 prompts each.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from alignment.ppo import ADVANTAGE_ESTIMATORS, AdvantageParams
from alignment.ppo.dynamic_sampling import (
    ZERO_ADVANTAGE_FOR_EQUAL_GROUPS,
    groups_to_train,
    keep_groups,
    overlong_penalty,
    refill_seed_offset,
    refill_size,
    uncut_weights,
)

TOL = dict(rtol=0, atol=1e-6)
REPO = Path(__file__).resolve().parents[1]
GRPO = REPO / "recipes" / "tiny" / "ppo_grpo.yaml"


def close(actual, expected) -> None:
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64), **TOL)


# --------------------------------------------------------------------------- pure functions, by hand


def test_keep_groups_keeps_exactly_the_groups_whose_scores_differ():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0],    # all solved: no signal
                           [1.0, 0.0, 1.0, 1.0],    # one failure: signal
                           [0.5, 0.5, 0.5, 0.5],    # all equal, not 0/1: no signal
                           [0.0, 0.0, 0.0, 0.0],    # all failed: no signal
                           [0.3, 0.3, 0.3, 0.3 + 1e-6]])  # a tiny difference still moves GRPO (std + eps)
    assert keep_groups(scores).tolist() == [False, True, False, False, True]
    # overlong filtering: a group whose samples are all cut has no loss weight left, whatever its scores
    trainable = torch.tensor([[True] * 4, [False] * 4, [True] * 4, [True] * 4, [False, False, False, True]])
    assert keep_groups(scores, trainable).tolist() == [False, False, False, False, True]
    with pytest.raises(ValueError, match="n_groups, group_size"):
        keep_groups(scores.flatten())
    with pytest.raises(ValueError, match="differ in shape"):
        keep_groups(scores, trainable[:, :2])


@pytest.mark.parametrize("name", sorted(ADVANTAGE_ESTIMATORS))
def test_dropped_groups_are_exactly_the_zero_advantage_ones_of_the_allowed_estimators(name):
    """The estimators dynamic sampling accepts give a group of equal scores advantage 0 at every token (KL in the
    loss, so none in the reward); the others do not, which is why the recipe refuses them."""
    if ADVANTAGE_ESTIMATORS[name].needs_critic:
        assert name not in ZERO_ADVANTAGE_FOR_EQUAL_GROUPS
        return
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.5, 0.5])  # groups of 2: equal, varied, varied, equal
    lengths = torch.tensor([3, 3, 3, 1, 2, 2, 3, 3])  # unequal: a whitening over the batch's tokens shifts every group
    mask = (torch.arange(4) < lengths[:, None]).float()
    advantages, _ = ADVANTAGE_ESTIMATORS[name].compute(scores, torch.zeros(8, 4), mask, None, AdvantageParams(group_size=2))
    per_group = advantages.abs().sum(1).view(4, 2).sum(1)
    dropped = ~keep_groups(scores.view(4, 2))
    assert dropped.tolist() == [True, False, False, True]
    assert bool((per_group[dropped] == 0).all()) == (name in ZERO_ADVANTAGE_FOR_EQUAL_GROUPS)
    assert bool((per_group[~dropped] > 0).all())


def test_soft_overlong_penalty_by_hand():
    # L_max = 20, L_cache = 4: no penalty up to 16 tokens, then (16 - |y|) / 4, -1 at 20 and beyond
    lengths = torch.tensor([0, 10, 16, 17, 18, 19, 20, 21])
    close(overlong_penalty(lengths, max_len=20, buffer=4), [0, 0, 0, -0.25, -0.5, -0.75, -1.0, -1.0])
    close(overlong_penalty(lengths, max_len=20, buffer=4, factor=0.5), [0, 0, 0, -0.125, -0.25, -0.375, -0.5, -0.5])
    # DAPO's own setting: L_max = 20480, L_cache = 4096; an answer of 18432 tokens is half-way down the ramp
    close(overlong_penalty(torch.tensor([16384, 18432, 20480]), 20480, 4096), [0.0, -0.5, -1.0])
    # buffer = max_len: the ramp starts at 0 tokens
    close(overlong_penalty(torch.tensor([0, 2, 4]), max_len=4, buffer=4), [0.0, -0.5, -1.0])
    for bad in (dict(buffer=0), dict(buffer=21)):
        with pytest.raises(ValueError, match="overlong buffer"):
            overlong_penalty(lengths, max_len=20, **bad)
    with pytest.raises(ValueError, match="factor"):
        overlong_penalty(lengths, max_len=20, buffer=4, factor=-1.0)


def test_uncut_weights_zero_the_answers_cut_at_the_budget():
    close(uncut_weights(["stop", "length", "stop", "length"]), [1.0, 0.0, 1.0, 0.0])


def test_refill_size_by_hand():
    # 5 of 8 groups kept so far, 3 missing: 3 * 8 / 5 = 4.8 -> 5 prompts, rounded up to the 2 processes: 6
    assert refill_size(missing=3, kept=5, generated=8, cap=8, multiple=2) == 6
    assert refill_size(missing=3, kept=5, generated=8, cap=8, multiple=1) == 5
    # nothing kept yet: a whole step's worth
    assert refill_size(missing=8, kept=0, generated=8, cap=8, multiple=1) == 8
    # a low keep rate asks for more than the cap: the cap
    assert refill_size(missing=6, kept=2, generated=8, cap=8, multiple=1) == 8
    # never fewer than the missing groups, and a multiple of the world size
    assert refill_size(missing=1, kept=7, generated=8, cap=8, multiple=1) == 2  # ceil(8 / 7)
    assert refill_size(missing=1, kept=8, generated=8, cap=8, multiple=4) == 4
    with pytest.raises(ValueError):
        refill_size(missing=1, kept=1, generated=1, cap=6, multiple=4)  # the cap is no multiple of the world size


def test_groups_to_train_by_hand():
    assert groups_to_train(kept=10, target=8, world=2) == 8  # enough: the first 8
    assert groups_to_train(kept=8, target=8, world=2) == 8
    assert groups_to_train(kept=7, target=8, world=2) == 6  # short: a multiple of the processes
    assert groups_to_train(kept=5, target=8, world=1) == 5
    assert groups_to_train(kept=1, target=8, world=2) == 0  # fewer than the processes: the step is skipped


def test_refill_seeds_never_meet_another_sample_of_the_run():
    steps, max_rounds, P, G = 5, 3, 8, 4
    block = P * G
    first_rounds = {s * block for s in range(steps)}  # RolloutSchedule.sampling_for
    extra = [refill_seed_offset(s, r, steps, max_rounds, P, G) for s in range(steps) for r in range(1, max_rounds + 1)]
    assert refill_seed_offset(2, 1, steps, max_rounds, P, G) == (5 + 2 * 3 + 0) * 32
    starts = sorted(first_rounds | set(extra))
    assert len(starts) == steps * (max_rounds + 1)  # all distinct
    assert all(b - a >= block for a, b in zip(starts, starts[1:]))  # blocks of P x G streams never overlap
    with pytest.raises(ValueError):
        refill_seed_offset(0, 0, steps, max_rounds, P, G)  # round 0 is the step's own


def test_shape_scores_adds_the_soft_penalty_beside_the_truncation_penalty_before_the_clip():
    from alignment.ppo import RunningMoments
    from alignment.stages.ppo import shape_scores

    algo = SimpleNamespace(truncation_penalty=0.5, reward_clip=1.0)
    raw = torch.tensor([1.0, 1.0, 0.0])
    penalty = overlong_penalty(torch.tensor([3, 20, 18]), max_len=20, buffer=4)  # 0, -1, -0.5
    # 1 - 0 + 0 = 1;  1 - 0.5 - 1 = -0.5;  0 - 0 - 0.5 = -0.5
    close(shape_scores(raw, ["stop", "length", "stop"], algo, None, penalty), [1.0, -0.5, -0.5])
    # after the running normalisation ((x - 0.5) / 0.5): 1 + 0 = 1;  1 - 0.5 - 1 = -0.5;  -1 - 0.5 = -1.5 -> clip -1
    moments = RunningMoments()
    moments.update(torch.tensor([0.0, 1.0]))
    close(shape_scores(raw, ["stop", "length", "stop"], algo, moments, penalty), [1.0, -0.5, -1.0])
    # without the penalty the result is the old one, bit for bit
    assert torch.equal(shape_scores(raw, ["stop", "length", "stop"], algo, None),
                       shape_scores(raw, ["stop", "length", "stop"], algo, None, None))


# --------------------------------------------------------------------------- recipe


def grpo_overrides(tiny_paths, policy, out: Path, *extra: str) -> list[str]:
    return [f"policy.name_or_path={policy}", f"prompts.sources.0.path={tiny_paths.prompts}", f"output.dir={out}",
            "rewards=[{kind: function, function: 'alignment.tiny.task:gold_reward'}]", "eval=null", *extra]


def test_the_options_are_off_by_default_and_nonsense_is_refused(tiny_paths, tmp_path):
    from alignment.config.ppo import PPORecipe
    from alignment.config.schema import load_recipe
    from alignment.errors import RecipeError

    def load(*extra):
        return load_recipe(GRPO, PPORecipe, grpo_overrides(tiny_paths, tiny_paths.base, tmp_path, *extra), check_paths=False)

    algo = load().algorithm
    assert not algo.dynamic_sampling.enabled and not algo.overlong.filter and algo.overlong.buffer is None
    for advantage in ZERO_ADVANTAGE_FOR_EQUAL_GROUPS:
        assert load("algorithm.dynamic_sampling.enabled=true", f"algorithm.advantage={advantage}").algorithm.dynamic_sampling.enabled
    refused = {
        ("algorithm.advantage=gae", f"value.name_or_path={tiny_paths.base}"): "needs a group-relative advantage",
        ("algorithm.advantage=reinforce++",): "needs a group-relative advantage",
        ("algorithm.advantage=reinforce++_baseline",): "needs a group-relative advantage",
        ("algorithm.advantage=reinforce++", "rollout.sampling.samples_per_prompt=1"): "samples_per_prompt >= 2",
        ("rollout.async_generation=true",): "cannot be combined with rollout.async_generation",
    }
    for extra, message in refused.items():
        with pytest.raises(RecipeError, match=f"algorithm.dynamic_sampling: .*{message}"):
            load("algorithm.dynamic_sampling.enabled=true", *extra)
    with pytest.raises(RecipeError, match=r"algorithm.overlong.buffer: must be below rollout.sampling.max_new_tokens \(24\)"):
        load("algorithm.overlong.buffer=24")
    with pytest.raises(RecipeError, match="algorithm.dynamic_sampling.max_rounds"):
        load("algorithm.dynamic_sampling.max_rounds=-1")
    # async generation with the overlong options is fine (nothing there depends on the next step)
    assert load("rollout.async_generation=true", "algorithm.overlong.filter=true", "algorithm.overlong.buffer=4")


# --------------------------------------------------------------------------- the draw on two ranks


N_ROWS, TARGET, GROUP = 24, 4, 4


class _FakeEngine:
    """Rank 0's engine: answer k to prompt row r is the text "r/k" (the prompt ids are [r])."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, sampling):
        from rollout import Sample

        self.calls.append((len(prompts), sampling.seed))
        return [Sample(prompt_index=i, prompt_ids=list(p), completion_ids=[7, 8, 9], text=f"{p[0]}/{k}",
                       logprobs=[0.0] * 3, finish_reason="stop", weight_version=0)
                for i, p in enumerate(prompts) for k in range(sampling.n)]


class _RuleReward:
    """Answer k to row r scores `rule(r, k)`; records the rows this rank scored."""

    def __init__(self, rule):
        self.rule, self.scored, self.trimmed = rule, [], {}

    def __call__(self, prompts, completions, columns):
        rows_k = [tuple(int(x) for x in text.split("/")) for text in completions]
        assert columns["item"] == [f"item{r}" for r, _ in rows_k] and prompts == [f"prompt {r}" for r, _ in rows_k]
        self.scored.append([r for r, _ in rows_k])
        values = torch.tensor([self.rule(r, k) for r, k in rows_k])
        return values, {"0_function": values}


def _odd_rows_vary(r, k):
    return float(k % 2) if r % 2 else 1.0


def _rare_rows_vary(r, k):
    return float(k % 2) if r % 8 == 1 else 0.0


def _draw_worker(rank: int, port: int, out_dir: str) -> None:
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    from alignment.config.ppo import PPORecipe
    from alignment.config.schema import load_recipe
    from alignment.stages import ppo as stage
    from alignment.stages.rollout_schedule import RolloutSchedule

    prompt_ids = [[r] for r in range(N_ROWS)]
    columns = {"prompt": [f"prompt {r}" for r in range(N_ROWS)], "item": [f"item{r}" for r in range(N_ROWS)]}
    results = {}
    for name, rule, rounds in (("odd", _odd_rows_vary, 3), ("rare", _rare_rows_vary, 1)):
        recipe = load_recipe(GRPO, PPORecipe, [f"train.prompts_per_step={TARGET}", "train.steps=3",
                                               "algorithm.dynamic_sampling.enabled=true",
                                               f"algorithm.dynamic_sampling.max_rounds={rounds}"], check_paths=False)
        engine = _FakeEngine() if rank == 0 else None
        rollouts = (RolloutSchedule(lambda rows, cfg: engine.generate([prompt_ids[r] for r in rows], cfg),
                                    recipe.rollout.sampling, ahead=False) if rank == 0 else None)
        reward, state = _RuleReward(rule), stage.LoopState()
        drawn = stage._draw_groups_with_signal(1, state, rank, 2, rollouts, reward, recipe, prompt_ids, columns,
                                               ["item"])
        results[name] = {"rows": drawn.rows, "raw": drawn.raw, "parts": drawn.parts, "groups": drawn.groups,
                         "with_signal": drawn.groups_with_signal, "metrics": drawn.metrics, "scored": reward.scored,
                         "state": (state.data_epoch, state.data_offset), "calls": engine.calls if engine else None,
                         "texts": [s.text for s in drawn.samples]}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    # Leave the group only once both ranks are done: a rank tearing gloo down while the other still works can abort
    # ("terminate called without an active exception", seen once in a full run; alignment.distributed.shutdown
    # does the same for launched ranks).
    dist.barrier()
    dist.destroy_process_group()


def test_two_ranks_draw_the_same_groups_each_scoring_half_of_the_candidates(tmp_path):
    """The cross-rank design in 2 real processes (gloo): rank 0 generates each round, every rank scores its half of the
    candidates, the gathered rewards give both ranks the same draw (the first groups with signal in stream order),
    and the stream advanced by every prompt generated."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_draw_worker, args=(port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    stream = torch.randperm(N_ROWS, generator=torch.Generator().manual_seed(0)).tolist()  # epoch 0 of seed 0
    for name, rule in (("odd", _odd_rows_vary), ("rare", _rare_rows_vary)):
        a, b = ranks[0][name], ranks[1][name]
        assert a["rows"] == b["rows"] and torch.equal(a["raw"], b["raw"]) and a["metrics"] == b["metrics"]
        assert a["groups"] == b["groups"] and a["texts"] == b["texts"]
        generated = sum(n for n, _ in a["calls"])
        assert a["state"] == b["state"] == (0, generated)
        candidates = stream[:generated]
        # each round: rank 0 scored the first half of the candidates' samples, rank 1 the second, nothing twice
        start = 0
        for (n, _), mine, theirs in zip(a["calls"], a["scored"], b["scored"]):
            rows = [r for r in candidates[start:start + n] for _ in range(GROUP)]
            assert mine + theirs == rows and len(mine) == len(theirs)
            start += n
        varied = [r for r in candidates if len({rule(r, k) for k in range(GROUP)}) > 1]
        assert a["with_signal"] == len(varied)
        assert a["rows"] == [r for r in varied[:a["groups"]] for _ in range(GROUP)]
        assert a["raw"].tolist() == [rule(r, k) for r in varied[:a["groups"]] for k in range(GROUP)]
        assert torch.equal(a["parts"]["0_function"], a["raw"])
        m = a["metrics"]
        assert m["dynamic/kept_groups"] == a["groups"] and m["dynamic/generated_samples"] == generated * GROUP
        assert m["dynamic/dropped_groups"] == generated - len(varied) and m["dynamic/extra_rounds"] == len(a["calls"]) - 1
        # round 0 takes step 1's own seeds; refills take blocks after the run's 3 steps
        block = TARGET * GROUP
        assert [seed for _, seed in a["calls"]][0] == 1 * block
        assert all(seed >= 3 * block for _, seed in a["calls"][1:])
    odd, rare = ranks[0]["odd"], ranks[0]["rare"]
    assert odd["groups"] == TARGET and odd["metrics"]["dynamic/extra_rounds"] >= 1  # refilled up to the target
    # few groups vary: after the one extra round the step trains on what there is, cut to a multiple of 2 ranks
    assert rare["with_signal"] < TARGET and rare["groups"] == rare["with_signal"] // 2 * 2
    assert rare["metrics"]["dynamic/extra_rounds"] == 1


# --------------------------------------------------------------------------- the real stage


MENTIONS_ITEM = '''
import re


def mentions_item(prompts, completions, item, **unused):
    """1 if the answer names the item it was asked about: the tiny SFT policy does so ~85% of the time, so about half
    of the groups of 4 are solved uniformly."""
    return [float(it in re.findall(r"[a-z]+", text)) for it, text in zip(item, completions)]
'''


class RecordingEngine:
    """The session's engine, recording each generation's sampling settings and prompt count."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    @property
    def weight_version(self):
        return self.inner.weight_version

    def generate(self, prompts, sampling):
        self.calls.append((sampling, len(prompts)))
        return self.inner.generate(prompts, sampling)

    def update_weights(self, weights, version):
        return self.inner.update_weights(weights, version)

    def close(self):
        pass


def _spy_advantages(monkeypatch, stage) -> list[torch.Tensor]:
    """The scores every advantage computation of the stage receives."""
    seen: list[torch.Tensor] = []
    estimators = {}
    for name, est in ADVANTAGE_ESTIMATORS.items():  # the registry itself, never an earlier spy
        def compute(scores, *args, _inner=est.compute, **kwargs):
            seen.append(scores.clone())
            return _inner(scores, *args, **kwargs)
        estimators[name] = type(est)(compute, est.needs_critic, est.min_group_size)
    monkeypatch.setattr(stage, "ADVANTAGE_ESTIMATORS", estimators)
    return seen


@pytest.mark.e2e
def test_dynamic_sampling_trains_on_full_steps_of_groups_with_signal(tiny_paths, tiny_sft, vllm_engine, tmp_path,
                                                                     monkeypatch):
    """A reward the SFT policy earns uniformly in about half of the groups: each step drops those groups, refills from
    the prompt stream, and trains on exactly prompts_per_step groups whose rewards all vary; the metrics account for
    every generated group, the data stream moved by every prompt generated (resume stays exact) and every sample of
    the run drew a seed stream of its own."""
    import alignment.stages.ppo as stage
    from alignment.config.ppo import PPORecipe
    from alignment.config.schema import load_recipe
    from conftest import read_metrics

    reward_file = tmp_path / "mentions.py"
    reward_file.write_text(MENTIONS_ITEM)
    scores = _spy_advantages(monkeypatch, stage)
    engine = RecordingEngine(vllm_engine)
    out = tmp_path / "run"
    recipe = load_recipe(GRPO, PPORecipe, grpo_overrides(
        tiny_paths, tiny_sft.final, out, f"rewards=[{{kind: function, function: '{reward_file}:mentions_item'}}]",
        "train.steps=2", "train.prompts_per_step=8", "algorithm.dynamic_sampling.enabled=true",
        "algorithm.dynamic_sampling.max_rounds=4"))
    stage.run(recipe, engine=engine)

    metrics = read_metrics(out)
    print([{k: v for k, v in m.items() if k.startswith("dynamic/")} for m in metrics])
    assert len(metrics) == 2 and len(scores) == 2
    for m, s in zip(metrics, scores):
        assert m["dynamic/kept_groups"] == 8 and m["dynamic/dropped_groups"] >= 1 and m["dynamic/extra_rounds"] >= 1
        generated_groups = m["dynamic/generated_samples"] / 4
        assert generated_groups == m["dynamic/kept_groups"] + m["dynamic/dropped_groups"] + m["dynamic/unused_groups"]
        assert s.shape == (32,)
        groups = s.view(8, 4)
        assert bool((groups != groups[:, :1]).any(1).all()), groups  # every trained group varies
        assert 0 < m["ppo/reward"] < 1 and m["dynamic/candidate_reward"] > m["ppo/reward"]  # uniform groups were 1s
        assert m["dynamic/skipped_steps"] == 0
    rollouts = [(cfg, n) for cfg, n in engine.calls if cfg.n == 4]
    assert len(rollouts) == sum(1 + m["dynamic/extra_rounds"] for m in metrics)
    assert sum(n for _, n in rollouts) * 4 == sum(m["dynamic/generated_samples"] for m in metrics)
    streams = [cfg.prompt_seed(i) + k for cfg, n in rollouts for i in range(n) for k in range(4)]
    assert len(set(streams)) == len(streams)
    loop = json.loads((out / "checkpoints" / "checkpoint-2" / "loop_state.json").read_text())["loop"]
    n_prompts = len(tiny_paths.prompts.read_text().splitlines())
    assert loop["data_epoch"] * n_prompts + loop["data_offset"] == sum(n for _, n in rollouts)


@pytest.mark.e2e
def test_with_the_options_off_the_stage_is_bit_identical_to_the_defaults(tiny_paths, tiny_sft, vllm_engine, tmp_path,
                                                                         monkeypatch):
    """The DAPO options explicitly off take the default run's path: the same scores and advantages bit for bit and the
    same metrics.jsonl (timings aside), with none of the options' metrics."""
    import alignment.stages.ppo as stage
    from alignment.config.ppo import PPORecipe
    from alignment.config.schema import load_recipe
    from conftest import read_metrics

    off = ["algorithm.dynamic_sampling.enabled=false", "algorithm.dynamic_sampling.max_rounds=7",
           "algorithm.overlong.filter=false", "algorithm.overlong.buffer=null", "algorithm.overlong.penalty_factor=3.0"]
    runs = {}
    for name, extra in (("default", []), ("off", off)):
        scores = _spy_advantages(monkeypatch, stage)
        out = tmp_path / name
        stage.run(load_recipe(GRPO, PPORecipe, grpo_overrides(tiny_paths, tiny_sft.final, out, "train.steps=2",
                                                              "train.prompts_per_step=8", *extra)), engine=vllm_engine)
        runs[name] = (scores, read_metrics(out))
    (scores_a, metrics_a), (scores_b, metrics_b) = runs["default"], runs["off"]
    assert len(scores_a) == len(scores_b) == 2 and all(torch.equal(a, b) for a, b in zip(scores_a, scores_b))

    def comparable(m):
        return {k: v for k, v in m.items() if not k.startswith(("time/", "perf/", "memory/", "sync/seconds"))
                and k not in ("time", "rollout/generate_seconds")}  # wall-clock figures

    assert [comparable(m) for m in metrics_a] == [comparable(m) for m in metrics_b]
    assert not any(k.startswith("dynamic/") or "overlong" in k for m in metrics_b for k in m)


@pytest.mark.e2e
def test_overlong_filtering_and_soft_punishment_in_the_stage(tiny_paths, tiny_sft, vllm_engine, tmp_path, monkeypatch):
    """max_new_tokens 8: the SFT policy's answers of 3 adjectives are cut. Overlong filtering zeroes their rows of
    the loss mask (the policy loss sees only finished answers' tokens), and the soft punishment (buffer 3: the ramp
    starts at 5 tokens) is added to each score before the reward clip, its mean logged."""
    import alignment.stages.ppo as stage
    from alignment.config.ppo import PPORecipe
    from alignment.config.schema import load_recipe
    from conftest import read_metrics

    shaped, trained, loss_tokens = [], [], []
    shape_scores, train_on_batch, policy_loss = stage.shape_scores, stage._train_on_batch, stage.clipped_policy_loss

    def spy_shape(raw, finish_reasons, algo, running_reward, length_penalty=None):
        result = shape_scores(raw, finish_reasons, algo, running_reward, length_penalty)
        shaped.append((raw.clone(), list(finish_reasons), length_penalty.clone(), result.clone()))
        return result

    def spy_train(batch, *args, **kwargs):
        trained.append((batch.mask.clone(), [len(c) for c in batch.completion_ids], list(batch.finish_reasons)))
        loss_tokens.append(0.0)
        return train_on_batch(batch, *args, **kwargs)

    def spy_loss(logp, old_logp, advantages, mask, *args, **kwargs):
        loss_tokens[-1] += float(mask.sum())
        return policy_loss(logp, old_logp, advantages, mask, *args, **kwargs)

    monkeypatch.setattr(stage, "shape_scores", spy_shape)
    monkeypatch.setattr(stage, "_train_on_batch", spy_train)
    monkeypatch.setattr(stage, "clipped_policy_loss", spy_loss)
    out = tmp_path / "run"
    stage.run(load_recipe(GRPO, PPORecipe, grpo_overrides(
        tiny_paths, tiny_sft.final, out, "train.steps=2", "train.prompts_per_step=8", "rollout.sampling.max_new_tokens=8",
        "algorithm.overlong.filter=true", "algorithm.overlong.buffer=3", "algorithm.overlong.penalty_factor=1.0",
        "algorithm.reward_clip=0.5")), engine=vllm_engine)

    metrics = read_metrics(out)
    epochs = 2  # recipes/tiny/ppo_grpo.yaml: every sample is in one minibatch of each of 2 epochs
    assert len(metrics) == len(trained) == len(shaped) == 2
    for m, (mask, lengths, reasons), (raw, _, penalty, scores), tokens in zip(metrics, trained, shaped, loss_tokens):
        cut = torch.tensor([r == "length" for r in reasons])
        assert 0 < int(cut.sum()) < len(cut), reasons  # a mix of cut and finished answers
        assert all(n == 8 for n, c in zip(lengths, cut.tolist()) if c)
        # the cut rows carry no loss weight, the finished ones all their tokens
        assert float(mask[cut].sum()) == 0
        assert mask[~cut].sum(1).tolist() == [float(n) for n, c in zip(lengths, cut.tolist()) if not c]
        assert tokens == epochs * sum(n for n, c in zip(lengths, cut.tolist()) if not c)
        close(m["ppo/overlong_filtered"], float(cut.float().mean()))
        assert m["ppo/truncation_rate"] == pytest.approx(float(cut.float().mean()))  # the metrics see every sample
        # soft punishment: 0 up to 5 tokens, (5 - n) / 3 after, -1 at 8; added before the clip at 0.5
        expected = [0.0 if n <= 5 else (5 - n) / 3 for n in lengths]
        close(penalty, expected)
        close(scores, (raw + torch.tensor(expected)).clamp(-0.5, 0.5))
        close(m["ppo/overlong_penalty"], sum(expected) / len(expected))


@pytest.mark.e2e
def test_dynamic_sampling_at_its_bound_trains_on_what_there_is_or_skips(tiny_paths, tiny_sft, vllm_engine, tmp_path,
                                                                        capsys):
    """No extra round allowed: a step trains on the groups with signal it found (a short batch, warned about); a
    reward that never varies leaves nothing to train on, and every step is skipped with a counted warning."""
    from alignment.config.ppo import PPORecipe
    from alignment.config.schema import load_recipe
    from alignment.stages.ppo import run
    from conftest import read_metrics

    reward_file = tmp_path / "rewards.py"
    reward_file.write_text(MENTIONS_ITEM + "\n\ndef constant(prompts, completions, **unused):\n"
                           "    return [1.0] * len(completions)\n")

    def recipe(out, reward, *extra):
        return load_recipe(GRPO, PPORecipe, grpo_overrides(
            tiny_paths, tiny_sft.final, out, f"rewards=[{{kind: function, function: '{reward_file}:{reward}'}}]",
            "train.prompts_per_step=8", "algorithm.dynamic_sampling.enabled=true", *extra))

    run(recipe(tmp_path / "short", "mentions_item", "train.steps=1", "algorithm.dynamic_sampling.max_rounds=0"),
        engine=vllm_engine)
    (m,) = read_metrics(tmp_path / "short")
    print({k: v for k, v in m.items() if k.startswith("dynamic/")})
    assert 0 < m["dynamic/kept_groups"] < 8 and m["dynamic/extra_rounds"] == 0 and m["dynamic/generated_samples"] == 32
    assert m["dynamic/kept_groups"] + m["dynamic/dropped_groups"] == 8 and "ppo/policy_loss" in m
    assert f"dynamic sampling found {m['dynamic/kept_groups']:.0f} of 8 groups" in capsys.readouterr().out

    run(recipe(tmp_path / "none", "constant", "train.steps=2", "algorithm.dynamic_sampling.max_rounds=1"),
        engine=vllm_engine)
    said = capsys.readouterr().out
    assert "step 1: dynamic sampling kept fewer groups with varied rewards than processes; step skipped (2 in this run" in said
    assert not (tmp_path / "none" / "metrics.jsonl").exists() or not read_metrics(tmp_path / "none")
    assert (tmp_path / "none" / "final" / "model.safetensors").is_file()


@pytest.mark.e2e
def test_a_resumed_run_with_dynamic_sampling_draws_and_trains_as_the_uninterrupted_one(tiny_paths, tiny_sft, vllm_engine,
                                                                                       tmp_path):
    """The refill rounds move the prompt stream by a number of prompts that depends on the rewards: a run resumed from
    its step-2 checkpoint must continue from where the stream stood, with the same refill seeds, and train steps 3-4
    exactly as the run that never stopped."""
    import shutil

    import alignment.stages.ppo as stage
    from alignment.config.ppo import PPORecipe
    from alignment.config.schema import load_recipe
    from conftest import read_metrics

    reward_file = tmp_path / "mentions.py"
    reward_file.write_text(MENTIONS_ITEM)

    def recipe(out):
        return load_recipe(GRPO, PPORecipe, grpo_overrides(
            tiny_paths, tiny_sft.final, out, f"rewards=[{{kind: function, function: '{reward_file}:mentions_item'}}]",
            "train.steps=4", "output.save_steps=2", "train.prompts_per_step=8", "algorithm.dynamic_sampling.enabled=true",
            "algorithm.dynamic_sampling.max_rounds=4"))

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    stage.run(recipe(straight), engine=vllm_engine)
    # the state a run killed after its step-2 checkpoint leaves (the rerun drops the metrics past it)
    shutil.copytree(straight, resumed, ignore=lambda d, names: [n for n in names if n in (".lock", "checkpoint-4", "final")])
    stage.run(recipe(resumed), engine=vllm_engine)

    expected, got = read_metrics(straight), read_metrics(resumed)
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    assert sum(m["dynamic/extra_rounds"] for m in expected[2:]) >= 1  # the resumed steps did refill
    for want, have in zip(expected[2:], got[2:]):
        for key in ("dynamic/generated_samples", "dynamic/kept_groups", "dynamic/dropped_groups", "dynamic/extra_rounds",
                    "ppo/reward", "ppo/policy_loss", "ppo/kl", "ppo/response_length"):
            assert have[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), (want["step"], key)
    loop = lambda out: json.loads((out / "checkpoints" / "checkpoint-4" / "loop_state.json").read_text())["loop"]  # noqa: E731
    assert loop(resumed) == loop(straight)
