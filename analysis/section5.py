"""The Section 5 part of ``results/summary.md`` (``run_all.sh --evals analysis``):
our numbers beside the paper's for the analyses of the selected views
(Section 5.1, Appendix D, Section 5.2), the manual IoU policy (Table 5), the
STN adversary (Table 6), easy selection (Appendix F.2) and the number of views
(Fig. 7).

It reads, in the results folder of one profile:

* ``analysis/<token>_<run>_s<seed>/{iou,importance}.json`` (``analysis.iou``,
  ``analysis.importance``) and ``analysis/<token>_hvs/predict.json``
  (``analysis.predict``);
* ``<token>_<variant>_s<seed>_linear.json`` (``eval.linear``) of the baseline,
  HVS and every variant run (``easy``, ``n_views_8``, ``static_color``,
  ``iou_<start>-<end>[_alt]``, ``stn-<mode>``, ``stn-baseline``);
* ``<token>_<variant>_s<seed>_train.json`` (``analysis.collapse``: the end of
  the training log, with the collapse measure ``out_std``).
"""
from __future__ import annotations

import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

from analysis.importance import PAPER as PAPER_IMPORTANCE
from analysis.iou import PAPER as PAPER_IOU
from analysis.predict import PAPER as PAPER_PREDICT

#: Table 5 (delta of top-1 linear accuracy to the baseline, 100 epochs, 2 seeds): policy -> (SimSiam, DINO)
PAPER_TABLE5 = {"iou_0.30-0.35": (-0.80, -1.47), "iou_0.30-0.35_alt": (0.10, -0.45), "iou_0.40-0.60": (0.55, -0.40),
                "iou_0.40-0.60_alt": (0.25, -0.20), "iou_0.10-0.80": (-33.95, -1.50), "iou_1.00-0.10": (0.07, None)}
PAPER_TABLE5_BASELINE = {"simsiam": 68.20, "dino": 73.50}
#: Table 6 (DINO ViT-tiny/16, CIFAR-10, 300 epochs): mode -> (linear, finetune)
PAPER_TABLE6 = {"baseline": (86.1, 92.7), "translation-scale-sym": (83.7, 90.3), "translation-scale": (82.8, 89.7),
                "rotation-translation": (56.7, None), "rotation-translation-scale": (31.7, None),
                "rotation-translation-scale-sym": (77.6, None), "affine": (78.3, 83.5)}
#: the runs of run_all.sh: the baseline, HVS and the variants of the analyses
VARIANT = r"(?P<variant>baseline|hvs|easy|n_views_8|static_color|iou_[\d.]+-[\d.]+(?:_alt)?|stn-[a-z\-]+)"
TOKEN = r"(?P<token>[a-z0-9]+(?:_[a-z0-9]+)*?)"
STEM = re.compile(TOKEN + "_" + VARIANT + r"_s(?P<seed>\d+)_(?P<kind>linear|train)\.json$")
FOLDER = re.compile(TOKEN + "_" + VARIANT + r"(?:_s\d+)?")


def policy_label(policy: str) -> str:
    """``iou_0.30-0.35_alt`` -> ``range(0.30-0.35)+alternating`` (the paper's names)."""
    m = re.fullmatch(r"iou_([\d.]+)-([\d.]+)(_alt)?", policy)
    return f"range({m[1]}-{m[2]})" + ("+alternating" if m[3] else "") if m else policy


def fmt(values, signed=False, scale=1.0, digits=2) -> str:
    """Mean ± sd over seeds (one value: itself; none: a dash)."""
    values = [v * scale for v in values if v is not None]
    if not values:
        return "—"
    f = f"{'+' if signed else ''}.{digits}f"
    if len(values) == 1:
        return f"{values[0]:{f}}"
    return f"{statistics.mean(values):{f}} ± {statistics.stdev(values):.{digits}f}"


def pct(values) -> str:
    """Fractions as percentages."""
    cell = fmt(values, scale=100)
    return cell if cell == "—" else f"{cell} %"


def paper_fmt(value, signed=False) -> str:
    return "—" if value is None else f"{value:{'+.2f' if signed else '.2f'}}"


def read_runs(results: Path) -> dict:
    """{(token, variant): {"linear": {seed: top1}, "train": {seed: report}}} of the results folder."""
    runs = defaultdict(lambda: {"linear": {}, "train": {}})
    for path in sorted(results.glob("*.json")):
        m = STEM.match(path.name)
        if not m:
            continue
        report = json.loads(path.read_text())
        value = report["top1"] if m["kind"] == "linear" else report
        runs[(m["token"], m["variant"])][m["kind"]][int(m["seed"])] = value
    return runs


def deltas(runs: dict, token: str, variant: str, reference: str = "baseline") -> list:
    """Per-seed differences of linear top-1, variant minus reference, over the seeds both have."""
    a, b = runs.get((token, variant), {}).get("linear", {}), runs.get((token, reference), {}).get("linear", {})
    return [a[s] - b[s] for s in sorted(set(a) & set(b))]


def linear(runs: dict, token: str, variant: str) -> list:
    return list(runs.get((token, variant), {}).get("linear", {}).values())


def out_std(runs: dict, token: str, variant: str) -> list:
    return [r["last"].get("out_std") for r in runs.get((token, variant), {}).get("train", {}).values()]


def read_analyses(results: Path, name: str) -> dict:
    """{(token, run): [report per seed]} of ``analysis/*/<name>.json``."""
    found = defaultdict(list)
    for path in sorted((results / "analysis").glob(f"*/{name}.json")):
        m = FOLDER.fullmatch(path.parent.name)
        if m:
            found[(m["token"], m["variant"])].append(json.loads(path.read_text()))
    return found


# ----------------------------------------------------------------------------
# the tables
# ----------------------------------------------------------------------------
def selected_views_table(results: Path) -> list:
    """Section 5.1 / 5.2: lowest-IoU fraction, IoU shift, GBT accuracy, per HVS run."""
    iou, predict = read_analyses(results, "iou"), read_analyses(results, "predict")
    rows = []
    for (token, run), reports in sorted(iou.items()):
        lowest = [r["lowest_iou_fraction"]["overall"] for r in reports]
        chance = [r["lowest_iou_fraction"]["chance"] for r in reports]
        fit = [(r["chosen_iou"]["fit"]["at_first_step"], r["chosen_iou"]["fit"]["at_last_step"]) for r in reports]
        base = [r["baseline"]["iou"]["mean"] for r in reports if r.get("baseline")]
        pred = predict.get((token, run), [])
        acc = [p["cross_validation"]["accuracy"] for p in pred if p.get("cross_validation")]
        held = [p["held_out_accuracy"] for p in pred if p.get("held_out_accuracy") is not None]
        rows.append(f"| {token} | {run} | {pct(lowest)} | {pct(chance)} | "
                    f"{fmt([f for f, _ in fit])} → {fmt([l_ for _, l_ in fit])} | "
                    f"{fmt([r['chosen_iou']['mean'] for r in reports])} | {fmt(base)} | "
                    f"{pct(acc)} | {pct(held)} |")
    if not rows:
        return []
    return ["| Method | Run | Chosen = lowest-IoU pair | Chance | Chosen IoU, linear fit first → last step | "
            "Chosen IoU mean | Baseline IoU mean | GBT 5-fold accuracy | GBT held-out seed |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
            f"| Paper: SimSiam | hvs | > 40 % | {100 * PAPER_IOU['chance']:.1f} % | "
            f"{PAPER_IOU['chosen_iou_fit_first']:.2f} → {PAPER_IOU['chosen_iou_fit_last']:.2f} | — | "
            f"higher than HVS | ≤ {100 * PAPER_PREDICT['max_test_accuracy']:.0f} % | "
            f"≤ {100 * PAPER_PREDICT['max_test_accuracy']:.0f} % |"]


def importance_table(results: Path) -> list:
    """Appendix D / Fig. 8: the fANOVA importance of every pair metric for the loss."""
    found = read_analyses(results, "importance")
    if not found:
        return []
    columns = sorted(found)
    metrics = list(PAPER_IMPORTANCE["importance"])
    for reports in found.values():
        for r in reports:
            metrics += [m for m in r["importance"] if m not in metrics]
    head = "| Metric | " + " | ".join(f"{t} {run}" for t, run in columns) + " | Paper (SimSiam) |"
    lines = [head, "|---" * (len(columns) + 2) + "|"]
    for metric in metrics:
        cells = [pct([r["importance"].get(metric) for r in found[c]]) for c in columns]
        paper = PAPER_IMPORTANCE["importance"].get(metric)
        lines.append(f"| {metric} | " + " | ".join(cells) + f" | {pct([paper])} |")
    return lines


def table5(runs: dict) -> list:
    policies = sorted({v for (_, v) in runs if v.startswith("iou_")})
    if not policies:
        return []
    lines = ["| IoU policy | SimSiam Δ ours | SimSiam Δ paper | DINO Δ ours | DINO Δ paper |", "|---|---|---|---|---|"]
    for policy in policies:
        paper = PAPER_TABLE5.get(policy, (None, None))
        lines.append(f"| {policy_label(policy)} | {fmt(deltas(runs, 'simsiam', policy), signed=True)} | "
                     f"{paper_fmt(paper[0], True)} | {fmt(deltas(runs, 'dino', policy), signed=True)} | "
                     f"{paper_fmt(paper[1], True)} |")
    lines.append(f"| baseline (top-1) | {fmt(linear(runs, 'simsiam', 'baseline'))} | "
                 f"{PAPER_TABLE5_BASELINE['simsiam']:.2f} | {fmt(linear(runs, 'dino', 'baseline'))} | "
                 f"{PAPER_TABLE5_BASELINE['dino']:.2f} |")
    return lines


def table6(runs: dict) -> list:
    modes = [m for m in PAPER_TABLE6 if ("dino", f"stn-{m}") in runs]
    if len(modes) < 2 and "baseline" in modes or not modes:
        return []
    lines = ["| STN mode | Penalty | Ours linear | Ours Δ to baseline | Paper linear | Paper F.T. |",
             "|---|---|---|---|---|---|"]
    for mode in modes:
        variant = f"stn-{mode}"
        delta = "—" if mode == "baseline" else fmt(deltas(runs, "dino", variant, "stn-baseline"), signed=True)
        paper = PAPER_TABLE6[mode]
        lines.append(f"| {mode} | {'—' if mode == 'baseline' else 'TCP'} | {fmt(linear(runs, 'dino', variant))} | "
                     f"{delta} | {paper_fmt(paper[0])} | {paper_fmt(paper[1])} |")
    return lines


def views_table(runs: dict) -> list:
    """Appendix F.2 (easy selection) and Fig. 7 (N = 8), SimSiam, beside its baseline and HVS."""
    rows = [("baseline", "standard augmentation", "68.20 (Table 5's baseline)"),
            ("hvs", "HVS, N = 4", "+0.7 to +1.2 over the baseline (Table 1)"),
            ("n_views_8", "HVS, N = 8 (Fig. 7)", "−0.05 vs N = 4 (100 ep.), still above the baseline"),
            ("easy", "easy selection, argmin (App. F.2)", "collapse: 0.1 % linear"),
            ("static_color", "HVS, static colour (Fig. 4 right)", "—")]
    if not any(("simsiam", v) in runs for v, _, _ in rows[2:]):
        return []
    lines = ["| SimSiam run | What | Ours linear | Ours Δ to HVS | Ours out_std (last steps) | Paper |",
             "|---|---|---|---|---|---|"]
    for variant, what, paper in rows:
        if ("simsiam", variant) not in runs:
            continue
        delta = "—" if variant == "hvs" else fmt(deltas(runs, "simsiam", variant, "hvs"), signed=True)
        lines.append(f"| {variant} | {what} | {fmt(linear(runs, 'simsiam', variant))} | {delta} | "
                     f"{fmt(out_std(runs, 'simsiam', variant), digits=4)} | {paper} |")
    return lines


def render(results: Path) -> list:
    """The Section 5 lines of the summary ([] when no analysis ran)."""
    results = Path(results)
    runs = read_runs(results)
    parts = [
        ("### Selected views (Section 5.1, Fig. 3 and 4; Section 5.2, predictability)",
         "From the selection logs: the fraction of samples whose chosen pair has the lowest IoU of the pairs "
         "compared (DINO and iBOT: the pair of global crops), the IoU of the chosen pair over training (linear "
         "fit), and gradient-boosted trees predicting the chosen pair from the logged parameters.",
         selected_views_table(results)),
        ("### What the loss depends on (Appendix D, Fig. 8): first-order fANOVA importance",
         "Share of the variance of the per-pair loss explained by each pair metric alone (functional ANOVA over a "
         "random forest, `analysis/fanova.py`).",
         importance_table(results)),
        ("### Manual IoU policy (Table 5): Δ of linear top-1 to the baseline",
         "The crops of the pair (DINO: the global crops) are redrawn until their IoU is at most a threshold "
         "scheduled from start to end over training; no HVS.", table5(runs)),
        ("### STN adversary (Table 6): DINO ViT-tiny on CIFAR-10",
         "A spatial transformer generates the crops and maximises DINO's loss (`dino/stn.py`); theta-crop "
         "penalty (TCP).", table6(runs)),
        ("### Easy selection, number of views and static colour (Appendix F.2, Fig. 7, Fig. 4 right)",
         "`out_std`: std of the L2-normalised outputs over the batch (SimSiam's collapse measure; about "
         "1/sqrt(d) when healthy, 0 when collapsed).", views_table(runs)),
    ]
    lines = []
    for title, text, table in parts:
        if table:
            lines += ["", title, "", text, "", *table]
    if lines:
        lines = ["", "## Section 5: what makes a view hard (`run_all.sh --evals analysis`)", "",
                 "At our scale: one short run per row, so these numbers show that every analysis runs end to end "
                 "and which way it points, not the paper's effect sizes."] + lines
    return lines
