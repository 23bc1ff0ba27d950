"""PPO math under data parallelism, in 2 real processes (gloo, DeepSpeed on CPU), checked against one process
computing on the concatenated batch:

- advantage whitening (GAE, REINFORCE++, REINFORCE++-baseline) uses the global batch's statistics;
- losses reduced over the whole accumulation window of both ranks, through the DeepSpeed engines and
  `AccumulationWindow` the stage uses, give the single-process gradient of the window's loss;
- a window whose micro-batches were all NaN takes no optimizer step under ZeRO-2 (weights and Adam state unchanged).

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


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from alignment.distributed import sum_across_ranks
    from alignment.training import init_distributed

    init_distributed()
    mine = slice(4 * rank, 4 * rank + 4)
    results = {
        "advantages": {name: _advantages(name, mine, sum_across_ranks) for name in WHITENED},
        "per_rank_advantages": {name: _advantages(name, mine) for name in WHITENED},
        "gradients": {mode: _accumulated_gradient(mode, rank) for mode in AGGREGATIONS},
        "skipped_window": _skipped_window_under_zero2(),
    }
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


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
