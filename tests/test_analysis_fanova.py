"""First-order fANOVA over a random forest (analysis/fanova.py) against
functions whose first-order Sobol indices are known."""
import numpy as np
import pytest

from analysis.fanova import fanova, tree_importance


def test_additive_function():
    """f = x1 + 2 x2 (+ a dummy x3), x ~ U[0, 1]^3: the variances are 1/12 and
    4/12, so the indices are 0.2 and 0.8 and nothing is left for x3 or for
    interactions.  Tolerance 0.03 abs (3000 samples)."""
    X = np.random.default_rng(0).uniform(0, 1, (3000, 3))
    result = fanova(X, X[:, 0] + 2 * X[:, 1], n_trees=16, seed=0, n_jobs=1)
    assert result.importance == pytest.approx([0.2, 0.8, 0.0], abs=0.03)
    assert result.n_trees == 16 and result.importance.sum() <= 1 + 1e-9


def test_ishigami_function():
    """Ishigami, a = 7, b = 0.1, x ~ U[-pi, pi]^3 (+ a dummy x4):
    S1 = 0.3139, S2 = 0.4424, S3 = 0 (x3 acts only with x1).  A forest's
    first-order indices approach these from below as the sample grows (its
    trees spread some variance into interactions); with 20000 samples they are
    within 0.05 abs, the dummy's under 0.01 (about 1 s on 2 cores)."""
    X = np.random.default_rng(1).uniform(-np.pi, np.pi, (20000, 4))
    y = np.sin(X[:, 0]) + 7 * np.sin(X[:, 1]) ** 2 + 0.1 * X[:, 2] ** 4 * np.sin(X[:, 0])
    importance = fanova(X, y, n_trees=16, seed=0, min_samples_leaf=5, n_jobs=1).importance
    assert importance[:3] == pytest.approx([0.3139, 0.4424, 0.0], abs=0.05)
    assert importance[3] < 0.01


def test_tree_importance_matches_monte_carlo():
    """The exact marginals of one tree against a Monte Carlo estimate of
    Var(E[f | x_i]) / Var(f) under the uniform measure on the box."""
    rng = np.random.default_rng(2)
    X = rng.uniform(0, 1, (500, 2))
    result = fanova(X, X[:, 0] * X[:, 1] + X[:, 0], n_trees=1, seed=0, n_jobs=1)
    tree = result.forest.estimators_[0]
    lower, upper = X.min(axis=0), X.max(axis=0)
    exact, total = tree_importance(tree.tree_, lower, upper)
    U = rng.uniform(lower, upper, (40000, 2))
    assert total == pytest.approx(tree.predict(U).var(), rel=0.03)
    grid, others = np.linspace(lower[0], upper[0], 400), rng.uniform(lower, upper, (400, 2))
    marginal = [tree.predict(np.column_stack([np.full(400, g), others[:, 1]])).mean() for g in grid]
    assert exact[0] == pytest.approx(np.var(marginal) / total, abs=0.03)


def test_constant_target_and_constant_feature():
    X = np.random.default_rng(3).uniform(0, 1, (200, 2))
    X[:, 1] = 5.0
    assert fanova(X, np.ones(200), n_trees=2, n_jobs=1).importance.tolist() == [0.0, 0.0]
    assert fanova(X, X[:, 0], n_trees=2, n_jobs=1).importance == pytest.approx([1.0, 0.0], abs=1e-6)


def test_the_fanova_package_draws_floor_of_0_7_d_features_per_split():
    """max_features=0.7 is the automl package's default, floor(0.7 d) features at every split."""
    X = np.random.default_rng(0).uniform(size=(300, 10))
    assert fanova(X, X[:, 0], n_trees=2, n_jobs=1, max_features=0.7).forest.estimators_[0].max_features_ == 7
    assert fanova(X, X[:, 0], n_trees=2, n_jobs=1).forest.estimators_[0].max_features_ == 10
