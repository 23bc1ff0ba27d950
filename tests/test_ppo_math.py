"""Hand-computed checks of the PPO math in alignment/ppo (tolerance 1e-6 unless said otherwise)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from alignment.ppo import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    KL_PLACEMENTS,
    AdaptiveKLController,
    AdvantageParams,
    FixedKLController,
    RunningMoments,
    aggregate_loss,
    clip_scores,
    clipped_policy_loss,
    clipped_value_loss,
    discounted_returns,
    explained_variance,
    gae,
    grpo_scores,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_loss_term,
    masked_mean,
    masked_whiten,
    normalize_scores,
    penalize_truncated,
    rloo_scores,
    token_level_rewards,
    token_logprobs,
    truncated_is_weights,
    validate_advantage_estimator,
    validate_kl,
)

TOL = dict(rtol=0, atol=1e-6)
REPO = Path(__file__).resolve().parents[1]


def t64(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


def close(actual, expected, **tol) -> None:
    torch.testing.assert_close(t64(actual).detach(), t64(expected), **(tol or TOL))


# --------------------------------------------------------------------------- GAE


def test_gae_1x3_by_hand():
    rewards, values, mask = t64([[0.0, 0.0, 1.0]]), t64([[0.5, 0.6, 0.7]]), t64([[1, 1, 1]])
    gamma, lam = 0.9, 0.8
    # t=2: delta = 1 + 0.9*0 - 0.7 = 0.3                       A2 = 0.3
    # t=1: delta = 0 + 0.9*0.7 - 0.6 = 0.03                    A1 = 0.03 + 0.72*0.3   = 0.246
    # t=0: delta = 0 + 0.9*0.6 - 0.5 = 0.04                    A0 = 0.04 + 0.72*0.246 = 0.21712
    # returns = A + V = [0.71712, 0.846, 1.0]
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    close(advantages, [[0.21712, 0.246, 0.3]])
    close(returns, [[0.71712, 0.846, 1.0]])


def test_gae_padded_2x4_by_hand():
    rewards = t64([[0.1, 0.0, 0.0, 2.0], [0.0, 1.0, 99.0, 99.0]])
    values = t64([[1.0, 2.0, 3.0, 4.0], [0.5, 0.25, 7.0, 7.0]])
    mask = t64([[1, 1, 1, 1], [1, 1, 0, 0]])
    gamma, lam = 1.0, 0.5
    # row 0 (4 real tokens):
    #   t=3: delta = 2 - 4 = -2                 A3 = -2
    #   t=2: delta = 0 + 4 - 3 = 1              A2 = 1 + 0.5*(-2) = 0
    #   t=1: delta = 0 + 3 - 2 = 1              A1 = 1 + 0.5*0    = 1
    #   t=0: delta = 0.1 + 2 - 1 = 1.1          A0 = 1.1 + 0.5*1  = 1.6
    #   returns = [2.6, 3, 3, 2]
    # row 1 (2 real tokens; the 99s and 7s are padding and must not leak):
    #   t=1: delta = 1 + 1*0 - 0.25 = 0.75      A1 = 0.75
    #   t=0: delta = 0 + 0.25 - 0.5 = -0.25     A0 = -0.25 + 0.5*0.75 = 0.125
    #   returns = [0.625, 1.0, 0, 0]
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    close(advantages, [[1.6, 1.0, 0.0, -2.0], [0.125, 0.75, 0.0, 0.0]])
    close(returns, [[2.6, 3.0, 3.0, 2.0], [0.625, 1.0, 0.0, 0.0]])


def _random_padded(B=4, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([6, 1, 4, 3])[:B]
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    return rewards, values, mask, g


def test_gae_gamma1_lam1_is_returns_minus_values():
    rewards, values, mask, _ = _random_padded()
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # A_t = sum_{k>=t} r_k - V_t (the values telescope away), computed here with a reversed cumsum
    reward_to_go = (rewards * mask).flip(1).cumsum(1).flip(1)
    close(advantages, (reward_to_go - values) * mask)
    close(returns, reward_to_go * mask)


@pytest.mark.parametrize("fn", ["gae", "discounted_returns"])
def test_padding_changes_nothing(fn):
    rewards, values, mask, g = _random_padded()
    garbage_r = rewards + 1000 * torch.randn(rewards.shape, generator=g, dtype=torch.float64) * (1 - mask)
    garbage_v = values + 1000 * torch.randn(values.shape, generator=g, dtype=torch.float64) * (1 - mask)
    assert not torch.equal(garbage_r, rewards)
    if fn == "gae":
        clean = gae(rewards, values, mask, 0.99, 0.95)
        dirty = gae(garbage_r, garbage_v, mask, 0.99, 0.95)
    else:
        clean = (discounted_returns(rewards, mask, 0.9),)
        dirty = (discounted_returns(garbage_r, mask, 0.9),)
    for c, d in zip(clean, dirty):
        close(d, c)
        assert torch.all(d[mask == 0] == 0)


def test_discounted_returns_by_hand():
    rewards, mask = t64([[1.0, 2.0, 4.0], [3.0, 5.0, 7.0]]), t64([[1, 1, 1], [1, 0, 0]])
    # row 0: G2 = 4, G1 = 2 + 0.5*4 = 4, G0 = 1 + 0.5*4 = 3;  row 1: G0 = 3 (5 and 7 are padding)
    close(discounted_returns(rewards, mask, 0.5), [[3.0, 4.0, 4.0], [3.0, 0.0, 0.0]])


# --------------------------------------------------------------------------- KL


def test_kl_estimators_by_hand():
    logp, ref_logp = t64([math.log(0.5)]), t64([math.log(0.25)])
    # log r = log(0.25 / 0.5) = -log 2,  r = 0.5
    close(kl_k1(logp, ref_logp), [math.log(2)])  # 0.693147
    close(kl_k2(logp, ref_logp), [0.5 * math.log(2) ** 2])  # 0.240227
    close(kl_k3(logp, ref_logp), [0.5 + math.log(2) - 1])  # 0.193147
    assert KL_ESTIMATORS == {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def test_k1_k3_are_unbiased_under_the_policy():
    # Enumerate a 3-token vocabulary: E_{x~p}[k(x)] must equal KL(p || q) exactly for k1 and k3.
    p, q = t64([0.5, 0.3, 0.2]), t64([0.2, 0.5, 0.3])
    kl = float((p * (p / q).log()).sum())
    for estimator in (kl_k1, kl_k3):
        close((p * estimator(p.log(), q.log())).sum(), kl)
    # k2 is biased: its expectation differs from the true KL here.
    assert abs(float((p * kl_k2(p.log(), q.log())).sum()) - kl) > 1e-3


def test_k3_nonnegative_and_k2_nonnegative():
    g = torch.Generator().manual_seed(1)
    logp, ref_logp = 3 * torch.randn(1000, generator=g), 3 * torch.randn(1000, generator=g)
    assert bool((kl_k3(logp, ref_logp) >= 0).all())
    assert bool((kl_k2(logp, ref_logp) >= 0).all())
    assert bool((kl_k1(logp, ref_logp) < 0).any())  # k1 can be negative per token
    assert float(kl_k3(logp, logp).abs().max()) == 0.0


def _leash_gradient(estimator: str, placement: str, logits: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """The exact expected gradient (w.r.t. the logits) that the PPO loss's KL leash puts on a one-token policy,
    built the way the stage builds it: every vocabulary entry is one sampled sequence, weighed by its probability.

    reward: the penalty k(old_logp, ref_logp) enters the reward (token_level_rewards), the advantage is the return,
            and the clipped policy loss carries it; loss: kl_loss_term(logp, ref_logp) is added to the loss.
    On-policy: old_logp = logp at the current logits."""
    logits = logits.clone().requires_grad_(True)
    logp = torch.log_softmax(logits, -1)[:, None]  # [V, 1]: entry x as a sequence of one token
    old_logp, ref, mask = logp.detach(), ref_logp[:, None], torch.ones(len(logits), 1, dtype=logits.dtype)
    kl_fn = KL_ESTIMATORS[estimator]
    if placement == "reward":
        rewards = token_level_rewards(torch.zeros(len(logits), dtype=logits.dtype), kl_fn(old_logp, ref), mask, kl_coef=1.0)
        per_token = clipped_policy_loss(logp, old_logp, discounted_returns(rewards, mask, 1.0), mask).loss_per_token
    else:
        per_token = kl_loss_term(logp, ref, mask, kl_fn, coef=1.0)
    (old_logp.exp() * per_token).sum().backward()  # expectation over x ~ pi
    return logits.grad


def _divergence_gradient(divergence: str, logits: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    logits = logits.clone().requires_grad_(True)
    logp = torch.log_softmax(logits, -1)
    if divergence == "KL(pi || ref)":
        value = (logp.exp() * (logp - ref_logp)).sum()
    else:
        assert divergence == "KL(ref || pi)"
        value = (ref_logp.exp() * (ref_logp - logp)).sum()
    value.backward()
    return logits.grad


def _five_token_policy_and_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, generator=g, dtype=torch.float64)
    ref_logp = torch.log_softmax(torch.randn(5, generator=g, dtype=torch.float64), -1)
    return logits, ref_logp


@pytest.mark.parametrize("pair", sorted(KL_PLACEMENTS), ids=lambda p: f"{p[0]}-in-{p[1]}")
def test_allowed_kl_pairs_give_their_divergences_exact_gradient(pair):
    logits, ref_logp = _five_token_policy_and_reference()
    expected = _divergence_gradient(KL_PLACEMENTS[pair], logits, ref_logp)
    assert expected.abs().max() > 0.05  # the policy is far enough from the reference for the check to bite
    close(_leash_gradient(*pair, logits, ref_logp), expected, rtol=0, atol=1e-12)
    assert validate_kl(*pair) == []


@pytest.mark.parametrize("pair", [("k1", "loss"), ("k2", "reward"), ("k3", "reward")], ids=lambda p: f"{p[0]}-in-{p[1]}")
def test_wrong_kl_pairs_are_refused_with_the_reason(pair):
    logits, ref_logp = _five_token_policy_and_reference()
    got = _leash_gradient(*pair, logits, ref_logp)
    for divergence in ("KL(pi || ref)", "KL(ref || pi)"):  # follows neither direction's gradient
        assert (got - _divergence_gradient(divergence, logits, ref_logp)).abs().max() > 0.05
    if pair == ("k1", "loss"):
        close(got, torch.zeros(5), rtol=0, atol=1e-12)  # the leash vanishes
    [error] = validate_kl(*pair)
    assert f"estimator {pair[0]} with placement {pair[1]}" in error and "k2 in the loss" in error


def test_recipe_check_refuses_a_wrong_kl_pair_and_takes_the_defaults():
    from alignment.config.ppo import KLSection, PPORecipe
    from alignment.config.schema import load_recipe
    from alignment.errors import RecipeError

    tiny = REPO / "recipes/tiny/ppo.yaml"
    assert (KLSection().estimator, KLSection().placement) == ("k1", "reward")  # the defaults are a sound pair
    with pytest.raises(RecipeError, match="algorithm.kl: estimator k1 with placement loss gives a wrong KL gradient"):
        load_recipe(tiny, PPORecipe, ["algorithm.kl.placement=loss"], check_paths=False)
    with pytest.raises(RecipeError, match="estimator k3 with placement reward"):
        load_recipe(tiny, PPORecipe, ["algorithm.kl.estimator=k3"], check_paths=False)


def test_kl_loss_term_is_weighted_like_the_policy_term():
    logp = torch.tensor([[math.log(0.5), math.log(0.25), math.log(0.1)]], dtype=torch.float64, requires_grad=True)
    ref_logp, mask = torch.log(t64([[0.25, 0.25, 0.5]])), t64([[1, 1, 0]])
    weights = t64([[2.0, 0.5, 3.0]])
    term = kl_loss_term(logp, ref_logp, mask, kl_k2, coef=0.1, is_weights=weights)
    # k2 = (log 0.5 - log 0.25)^2 / 2 = (ln 2)^2 / 2 at token 0, 0 at token 1; padding 0
    close(term.detach(), [[0.1 * 2.0 * math.log(2) ** 2 / 2, 0.0, 0.0]])
    term.sum().backward()
    close(logp.grad, [[0.1 * 2.0 * math.log(2), 0.0, 0.0]])  # d k2 / d logp = logp - ref_logp, times coef * w
    close(kl_loss_term(logp, ref_logp, mask, kl_k2, coef=0.1).detach(), [[0.1 * math.log(2) ** 2 / 2, 0.0, 0.0]])


def test_adaptive_kl_controller_sequence_and_resume():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    # KL 12: error 12/6 - 1 = 1, clipped to 0.2:   beta = 0.2 * (1 + 0.2 * 256/10000)
    ctl.update(12.0, n_steps=256)
    beta = 0.2 * (1 + 0.2 * 0.0256)
    assert ctl.coef == pytest.approx(beta, abs=1e-12)
    # KL 3: error 3/6 - 1 = -0.5, clipped to -0.2
    ctl.update(3.0, n_steps=256)
    beta *= 1 - 0.2 * 0.0256
    assert ctl.coef == pytest.approx(beta, abs=1e-12)
    # KL 6.6: error 0.1 (inside the clip)
    ctl.update(6.6, n_steps=256)
    beta *= 1 + 0.1 * 0.0256
    assert ctl.coef == pytest.approx(beta, abs=1e-12)
    assert ctl.coef == pytest.approx(0.2005067, abs=1e-6)

    resumed = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    resumed.load_state_dict(ctl.state_dict())
    ctl.update(9.0, n_steps=64)
    resumed.update(9.0, n_steps=64)
    assert resumed.coef == ctl.coef != 0.2


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, n_steps=1000)
    assert ctl.coef == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.coef == 0.05


# --------------------------------------------------------------------------- rewards


def test_token_level_rewards_by_hand():
    scores = t64([2.0, -1.0])
    kl = t64([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mask = t64([[1, 1, 1], [1, 1, 0]])
    # r_t = -0.5 * kl_t, plus the score at the last real token (index 2 for row 0, 1 for row 1)
    close(token_level_rewards(scores, kl, mask, kl_coef=0.5), [[-0.05, -0.1, 1.85], [-0.2, -1.25, 0.0]])
    with pytest.raises(ValueError, match="no real token"):
        token_level_rewards(scores, kl, t64([[1, 1, 1], [0, 0, 0]]), 0.5)


def test_score_transforms():
    scores = t64([3.0, -5.0, 1.0])
    close(normalize_scores(scores, mean=1.0, std=2.0, eps=0.0), [1.0, -3.0, 0.0])
    close(clip_scores(scores, 2.0), [2.0, -2.0, 1.0])
    # the penalty is subtracted from truncated answers only; a negative one (which would reward rambling) is refused
    close(penalize_truncated(scores, ["stop", "length", "length"], penalty=1.5), [3.0, -6.5, -0.5])
    with pytest.raises(ValueError):
        penalize_truncated(scores, ["stop"], 1.0)
    with pytest.raises(ValueError, match=">= 0"):
        penalize_truncated(scores, ["stop", "length", "stop"], penalty=-1.0)


@pytest.mark.parametrize("recipe", ["qwen2.5-7b/ppo.yaml", "tiny/ppo.yaml"])
def test_shipped_recipe_scores_a_truncated_answer_below_the_same_answer_finished(recipe):
    """The whole score path of the stage (normalise, truncation penalty, clip) with a shipped recipe's settings."""
    from alignment.config.ppo import PPORecipe
    from alignment.config.schema import load_recipe
    from alignment.stages.ppo import shape_scores

    algo = load_recipe(REPO / "recipes" / recipe, PPORecipe, ["algorithm.truncation_penalty=1.0"] if "tiny" in recipe else [],
                       check_paths=False).algorithm
    assert algo.truncation_penalty == 1.0
    finished, truncated = shape_scores(torch.tensor([0.5, 0.5]), ["stop", "length"], algo, running_reward=None)
    assert truncated < finished
    close(finished - truncated, 1.0)


def test_negative_truncation_penalty_is_a_recipe_error():
    from alignment.config.ppo import PPORecipe
    from alignment.config.schema import load_recipe
    from alignment.errors import RecipeError

    with pytest.raises(RecipeError, match="algorithm.truncation_penalty: must be >= 0"):
        load_recipe(REPO / "recipes/tiny/ppo.yaml", PPORecipe, ["algorithm.truncation_penalty=-1.0"], check_paths=False)


def test_running_moments_matches_numpy_and_resumes():
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, size=n) for n in (5, 17, 1, 64)]
    moments = RunningMoments()
    for b in batches[:2]:
        moments.update(torch.tensor(b))
    resumed = RunningMoments()
    resumed.load_state_dict(moments.state_dict())
    for b in batches[2:]:
        moments.update(torch.tensor(b))
        resumed.update(torch.tensor(b))
    everything = np.concatenate(batches)
    assert moments.count == resumed.count == everything.size
    assert (resumed.mean, resumed.std) == (moments.mean, moments.std)
    assert resumed.mean == pytest.approx(np.mean(everything), abs=1e-12)
    assert resumed.std == pytest.approx(np.std(everything), abs=1e-12)


# --------------------------------------------------------------------------- masking / aggregation


def test_masked_mean_and_whiten():
    values, mask = t64([[1.0, 2.0, 50.0], [3.0, 50.0, 50.0]]), t64([[1, 1, 0], [1, 0, 0]])
    close(masked_mean(values, mask), 2.0)
    close(masked_mean(values, mask, dim=1), [1.5, 3.0])
    real = np.array([1.0, 2.0, 3.0])
    z = (real - real.mean()) / real.std()  # population std: [-1.2247, 0, 1.2247]
    close(masked_whiten(values, mask), [[z[0], z[1], 0.0], [z[2], 0.0, 0.0]])
    close(masked_whiten(values, mask, shift_mean=False), [[z[0] + 2, z[1] + 2, 0.0], [z[2] + 2, 0.0, 0.0]])


def test_aggregation_modes_by_hand():
    loss, mask = t64([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]]), t64([[1, 1, 1], [1, 0, 0]])
    close(aggregate_loss(loss, mask, "token_mean"), (1 + 2 + 3 + 4) / 4)  # 2.5
    close(aggregate_loss(loss, mask, "seq_mean_token_sum"), (6 + 4) / 2)  # 5
    close(aggregate_loss(loss, mask, "seq_mean_token_mean"), (2 + 4) / 2)  # 3
    with pytest.raises(ValueError, match="token_mean"):
        aggregate_loss(loss, mask, "mean")  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"])
def test_accumulated_micro_batches_equal_the_full_batch(mode):
    g = torch.Generator().manual_seed(2)
    lengths = torch.tensor([7, 1, 2, 8, 3, 5])
    mask = (torch.arange(8)[None, :] < lengths[:, None]).double()
    loss = torch.randn(6, 8, generator=g, dtype=torch.float64)
    full = aggregate_loss(loss, mask, mode)
    windows = dict(num_tokens_in_window=mask.sum(), num_seqs_in_window=6)
    micro = [(loss[:2], mask[:2]), (loss[2:3], mask[2:3]), (loss[3:], mask[3:])]
    accumulated = sum(aggregate_loss(l, m, mode, **windows) for l, m in micro)
    close(accumulated, full)
    # Without the window totals each micro-batch normalises by itself: the mean of means differs.
    naive = sum(aggregate_loss(l, m, mode) for l, m in micro) / len(micro)
    assert abs(float(naive) - float(full)) > 1e-3


# --------------------------------------------------------------------------- advantage estimators


def test_grpo_and_dr_grpo_scores_by_hand():
    scores = t64([1.0, 0.0, 0.0, 1.0, 2.0, 4.0])
    # group [1, 0, 0]: mean 1/3, unbiased std sqrt((4/9 + 1/9 + 1/9) / 2) = 1/sqrt(3)
    # group [1, 2, 4]: mean 7/3, unbiased std sqrt((16/9 + 1/9 + 25/9) / 2) = sqrt(7/3)
    s1, s2 = 1 / math.sqrt(3), math.sqrt(7 / 3)
    expected = [2 / 3 / s1, -1 / 3 / s1, -1 / 3 / s1, -4 / 3 / s2, -1 / 3 / s2, 5 / 3 / s2]
    close(grpo_scores(scores, group_size=3, eps=0.0), expected)
    close(grpo_scores(scores, group_size=3, scale_by_std=False), [2 / 3, -1 / 3, -1 / 3, -4 / 3, -1 / 3, 5 / 3])
    with pytest.raises(ValueError, match="groups of 4"):
        grpo_scores(scores, group_size=4)


def test_rloo_scores_by_hand():
    scores = t64([1.0, 0.0, 0.0, 1.0, 2.0, 4.0])
    # baseline_i = mean of the other two:  [0, 0.5, 0.5] and [3, 2.5, 1.5]
    close(rloo_scores(scores, group_size=3), [1.0, -0.5, -0.5, -2.0, -0.5, 2.5])
    with pytest.raises(ValueError):
        rloo_scores(scores, group_size=1)


def test_group_estimators_broadcast_over_tokens():
    scores = t64([1.0, 0.0, 0.0, 1.0, 2.0, 4.0])
    mask = t64([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1], [1, 0, 0], [1, 1, 0]])
    kl = torch.full((6, 3), 123.0, dtype=torch.float64)  # ignored: kl_coef = 0
    params = AdvantageParams(group_size=3, kl_coef=0.0, gamma=1.0, eps=0.0)
    # Per-sequence values by hand (see test_grpo_and_dr_grpo_scores_by_hand and test_rloo_scores_by_hand):
    s1, s2 = 1 / math.sqrt(3), math.sqrt(7 / 3)  # unbiased group stds
    for name, per_seq in [
        ("grpo", [2 / 3 / s1, -1 / 3 / s1, -1 / 3 / s1, -4 / 3 / s2, -1 / 3 / s2, 5 / 3 / s2]),
        ("dr_grpo", [2 / 3, -1 / 3, -1 / 3, -4 / 3, -1 / 3, 5 / 3]),
        ("rloo", [1.0, -0.5, -0.5, -2.0, -0.5, 2.5]),
    ]:
        advantages, returns = ADVANTAGE_ESTIMATORS[name].compute(scores, kl, mask, None, params)
        close(advantages, t64(per_seq)[:, None] * mask)
        close(returns, t64(per_seq)[:, None] * mask)


def _whiten_np(xs: list[float]) -> list[float]:
    a = np.array(xs)
    return list((a - a.mean()) / np.sqrt(a.var() + 1e-8))


def test_reinforce_pp_by_hand():
    scores = t64([1.0, 0.0])
    kl = t64([[0.1, 0.2, 0.3], [0.5, 0.4, 9.0]])
    mask = t64([[1, 1, 1], [1, 1, 0]])
    params = AdvantageParams(kl_coef=0.1, gamma=1.0)
    # rewards: row 0 [-0.01, -0.02, -0.03 + 1] -> reward-to-go [0.94, 0.95, 0.97]
    #          row 1 [-0.05, -0.04 + 0]        -> reward-to-go [-0.09, -0.04]
    advantages, returns = ADVANTAGE_ESTIMATORS["reinforce++"].compute(scores, kl, mask, None, params)
    close(returns, [[0.94, 0.95, 0.97], [-0.09, -0.04, 0.0]])
    w = _whiten_np([0.94, 0.95, 0.97, -0.09, -0.04])  # global whitening over the 5 real tokens
    close(advantages, [[w[0], w[1], w[2]], [w[3], w[4], 0.0]])


def test_reinforce_pp_baseline_by_hand():
    scores = t64([1.0, 0.0])
    kl = t64([[0.1, 0.2, 0.3], [0.5, 0.4, 9.0]])
    mask = t64([[1, 1, 1], [1, 1, 0]])
    params = AdvantageParams(kl_coef=0.1, gamma=1.0, group_size=2)
    # group mean 0.5 -> baselined scores [0.5, -0.5]
    # rewards: row 0 [-0.01, -0.02, 0.47] -> [0.44, 0.45, 0.47];  row 1 [-0.05, -0.54] -> [-0.59, -0.54]
    advantages, returns = ADVANTAGE_ESTIMATORS["reinforce++_baseline"].compute(scores, kl, mask, None, params)
    close(returns, [[0.44, 0.45, 0.47], [-0.59, -0.54, 0.0]])
    w = _whiten_np([0.44, 0.45, 0.47, -0.59, -0.54])
    close(advantages, [[w[0], w[1], w[2]], [w[3], w[4], 0.0]])


def test_gae_estimator_whitens_advantages_not_returns():
    scores, kl = t64([1.0]), t64([[0.0, 0.0, 0.0]])
    values, mask = t64([[0.5, 0.6, 0.7]]), t64([[1, 1, 1]])
    params = AdvantageParams(gamma=0.9, lam=0.8, kl_coef=0.0)
    advantages, returns = ADVANTAGE_ESTIMATORS["gae"].compute(scores, kl, mask, values, params)
    close(returns, [[0.71712, 0.846, 1.0]])  # as in test_gae_1x3_by_hand
    close(advantages, [_whiten_np([0.21712, 0.246, 0.3])])
    with pytest.raises(ValueError, match="critic"):
        ADVANTAGE_ESTIMATORS["gae"].compute(scores, kl, mask, None, params)


def test_advantage_registry_and_config_check():
    assert {n for n, e in ADVANTAGE_ESTIMATORS.items() if e.needs_critic} == {"gae"}
    assert validate_advantage_estimator("gae", 1) == []
    assert validate_advantage_estimator("grpo", 4) == []
    [unknown] = validate_advantage_estimator("grpoo", 4)
    assert "'grpoo'" in unknown and "grpo" in unknown
    [too_small] = validate_advantage_estimator("rloo", 1)
    assert "at least 2 samples per prompt, got 1" in too_small


# --------------------------------------------------------------------------- policy loss


def _grad_of_loss(ratio: float, advantage: float, **kw) -> tuple[float, float]:
    """(loss, d loss / d logp) for one token with old_logp = 0, logp = log(ratio)."""
    logp = torch.tensor([[math.log(ratio)]], dtype=torch.float64, requires_grad=True)
    out = clipped_policy_loss(logp, t64([[0.0]]), t64([[advantage]]), t64([[1.0]]), **kw)
    out.loss_per_token.sum().backward()
    return float(out.loss_per_token.detach()), float(logp.grad)


@pytest.mark.parametrize(
    "ratio, advantage, loss, grad",
    [
        # inside the band [0.9, 1.3]: L = -A * rho, dL/dlogp = -A * rho
        (1.25, 1.0, -1.25, -1.25),
        (0.95, -2.0, 1.9, 1.9),
        # above 1 + clip_high with A > 0: clipped, L = -1.3, no gradient
        (1.5, 1.0, -1.3, 0.0),
        # above the band with A < 0: the unclipped term is larger, gradient kept
        (1.5, -1.0, 1.5, 1.5),
        # below 1 - clip_low with A < 0: clipped, L = 0.9 * 1, no gradient
        (0.85, -1.0, 0.9, 0.0),
        # below the band with A > 0: unclipped, gradient kept
        (0.5, 2.0, -1.0, -1.0),
    ],
)
def test_policy_clip_zeroes_the_right_gradients(ratio, advantage, loss, grad):
    got_loss, got_grad = _grad_of_loss(ratio, advantage, clip_low=0.1, clip_high=0.3)
    assert got_loss == pytest.approx(loss, abs=1e-6)
    assert got_grad == pytest.approx(grad, abs=1e-6)


@pytest.mark.parametrize(
    "ratio, advantage, loss, grad",
    [
        # A < 0, rho = 10: max(10, 1.2) = 10 > 3 = -c*A -> capped at 3, no gradient
        (10.0, -1.0, 3.0, 0.0),
        # A < 0, rho = 2: max(2, 1.2) = 2 < 3 -> unchanged
        (2.0, -1.0, 2.0, 2.0),
        # A > 0: the dual clip does not apply
        (10.0, 1.0, -1.2, 0.0),
    ],
)
def test_dual_clip(ratio, advantage, loss, grad):
    got_loss, got_grad = _grad_of_loss(ratio, advantage, dual_clip=3.0)
    assert got_loss == pytest.approx(loss, abs=1e-6)
    assert got_grad == pytest.approx(grad, abs=1e-6)


@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_a_huge_log_ratio_gives_a_finite_gradient(dual_clip):
    """log(pi/pi_old) past 88 in float32 (a sampled token the trainer gives log-prob < -88): exp overflows, and the
    clipped loss stays finite while its gradient was inf * 0 = NaN, which the loss check before the optimizer step
    could not see. With the log-ratio bounded the gradient is finite (and zero: the clip removes it)."""
    logp = torch.tensor([[100.0, -100.0, 0.1]], requires_grad=True)
    old = torch.tensor([[-1.0, 0.0, 0.0]])
    out = clipped_policy_loss(logp, old, torch.tensor([[1.0, -1.0, 1.0]]), torch.ones(1, 3), dual_clip=dual_clip)
    out.loss_per_token.sum().backward()
    assert torch.isfinite(out.loss_per_token).all() and torch.isfinite(logp.grad).all()
    assert logp.grad[0, :2].tolist() == [0.0, 0.0]
    assert logp.grad[0, 2] == pytest.approx(-math.exp(0.1))  # an ordinary token keeps its gradient


def test_dual_clip_fraction_and_validation():
    logp = t64([[math.log(10.0), math.log(2.0), 0.0]])
    out = clipped_policy_loss(logp, torch.zeros(1, 3, dtype=torch.float64), t64([[-1.0, -1.0, 5.0]]),
                              t64([[1, 1, 0]]), dual_clip=3.0)
    close(out.dual_clip_fraction, 0.5)  # 1 of the 2 real tokens
    close(out.clip_fraction, 0.0)  # A < 0 with a large ratio is never clipped by the plain clip
    with pytest.raises(ValueError, match="dual_clip"):
        clipped_policy_loss(logp, logp, logp, logp, dual_clip=1.0)


def test_policy_stats_by_hand():
    # ratios [2, 0.5, 1.5, 1.1 (padding)], A = [1, 1, 0, 1]
    logp = t64([[math.log(2.0), math.log(0.5), math.log(1.5), math.log(1.1)]])
    out = clipped_policy_loss(logp, torch.zeros_like(logp), t64([[1.0, 1.0, 0.0, 1.0]]), t64([[1, 1, 1, 0]]))
    # approx_kl = mean((rho - 1) - log rho) = ((1 - ln 2) + (-0.5 + ln 2) + (0.5 - ln 1.5)) / 3
    close(out.approx_kl, (1 - math.log(1.5)) / 3)
    close(out.ratio_mean, (2 + 0.5 + 1.5) / 3)
    # only rho = 2 with A > 0 loses its gradient to the clip (rho = 1.5 with A = 0 has none to lose)
    close(out.clip_fraction, 1 / 3)
    close(out.loss_per_token, [[-1.2, -0.5, 0.0, 0.0]])


def test_truncated_importance_sampling():
    old_logp = torch.tensor([[math.log(0.6), math.log(0.3)]], dtype=torch.float64, requires_grad=True)
    sampler_logp = t64([[math.log(0.3), math.log(0.6)]])
    weights = truncated_is_weights(old_logp, sampler_logp, cap=1.5)
    close(weights, [[1.5, 0.5]])  # min(0.6/0.3, 1.5), min(0.3/0.6, 1.5)
    assert not weights.requires_grad

    logp = torch.tensor([[math.log(1.1), math.log(1.1)]], dtype=torch.float64, requires_grad=True)
    out = clipped_policy_loss(logp, torch.zeros(1, 2, dtype=torch.float64), t64([[1.0, -2.0]]),
                              t64([[1, 1]]), is_weights=weights)
    # unweighted L = [-1.1, 2.2]  ->  weighted [-1.65, 1.1]; gradients scale the same way
    close(out.loss_per_token.detach(), [[-1.65, 1.1]])
    out.loss_per_token.sum().backward()
    close(logp.grad, [[-1.65, 1.1]])


# --------------------------------------------------------------------------- value loss & diagnostics


def test_clipped_value_loss_by_hand():
    values = torch.tensor([[2.0, 1.2, 0.0, 5.0]], dtype=torch.float64, requires_grad=True)
    old_values, returns, mask = t64([[1.0, 1.0, 1.0, 0.0]]), t64([[3.0, 3.0, 3.0, 0.0]]), t64([[1, 1, 1, 0]])
    loss, clip_fraction = clipped_value_loss(values, old_values, returns, mask, value_clip=0.5)
    # token 0: (2-3)^2 = 1 vs clipped V = 1.5: (1.5-3)^2 = 2.25 -> 0.5*2.25 = 1.125, no gradient
    # token 1: inside the clip: 0.5 * (1.2-3)^2 = 1.62, gradient V - R = -1.8
    # token 2: (0-3)^2 = 9 vs clipped V = 0.5: 6.25 -> 4.5, gradient V - R = -3
    close(loss.detach(), [[1.125, 1.62, 4.5, 0.0]])
    close(clip_fraction, 1 / 3)
    loss.sum().backward()
    close(values.grad, [[0.0, -1.8, -3.0, 0.0]])
    unclipped, _ = clipped_value_loss(values, old_values, returns, mask, value_clip=None)
    close(unclipped.detach(), [[0.5, 1.62, 4.5, 0.0]])


def test_token_logprobs_and_entropy_from_one_log_softmax():
    logits = torch.log(t64([[[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]]])) + 7.0  # shift must not matter
    logp, entropy = token_logprobs(logits, torch.tensor([[0, 2]]), with_entropy=True)
    close(logp, [[math.log(0.5), math.log(1 / 3)]])
    # H = 0.5 ln 2 + 2 * 0.25 ln 4 = 1.5 ln 2;  uniform over 3: ln 3
    close(entropy, [[1.5 * math.log(2), math.log(3)]])
    # temperature 2 halves the logits: [0.5, 0.25, 0.25] -> proportional to sqrt -> [0.4142, 0.2929, 0.2929]
    close(token_logprobs(logits, torch.tensor([[0, 2]]), temperature=2.0)[0], [[math.log(2**0.5 / (2**0.5 + 2)), math.log(1 / 3)]])
    low = token_logprobs(logits.to(torch.bfloat16), torch.tensor([[0, 2]]), with_entropy=True)
    assert low[0].dtype == low[1].dtype == torch.float32


def _full_softmax_logprobs(logits, targets, temperature):
    """The unchunked computation token_logprobs replaced: one log_softmax over the whole [B, T, V]."""
    logp_all = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, -1)
    return logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)


@pytest.mark.parametrize("chunk_elements", [5, 11 * 3, 11 * 20, 1 << 25], ids=["part-row", "3-positions", "whole-rows", "one-chunk"])
def test_chunked_logprobs_match_the_full_softmax_in_value_and_gradient(chunk_elements):
    g = torch.Generator().manual_seed(3)
    full = (3 * torch.randn(3, 7, 11, generator=g, dtype=torch.float64)).requires_grad_(True)
    targets = torch.randint(0, 11, (3, 6), generator=g)
    w_logp, w_ent = torch.randn(3, 6, generator=g, dtype=torch.float64), torch.randn(3, 6, generator=g, dtype=torch.float64)
    logp, entropy = token_logprobs(full[:, :-1], targets, 0.7, with_entropy=True, chunk_elements=chunk_elements)
    grad, = torch.autograd.grad((logp * w_logp).sum() + (entropy * w_ent).sum(), full)
    ref_logp, ref_entropy = _full_softmax_logprobs(full[:, :-1], targets, 0.7)
    ref_grad, = torch.autograd.grad((ref_logp * w_logp).sum() + (ref_entropy * w_ent).sum(), full)
    close(logp, ref_logp, rtol=0, atol=1e-12)
    close(entropy, ref_entropy, rtol=0, atol=1e-12)
    close(grad, ref_grad, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda x: token_logprobs(x, targets[:2, :3], 1.3, with_entropy=True, chunk_elements=chunk_elements),
        full[:2, :3].detach().clone().requires_grad_(True))
    # bf16 logits: float32 results, the same values as upcasting first
    low = full.detach().to(torch.bfloat16)
    low_logp, low_entropy = token_logprobs(low, targets.new_zeros(3, 7), with_entropy=True, chunk_elements=chunk_elements)
    assert low_logp.dtype == low_entropy.dtype == torch.float32
    close(low_logp, _full_softmax_logprobs(low, targets.new_zeros(3, 7), 1.0)[0], rtol=0, atol=1e-5)


def test_entropy_of_a_distribution_with_impossible_tokens_is_finite():
    logits = torch.tensor([[[0.0, float("-inf"), math.log(3.0)]]], dtype=torch.float64, requires_grad=True)
    logp, entropy = token_logprobs(logits, torch.tensor([[0]]), with_entropy=True)
    close(logp, [[math.log(0.25)]])
    close(entropy, [[-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]])  # the -inf token contributes 0, not NaN
    (logp + entropy).sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0, 0, 1] == 0
    assert torch.isnan(_full_softmax_logprobs(logits.detach(), torch.tensor([[0]]), 1.0)[1]).all()  # what it replaced


def test_explained_variance_by_hand():
    returns, mask = t64([[1.0, 2.0, 3.0, 100.0]]), t64([[1, 1, 1, 0]])
    # R - V = [0, 0, 1]: Var = 2/9;  Var[R] = 2/3;  EV = 1 - (2/9)/(2/3) = 2/3
    assert explained_variance(t64([[1.0, 2.0, 2.0, -50.0]]), returns, mask) == pytest.approx(2 / 3, abs=1e-6)
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0, abs=1e-6)
    assert explained_variance(torch.full_like(returns, 9.0), returns, mask) == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(explained_variance(returns, torch.ones_like(returns), mask))


def test_model_inputs_left_pad_prompts_right_pad_completions():
    from alignment.ppo.batch import RolloutBatch
    from rollout import Sample

    samples = [Sample(prompt_index=0, prompt_ids=[5, 6, 7], completion_ids=[8], text="", logprobs=[-0.1], finish_reason="stop", weight_version=3),
               Sample(prompt_index=1, prompt_ids=[9], completion_ids=[10, 11, 12], text="", logprobs=[-1.0, -2.0, -3.0],
                      finish_reason="length", weight_version=3)]
    batch = RolloutBatch.from_samples(samples, [4, 7])
    assert batch.mask.tolist() == [[1, 0, 0], [1, 1, 1]] and batch.sampler_logp[1].tolist() == [-1.0, -2.0, -3.0]
    inputs = batch.model_inputs(torch.tensor([1, 0]), pad_id=0, device=torch.device("cpu"))
    assert (inputs.completion_start, inputs.completion_len) == (3, 3)
    assert inputs.input_ids.tolist() == [[0, 0, 9, 10, 11, 12], [5, 6, 7, 8, 0, 0]]
    assert inputs.attention_mask.tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]
    assert inputs.position_ids.tolist() == [[0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 3, 3]]


@pytest.mark.parametrize("family, dropout", [
    ("llama", {"attention_dropout": 0.5}),                                 # a rate kept on the attention module
    ("phi3", {"attention_dropout": 0.5, "resid_pdrop": 0.5, "embd_pdrop": 0.5}),  # and nn.Dropout modules
    ("gpt2", {"attn_pdrop": 0.5, "resid_pdrop": 0.5, "embd_pdrop": 0.5}),
])
def test_trained_models_compute_in_training_mode_without_dropout(family, dropout):
    """PPO's trained models run in training mode (gradient checkpointing needs it) with every dropout off: two forwards
    in training mode equal the eval-mode forward, for models that keep dropout rates as modules or as attributes."""
    import transformers

    from alignment.models import disable_dropout

    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=64, n_embd=128, n_layer=2, n_head=2, n_positions=64, **dropout)
    else:
        cls = {"llama": transformers.LlamaConfig, "phi3": transformers.Phi3Config}[family]
        config = cls(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                     head_dim=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, **dropout)
    config._attn_implementation = "eager"  # the attention kernel reads the module's dropout rate in training mode
    model = transformers.AutoModelForCausalLM.from_config(config)
    ids = torch.randint(0, 64, (2, 12))
    model.train()
    assert not torch.equal(model(ids).logits, model(ids).logits)  # dropout is on as configured
    disable_dropout(model)
    first, second = model(ids).logits, model(ids).logits
    model.eval()
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, model(ids).logits, rtol=0, atol=0)


def test_overoptimization_is_reward_up_and_gold_down_beyond_noise():
    """Two windows of 3 steps: the watch reports once the reward's mean rose and the gold's fell by more than twice the
    standard error of the difference of means, and not for a gold drop within the noise or a reward that fell too."""
    from alignment.ppo.overoptimization import OveroptimizationWatch

    def run(rewards, golds):
        watch = OveroptimizationWatch(window=3)
        return [watch.update(r, g) for r, g in zip(rewards, golds)]

    found = run([0, 0, 0, 1, 1, 1], [0.50, 0.52, 0.48, 0.30, 0.32, 0.28])
    assert found[:5] == [None] * 5 and found[5] is not None
    # gold means 0.50 -> 0.30, each window's variance 0.0004: standard error sqrt(0.0008 / 3) = 0.0163
    assert found[5].gold_drop == pytest.approx(0.2) and found[5].gold_standard_error == pytest.approx(math.sqrt(0.0008 / 3))
    assert found[5].reward_rise == pytest.approx(1.0) and "over the last 3 steps" in found[5].describe()
    assert run([0, 0, 0, 1, 1, 1], [0.5, 0.7, 0.3, 0.45, 0.65, 0.25])[5] is None  # a 0.05 drop in noise of 0.2
    assert run([1, 1, 1, 0, 0, 0], [0.50, 0.52, 0.48, 0.30, 0.32, 0.28])[5] is None  # the reward fell too


def test_token_budget_micro_batches_by_hand():
    from alignment.ppo.batch import RolloutBatch

    prompts, answers = [3, 4, 5, 3, 4, 5], [1, 2, 3, 10, 12, 2]  # totals 4, 6, 8, 13, 16, 7
    batch = RolloutBatch(prompt_ids=[[1] * p for p in prompts], completion_ids=[[2] * c for c in answers],
                         finish_reasons=["stop"] * 6, prompt_rows=list(range(6)), mask=torch.ones(6, 12),
                         sampler_logp=torch.zeros(6, 12), weight_version=0)
    rows = torch.arange(6)
    as_lists = lambda groups: [g.tolist() for g in groups]  # noqa: E731
    # rows by length, padded as model_inputs pads: rows x (longest prompt + longest answer) <= the budget
    assert as_lists(batch.micro_batches(rows, 16, max_tokens=20)) == [[0, 1], [5, 2], [3], [4]]  # 12, 16, 13, 16
    assert [batch.input_tokens(g) for g in batch.micro_batches(rows, 16, max_tokens=20)] == [12, 16, 13, 16]
    assert as_lists(batch.micro_batches(rows, 16, max_tokens=10)) == [[0], [1], [5], [2], [3], [4]]  # a long row alone
    assert as_lists(batch.micro_batches(rows, 2, max_tokens=10**6)) == [[0, 1], [5, 2], [3, 4]]  # and <= rows
    assert as_lists(batch.micro_batches(rows, 4)) == [[0, 1, 5, 2], [3, 4]]  # no budget: micro_batch_size rows
    # one process: the count is what the budget gives
    assert len(batch.distributed_micro_batches(rows, 16, max_tokens=20)) == 4


def test_packed_micro_batches_by_hand():
    """`algorithm.packing`: a micro-batch is its sequences back to back in one row (no padding), position ids
    restarting at each; the budget counts real tokens; outputs land in the [b, T_mb] layout of padded inputs."""
    from alignment.ppo.batch import RolloutBatch

    prompts, answers = [[5, 6], [7], [8, 9, 10]], [[11, 12, 13], [14], []]
    batch = RolloutBatch(prompt_ids=prompts, completion_ids=answers, finish_reasons=["stop"] * 3,
                         prompt_rows=[0, 1, 2], mask=torch.ones(3, 3), sampler_logp=torch.zeros(3, 3), weight_version=0)
    inputs = batch.model_inputs(torch.tensor([0, 1, 2]), pad_id=0, device=torch.device("cpu"), packed=True)
    assert inputs.input_ids.tolist() == [[5, 6, 11, 12, 13, 7, 14, 8, 9, 10]] and inputs.attention_mask is None
    assert inputs.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 0, 1, 2]]
    # the output at position 1 predicts 11, at 2 predicts 12, at 3 predicts 13, at 5 predicts 14; row 2 has no answer
    assert inputs.logit_positions.tolist() == [1, 2, 3, 5] and inputs.completion_len == 3
    assert [t.tolist() for t in inputs.completion_slots] == [[0, 0, 0, 1], [0, 1, 2, 0]]
    assert inputs.unpack(torch.tensor([1.0, 2.0, 3.0, 4.0])).tolist() == [[1, 2, 3], [4, 0, 0], [0, 0, 0]]
    # budgets count real tokens: 2 + 3 (row 1), 3 (row 2), 5 (row 0) sorted by length
    rows = torch.arange(3)
    assert [g.tolist() for g in batch.micro_batches(rows, 16, max_tokens=5, packed=True)] == [[1, 2], [0]]
    assert [g.tolist() for g in batch.micro_batches(rows, 16, max_tokens=5)] == [[1], [2], [0]]  # padded: 2 x 4 > 5
    assert batch.input_tokens(rows, packed=True) == 10 and batch.input_tokens(rows) == 3 * (3 + 3)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma", "mistral", "phi3", "olmo2"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_forwards_equal_padded_ones(family, attention):
    """Policy log-probs, entropy and their gradient, and critic values, of packed micro-batches equal those of padded
    ones on the architectures users bring: transformers must read the packed position ids as separate sequences."""
    import transformers

    from alignment.ppo.batch import RolloutBatch
    from alignment.ppo.forward import TokenValueModel, critic_forward, policy_forward
    from helpers_models import FAMILIES

    config_class, _, extra = FAMILIES[family]
    config = getattr(transformers, config_class)(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, head_dim=16,
        max_position_embeddings=64, pad_token_id=0, num_labels=1, **extra)
    config._attn_implementation = attention
    gen = torch.Generator().manual_seed(0)
    lengths = [(3, 5), (7, 1), (2, 9), (5, 4), (4, 0)]
    batch = RolloutBatch(prompt_ids=[torch.randint(1, 32, (p,), generator=gen).tolist() for p, _ in lengths],
                         completion_ids=[torch.randint(1, 32, (c,), generator=gen).tolist() for _, c in lengths],
                         finish_reasons=["stop"] * 5, prompt_rows=list(range(5)), mask=torch.ones(5, 9),
                         sampler_logp=torch.zeros(5, 9), weight_version=0)
    for i, (_, c) in enumerate(lengths):
        batch.mask[i, c:] = 0
    torch.manual_seed(0)
    policy = transformers.AutoModelForCausalLM.from_config(config)
    critic = TokenValueModel(transformers.AutoModelForSequenceClassification.from_config(config))
    results = {}
    for packed in (False, True):
        inputs = batch.model_inputs(torch.arange(5), pad_id=0, device=torch.device("cpu"), packed=packed)
        policy.zero_grad()
        logp, entropy = policy_forward(policy, inputs, temperature=0.7, with_entropy=True)
        (logp * batch.mask).sum().backward()
        results[packed] = (logp * batch.mask, entropy * batch.mask, critic_forward(critic, inputs) * batch.mask,
                           [p.grad.clone() for p in policy.parameters()])
    for padded, packed in zip(results[False][:3], results[True][:3]):
        torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    for padded, packed in zip(results[False][3], results[True][3]):
        torch.testing.assert_close(packed, padded, rtol=1e-4, atol=1e-5)
    # the packed row is 40 real tokens; padded, 5 rows x (7 + 9)
    assert batch.input_tokens(torch.arange(5), packed=True) == 40 and batch.input_tokens(torch.arange(5)) == 80
