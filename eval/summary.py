"""The results table of ``run_all.sh``: our numbers beside the paper's.

Reads ``<results>/<token>_<baseline|hvs>_s<seed>_knn.json`` (written by
``eval.knn --output``; ``<token>`` is run_all.sh's method token, e.g. ``dino`` or
``dino_resnet``) and the paper's figures from ``configs/paper_numbers.csv`` (the
project's copy of Tables 1, 2, 4 and 7), and writes ``<results>/summary.md``.
Each of our results is shown beside the paper's row of the same method and
backbone family, taken from the architecture in the k-NN file (our ResNets
beside RN50, our ViTs beside ViT-S/16: ``dino`` and ``ibot`` runs of a
``vit_tiny/4`` beside DINO's and iBOT's ViT-S/16 rows).

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
#: run_all.sh method token -> the paper's method name
NAMES = {"simsiam": "SimSiam", "simclr": "SimCLR", "dino": "DINO", "dino_resnet": "DINO", "ibot": "iBOT"}
#: a token's backbone family when its k-NN file names no architecture (files of older runs)
DEFAULT_FAMILY = {"simsiam": "resnet", "simclr": "resnet", "dino": "vit", "dino_resnet": "resnet", "ibot": "vit"}
#: the token may hold underscores (dino_resnet); the shortest one that leaves a valid tail is taken
FILE = re.compile(r"(?P<method>[a-z0-9]+(?:_[a-z0-9]+)*?)_(?P<variant>baseline|hvs)_s(?P<seed>\d+)_knn\.json$")


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


def paper_name(token: str) -> str:
    """The paper's name of a method token: ``dino_resnet`` -> ``DINO``."""
    return NAMES.get(token) or NAMES.get(token.split("_")[0], token)


def family(arch: str | None, token: str = "") -> str | None:
    """Backbone family of an architecture name, ours (``resnet18``, ``vit_tiny/4``)
    or the paper's (``RN50``, ``ViT-S/16``): ``resnet``, ``vit`` or None if
    unknown; without an architecture, the token's usual family."""
    if not arch:
        return DEFAULT_FAMILY.get(token, DEFAULT_FAMILY.get(token.split("_")[0]))
    a = arch.lower()
    if a.startswith(("resnet", "rn")):
        return "resnet"
    if a.startswith("vit"):
        return "vit"
    return None


class Ours:
    """k-NN results of one method token and one architecture: {variant: {seed: top-1}}."""

    def __init__(self, token: str, arch: str | None):
        self.token, self.arch = token, arch
        self.name, self.family = paper_name(token), family(arch, token)
        self.top1 = {"baseline": {}, "hvs": {}}


def collect(results: Path, k: str) -> list:
    """Our results, one :class:`Ours` per (method token, architecture), from the
    k-NN JSON files (``eval.knn --output``; the architecture is the checkpoint's,
    the file's ``arch``)."""
    groups = {}
    for path in sorted(results.glob("*_knn.json")):
        m = FILE.match(path.name)
        if not m:
            continue
        report = json.loads(path.read_text())
        try:
            top1 = report["knn"][k]["top1"]
        except KeyError:
            raise SystemExit(f"eval.summary: {path} has no k={k} result (it has k = "
                             f"{', '.join(report.get('knn', {})) or 'none'}); pass --k") from None
        key = (m["method"], report.get("arch"))
        if key not in groups:
            groups[key] = Ours(*key)
        groups[key].top1[m["variant"]][int(m["seed"])] = top1
    return sorted(groups.values(), key=lambda g: (g.name, g.token, g.arch or ""))


def mean_sd(values, signed=False):
    if not values:
        return "—"
    fmt = "+.2f" if signed else ".2f"
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):.2f}"


def our_cells(g: Ours | None) -> str:
    """Ours arch | baseline | + HVS | diff | seeds (paired seeds: both variants)."""
    if g is None:
        return "— | not run | not run | — | 0"
    base, hvs = g.top1["baseline"], g.top1["hvs"]
    seeds = sorted(set(base) & set(hvs))
    diffs = [hvs[s] - base[s] for s in seeds]
    return (f"{g.arch or '—'} | {mean_sd(list(base.values()))} | {mean_sd(list(hvs.values()))} | "
            f"{mean_sd(diffs, signed=True)} | {len(seeds)}")


def render(results: Path, scale: str, k: str = "20", paper_epochs: str = "100") -> str:
    """The table: for every method we have results of, each paper row (k-NN:
    beside our runs of the same backbone family, or "not run"; linear: "not run
    yet"), and our runs of a family the paper has no row for."""
    found, paper = collect(results, k), paper_rows("1", paper_epochs)
    lines = [
        "# HVS: our numbers beside the paper's", "",
        f"**Our scale:** {scale}", "",
        f"**Paper:** Table 1, ImageNet, {paper_epochs} epochs{' (SimCLR: 200)' if paper_epochs == '300' else ''} (ResNet-50 / ViT-S/16, many GPUs). "
        "Each of our runs is beside the paper's row of the same backbone family (ours: ResNet-18/50 beside RN50, "
        "ViTs beside ViT-S/16). "
        "Numbers at our scale are not comparable in absolute terms; compare the sign and size of the difference.",
        "", f"Our k-NN: weighted {k}-NN top-1 (T = 0.07) on the test split, mean ± sd over seeds.", "",
        "| Method | Protocol | Ours arch | Ours baseline | Ours + HVS | Ours diff | Seeds | Paper arch | Paper baseline | Paper + HVS | Paper diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in sorted({g.name for g in found}):
        ours = [g for g in found if g.name == name]
        shown = set()
        for arch, pb, ph in paper.get((name, "knn"), []):
            beside = [g for g in ours if g.family == family(arch)] or [None]
            for g in beside:
                lines.append(f"| {name} | k-NN | {our_cells(g)} | {arch} | {pb:.2f} | {ph:.2f} | {ph - pb:+.2f} |")
                shown.add(id(g))
        for g in ours:
            if id(g) not in shown:  # no paper row of this family
                lines.append(f"| {name} | k-NN | {our_cells(g)} | — | — | — | — |")
        for arch, pb, ph in paper.get((name, "linear"), []):
            lines.append(f"| {name} | linear | — | not run yet | not run yet | — | 0 | {arch} | {pb:.2f} | {ph:.2f} | {ph - pb:+.2f} |")
    if not found:
        lines.append("| (no k-NN results found) | | | | | | | | | | |")
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
