"""Statistics of the evaluation harness and labelers, on hand-made cases with hand-computed answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from alignment.evaluation import stats


def test_win_rate_ties_count_half():
    # per prompt: 1 > 0 win, 0 == 0 tie, 0.5 < 1 loss  ->  (1 + 0.5 + 0) / 3
    wr = stats.win_rate([1.0, 0.0, 0.5], [0.0, 0.0, 1.0], samples=200)
    assert wr.rate.value == pytest.approx(0.5)
    assert (wr.wins, wr.ties, wr.losses) == (1, 1, 1)


def test_win_rate_all_sample_pairs_per_prompt():
    # prompt 0: a = (1, 0) vs b = (0.5, 0): pairs 1>.5 W, 1>0 W, 0<.5 L, 0==0 T -> (1 + 1 + 0 + .5) / 4 = .625
    # prompt 1: a = (2, 2) vs b = (1, 3): W, L, W, L -> .5
    values = stats.win_values([[1.0, 0.0], [2.0, 2.0]], [[0.5, 0.0], [1.0, 3.0]])
    assert values.tolist() == pytest.approx([0.625, 0.5])
    wr = stats.win_rate([[1.0, 0.0], [2.0, 2.0]], [[0.5, 0.0], [1.0, 3.0]], samples=100)
    assert wr.rate.value == pytest.approx(0.5625)
    assert (wr.wins, wr.ties, wr.losses) == (4, 1, 3)


def test_win_rate_is_antisymmetric_and_identical_policies_tie():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(50, 3)), rng.normal(size=(50, 3))
    assert stats.win_rate(a, b).rate.value + stats.win_rate(b, a).rate.value == pytest.approx(1.0)
    same = stats.win_rate(a, a)
    assert same.rate.value == pytest.approx(0.5) and same.rate.low <= 0.5 <= same.rate.high


def test_bootstrap_is_deterministic_and_brackets_the_mean():
    v = np.arange(20, dtype=float)
    e1, e2 = stats.bootstrap_mean(v, seed=3), stats.bootstrap_mean(v, seed=3)
    assert e1 == e2
    assert e1.value == pytest.approx(9.5) and e1.low < 9.5 < e1.high
    assert stats.bootstrap_mean(v, seed=4) != e1
    const = stats.bootstrap_mean([2.0] * 10)
    assert (const.value, const.low, const.high) == (2.0, 2.0, 2.0)


def test_bootstrap_ci_covers_a_known_mean_about_95_percent_of_the_time():
    """Normal(mu=0.3, sd=1), 60 prompts per data set, 300 data sets: the 95% interval should contain mu in
    roughly 95% of them (percentile bootstrap under-covers a little at small n; binomial sd here is 1.3%)."""
    rng = np.random.default_rng(0)
    mu, covered, widths = 0.3, 0, []
    for rep in range(300):
        est = stats.bootstrap_mean(rng.normal(mu, 1.0, size=60), samples=1000, confidence=0.95, seed=rep)
        covered += est.low <= mu <= est.high
        widths.append(est.high - est.low)
    assert 0.90 <= covered / 300 <= 0.99
    # the interval's width is close to the normal theory's 2 * 1.96 * sd / sqrt(n) = 0.506
    assert np.mean(widths) == pytest.approx(2 * 1.96 / math.sqrt(60), rel=0.08)


def test_mean_score_resamples_prompts_not_samples():
    # two prompts with 3 samples each: per-prompt means 1 and 3 -> mean 2; a resample is (1,1), (1,3), (3,1) or (3,3)
    est = stats.mean_score([[0.0, 1.0, 2.0], [3.0, 3.0, 3.0]], samples=2000)
    assert est.value == pytest.approx(2.0) and est.n == 2
    assert est.low == pytest.approx(1.0) and est.high == pytest.approx(3.0)


def test_cohen_kappa_matches_a_hand_computation():
    a = ["A", "A", "A", "A", "A", "A", "B", "B", "B", "B"]
    b = ["A", "A", "A", "A", "A", "B", "B", "B", "B", "A"]
    # p_o = 8/10; a: 6 A, 4 B; b: 6 A, 4 B; p_e = .6*.6 + .4*.4 = .52; kappa = (.8 - .52) / (1 - .52) = .58333
    assert stats.cohen_kappa(a, b) == pytest.approx(0.28 / 0.48)
    assert stats.accuracy(a, b) == pytest.approx(0.8)
    assert stats.cohen_kappa(a, a) == pytest.approx(1.0)
    # three categories: p_o = 3/6; a: A2 B2 tie2, b: A3 B2 tie1 -> p_e = (2*3 + 2*2 + 2*1)/36 = 1/3; kappa = (1/2 - 1/3)/(2/3) = .25
    a3 = ["A", "A", "B", "B", "tie", "tie"]
    b3 = ["A", "B", "B", "A", "tie", "A"]
    assert stats.cohen_kappa(a3, b3) == pytest.approx(0.25)
    # opposite labels on a balanced set: kappa -1
    assert stats.cohen_kappa(["A", "B"] * 5, ["B", "A"] * 5) == pytest.approx(-1.0)


def test_agreement_reports_decisive_accuracy_and_confusion():
    labels = ["A", "B", "tie", "A"]
    reference = ["A", "A", "tie", "tie"]
    out = stats.agreement(labels, reference)
    assert out["accuracy"] == pytest.approx(0.5)
    assert out["n_reference_decisive"] == 2 and out["accuracy_on_decisive"] == pytest.approx(0.5)
    assert out["confusion_reference_to_labeler"] == {"A->A": 1, "A->B": 1, "tie->A": 1, "tie->tie": 1}


def test_truncation_rate_and_input_checks():
    assert stats.truncation_rate(["stop", "length", "stop", "length"]) == 0.5
    with pytest.raises(ValueError):
        stats.win_rate([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        stats.bootstrap_mean([])
    assert stats.preference_values(["A", "tie", "B"]).tolist() == [1.0, 0.5, 0.0]


def test_perplexity_weighs_texts_by_their_tokens():
    from alignment.evaluation.stats import perplexity

    same = perplexity([2 * math.log(2), 2 * math.log(2)], [2, 2], samples=200)
    assert (same.value, same.low, same.high, same.n) == pytest.approx((2.0, 2.0, 2.0, 2))
    mixed = perplexity([0.0, 3 * math.log(3)], [1, 3], samples=2000, seed=1)
    assert mixed.value == pytest.approx(3 ** 0.75)  # exp(total NLL / total tokens), not the mean of per-text perplexities
    assert mixed.low == pytest.approx(1.0) and mixed.high == pytest.approx(3.0)  # resamples of one text only
    with pytest.raises(ValueError):
        perplexity([], [])


def test_reference_metrics_hand_checked():
    from alignment.evaluation.text_metrics import reference_scores

    answer = "the lamp is bright and sturdy ."
    assert reference_scores("bleu", [answer], [answer]) == [pytest.approx(100.0)]
    assert reference_scores("rougeL", [answer, "the lamp is bright ."], [answer, [answer]]) == [
        pytest.approx(1.0), pytest.approx(0.8)]  # rouge-score drops punctuation: LCS 4, precision 4/4, recall 4/6
    # several references: the best one counts
    assert reference_scores("rouge1", ["a b"], [["c d", "a b"]]) == [pytest.approx(1.0)]
    assert reference_scores("bleu", ["x y z"], [["a b c d"]]) == [pytest.approx(0.0)]
