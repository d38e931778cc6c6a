"""IoU of the selected view pairs (paper Section 5.1: Fig. 3 and Fig. 4 left).

For every logged sample, with the pairs defined as in :mod:`analysis.logs`
(slots 0 and 1 of each compared combination; DINO / iBOT: the two global
crops):

* ``chosen``: IoU of the pair of the chosen combination;
* ``compared``: mean IoU over the distinct compared pairs (what a random
  choice among them gives on average);
* ``lowest``: whether the chosen pair has the lowest IoU among the compared
  pairs (ties count as lowest), with its Wilson 95 % interval over the
  samples, overall, per epoch (epochs from the run's ``log.jsonl``) and over
  the last epoch.  Its chance level is the mean over samples of
  1 / (number of distinct compared pairs): 1/6 for N = 4 pair methods, usually
  1/4 for DINO.  ``chance_with_ties`` counts every pair tied at the lowest IoU
  as a hit (the exact rate of a uniformly random choice; the intervals are
  compared with it, ``above_chance``).

Per logged step these are averaged over the step's samples; a straight line
(``numpy.polyfit``, degree 1, every logged step weighted equally) is fitted to
the per-step mean chosen IoU, and its values at the first and the last logged
step are reported (paper, SimSiam+HVS: about 0.30 -> 0.35).  With
``--baseline RUN`` (a run without HVS, or with ``hvs.mode=random``) the same
is computed for the pair that run trained on, for Fig. 4 left, and the IoU
histogram compares the two runs (Fig. 3 right); without it the histogram
compares the chosen pairs with all compared pairs.

    python -m analysis.iou --run runs/small/simsiam_hvs_s0 --baseline runs/small/simsiam_s0 --output results/iou

writes ``iou.json`` (every number) and ``iou_lowest_fraction.png`` (Fig. 3
left: per epoch, with its 95 % band and the chance line), ``iou_histogram.png`` (Fig. 3 right), ``iou_over_training.png`` (Fig. 4
left).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from analysis.logs import (AnalysisError, SelectionData, load_selection, new_figure, run_cli, run_summary,
                           save_figure, write_json)
from analysis.metrics import sample_pair_metrics
from analysis.stats import proportion, wilson

TIE = 1e-9  # IoUs closer than this count as equal
PAPER = {"source": "HVS paper, Section 5.1, Fig. 3 and Fig. 4 left (SimSiam+HVS, ResNet-50, 100 epochs, N=4, 3 seeds)",
         "lowest_iou_fraction": "over 0.40 during training", "chance": 1 / 6,
         "chosen_iou_fit_first": 0.30, "chosen_iou_fit_last": 0.35}


def sample_iou(data: SelectionData) -> dict:
    """Per-sample arrays [M]: ``chosen``, ``compared``, ``lowest`` (bool),
    ``n_pairs`` and ``n_lowest`` (pairs tied at the lowest IoU)."""
    ious = sample_pair_metrics(data, ["iou"])["iou"]  # [M, K], NaN padding
    chosen = ious[np.arange(data.n_samples), data.chosen_pair]
    low = np.nanmin(ious, axis=1)
    return {"chosen": chosen, "compared": np.nanmean(ious, axis=1), "lowest": chosen <= low + TIE,
            "n_pairs": np.isfinite(ious).sum(axis=1), "n_lowest": (ious <= low[:, None] + TIE).sum(axis=1)}


def per_step(values: np.ndarray, steps: np.ndarray):
    """(steps [T], mean of ``values`` over the samples of every step [T])."""
    unique, inverse = np.unique(steps, return_inverse=True)
    sums = np.bincount(inverse, weights=values.astype(np.float64), minlength=len(unique))
    return unique, sums / np.bincount(inverse, minlength=len(unique))


def linear_fit(x: np.ndarray, y: np.ndarray) -> Optional[dict]:
    """Least-squares line through (x, y): slope, intercept, and its value at the
    first and last x; None with fewer than two distinct x."""
    if len(np.unique(x)) < 2:
        return None
    slope, intercept = np.polyfit(np.asarray(x, np.float64), np.asarray(y, np.float64), 1)
    first, last = float(np.min(x)), float(np.max(x))
    return {"slope": slope, "intercept": intercept, "first_step": int(first), "last_step": int(last),
            "at_first_step": slope * first + intercept, "at_last_step": slope * last + intercept}


def _curve(values: np.ndarray, steps: np.ndarray) -> dict:
    """Mean, per-step means and their linear fit."""
    s, m = per_step(values, steps)
    return {"mean": float(values.mean()), "steps": s, "per_step": m, "fit": linear_fit(s, m)}


def epoch_ends(run_dir: Path) -> list:
    """Training step at the end of every completed epoch, from the run's
    ``log.jsonl`` (its ``"type": "epoch"`` rows); [] without them."""
    import json

    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        return []
    ends = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line cut short by a stopped run
            continue
        if isinstance(row, dict) and row.get("type") == "epoch" and "step" in row and "epoch" in row:
            ends[int(row["epoch"])] = int(row["step"])
    return [ends[e] for e in sorted(ends)]


def by_epoch(data: SelectionData, per: dict) -> Optional[dict]:
    """The lowest-IoU fraction per epoch with its Wilson 95 % interval and the
    chance of a random choice in that epoch; None when the run's log names no
    completed epoch.  Logged steps after the last completed epoch form a
    partial last epoch."""
    ends = epoch_ends(data.run_dir)
    if not ends:
        return None
    epoch = np.searchsorted(np.asarray(ends), data.sample_step, side="right")  # step s < ends[e] -> epoch e
    numbers = np.unique(epoch)
    hits = np.array([per["lowest"][epoch == e].sum() for e in numbers])
    counts = np.array([(epoch == e).sum() for e in numbers])
    chance = np.array([(per["n_lowest"] / per["n_pairs"])[epoch == e].mean() for e in numbers])
    low, high = wilson(hits, counts)
    return {"epoch": numbers + 1, "complete": numbers < len(ends), "k": hits, "n": counts,
            "fraction": hits / counts, "low": low, "high": high, "chance_with_ties": chance}


def analyse(data: SelectionData, baseline: Optional[SelectionData] = None, bins: int = 20) -> dict:
    """Every number of the IoU analysis (the JSON written by the CLI)."""
    per, steps = sample_iou(data), data.sample_step
    edges = np.linspace(0.0, 1.0, bins + 1)
    lowest, tie_chance = per["lowest"], float((per["n_lowest"] / per["n_pairs"]).mean())
    epochs = by_epoch(data, per)
    last_steps = data.sample_step == data.step.max()
    if epochs is not None:  # the last epoch of the log (a partial one only if no complete epoch follows it)
        last = epochs["epoch"][-1] - 1
        last_steps = np.searchsorted(np.asarray(epoch_ends(data.run_dir)), data.sample_step, side="right") == last
    last_chance = float((per["n_lowest"] / per["n_pairs"])[last_steps].mean())
    result = {"analysis": "iou", **run_summary(data),
              "mean_compared_pairs": float(per["n_pairs"].mean()),
              "chosen_iou": _curve(per["chosen"], steps),
              "compared_iou": _curve(per["compared"], steps),
              "lowest_iou_fraction": {
                  "overall": float(per["lowest"].mean()),
                  "chance": float((1.0 / per["n_pairs"]).mean()),
                  "chance_with_ties": tie_chance,
                  # Wilson 95 % interval over the samples, beside the exact chance of a random choice
                  "interval": proportion(int(lowest.sum()), len(lowest), chance=tie_chance),
                  "last_epoch": {"epoch": None if epochs is None else int(epochs["epoch"][-1]),
                                 **proportion(int(lowest[last_steps].sum()), int(last_steps.sum()),
                                              chance=last_chance)},
                  "by_epoch": epochs,
                  **dict(zip(("steps", "per_step"), per_step(per["lowest"], steps)))},
              "baseline": None}
    reference, reference_name = per["compared"], "all compared pairs (mean per sample)"
    if baseline is not None:
        base = sample_iou(baseline)
        result["baseline"] = {**run_summary(baseline), "iou": _curve(base["chosen"], baseline.sample_step)}
        reference, reference_name = base["chosen"], f"baseline {baseline.run_dir}"
    result["histogram"] = {"bin_edges": edges, "chosen": np.histogram(per["chosen"], edges)[0],
                           "reference": np.histogram(reference, edges)[0], "reference_name": reference_name}
    result["paper"] = PAPER
    return result


# --- figures -------------------------------------------------------------------

def plot(result: dict, out_dir: Path) -> list:
    """The three figures, from the result alone; returns their paths."""
    out_dir, paths = Path(out_dir), []
    low = result["lowest_iou_fraction"]
    fig, ax = new_figure()
    epochs = low.get("by_epoch")
    if epochs:  # per epoch, with the Wilson 95 % band and the chance of a random choice
        from matplotlib.ticker import MaxNLocator

        x, frac = np.asarray(epochs["epoch"]), np.asarray(epochs["fraction"], np.float64)
        ax.fill_between(x, epochs["low"], epochs["high"], alpha=0.3, label="95 % interval (Wilson)")
        ax.errorbar(x, frac, yerr=[frac - np.asarray(epochs["low"]), np.asarray(epochs["high"]) - frac],
                    marker="o", capsize=3, label="chosen pair has the lowest IoU")  # visible for one epoch too
        ax.plot(x, epochs["chance_with_ties"], color="gray", linestyle="--", marker="_",
                label="chance (random choice)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="epoch")
    else:  # no epoch in the log: per logged step, the interval of the whole run
        ax.plot(low["steps"], low["per_step"], marker=".", label="chosen pair has the lowest IoU")
        ax.axhspan(low["interval"]["low"], low["interval"]["high"], alpha=0.3, label="95 % interval, whole run")
        ax.axhline(low["chance_with_ties"], color="gray", linestyle="--",
                   label=f"chance ({low['chance_with_ties']:.3f})")
        ax.set(xlabel="training step")
    ax.set(ylabel="fraction of samples", ylim=(0, 1), title="Selected pair = lowest-IoU pair (Fig. 3 left)")
    ax.legend()
    paths.append(save_figure(fig, out_dir / "iou_lowest_fraction.png"))

    hist = result["histogram"]
    edges = np.asarray(hist["bin_edges"])
    fig, ax = new_figure()
    for key, label in (("chosen", "selected pairs"), ("reference", hist["reference_name"])):
        counts = np.asarray(hist[key], np.float64)
        ax.stairs(counts / max(1.0, counts.sum()), edges, label=label, fill=key == "chosen", alpha=0.6)
    ax.set(xlabel="IoU of the pair", ylabel="fraction of samples", title="IoU distribution (Fig. 3 right)")
    ax.legend()
    paths.append(save_figure(fig, out_dir / "iou_histogram.png"))

    fig, ax = new_figure()
    curves = [(result["chosen_iou"], "selected pairs"), (result["compared_iou"], "all compared pairs")]
    if result["baseline"] is not None:
        curves.append((result["baseline"]["iou"], "baseline"))
    for curve, label in curves:
        line, = ax.plot(curve["steps"], curve["per_step"], marker=".", label=label)
        fit = curve["fit"]
        if fit is not None:
            ax.plot([fit["first_step"], fit["last_step"]], [fit["at_first_step"], fit["at_last_step"]],
                    linestyle="--", color=line.get_color(),
                    label=f"fit {fit['at_first_step']:.3f} -> {fit['at_last_step']:.3f}")
    ax.set(xlabel="training step", ylabel="mean IoU of the pair", title="IoU over training (Fig. 4 left)")
    ax.legend()
    paths.append(save_figure(fig, out_dir / "iou_over_training.png"))
    return paths


# --- command line --------------------------------------------------------------

def summary(result: dict) -> str:
    chosen, low = result["chosen_iou"], result["lowest_iou_fraction"]
    fit = chosen["fit"]
    lines = [f"{result['run']}: {result['n_samples']} samples over {result['n_steps']} logged steps "
             f"({result['method'] or 'method unknown'}, selection {result['selection']})",
             f"IoU of the selected pair {chosen['mean']:.3f}, "
             f"of all compared pairs {result['compared_iou']['mean']:.3f}"
             + (f"; linear fit {fit['at_first_step']:.3f} (step {fit['first_step']}) -> {fit['at_last_step']:.3f} "
                f"(step {fit['last_step']})" if fit else ""),
             f"the selected pair is the lowest-IoU pair in {low['overall']:.1%} of samples "
             f"(95% interval {low['interval']['low']:.1%} to {low['interval']['high']:.1%}; chance of a random "
             f"choice {low['chance_with_ties']:.1%}; paper, SimSiam N=4: over 40%, chance 16.7%)"]
    if result["baseline"] is not None:
        base = result["baseline"]["iou"]
        lines.append(f"baseline {result['baseline']['run']}: IoU {base['mean']:.3f}"
                     + (f", fit {base['fit']['at_first_step']:.3f} -> {base['fit']['at_last_step']:.3f}"
                        if base["fit"] else ""))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.iou", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="IoU of the view pairs chosen by hard view selection, from a run's selection logs "
                    "(paper Fig. 3 and Fig. 4 left).",
        epilog="Writes OUTPUT/iou.json and OUTPUT/iou_{lowest_fraction,histogram,over_training}.png.\n"
               "Pairs are slots 0 and 1 of each combination (DINO/iBOT: the two global crops).")
    parser.add_argument("--run", required=True, type=Path, help="run folder with selection/*.npz (an HVS run)")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="run folder of a baseline (no HVS, or hvs.mode=random) to compare the IoU with")
    parser.add_argument("--output", required=True, type=Path, help="folder for iou.json and the figures")
    parser.add_argument("--bins", type=int, default=20, help="histogram bins over [0, 1] (default 20)")
    return parser


def _run(args) -> dict:
    if args.bins < 1:
        raise AnalysisError(f"--bins {args.bins} must be at least 1")
    data = load_selection(args.run)
    baseline = load_selection(args.baseline) if args.baseline is not None else None
    result = analyse(data, baseline, bins=args.bins)
    args.output.mkdir(parents=True, exist_ok=True)
    result["figures"] = plot(result, args.output)
    write_json(args.output / "iou.json", result)
    print(summary(result))
    print(f"wrote {args.output / 'iou.json'} and {len(result['figures'])} figures")
    return result


def main(argv=None) -> int:
    return run_cli(build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
