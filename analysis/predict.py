"""Can the selected pair be predicted from the augmentation parameters?
(paper Section 5.2, last paragraph: never above 40 % test accuracy.)

Every logged sample is one example:

* class: the chosen pair, i.e. (slot 0, slot 1) of the chosen combination
  (SimSiam, SimCLR: the pair itself, one of C(N, 2) classes, numbered as the
  lexicographic combinations; DINO, iBOT: the chosen pair of global crops);
  classes are the distinct pairs of all given runs, in sorted order;
* features: the training step; the logged parameters (all
  :data:`common.views.augment.PARAM_NAMES` columns) of every candidate view that can
  be in a pair (for DINO / iBOT the global candidates only); for every class
  pair its metrics (:data:`analysis.metrics.PAIR_METRICS`), the rank of each
  metric among the pairs compared for the sample (0 = lowest: "is it the
  lowest-IoU pair?" is then one split) and whether it was compared at that
  step.  All are functions of the logged parameters; the scores (losses) are
  not used: they decide the choice.

The classifier is scikit-learn's ``HistGradientBoostingClassifier`` (gradient-
boosted trees, Friedman 2001, histogram-binned), not tuned (the paper tuned
its hyperparameters; it stayed below 40 % either way).  Reported:

(a) ``cross_validation``: k-fold (default 5, shuffled) over the samples of
    all given runs pooled;
(b) ``held_out_runs`` (3 or more runs, e.g. seeds): train on all runs but one,
    test on that one, each in turn (the paper: 2 seeds -> the third).

Beside every accuracy, the chance levels: ``uniform`` = 1 / number of classes,
and ``majority`` = accuracy of always answering the most frequent class of the
training part; ``interval``: the accuracy over all test parts together and
the majority-class accuracy, each with its Wilson 95 % interval.

    python -m analysis.predict --run runs/small/simsiam_hvs_s{0,1,2} --output results/predict

writes ``predict.json`` and ``predict_accuracy.png``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from analysis.logs import (AnalysisError, SelectionData, load_selection, new_figure, run_cli, run_summary,
                           save_figure, write_json)
from analysis.metrics import PAIR_METRICS, pair_metrics
from analysis.stats import proportion

PAPER = {"source": "HVS paper, Section 5.2 (SimSiam+HVS logs, 300k samples per seed; train on 2 seeds, test on the "
                   "third; also 5-fold CV, tuned hyperparameters)",
         "max_test_accuracy": 0.40, "chance": 1 / 6}


def pair_classes(runs: list) -> np.ndarray:
    """[K, 2] the distinct (slot 0, slot 1) pairs compared in any of ``runs``,
    sorted; AnalysisError if a run never compared two pairs."""
    for data in runs:
        if data.pairs.shape[1] < 2:
            raise AnalysisError(f"{data.run_dir} compared a single pair per step (selection: {data.selection}): "
                                "there is no choice to predict; give runs trained with hvs.enabled=true")
    views = {d.n_views for d in runs}
    if len(views) > 1:
        raise AnalysisError(f"the runs have different numbers of candidate views {sorted(views)}: "
                            + ", ".join(f"{d.run_dir} ({d.n_views})" for d in runs))
    every = np.concatenate([d.pairs.reshape(-1, 2) for d in runs])
    return np.unique(every[every[:, 0] >= 0], axis=0)


def features(data: SelectionData, classes: np.ndarray):
    """(X [M, F], y [M], feature names [F]) of one run for the pair ``classes``."""
    views = np.unique(classes)
    class_id = {tuple(p): k for k, p in enumerate(classes.tolist())}
    chosen = data.pairs[data.block, data.chosen_pair]
    y = np.array([class_id[tuple(p)] for p in chosen.tolist()], np.int64)
    compared = np.zeros((len(data.pairs), len(classes)), bool)  # per block
    for b, block_pairs in enumerate(data.pairs.tolist()):
        compared[b, [class_id[tuple(p)] for p in block_pairs if p[0] >= 0]] = True
    columns, names = [data.sample_step[:, None].astype(np.float64)], ["step"]
    columns.append(data.params[:, views].reshape(data.n_samples, -1).astype(np.float64))
    names += [f"view{v}.{p}" for v in views for p in data.param_names]
    per_pair = [pair_metrics(data.params[:, a], data.params[:, b]) for a, b in classes.tolist()]
    was_compared = compared[data.block]  # [M, K]
    for m in PAIR_METRICS:
        values = np.stack([v[m] for v in per_pair], axis=1)  # [M, K]
        columns += [values, within_sample_rank(values, was_compared)]
        names += [f"pair{a}-{b}.{m}" for a, b in classes.tolist()]
        names += [f"pair{a}-{b}.{m}_rank" for a, b in classes.tolist()]
    columns.append(was_compared.astype(np.float64))
    names += [f"pair{a}-{b}.compared" for a, b in classes.tolist()]
    return np.concatenate(columns, axis=1), y, names


def within_sample_rank(values: np.ndarray, compared: np.ndarray) -> np.ndarray:
    """[M, K] rank of every pair's value among the sample's compared pairs
    (0 = lowest; ties share the lower rank); NaN for pairs not compared."""
    smaller = (values[:, None, :] < values[:, :, None]) & compared[:, None, :]  # [M, k, j]: pair j below pair k
    return np.where(compared, smaller.sum(axis=2), np.nan)


def _subsample(data: SelectionData, max_rows: int, seed: int) -> SelectionData:
    """At most ``max_rows`` samples of ``data``, drawn at random."""
    if data.n_samples <= max_rows:
        return data
    return data.subset(np.sort(np.random.default_rng(seed).choice(data.n_samples, max_rows, replace=False)))


def _classifier(max_iter: int, learning_rate: float, seed: int):
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(max_iter=max_iter, learning_rate=learning_rate, random_state=seed)


def evaluate(X_train, y_train, X_test, y_test, max_iter: int, learning_rate: float, seed: int) -> dict:
    """Fit on the training part; test accuracy and the majority-class accuracy
    (a training part of one class predicts that class)."""
    majority = np.bincount(y_train).argmax()
    if len(np.unique(y_train)) < 2:
        predicted = np.full(len(y_test), majority)
    else:
        predicted = _classifier(max_iter, learning_rate, seed).fit(X_train, y_train).predict(X_test)
    hits, majority_hits = int((predicted == y_test).sum()), int((y_test == majority).sum())
    return {"accuracy": hits / len(y_test), "majority": majority_hits / len(y_test),
            "n_train": len(y_train), "n_test": len(y_test), "hits": hits, "majority_hits": majority_hits}


def pooled(rows: list, uniform: float) -> dict:
    """The accuracy over the test parts of ``rows`` together (each test sample
    counted once) with its Wilson 95 % interval, beside the uniform chance,
    and the majority-class accuracy with its own interval."""
    n = sum(r["n_test"] for r in rows)
    acc = proportion(sum(r["hits"] for r in rows), n, chance=uniform)
    maj = proportion(sum(r["majority_hits"] for r in rows), n)
    acc["above_majority"] = bool(acc["low"] > maj["high"])
    return {"accuracy": acc, "majority": maj}


def analyse(runs: list, folds: int = 5, max_rows: int = 300_000, max_iter: int = 100, learning_rate: float = 0.1,
            seed: int = 0, threads: Optional[int] = None) -> dict:
    """Every number of the prediction analysis (the JSON written by the CLI).
    ``max_rows`` caps the samples taken from each run; ``threads`` the
    classifier's OpenMP threads (None: all cores)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=threads, user_api="openmp"):
        return _analyse(runs, folds, max_rows, max_iter, learning_rate, seed)


def _analyse(runs, folds, max_rows, max_iter, learning_rate, seed) -> dict:
    from sklearn.model_selection import KFold

    classes = pair_classes(runs)
    built = [features(_subsample(d, max_rows, seed + i), classes) for i, d in enumerate(runs)]
    names, tables = built[0][2], [(X, y) for X, y, _ in built]
    X, y = np.concatenate([t[0] for t in tables]), np.concatenate([t[1] for t in tables])
    if len(y) < 2 * folds:
        raise AnalysisError(f"only {len(y)} logged samples for {folds}-fold cross-validation: log more steps")
    splits = KFold(n_splits=folds, shuffle=True, random_state=seed).split(X)
    per_fold = [evaluate(X[tr], y[tr], X[te], y[te], max_iter, learning_rate, seed) for tr, te in splits]
    held_out = None
    if len(runs) >= 3:
        held_out = []
        for i, data in enumerate(runs):
            rest = [t for j, t in enumerate(tables) if j != i]
            held_out.append({"test_run": str(data.run_dir), **evaluate(
                np.concatenate([t[0] for t in rest]), np.concatenate([t[1] for t in rest]), *tables[i],
                max_iter, learning_rate, seed)})
    mean = lambda rows, key: float(np.mean([r[key] for r in rows]))  # noqa: E731
    uniform = 1.0 / len(classes)
    return {"analysis": "predict", "runs": [run_summary(d) for d in runs],
            "pair_definition": runs[0].pair_definition,
            "classifier": f"sklearn HistGradientBoostingClassifier(max_iter={max_iter}, learning_rate={learning_rate}, "
                          f"random_state={seed}), untuned",
            "classes": classes, "class_counts": np.bincount(y, minlength=len(classes)),
            "n_samples": len(y), "n_features": len(names), "feature_names": names,
            "chance": {"uniform": uniform, "majority": mean(per_fold, "majority")},
            "cross_validation": {"folds": folds, "per_fold": per_fold, "accuracy": mean(per_fold, "accuracy"),
                                 "majority": mean(per_fold, "majority"), "interval": pooled(per_fold, uniform)},
            "held_out_runs": held_out,
            "held_out_accuracy": mean(held_out, "accuracy") if held_out else None,
            "held_out_interval": pooled(held_out, uniform) if held_out else None,
            "held_out_note": None if held_out else f"needs 3 or more runs (given {len(runs)})",
            "paper": PAPER}


def plot(result: dict, path: Path) -> str:
    """Accuracy of the cross-validation and of every held-out run, with chance."""
    cv = result["cross_validation"]
    labels, values = [f"{cv['folds']}-fold CV"], [cv["accuracy"]]
    intervals = [cv["interval"]["accuracy"]] if cv.get("interval") else [None]
    for row in result["held_out_runs"] or []:
        labels.append(f"held out: {Path(row['test_run']).name}")
        values.append(row["accuracy"])
        intervals.append(proportion(row["hits"], row["n_test"]) if "hits" in row else None)
    fig, ax = new_figure(max(5.0, 1.2 * len(labels) + 2), 4.0)
    err = np.array([[v - i["low"], i["high"] - v] if i else [0.0, 0.0] for v, i in zip(values, intervals)]).T
    ax.bar(range(len(values)), values, yerr=err, capsize=4, label="accuracy, 95 % interval (Wilson)")
    ax.set_xticks(range(len(values)), labels, rotation=20, ha="right")
    ax.axhline(result["chance"]["uniform"], color="gray", linestyle="--", label="chance (1 / classes)")
    ax.axhline(result["chance"]["majority"], color="black", linestyle=":", label="majority class")
    ax.axhline(PAPER["max_test_accuracy"], color="red", linestyle="-.", label="paper: never above 40 %")
    ax.set(ylim=(0, 1), ylabel="accuracy of predicting the selected pair", title="Predicting the selected pair")
    ax.legend()
    return save_figure(fig, path)


def summary(result: dict) -> str:
    cv = result["cross_validation"]["interval"]
    lines = [f"{len(result['runs'])} run(s), {result['n_samples']} samples, {len(result['classes'])} classes, "
             f"{result['n_features']} features",
             f"{result['cross_validation']['folds']}-fold CV accuracy {cv['accuracy']['value']:.3f} "
             f"[{cv['accuracy']['low']:.3f}, {cv['accuracy']['high']:.3f}] (chance {result['chance']['uniform']:.3f}, "
             f"majority {cv['majority']['value']:.3f} [{cv['majority']['low']:.3f}, {cv['majority']['high']:.3f}]; "
             "paper: never above 0.40)"]
    for row in result["held_out_runs"] or []:
        lines.append(f"held out {row['test_run']}: accuracy {row['accuracy']:.3f} (majority {row['majority']:.3f})")
    if result["held_out_note"]:
        lines.append(f"held-out runs: {result['held_out_note']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.predict", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Predict the pair chosen by hard view selection from the logged augmentation parameters "
                    "with gradient-boosted trees (paper Section 5.2).",
        epilog="Writes OUTPUT/predict.json and OUTPUT/predict_accuracy.png.  With 3 or more runs (seeds) each "
               "run is also held out in turn.")
    parser.add_argument("--run", required=True, nargs="+", type=Path, help="run folder(s) with selection/*.npz")
    parser.add_argument("--output", required=True, type=Path, help="folder for predict.json and the figure")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    parser.add_argument("--max-rows", type=int, default=300_000,
                        help="use at most this many samples of each run, drawn at random (default 300000)")
    parser.add_argument("--max-iter", type=int, default=100, help="boosting iterations (default 100)")
    parser.add_argument("--learning-rate", type=float, default=0.1, help="boosting learning rate (default 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="subsample, fold and classifier seed (default 0)")
    parser.add_argument("--threads", type=int, default=None, help="classifier threads (default: all cores)")
    return parser


def _run(args) -> dict:
    if args.folds < 2:
        raise AnalysisError(f"--folds {args.folds} must be at least 2")
    if len({r.resolve() for r in args.run}) < len(args.run):
        raise AnalysisError("a run is given twice: its samples would be both trained and tested on")
    for name in ("max_rows", "max_iter", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise AnalysisError(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 1")
    result = analyse([load_selection(r) for r in args.run], args.folds, args.max_rows, args.max_iter,
                     args.learning_rate, args.seed, args.threads)
    args.output.mkdir(parents=True, exist_ok=True)
    result["figures"] = [plot(result, args.output / "predict_accuracy.png")]
    write_json(args.output / "predict.json", result)
    print(summary(result))
    print(f"wrote {args.output / 'predict.json'} and {result['figures'][0]}")
    return result


def main(argv=None) -> int:
    return run_cli(build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
