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
from collections import defaultdict
from pathlib import Path

from analysis.importance import PAPER as PAPER_IMPORTANCE
from analysis.iou import PAPER as PAPER_IOU
from analysis.predict import PAPER as PAPER_PREDICT
from analysis.stats import difference_cells, format_interval, over_seeds, value_cell

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
FOLDER = re.compile(TOKEN + "_" + VARIANT + r"(?:_s(?P<seed>\d+))?")


def policy_label(policy: str) -> str:
    """``iou_0.30-0.35_alt`` -> ``range(0.30-0.35)+alternating`` (the paper's names)."""
    m = re.fullmatch(r"iou_([\d.]+)-([\d.]+)(_alt)?", policy)
    return f"range({m[1]}-{m[2]})" + ("+alternating" if m[3] else "") if m else policy


def paper_fmt(value, signed=False) -> str:
    return "—" if value is None else f"{value:{'+.2f' if signed else '.2f'}}"


def read_runs(results: Path) -> dict:
    """{(token, variant): {"linear": {seed: top1}, "n_test": {seed: test images}, "train": {seed: report}}}
    of the results folder."""
    runs = defaultdict(lambda: {"linear": {}, "n_test": {}, "train": {}})
    for path in sorted(results.glob("*.json")):
        m = STEM.match(path.name)
        if not m:
            continue
        report = json.loads(path.read_text())
        value = report["top1"] if m["kind"] == "linear" else report
        runs[(m["token"], m["variant"])][m["kind"]][int(m["seed"])] = value
        if m["kind"] == "linear":
            runs[(m["token"], m["variant"])]["n_test"][int(m["seed"])] = report.get("n_test")
    return runs


def delta(runs: dict, token: str, variant: str, reference: str = "baseline") -> str:
    """Linear top-1 of ``variant`` minus ``reference``, paired by seed, with its
    95 % interval and the plain verdict (:func:`analysis.stats.difference_cells`)."""
    a, b = runs.get((token, variant), {}), runs.get((token, reference), {})
    if not a.get("linear") or not b.get("linear"):
        return "—"
    n_test = {s: b["n_test"].get(s) or a["n_test"].get(s) for s in b["linear"]}
    cell, verdict = difference_cells(a["linear"], b["linear"], n_test,
                                     names=(variant, "the baseline" if reference == "baseline" else reference))
    return cell if cell == "—" else f"{cell}: {verdict}"


def linear(runs: dict, token: str, variant: str) -> str:
    """Linear top-1 over seeds with its interval (:func:`analysis.stats.value_cell`)."""
    run = runs.get((token, variant), {})
    return value_cell(run.get("linear", {}), run.get("n_test"))


def out_std(runs: dict, token: str, variant: str) -> str:
    train = runs.get((token, variant), {}).get("train", {})
    return value_cell({s: r["last"].get("out_std") for s, r in train.items()}, digits=4)


def read_analyses(results: Path, name: str) -> dict:
    """{(token, run): [report per seed]} of ``analysis/*/<name>.json`` (each
    report's ``_seed``: the seed of its folder, None for a pooled one)."""
    found = defaultdict(list)
    for path in sorted((results / "analysis").glob(f"*/{name}.json")):
        m = FOLDER.fullmatch(path.parent.name)
        if m:
            report = json.loads(path.read_text())
            report["_seed"] = None if m["seed"] is None else int(m["seed"])
            found[(m["token"], m["variant"])].append(report)
    return found


def fraction_cell(parts: list) -> str:
    """A fraction in percent: one run, its Wilson interval (``parts``: the
    :func:`analysis.stats.proportion` dicts of the runs); several, mean ± sd and
    the t-interval over runs; the chance beside it is a column of its own."""
    parts = [p for p in parts if p and p.get("value") is not None]
    if not parts:
        return "—"
    if len(parts) == 1:
        p = parts[0]
        mark = " (above chance)" if p.get("above_chance") else ""
        return f"{100 * p['value']:.1f} % {format_interval(100 * p['low'], 100 * p['high'], 1)}{mark}"
    s = over_seeds([100 * p["value"] for p in parts])
    return f"{s['mean']:.1f} ± {s['sd']:.1f} % {format_interval(s['low'], s['high'], 1)} ({s['n']} seeds)"


# ----------------------------------------------------------------------------
# the tables
# ----------------------------------------------------------------------------
def selected_views_table(results: Path) -> list:
    """Section 5.1 / 5.2: lowest-IoU fraction (overall and last epoch, with
    their intervals beside chance), IoU shift, GBT accuracy (with its interval
    beside chance and the majority class), per HVS run."""
    iou, predict = read_analyses(results, "iou"), read_analyses(results, "predict")
    rows = []
    for (token, run), reports in sorted(iou.items()):
        lows = [r["lowest_iou_fraction"] for r in reports]
        overall = [low.get("interval") or {"value": low["overall"]} for low in lows]
        last = [low.get("last_epoch") for low in lows]
        chance = [low.get("chance_with_ties", low["chance"]) for low in lows]
        fit = [(r["chosen_iou"]["fit"]["at_first_step"], r["chosen_iou"]["fit"]["at_last_step"]) for r in reports]
        base = {i: r["baseline"]["iou"]["mean"] for i, r in enumerate(reports) if r.get("baseline")}
        pred = predict.get((token, run), [])
        rows.append(f"| {token} | {run} | {fraction_cell(overall)} | {fraction_cell(last)} | "
                    f"{100 * min(chance):.1f}" + (f"–{100 * max(chance):.1f}" if max(chance) > min(chance) else "")
                    + f" % | {value_cell(dict(enumerate(f for f, _ in fit)))} → "
                    f"{value_cell(dict(enumerate(l_ for _, l_ in fit)))} | "
                    f"{value_cell(dict(enumerate(r['chosen_iou']['mean'] for r in reports)))} | "
                    f"{value_cell(base)} | {gbt_cells(pred)} |")
    if not rows:
        return []
    return ["| Method | Run | Chosen = lowest-IoU pair, all logged steps | Same, last epoch | Chance (random "
            "choice) | Chosen IoU, linear fit first → last step | Chosen IoU mean | Baseline IoU mean | "
            "GBT 5-fold accuracy | GBT held-out seed | GBT chance / majority class |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            *rows,
            f"| Paper: SimSiam | hvs | > 40 % | — | {100 * PAPER_IOU['chance']:.1f} % | "
            f"{PAPER_IOU['chosen_iou_fit_first']:.2f} → {PAPER_IOU['chosen_iou_fit_last']:.2f} | — | "
            f"higher than HVS | ≤ {100 * PAPER_PREDICT['max_test_accuracy']:.0f} % | "
            f"≤ {100 * PAPER_PREDICT['max_test_accuracy']:.0f} % | {100 * PAPER_PREDICT['chance']:.1f} % / — |"]


def gbt_cells(pred: list) -> str:
    """GBT 5-fold | held-out | chance / majority cells of a predict.json (pooled over all seeds' runs)."""
    if not pred:
        return "— | — | —"
    p = pred[0]
    cv, held = p.get("cross_validation") or {}, p.get("held_out_interval")
    if cv.get("interval"):
        acc, maj = cv["interval"]["accuracy"], cv["interval"]["majority"]
        mark = " (above majority)" if acc.get("above_majority") else ""
        cv_cell = f"{fraction_cell([acc])}{mark}"
        chance = f"{100 * p['chance']['uniform']:.1f} % / {fraction_cell([maj])}"
    else:  # a file of an older version: no interval
        cv_cell = f"{100 * cv['accuracy']:.1f} % (no interval)" if cv.get("accuracy") is not None else "—"
        chance = f"{100 * p['chance']['uniform']:.1f} % / —" if p.get("chance") else "—"
    if held:
        mark = " (above majority)" if held["accuracy"].get("above_majority") else ""
        held_cell = f"{fraction_cell([held['accuracy']])}{mark}"
    elif p.get("held_out_accuracy") is not None:
        held_cell = f"{100 * p['held_out_accuracy']:.1f} % (no interval)"
    else:
        held_cell = "—"
    return f"{cv_cell} | {held_cell} | {chance}"


def importance_table(results: Path) -> list:
    """Appendix D / Fig. 8: the fANOVA importance of every pair metric for the
    loss, one column per run, each beside its permutation null's 95th
    percentile; **bold**: above the null."""
    found = read_analyses(results, "importance")
    if not found:
        return []
    columns = [(key, r) for key in sorted(found) for r in sorted(found[key], key=lambda r: r["_seed"] or 0)]
    metrics = list(PAPER_IMPORTANCE["importance"])
    for _, r in columns:
        metrics += [m for m in r["importance"] if m not in metrics]
    head = ("| Metric | " + " | ".join(f"{t} {run}" + ("" if r["_seed"] is None else f" s{r['_seed']}")
                                         for (t, run), r in columns) + " | Paper (SimSiam) |")
    lines = [head, "|---" * (len(columns) + 2) + "|"]
    for metric in metrics:
        cells = [importance_cell(r, metric) for _, r in columns]
        paper = PAPER_IMPORTANCE["importance"].get(metric)
        lines.append(f"| {metric} | " + " | ".join(cells) + f" | {'—' if paper is None else f'{100 * paper:.2f} %'} |")
    shuffles = sorted({r["null"]["shuffles"] for _, r in columns if r.get("null")})
    lines.append("| sum of first order | " + " | ".join(
        f"{100 * r['sum_first_order']:.2f} %" + (f" (null {100 * r['null']['sum_first_order_95']:.2f} %)"
                                                 if r.get("null") else "") if r.get("sum_first_order") is not None
        else "—" for _, r in columns) + " | — |")
    if shuffles:
        lines += ["", f"In brackets: the 95th percentile of the same metric's importance over "
                      f"{' / '.join(map(str, shuffles))} shuffles of the loss against the metrics (the same forest "
                      "settings); **bold**: above it and above the 95th percentile of the largest importance of "
                      "each shuffle, i.e. the loss depends on that metric beyond what a forest finds in noise."]
    return lines


def importance_cell(report: dict, metric: str) -> str:
    value = report["importance"].get(metric)
    if value is None:
        return "—"
    null = report.get("null")
    if not null:
        return f"{100 * value:.2f} % (no null)"
    cell = f"{100 * value:.2f} % ({100 * null['percentile_95'][metric]:.2f} %)"
    return f"**{cell}**" if null["above_null"].get(metric) else cell


def table5(runs: dict) -> list:
    policies = sorted({v for (_, v) in runs if v.startswith("iou_")})
    if not policies:
        return []
    lines = ["| IoU policy | SimSiam Δ ours | SimSiam Δ paper | DINO Δ ours | DINO Δ paper |", "|---|---|---|---|---|"]
    for policy in policies:
        paper = PAPER_TABLE5.get(policy, (None, None))
        lines.append(f"| {policy_label(policy)} | {delta(runs, 'simsiam', policy)} | "
                     f"{paper_fmt(paper[0], True)} | {delta(runs, 'dino', policy)} | "
                     f"{paper_fmt(paper[1], True)} |")
    lines.append(f"| baseline (top-1) | {linear(runs, 'simsiam', 'baseline')} | "
                 f"{PAPER_TABLE5_BASELINE['simsiam']:.2f} | {linear(runs, 'dino', 'baseline')} | "
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
        change = "—" if mode == "baseline" else delta(runs, "dino", variant, "stn-baseline")
        paper = PAPER_TABLE6[mode]
        lines.append(f"| {mode} | {'—' if mode == 'baseline' else 'TCP'} | {linear(runs, 'dino', variant)} | "
                     f"{change} | {paper_fmt(paper[0])} | {paper_fmt(paper[1])} |")
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
        change = "—" if variant == "hvs" else delta(runs, "simsiam", variant, "hvs")
        lines.append(f"| {variant} | {what} | {linear(runs, 'simsiam', variant)} | {change} | "
                     f"{out_std(runs, 'simsiam', variant)} | {paper} |")
    return lines


def render(results: Path) -> list:
    """The Section 5 lines of the summary ([] when no analysis ran)."""
    results = Path(results)
    runs = read_runs(results)
    parts = [
        ("### Selected views (Section 5.1, Fig. 3 and 4; Section 5.2, predictability)",
         "From the selection logs: the fraction of samples whose chosen pair has the lowest IoU of the pairs "
         "compared (DINO and iBOT: the pair of global crops), with its Wilson 95 % interval over the logged samples "
         "(several seeds: the t-interval over seeds) beside the chance of a random choice; the IoU of the chosen "
         "pair over training (linear fit); and gradient-boosted trees predicting the chosen pair from the logged "
         "parameters, their accuracy over all test parts with its Wilson interval beside chance (1 / pairs) and "
         "the majority-class accuracy.",
         selected_views_table(results)),
        ("### What the loss depends on (Appendix D, Fig. 8): first-order fANOVA importance",
         "Share of the variance of the per-pair loss explained by each pair metric alone (functional ANOVA over a "
         "random forest, `analysis/fanova.py`), beside its permutation null.",
         importance_table(results)),
        ("### Manual IoU policy (Table 5): Δ of linear top-1 to the baseline",
         "The crops of the pair (DINO: the global crops) are redrawn until their IoU is at most a threshold "
         "scheduled from start to end over training; no HVS.", table5(runs)),
        ("### STN adversary (Table 6): DINO ViT-tiny on CIFAR-10",
         "A spatial transformer generates the crops and maximises DINO's loss (`stn/method.py`); theta-crop "
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
                 "Brackets are 95 % intervals (one seed: Wilson on its test set or logged samples; several: the "
                 "Student-t interval over seeds); differences are paired by seed, with the verdict \"no difference "
                 "detectable at this scale\" when their interval contains 0."] + lines
    return lines
