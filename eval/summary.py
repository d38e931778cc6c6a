"""The results table of ``run_all.sh``: our numbers beside the paper's.

Reads ``<results>/<method>_<baseline|hvs>_s<seed>_knn.json`` (written by
``eval.knn --output``) and the paper's figures from ``configs/paper_numbers.csv``
(the project's copy of Tables 1, 2, 4 and 7), and writes ``<results>/summary.md``.

    python -m eval.summary --results results/small --scale "..." --paper-epochs 100
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

PAPER_CSV = Path(__file__).resolve().parents[1] / "configs" / "paper_numbers.csv"
NAMES = {"simsiam": "SimSiam", "simclr": "SimCLR", "dino": "DINO", "ibot": "iBOT"}
FILE = re.compile(r"(?P<method>[a-z0-9]+)_(?P<variant>baseline|hvs)_s(?P<seed>\d+)_knn\.json$")


#: Table 1's long-schedule column is 300 epochs, except SimCLR's 200.
LONG_EPOCHS = {"SimCLR": "200"}


def paper_rows(table="1", epochs="100"):
    """{(method, protocol): [(arch, baseline, hvs), ...]} from the paper's table;
    ``epochs="300"`` means each method's long schedule (SimCLR: 200)."""
    rows = defaultdict(list)
    with open(PAPER_CSV) as f:
        for r in csv.DictReader(f):
            wanted = LONG_EPOCHS.get(r["method"], epochs) if epochs == "300" else epochs
            if r["table"] == table and r["epochs"] == wanted:
                rows[(r["method"], r["protocol"])].append((r["arch"], float(r["baseline"]), float(r["hvs"])))
    return rows


def collect(results: Path, k: str):
    """{method: {variant: [top-1 of each seed]}} from the k-NN JSON files."""
    found = defaultdict(lambda: defaultdict(dict))
    for path in sorted(results.glob("*_knn.json")):
        m = FILE.match(path.name)
        if m:
            found[m["method"]][m["variant"]][int(m["seed"])] = json.loads(path.read_text())["knn"][k]["top1"]
    return found


def mean_sd(values, signed=False):
    if not values:
        return "—"
    fmt = "+.2f" if signed else ".2f"
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):.2f}"


def render(results: Path, scale: str, k: str = "20", paper_epochs: str = "100") -> str:
    found, paper = collect(results, k), paper_rows("1", paper_epochs)
    lines = [
        "# HVS: our numbers beside the paper's", "",
        f"**Our scale:** {scale}", "",
        f"**Paper:** Table 1, ImageNet, {paper_epochs} epochs{' (SimCLR: 200)' if paper_epochs == '300' else ''} (ResNet-50 / ViT-S/16, many GPUs). "
        "Numbers at our scale are not comparable in absolute terms; compare the sign and size of the difference.",
        "", f"Our k-NN: weighted {k}-NN top-1 (T = 0.07) on the test split, mean ± sd over seeds.", "",
        "| Method | Protocol | Ours baseline | Ours + HVS | Ours diff | Seeds | Paper arch | Paper baseline | Paper + HVS | Paper diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in sorted(found):
        base, hvs = found[method]["baseline"], found[method]["hvs"]
        seeds = sorted(set(base) & set(hvs))
        diffs = [hvs[s] - base[s] for s in seeds]
        name = NAMES.get(method, method)
        ours = (f"| {name} | k-NN | {mean_sd(list(base.values()))} | {mean_sd(list(hvs.values()))} | "
                f"{mean_sd(diffs, signed=True)} | {len(seeds)} |")
        for arch, pb, ph in paper.get((name, "knn"), []):
            lines.append(f"{ours} {arch} | {pb:.2f} | {ph:.2f} | {ph - pb:+.2f} |")
        if (name, "knn") not in paper:
            lines.append(f"{ours} — | — | — | — |")
        for arch, pb, ph in paper.get((name, "linear"), []):
            lines.append(f"| {name} | linear | not run yet | not run yet | — | 0 | {arch} | {pb:.2f} | {ph:.2f} | {ph - pb:+.2f} |")
    if not found:
        lines.append("| (no k-NN results found) | | | | | | | | | |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", required=True, help="folder holding the *_knn.json files")
    p.add_argument("--scale", required=True, help="one line describing the scale our numbers ran at")
    p.add_argument("--k", default="20", help="which k of the k-NN to report (default 20, as DINO)")
    p.add_argument("--paper-epochs", default="100", choices=["100", "300"],
                   help="paper rows to show: 100, or 300 (each method's long schedule: 200 for SimCLR)")
    args = p.parse_args(argv)
    results = Path(args.results)
    text = render(results, args.scale, args.k, args.paper_epochs)
    (results / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
