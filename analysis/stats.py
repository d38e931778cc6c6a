"""Uncertainty of the numbers the summaries report.

* :func:`wilson`: 95 % Wilson score interval of a proportion (one accuracy on
  ``n`` test images; the fraction of samples whose chosen pair has the lowest
  IoU);
* :func:`t_interval` / :func:`over_seeds`: mean, standard deviation and 95 %
  Student-t interval of one number over seeds;
* :func:`paired_difference`: HVS minus baseline by seed (the same seed gives
  both arms the same initial weights and data order), its t-interval over
  seeds, and the plain verdict :data:`NO_DIFFERENCE` when the interval holds 0;
  with one seed, Newcombe's interval for the difference of two proportions
  (test-set sampling only: seed-to-seed variation is not in it);
* :func:`permutation_null`: importances of K fits to shuffled targets, their
  95th percentile per feature and over features, and which observed
  importances lie above them.

Every function is vectorised over NumPy arrays (the coverage tests simulate
thousands of experiments at once) and takes its quantiles from scipy.stats.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
from scipy import stats

LEVEL = 0.95
NO_DIFFERENCE = "no difference detectable at this scale"


def wilson(k, n, level: float = LEVEL):
    """(low, high) Wilson score interval of the proportion ``k / n``
    (arrays broadcast; n = 0 gives (0, 1)).  The same as
    ``scipy.stats.binomtest(k, n).proportion_ci(method="wilson")``, vectorised."""
    k, n = np.asarray(k, np.float64), np.asarray(n, np.float64)
    z = stats.norm.ppf(0.5 + level / 2)
    safe = np.maximum(n, 1.0)
    p = k / safe
    centre = (p + z * z / (2 * safe)) / (1 + z * z / safe)
    half = z / (1 + z * z / safe) * np.sqrt(p * (1 - p) / safe + z * z / (4 * safe * safe))
    low, high = np.clip(centre - half, 0.0, 1.0), np.clip(centre + half, 0.0, 1.0)
    return np.where(n > 0, low, 0.0), np.where(n > 0, high, 1.0)


def accuracy_interval(top1_percent: float, n: int, level: float = LEVEL) -> tuple:
    """(low, high) in percent of one accuracy ``top1_percent`` on ``n`` test images."""
    k = np.rint(top1_percent / 100.0 * n)
    low, high = wilson(k, n, level)
    return float(100 * low), float(100 * high)


def newcombe(k1, n1, k2, n2, level: float = LEVEL):
    """(low, high) of p1 - p2 for two independent proportions (Newcombe's
    hybrid score interval, method 10), from the two Wilson intervals."""
    p1, p2 = np.asarray(k1) / np.maximum(n1, 1), np.asarray(k2) / np.maximum(n2, 1)
    l1, u1 = wilson(k1, n1, level)
    l2, u2 = wilson(k2, n2, level)
    d = p1 - p2
    return d - np.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + np.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def t_interval(values, level: float = LEVEL, axis: int = -1):
    """(mean, sd, low, high) of ``values`` along ``axis`` with the Student-t
    interval of the mean (n - 1 degrees of freedom); sd and the interval are
    NaN with a single value."""
    v = np.asarray(values, np.float64)
    n = v.shape[axis]
    mean = v.mean(axis=axis)
    if n < 2:
        nan = np.full_like(mean, np.nan)
        return mean, nan, nan, nan
    sd = v.std(axis=axis, ddof=1)
    half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / np.sqrt(n)
    return mean, sd, mean - half, mean + half


def over_seeds(values, level: float = LEVEL) -> dict:
    """Mean, sd and t-interval of one number over seeds (a list); with one seed
    only its value (``sd``, ``low``, ``high`` None)."""
    values = [float(v) for v in values]
    if not values:
        return {"n": 0, "mean": None, "sd": None, "low": None, "high": None}
    mean, sd, low, high = (float(x) for x in t_interval(values, level))
    if len(values) < 2:
        sd = low = high = None
    return {"n": len(values), "mean": mean, "sd": sd, "low": low, "high": high, "values": values}


def contains_zero(low, high) -> bool:
    return low is not None and high is not None and low <= 0.0 <= high


def paired_difference(hvs: dict, baseline: dict, n_test: Optional[dict] = None, level: float = LEVEL,
                      names: tuple = ("HVS", "the baseline")) -> dict:
    """HVS minus baseline over the seeds both have (``{seed: top-1 %}`` each).

    Two or more seeds: mean, sd and t-interval of the per-seed differences.
    One seed with ``n_test`` (``{seed: test images}``): Newcombe's interval of
    the difference of the two accuracies on their test sets.  ``verdict`` is
    :data:`NO_DIFFERENCE` when the interval contains 0, else which arm is
    higher; None without an interval."""
    seeds = sorted(set(hvs) & set(baseline))
    diffs = [hvs[s] - baseline[s] for s in seeds]
    out = {"seeds": seeds, "differences": diffs, **over_seeds(diffs, level), "interval": "t over seeds"}
    if len(seeds) == 1:
        s = seeds[0]
        n = (n_test or {}).get(s)
        if n:
            k1, k2 = np.rint(hvs[s] / 100 * n), np.rint(baseline[s] / 100 * n)
            low, high = newcombe(k1, n, k2, n, level)
            out.update(low=float(100 * low), high=float(100 * high), interval="test-set sampling (Newcombe), 1 seed")
        else:
            out["interval"] = None
    out["verdict"] = verdict(out["low"], out["high"], names)
    return out


def verdict(low, high, names: tuple = ("HVS", "the baseline")) -> Optional[str]:
    """The plain line of the interval of ``names[0]`` minus ``names[1]``."""
    if low is None or high is None:
        return None
    if contains_zero(low, high):
        return NO_DIFFERENCE
    return f"{names[0]} {'above' if low > 0 else 'below'} {names[1]}"


def proportion(k: int, n: int, chance: Optional[float] = None, level: float = LEVEL) -> dict:
    """A fraction ``k / n`` with its Wilson interval, beside ``chance`` when
    given (``above_chance``: the interval's lower end is above it)."""
    low, high = wilson(k, n, level)
    out = {"k": int(k), "n": int(n), "value": k / n if n else None, "low": float(low), "high": float(high)}
    if chance is not None:
        out["chance"] = float(chance)
        out["above_chance"] = bool(low > chance)
    return out


def permutation_null(importance: Callable, X, y, k: int = 20, seed: int = 0, level: float = LEVEL,
                     observed=None) -> dict:
    """Null distribution of feature importances: ``importance(X, y_shuffled)``
    for ``k`` random permutations of ``y`` (breaking every link between the
    features and the target, keeping both marginals), with the same settings
    as the observed fit.

    Returns ``null`` [k, D]; ``threshold`` [D], its ``level`` quantile per
    feature; ``family_threshold``, the ``level`` quantile of the largest
    importance of each shuffle (the importance that *some* feature reaches on
    noise); ``observed`` [D] (``importance(X, y)`` unless given); and
    ``above`` [D]: observed above both thresholds.  Comparing each of D
    features with its own 95th percentile alone would flag one of them on pure
    noise with probability about 1 - 0.95^D (34 % for D = 8); the family
    threshold keeps that at about 5 %."""
    if k < 1:
        raise ValueError(f"a permutation null needs at least 1 shuffle, got {k}")
    rng = np.random.default_rng(seed)
    y = np.asarray(y)
    observed = np.asarray(importance(X, y) if observed is None else observed, np.float64)
    null = np.stack([np.asarray(importance(X, y[rng.permutation(len(y))]), np.float64) for _ in range(k)])
    threshold = np.quantile(null, level, axis=0)
    family = float(np.quantile(null.max(axis=1), level))
    return {"k": k, "level": level, "observed": observed, "null": null, "threshold": threshold,
            "family_threshold": family, "above": (observed > threshold) & (observed > family)}


def format_interval(low, high, digits: int = 2, unit: str = "") -> str:
    """``[low, high]`` for a table cell (a dash without an interval)."""
    if low is None or high is None or not np.isfinite(low) or not np.isfinite(high):
        return "—"
    return f"[{low:.{digits}f}, {high:.{digits}f}]{unit}"


# ----------------------------------------------------------------------------
# table cells
# ----------------------------------------------------------------------------
def value_cell(values: dict, n_test: Optional[dict] = None, digits: int = 2, scale: float = 1.0) -> str:
    """One number over seeds (``{seed: value}``) for a table: one seed with its
    test-set size (``n_test``, accuracies in percent): ``v [low, high]``
    (Wilson); several seeds: ``mean ± sd [low, high] (n)`` (t over seeds); one
    seed without a size: the value and ``(1 seed, no interval)``."""
    values = {s: v for s, v in values.items() if v is not None}
    if not values:
        return "—"
    if len(values) == 1:
        (seed, v), = values.items()
        n = (n_test or {}).get(seed)
        if n:
            low, high = accuracy_interval(v, n)
            return f"{v * scale:.{digits}f} {format_interval(low * scale, high * scale, digits)}"
        return f"{v * scale:.{digits}f} (1 seed, no interval)"
    s = over_seeds([v * scale for v in values.values()])
    return (f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f} "
            f"{format_interval(s['low'], s['high'], digits)} ({s['n']} seeds)")


def difference_cells(hvs: dict, baseline: dict, n_test: Optional[dict] = None, digits: int = 2,
                     names: tuple = ("HVS", "the baseline")) -> tuple:
    """(cell, verdict) of the paired difference ``hvs - baseline`` by seed
    (:func:`paired_difference`); the verdict says "no interval" when there is
    none."""
    d = paired_difference(hvs, baseline, n_test, names=names)
    if not d["seeds"]:
        return "—", "—"
    if len(d["seeds"]) == 1:
        head = f"{d['mean']:+.{digits}f}"
    else:
        head = f"{d['mean']:+.{digits}f} ± {d['sd']:.{digits}f}"
    interval = format_interval(d["low"], d["high"], digits)
    cell = f"{head} {interval}" if interval != "—" else head
    return cell, d["verdict"] or f"no interval ({len(d['seeds'])} seed, no test-set size)"
