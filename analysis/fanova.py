"""First-order functional ANOVA over a random forest (Hutter, Hoos and
Leyton-Brown, ICML 2014), as the paper used for Fig. 8 (Appendix D).

For a regression tree t the prediction f_t(x) is piecewise constant: each leaf
is an axis-aligned box with a constant value.  Under the *uniform* measure on
the bounding box of the data:

* f0 = E[f_t] = sum over leaves of (leaf volume fraction) * (leaf value);
* Var[f_t] = sum over leaves of (volume fraction) * (value - f0)^2;
* the marginal of feature i, m_i(x_i) = E[f_t | x_i], is piecewise constant
  between the split points of feature i: a leaf whose interval along i
  contains x_i adds value * (product over the other features of the leaf's
  width fractions);
* importance_i = Var[m_i] / Var[f_t], the fraction of the tree's variance
  explained by feature i alone.

All of it is exact from the tree's leaves (no sampling).  The forest's
importance of feature i is the mean over its trees (trees with zero variance
are left out); the sum over features is at most 1, the rest being interactions.

The paper used the automl ``fanova`` package; it is not used here because it
needs SWIG to build and fails on NumPy 2.  This module computes the same
first-order quantity over a scikit-learn ``RandomForestRegressor`` with that
package's defaults of 16 trees, bootstrapping and depth at most 64.  One
default differs: the package draws floor(0.7 d) of the d features at every
split, while ``fanova`` here considers all of them by default
(``max_features=1.0``, scikit-learn's default for regression; the importance
analysis, ``analysis/importance.py``, keeps it, so its 12 pair metrics compete
at every split); pass ``max_features=0.7`` for the package's choice.  The trees themselves differ,
so the numbers agree in expectation, not digit for digit.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class FanovaResult:
    importance: np.ndarray  # [D] first-order importance, mean over trees
    std: np.ndarray         # [D] its standard deviation over trees
    n_trees: int            # trees used (those with non-zero variance)
    forest: object          # the fitted RandomForestRegressor


def leaf_boxes(tree, lower: np.ndarray, upper: np.ndarray):
    """(lower [L, D], upper [L, D], value [L]) of the leaves of a fitted
    sklearn tree (``estimator.tree_``), the root box being [lower, upper].
    Computed level by level, vectorised."""
    left, right = tree.children_left, tree.children_right
    lo = np.empty((tree.node_count, len(lower)))
    hi = np.empty_like(lo)
    lo[0], hi[0] = lower, upper
    frontier = np.array([0])
    while frontier.size:
        parent = frontier[left[frontier] != -1]
        feature, threshold = tree.feature[parent], tree.threshold[parent]
        for child, bound, side in ((left[parent], hi, np.minimum), (right[parent], lo, np.maximum)):
            lo[child], hi[child] = lo[parent], hi[parent]
            bound[child, feature] = side(bound[parent, feature], threshold)
        frontier = np.concatenate([left[parent], right[parent]])
    leaves = np.flatnonzero(left == -1)
    return lo[leaves], hi[leaves], tree.value[leaves, 0, 0]


def tree_importance(tree, lower: np.ndarray, upper: np.ndarray):
    """(first-order importance [D], total variance) of one fitted tree under the
    uniform measure on [lower, upper]; importance is NaN for a constant tree."""
    width = upper - lower
    constant = width <= 0
    lo, hi, value = leaf_boxes(tree, lower, upper)
    frac = np.where(constant, 1.0, (hi - lo) / np.where(constant, 1.0, width))  # [L, D] share of each range
    weight = frac.prod(axis=1)                                                  # [L] volume fraction
    f0 = weight @ value
    total = weight @ (value - f0) ** 2
    importance = np.zeros(len(lower))
    if total <= 1e-12 * max(1.0, f0 * f0):
        return np.full(len(lower), np.nan), 0.0
    for i in np.flatnonzero(~constant):
        # m_i on the intervals between the distinct leaf bounds along i: a
        # leaf adds value * weight / frac_i on [lo_i, hi_i) (difference array)
        points = np.unique(np.concatenate([lo[:, i], hi[:, i]]))
        contribution = value * weight / frac[:, i]
        steps = (np.bincount(np.searchsorted(points, lo[:, i]), contribution, len(points))
                 - np.bincount(np.searchsorted(points, hi[:, i]), contribution, len(points)))
        marginal = np.cumsum(steps)[:-1]
        share = np.diff(points) / width[i]
        importance[i] = share @ (marginal - f0) ** 2 / total
    return importance, total


def fanova(X: np.ndarray, y: np.ndarray, n_trees: int = 16, seed: int = 0, max_depth: int = 64,
           min_samples_leaf: int = 1, n_jobs: int = -1, max_features: float = 1.0) -> FanovaResult:
    """Fit a random forest to (X, y) and return the first-order fANOVA
    importance of every column of X, under the uniform measure on the
    bounding box of X.  ``max_features``: the fraction of the features drawn
    at every split (at least one; 0.7 is the ``fanova`` package's floor(0.7 d))."""
    from sklearn.ensemble import RandomForestRegressor

    X, y = np.asarray(X, np.float64), np.asarray(y, np.float64)
    if X.ndim != 2 or len(X) != len(y) or len(y) < 2:
        raise ValueError(f"fanova needs X [n, d] and y [n] with n >= 2, got {X.shape} and {y.shape}")
    forest = RandomForestRegressor(n_estimators=n_trees, max_features=max_features, bootstrap=True, max_depth=max_depth,
                                   min_samples_leaf=min_samples_leaf, random_state=seed, n_jobs=n_jobs)
    forest.fit(X, y)
    bounds = X.astype(np.float32).astype(np.float64)  # the trees split on float32 copies of X
    lower, upper = bounds.min(axis=0), bounds.max(axis=0)
    per_tree = np.array([tree_importance(t.tree_, lower, upper)[0] for t in forest.estimators_])
    used = per_tree[~np.isnan(per_tree).any(axis=1)]
    if len(used) == 0:
        return FanovaResult(np.zeros(X.shape[1]), np.zeros(X.shape[1]), 0, forest)
    return FanovaResult(used.mean(axis=0), used.std(axis=0), len(used), forest)
