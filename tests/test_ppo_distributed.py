"""PPO math under data parallelism, in 2 real processes (gloo, DeepSpeed on CPU), checked against one process
computing on the concatenated batch:

- advantage whitening (GAE, REINFORCE++, REINFORCE++-baseline) uses the global batch's statistics;
- losses reduced over the whole accumulation window of both ranks, through the DeepSpeed engines and
  `AccumulationWindow` the stage uses, give the single-process gradient of the window's loss;
- a window whose micro-batches were all NaN takes no optimizer step under ZeRO-2 (weights and Adam state unchanged);
- the stage's training pass (`_train_on_batch`, a tiny Llama) with token-budget micro-batches gives the gradient and
  the loss metrics of row micro-batches, the ranks' micro-batch counts made equal (ZeRO-3 runs too).

Both ranks run every check in one spawn (start-up is most of the cost); each test reads its part of the results.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from alignment.ppo import ADVANTAGE_ESTIMATORS, AdvantageParams, aggregate_loss

WORLD = 2
WHITENED = ("gae", "reinforce++", "reinforce++_baseline")
AGGREGATIONS = ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean")


def _global_rollouts():
    """One step's rollouts over both ranks: 8 sequences (2 prompts x 2 samples per rank), ragged lengths."""
    g = torch.Generator().manual_seed(11)
    lengths = torch.tensor([5, 2, 6, 1, 3, 6, 4, 2])
    mask = (torch.arange(6)[None, :] < lengths[:, None]).double()
    scores = torch.randn(8, generator=g, dtype=torch.float64) * 2 + 1
    kl = torch.rand(8, 6, generator=g, dtype=torch.float64) * 0.3 * mask
    values = torch.randn(8, 6, generator=g, dtype=torch.float64) * mask
    return scores, kl, mask, values


def _advantages(name: str, rows: slice, sum_across_ranks=None) -> torch.Tensor:
    scores, kl, mask, values = _global_rollouts()
    params = AdvantageParams(gamma=1.0, lam=0.9, kl_coef=0.5, group_size=2, sum_across_ranks=sum_across_ranks)
    return ADVANTAGE_ESTIMATORS[name].compute(scores[rows], kl[rows], mask[rows], values[rows], params)[0]


class _Toy(torch.nn.Module):
    """A per-token loss with parameters: loss[b, t] = (features[b, t] . w)^2 + bias."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, features):
        return self.linear(features).squeeze(-1) ** 2


def _window_data():
    g = torch.Generator().manual_seed(7)
    lengths = torch.tensor([4, 1, 3, 2, 4, 1])  # 3 sequences per rank
    mask = (torch.arange(4)[None, :] < lengths[:, None]).float()
    return torch.randn(6, 4, 4, generator=g), mask


def _engine(stage: int, **kw):
    from alignment.training import ZeroSettings, make_train_engine

    return make_train_engine(_Toy(), ZeroSettings(stage), lr=1e-2, weight_decay=0.1, warmup_steps=0,
                             micro_batch_size=2, grad_accum_steps=2, max_grad_norm=0.0, **kw)


def _accumulated_gradient(mode: str, rank: int) -> list[torch.Tensor]:
    """This rank's half of the window in 2 micro-batches, reduced as the stage does; the gradient DeepSpeed steps on."""
    from alignment.distributed import all_reduce_sum
    from alignment.training import AccumulationWindow

    features, mask = _window_data()
    mine = slice(3 * rank, 3 * rank + 3)
    features, mask = features[mine], mask[mine]
    engine = _engine(0)
    captured: list[torch.Tensor] = []
    step = engine.optimizer.step

    def spy_step(*args, **kwargs):  # the gradients the optimizer gets, after DeepSpeed's reduction over ranks
        captured.extend(p.grad.clone() for p in engine.module.parameters())
        return step(*args, **kwargs)

    engine.optimizer.step = spy_step
    window_tokens = all_reduce_sum(float(mask.sum())) / WORLD
    window_seqs = all_reduce_sum(float(len(mask))) / WORLD
    window = AccumulationWindow(engine)
    for rows in (slice(0, 2), slice(2, 3)):
        window.backward(aggregate_loss(engine(features[rows]), mask[rows], mode, window_tokens, window_seqs))
    assert window.step()
    return captured


def _skipped_window_under_zero2() -> dict:
    """A good window, then one whose every micro-batch is NaN: the second must leave weights and Adam state alone."""
    from alignment.training import AccumulationWindow

    engine = _engine(2)
    features, mask = _window_data()
    good = AccumulationWindow(engine)
    good.backward(aggregate_loss(engine(features[:2]), mask[:2]))
    assert good.step()
    weights = [p.detach().clone() for p in engine.module.parameters()]
    state = [t.clone() for s in engine.optimizer.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    bad = AccumulationWindow(engine)
    for rows in (slice(0, 2), slice(2, 3)):
        bad.backward(aggregate_loss(engine(features[rows]), mask[rows]) * float("nan"))
    stepped = bad.step()
    after_state = [t for s in engine.optimizer.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return {
        "stepped": stepped,
        "skipped": bad.skipped,
        "weights_equal": all(torch.equal(a, p.detach()) for a, p in zip(weights, engine.module.parameters())),
        "state_equal": len(state) > 0 and all(torch.equal(a, b) for a, b in zip(state, after_state)),
    }


# Completion lengths per rank: rank 0's long tail and rank 1's even lengths group differently under a token budget.
COMPLETION_LENGTHS = ([1, 2, 3, 10, 12, 2], [8, 8, 8, 8, 1, 1])
BUDGETS = (None, 20, 64, 10**6)
PACKED = tuple(("packed", budget) for budget in (None, 20, 64))  # algorithm.packing: padding-free micro-batches


def _rollouts(rank: int):
    """One rank's rollouts for `_train_on_batch`: random prompts (3-5 tokens) and answers, log-probs, advantages."""
    from alignment.ppo.batch import RolloutBatch

    g = torch.Generator().manual_seed(100 + rank)
    lengths = COMPLETION_LENGTHS[rank]
    T = max(lengths)
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).float()
    logp = lambda: -torch.rand(len(lengths), T, generator=g) * mask  # noqa: E731
    batch = RolloutBatch(
        prompt_ids=[torch.randint(1, 32, (3 + i % 3,), generator=g).tolist() for i in range(len(lengths))],
        completion_ids=[torch.randint(1, 32, (n,), generator=g).tolist() for n in lengths],
        finish_reasons=["stop"] * len(lengths), prompt_rows=list(range(len(lengths))), mask=mask,
        sampler_logp=logp(), weight_version=0)
    batch.old_logp, batch.ref_logp = logp(), logp()
    batch.advantages = torch.randn(len(lengths), T, generator=g) * mask
    batch.entropy = torch.zeros_like(mask)
    return batch


def _token_budget_training(rank: int, zero_stage: int) -> dict:
    """Per budget: the gradient the optimizer steps on (stage 0: after the reduction over ranks), the weights after
    the step, the loss metrics and this rank's micro-batch count."""
    from pathlib import Path

    from transformers import LlamaConfig, LlamaForCausalLM

    from alignment.config.ppo import PPORecipe
    from alignment.config.schema import load_recipe
    from alignment.ppo import KL_ESTIMATORS
    from alignment.stages import ppo as stage
    from alignment.training import ZeroSettings, make_train_engine

    out = {}
    for variant in (*BUDGETS, *PACKED):
        packed, budget = variant if isinstance(variant, tuple) else (False, variant)
        recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes/tiny/ppo_grpo.yaml", PPORecipe,
                             ["algorithm.epochs=1", "algorithm.minibatches=1", "algorithm.micro_batch_size=4",
                              f"algorithm.micro_batch_tokens={'null' if budget is None else budget}",
                              f"algorithm.packing={bool(packed)}"], check_paths=False)
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
        engine = make_train_engine(model, ZeroSettings(zero_stage), lr=1e-2, weight_decay=0.0, warmup_steps=0,
                                   micro_batch_size=4, grad_accum_steps=2, max_grad_norm=0.0)
        captured: list[torch.Tensor] = []
        if zero_stage == 0:
            step = engine.optimizer.step

            def spy_step(*args, _step=step, **kwargs):
                captured.extend(p.grad.clone() for p in engine.module.parameters())
                return _step(*args, **kwargs)

            engine.optimizer.step = spy_step
        batch = _rollouts(rank)
        counts = len(batch.distributed_micro_batches(torch.arange(len(batch)), 4, budget, bool(packed)))
        stats = stage._train_on_batch(batch, engine, None, recipe, 0.1, KL_ESTIMATORS["k3"], 0, torch.device("cpu"), 1.0,
                                      train_actor=True, generator_seed=0)
        out[variant] = {"gradient": captured, "stats": stats, "micro_batches": counts,
                        "local_micro_batches": len(batch.micro_batches(torch.arange(len(batch)), 4, budget, bool(packed)))}
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from alignment.distributed import shutdown, sum_across_ranks
    from alignment.training import init_distributed

    init_distributed()
    mine = slice(4 * rank, 4 * rank + 4)
    results = {
        "advantages": {name: _advantages(name, mine, sum_across_ranks) for name in WHITENED},
        "per_rank_advantages": {name: _advantages(name, mine) for name in WHITENED},
        "gradients": {mode: _accumulated_gradient(mode, rank) for mode in AGGREGATIONS},
        "skipped_window": _skipped_window_under_zero2(),
        "token_budget": _token_budget_training(rank, zero_stage=0),
        "token_budget_zero3": _token_budget_training(rank, zero_stage=3),
    }
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    shutdown()  # leave the group once both ranks are done (a rank exiting mid-work can abort the other in gloo)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo_distributed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(port, str(out)), nprocs=WORLD, join=True, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("name", WHITENED)
def test_whitening_uses_the_global_batch(two_ranks, name):
    expected = _advantages(name, slice(None))  # one process, the whole batch
    distributed = torch.cat([r["advantages"][name] for r in two_ranks])
    torch.testing.assert_close(distributed, expected, rtol=0, atol=1e-12)
    # Without the cross-rank sums each rank whitens its own half, and the result depends on the process count.
    per_rank = torch.cat([r["per_rank_advantages"][name] for r in two_ranks])
    assert (per_rank - expected).abs().max() > 1e-2


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_two_rank_accumulation_gives_the_single_process_window_gradient(two_ranks, mode):
    features, mask = _window_data()
    model = _Toy()
    aggregate_loss(model(features), mask, mode).backward()
    for got_0, got_1, expected in zip(two_ranks[0]["gradients"][mode], two_ranks[1]["gradients"][mode], model.parameters()):
        torch.testing.assert_close(got_0, expected.grad, rtol=1e-5, atol=1e-6)  # float32: DeepSpeed reduces no float64
        torch.testing.assert_close(got_1, expected.grad, rtol=1e-5, atol=1e-6)


def test_a_window_of_nan_micro_batches_takes_no_optimizer_step(two_ranks):
    for r in two_ranks:
        assert r["skipped_window"] == {"stepped": False, "skipped": 2, "weights_equal": True, "state_equal": True}


def test_token_budget_micro_batches_give_the_row_micro_batch_gradient(two_ranks):
    for r in two_ranks:
        rows = r["token_budget"][None]
        for budget in (*BUDGETS[1:], *PACKED):
            got = r["token_budget"][budget]
            for a, b in zip(got["gradient"], rows["gradient"]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
            for key in ("ppo/policy_loss", "ppo/clip_fraction", "ppo/approx_kl"):  # token-weighted: grouping-free
                assert got["stats"][key] == pytest.approx(rows["stats"][key], rel=1e-5, abs=1e-7), key
    # The budgets group differently from rows and from rank to rank; the ranks ran the same number of forwards.
    local = {b: [r["token_budget"][b]["local_micro_batches"] for r in two_ranks] for b in BUDGETS}
    assert local[None] == [2, 2] and local[20][0] != local[20][1], local
    assert all(len({r["token_budget"][b]["micro_batches"] for r in two_ranks}) == 1 for b in BUDGETS)
    assert all(r["token_budget"][20]["micro_batches"] == max(local[20]) for r in two_ranks)
    # packed, the budget counts real tokens only: never more forwards than padded under the same budget
    packed = {b: [r["token_budget"][("packed", b)]["local_micro_batches"] for r in two_ranks] for b in (20, 64)}
    assert all(p <= q for b in (20, 64) for p, q in zip(packed[b], local[b])), (packed, local)
    assert all(len({r["token_budget"][v]["micro_batches"] for r in two_ranks}) == 1 for v in PACKED)
    # ZeRO-3 gathers every layer in each forward: unequal counts would hang there; equal ones train alike.
    for r in two_ranks:
        for budget in (*BUDGETS[1:], *PACKED):
            assert r["token_budget_zero3"][budget]["stats"]["ppo/policy_loss"] == pytest.approx(
                r["token_budget_zero3"][None]["stats"]["ppo/policy_loss"], rel=1e-5)
