"""The intervals of analysis.stats cover the true value about 95 % of the time
on simulated data, agree with scipy where scipy has the function, and the
permutation null of the fANOVA importances flags a planted effect and nothing
on pure noise."""
import numpy as np
import pytest
from scipy import stats as sps

from analysis import stats

N_SIM = 2000


def covered(low, high, truth) -> float:
    return float(np.mean((low <= truth) & (truth <= high)))


@pytest.mark.parametrize("p, n", [(0.30, 1000), (0.85, 10000), (0.17, 600)])
def test_wilson_covers_the_true_accuracy(p, n):
    k = np.random.default_rng(1).binomial(n, p, size=N_SIM)
    low, high = stats.wilson(k, n)
    assert 0.93 <= covered(low, high, p) <= 0.97


def test_wilson_is_scipys():
    for k, n in [(0, 10), (3, 10), (299, 1000), (10, 10), (5123, 10000)]:
        ref = sps.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        low, high = stats.wilson(k, n)
        assert float(low) == pytest.approx(ref.low, abs=1e-12)
        assert float(high) == pytest.approx(ref.high, abs=1e-12)


def test_accuracy_interval_in_percent():
    low, high = stats.accuracy_interval(29.9, 1000)
    ref = sps.binomtest(299, 1000).proportion_ci(method="wilson")
    assert (low, high) == pytest.approx((100 * ref.low, 100 * ref.high))


@pytest.mark.parametrize("n_seeds", [3, 5])
def test_t_interval_covers_the_true_mean(n_seeds):
    values = np.random.default_rng(2).normal(50.0, 1.5, size=(N_SIM, n_seeds))
    mean, sd, low, high = stats.t_interval(values, axis=1)
    assert 0.93 <= covered(low, high, 50.0) <= 0.97
    ref = sps.t.interval(0.95, n_seeds - 1, loc=mean[0], scale=sps.sem(values[0]))
    assert (low[0], high[0]) == pytest.approx(ref)
    assert sd[0] == pytest.approx(np.std(values[0], ddof=1))


def test_paired_difference_covers_the_true_difference():
    """Seed effects shared by both arms cancel in the paired difference: the
    interval covers the true +0.5 about 95 % of the time although the seed
    spread (sd 2) is much larger than the effect."""
    rng = np.random.default_rng(3)
    seed_effect = rng.normal(0, 2.0, size=(N_SIM, 3))
    base = 60 + seed_effect + rng.normal(0, 0.3, size=(N_SIM, 3))
    hvs = 60.5 + seed_effect + rng.normal(0, 0.3, size=(N_SIM, 3))
    _, _, low, high = stats.t_interval(hvs - base, axis=1)
    assert 0.93 <= covered(low, high, 0.5) <= 0.97


def test_newcombe_covers_the_difference_of_two_accuracies():
    rng = np.random.default_rng(4)
    n = 1000
    k1, k2 = rng.binomial(n, 0.32, N_SIM), rng.binomial(n, 0.30, N_SIM)
    low, high = stats.newcombe(k1, n, k2, n)
    assert 0.93 <= covered(low, high, 0.02) <= 0.97


def test_paired_difference_verdicts():
    same = stats.paired_difference({0: 30.1, 1: 29.5, 2: 30.4}, {0: 30.0, 1: 30.2, 2: 29.8})
    assert same["low"] < 0 < same["high"] and same["verdict"] == stats.NO_DIFFERENCE
    assert same["differences"] == pytest.approx([0.1, -0.7, 0.6])
    up = stats.paired_difference({0: 33.0, 1: 33.1, 2: 32.9}, {0: 30.0, 1: 30.2, 2: 29.8})
    assert up["low"] > 0 and up["verdict"] == "HVS above the baseline"
    one = stats.paired_difference({0: 30.7}, {0: 29.9}, n_test={0: 1000})
    assert one["low"] < 0 < one["high"] and one["verdict"] == stats.NO_DIFFERENCE  # +0.8 on 1,000 images
    assert stats.paired_difference({0: 30.7}, {0: 29.9})["verdict"] is None  # no n: no interval, no verdict


def test_proportion_beside_chance():
    above = stats.proportion(250, 1000, chance=1 / 6)
    assert above["above_chance"] and above["low"] > 1 / 6
    at = stats.proportion(170, 1000, chance=1 / 6)
    assert not at["above_chance"] and at["low"] < 1 / 6 < at["high"]


def _fanova_importance(X, y):
    from analysis.fanova import fanova

    return fanova(X, y, n_trees=4, seed=0, min_samples_leaf=5, n_jobs=1).importance


def test_permutation_null_flags_a_planted_effect_only():
    rng = np.random.default_rng(5)
    X = rng.uniform(size=(400, 4))
    y = 2.0 * X[:, 1] + rng.normal(0, 0.3, 400)  # only feature 1 matters
    result = stats.permutation_null(_fanova_importance, X, y, k=19, seed=0)
    assert result["null"].shape == (19, 4)
    assert result["above"].tolist() == [False, True, False, False]
    assert result["observed"][1] > result["threshold"][1]


def test_permutation_null_flags_nothing_on_noise():
    """Pure noise: the forest still gives every feature some first-order
    importance, and none of it rises above the null."""
    rng = np.random.default_rng(6)
    X, y = rng.uniform(size=(400, 4)), rng.normal(size=400)
    result = stats.permutation_null(_fanova_importance, X, y, k=19, seed=0)
    assert (result["observed"] > 0).all()
    assert not result["above"].any()
