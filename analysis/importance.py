"""Which pair metrics explain the loss?  fANOVA importance (paper Appendix D,
Fig. 8; Section 5.1).

One row per (sample, compared combination) that has a finite score:

* features: the metrics (:data:`analysis.metrics.PAIR_METRICS`) of the
  combination's pair (SimSiam, SimCLR: its two views; DINO, iBOT: its two
  global crops, so combinations that differ only in their local crops share
  the features);
* target: the combination's score, i.e. the method's own per-sample loss on
  it.  ``raw`` (default, as the paper) uses the loss as logged; ``centred``
  subtracts the mean over the sample's compared combinations, which removes
  what makes one image harder than another and keeps what makes one pair of
  its views harder than another.

At most ``--max-rows`` rows (default 300000, the paper's 300k) are drawn at
random.  The importance of a metric is its first-order fANOVA importance
(:mod:`analysis.fanova`): the fraction of the variance of the random forest's
prediction, under the uniform measure on the metrics' bounding box, that the
metric explains alone.  The paper reports (SimSiam+HVS, raw loss): IoU 15.2 %,
brightness 5.1 %, relative centre distance 3.3 %, colour-jitter distance
2.3 %, contrast 1.6 %, saturation 1.4 %, hue 0.6 %.

    python -m analysis.importance --run runs/small/simsiam_hvs_s0 --output results/importance

Beside every importance stands its permutation null (:data:`NULL_SHUFFLES`
shuffles of the loss against the metrics, the same forest settings): on
shuffled data the forest still gives every metric a few percent, so only an
importance above the null's 95th percentile says that the loss depends on
that metric (:func:`analysis.stats.permutation_null`).

writes ``importance.json`` and ``importance.png`` (the bar chart with the null).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from analysis.fanova import fanova
from analysis.logs import (AnalysisError, SelectionData, load_selection, new_figure, run_cli, run_summary,
                           save_figure, write_json)
from analysis.metrics import PAIR_METRICS, sample_pair_metrics
from analysis.stats import permutation_null

PAPER = {"source": "HVS paper, Appendix D, Fig. 8 (SimSiam+HVS, 300k logged samples, raw loss, automl fanova)",
         "importance": {"iou": 0.152, "brightness": 0.051, "centre_distance": 0.033, "colour_distance": 0.023,
                        "contrast": 0.016, "saturation": 0.014, "hue": 0.006},
         "all_parameters_jointly": 0.017}
#: shuffles of the loss in the permutation null (its 95th percentile is then between the 19th and 20th value)
NULL_SHUFFLES = 20
NULL_DESCRIPTION = ("importances of the same forest fitted to the loss shuffled against the metrics, {k} shuffles; a "
                    "metric is above the null when its importance exceeds both its own 95th percentile and the 95th "
                    "percentile of the largest importance of each shuffle (about 5 % chance that any metric of pure "
                    "noise is marked)")
TARGETS = {"raw": "the combination's per-sample loss as logged (the paper)",
           "centred": "the combination's per-sample loss minus the mean over the sample's compared combinations"}


def parse_metrics(text: str) -> list:
    """``all``, ``paper`` (the seven of Fig. 8) or a comma-separated list of
    :data:`PAIR_METRICS` names."""
    if text == "all":
        return list(PAIR_METRICS)
    if text == "paper":
        return list(PAPER["importance"])
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PAIR_METRICS]
    if unknown or not names:
        raise AnalysisError(f"--metrics {text!r}: unknown {unknown}; use all, paper or names from {list(PAIR_METRICS)}")
    return names


def pair_table(data: SelectionData, metrics: list, max_rows: int = 300_000, seed: int = 0, target: str = "raw"):
    """(X [R, len(metrics)], y [R], n_available): the (sample, combination)
    rows, at most ``max_rows`` of the ``n_available`` with a finite score,
    drawn at random with ``seed``."""
    if target not in TARGETS:
        raise AnalysisError(f"target {target!r} is not one of {list(TARGETS)}")
    if not data.has_scores:
        raise AnalysisError(f"{data.run_dir} has no scores (selection: {data.selection}): the importance analysis "
                            "needs a run that scored every compared combination "
                            "(hvs.enabled=true, hvs.mode=hard or easy)")
    scores = data.scores
    finite = np.isfinite(scores)
    if target == "centred":
        mean = np.where(finite, scores, 0.0).sum(axis=1) / np.maximum(1, finite.sum(axis=1))
        scores = scores - mean[:, None]
    flat = np.flatnonzero(finite)
    if len(flat) > max_rows:
        flat = np.sort(np.random.default_rng(seed).choice(flat, max_rows, replace=False))
    sample, combo = np.divmod(flat, scores.shape[1])
    used, row = np.unique(sample, return_inverse=True)  # metrics of the drawn samples only
    values = sample_pair_metrics(data.subset(used), metrics)
    pair = data.combo_pair[data.block[sample], combo]
    X = np.stack([values[n][row, pair] for n in metrics], axis=1)
    return X, scores[sample, combo], int(finite.sum())


def analyse(data: SelectionData, metrics=None, max_rows: int = 300_000, trees: int = 16, seed: int = 0,
            target: str = "raw", min_samples_leaf: int = 1, threads: Optional[int] = None,
            null_shuffles: int = NULL_SHUFFLES) -> dict:
    """Every number of the importance analysis (the JSON written by the CLI),
    with the permutation null of ``null_shuffles`` shuffles of the loss (0:
    none)."""
    metrics = list(PAIR_METRICS) if metrics is None else list(metrics)
    X, y, available = pair_table(data, metrics, max_rows, seed, target)
    if len(y) < 10:
        raise AnalysisError(f"{data.run_dir}: only {len(y)} scored (sample, combination) rows; log more steps")
    fit = fanova(X, y, n_trees=trees, seed=seed, min_samples_leaf=min_samples_leaf, n_jobs=threads or -1)
    importance = dict(zip(metrics, fit.importance))
    null = None
    if null_shuffles > 0:
        def forest(X_, y_):  # the settings of the observed fit
            return fanova(X_, y_, n_trees=trees, seed=seed, min_samples_leaf=min_samples_leaf,
                          n_jobs=threads or -1).importance

        perm = permutation_null(forest, X, y, k=null_shuffles, seed=seed, observed=fit.importance)
        null = {"shuffles": null_shuffles, "level": perm["level"],
                "description": NULL_DESCRIPTION.format(k=null_shuffles),
                "percentile_95": dict(zip(metrics, perm["threshold"])),
                "family_percentile_95": perm["family_threshold"],
                "above_null": dict(zip(metrics, perm["above"].tolist())),
                "mean": dict(zip(metrics, perm["null"].mean(axis=0))),
                "sum_first_order_95": float(np.quantile(perm["null"].sum(axis=1), perm["level"])),
                "importances": {m: perm["null"][:, i] for i, m in enumerate(metrics)}}
    return {"analysis": "importance", **run_summary(data),
            "target": target, "target_description": TARGETS[target],
            "n_rows": len(y), "n_rows_available": available, "max_rows": max_rows,
            "trees": trees, "trees_used": fit.n_trees, "min_samples_leaf": min_samples_leaf, "seed": seed,
            "metrics": {n: PAIR_METRICS[n] for n in metrics},
            "importance": importance, "importance_std": dict(zip(metrics, fit.std)),
            "ranking": sorted(metrics, key=lambda n: -importance[n]),
            "sum_first_order": float(fit.importance.sum()), "null": null,
            "method_note": "first-order fANOVA (uniform measure on the metrics' bounding box) over a scikit-learn "
                           "RandomForestRegressor; see analysis/fanova.py",
            "paper": PAPER}


def plot(result: dict, path: Path) -> str:
    """Bar chart of the importances (percent), ours beside the paper's, with
    the permutation null: its shuffles as dots and its 95th percentile as a
    bar end; a star marks a metric above the null."""
    names = result["ranking"]
    ours = np.array([result["importance"][n] or 0.0 for n in names]) * 100
    paper = np.array([PAPER["importance"].get(n, np.nan) for n in names]) * 100
    fig, ax = new_figure(7.0, 0.45 * len(names) + 1.5)
    y = np.arange(len(names))
    ax.barh(y - 0.2, ours, height=0.4, label=f"this run ({result['target']} loss)")
    ax.barh(y + 0.2, paper, height=0.4, label="paper (Fig. 8)")
    null = result.get("null")
    if null:
        for i, n in enumerate(names):
            values = np.asarray(null["importances"][n], np.float64) * 100
            ax.plot(values, np.full(len(values), y[i] - 0.2), "k.", markersize=2,
                    label=f"null: {null['shuffles']} shuffles of the loss" if i == 0 else None)
            ax.plot([100 * null["percentile_95"][n]] * 2, [y[i] - 0.42, y[i] + 0.02], color="red",
                    label="null 95th percentile" if i == 0 else None)
            if null["above_null"][n]:
                ax.text(ours[i], y[i] - 0.2, " *", va="center", color="red")
        ax.axvline(100 * null["family_percentile_95"], color="red", linestyle=":",
                   label="null 95th pct. of the largest metric")
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set(xlabel="first-order fANOVA importance (% of variance)",
           title=f"Importance of pair metrics for the loss ({result['n_rows']} rows)")
    ax.legend(fontsize="small")
    return save_figure(fig, path)


def summary(result: dict) -> str:
    null = result.get("null")

    def beside(n):
        if not null:
            return ""
        mark = "above the null" if null["above_null"][n] else "within the null"
        return f"  (null 95th pct {100 * null['percentile_95'][n]:5.2f} %: {mark})"

    rows = "\n".join(f"  {n:16s} {100 * result['importance'][n]:6.2f} %" + beside(n)
                     + (f"   (paper {100 * PAPER['importance'][n]:.1f} %)" if n in PAPER["importance"] else "")
                     for n in result["ranking"])
    return (f"{result['run']}: fANOVA over {result['n_rows']} (sample, combination) rows, {result['target']} loss, "
            f"{result['trees_used']} trees\n{rows}\n  first-order sum  {100 * result['sum_first_order']:6.2f} %")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.importance", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="fANOVA importance of the pair metrics (IoU, centre distance, colour jitter, ...) for the "
                    "per-sample loss of every compared combination (paper Appendix D, Fig. 8).",
        epilog="Writes OUTPUT/importance.json and OUTPUT/importance.png.  Needs a run with scores "
               "(hvs.mode=hard or easy).\nMetrics: " + ", ".join(PAIR_METRICS))
    parser.add_argument("--run", required=True, type=Path, help="run folder with selection/*.npz")
    parser.add_argument("--output", required=True, type=Path, help="folder for importance.json and importance.png")
    parser.add_argument("--metrics", default="all",
                        help="all (default), paper (the seven of Fig. 8) or a comma-separated list")
    parser.add_argument("--target", choices=list(TARGETS), default="raw",
                        help="raw: the loss as logged (default, the paper); centred: minus the sample's mean")
    parser.add_argument("--max-rows", type=int, default=300_000,
                        help="use at most this many (sample, combination) rows, drawn at random (default 300000)")
    parser.add_argument("--trees", type=int, default=16, help="trees of the random forest (default 16)")
    parser.add_argument("--min-samples-leaf", type=int, default=1, help="of the forest's trees (default 1)")
    parser.add_argument("--null-shuffles", type=int, default=NULL_SHUFFLES,
                        help=f"shuffles of the loss in the permutation null, each one more forest fit "
                             f"(default {NULL_SHUFFLES}; 0: no null)")
    parser.add_argument("--seed", type=int, default=0, help="row subsample and forest seed (default 0)")
    parser.add_argument("--threads", type=int, default=None, help="threads of the forest (default: all cores)")
    return parser


def _run(args) -> dict:
    for name in ("max_rows", "trees", "min_samples_leaf", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise AnalysisError(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 1")
    metrics = parse_metrics(args.metrics)
    if args.null_shuffles < 0:
        raise AnalysisError(f"--null-shuffles {args.null_shuffles} must be 0 (no null) or more")
    result = analyse(load_selection(args.run), metrics, args.max_rows, args.trees, args.seed, args.target,
                     args.min_samples_leaf, args.threads, args.null_shuffles)
    args.output.mkdir(parents=True, exist_ok=True)
    result["figures"] = [plot(result, args.output / "importance.png")]
    write_json(args.output / "importance.json", result)
    print(summary(result))
    print(f"wrote {args.output / 'importance.json'} and {result['figures'][0]}")
    return result


def main(argv=None) -> int:
    return run_cli(build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
