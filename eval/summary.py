"""The results table of ``run_all.sh``: our numbers beside the paper's.

Reads the evaluation files of one profile, ``<results>/<token>_<baseline|hvs>_s<seed>_<evaluation>.json``
(``<token>`` is run_all.sh's method token, e.g. ``dino`` or ``dino_resnet``):

* ``knn``: ``eval.knn --output`` on the pretraining dataset (Table 1, k-NN);
* ``linear``: ``eval.linear`` on the pretraining dataset (Table 1, linear);
* ``linear-<dataset>`` and ``finetune-<dataset>``: ``eval.linear`` and
  ``eval.finetune`` on a transfer dataset (Table 2, "Lin." and "F.T.");
* ``detection-<dataset>``: ``detection.train_net --output`` (Tables 3 and 7:
  box AP, AP50, AP75 of a VOC-layout set, and mask AP of COCO);
* the files of ``run_all.sh --evals analysis``, for the Section 5 part
  (:mod:`analysis.section5`);

and the paper's figures from ``configs/paper_numbers.csv`` (the project's copy
of Tables 1, 2, 4 and 7; Table 3's AP50 are Table 7's), and writes ``<results>/summary.md``.  Each of our
results stands beside the paper's row of the same method, protocol and
backbone family, taken from the architecture in the file (our ResNets beside
RN50, our ViTs beside ViT-S/16).  A transfer dataset of ours that the paper
has no column for (e.g. Tiny-ImageNet-100 at the small scale) stands beside
the mean of the paper's five transfer datasets for that method and protocol.

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

from analysis.stats import difference_cells, value_cell
from common.engine import registry

PAPER_CSV = Path(__file__).resolve().parents[1] / "configs" / "paper_numbers.csv"
#: the token may hold underscores (dino_resnet); the shortest one that leaves a valid tail is taken
FILE = re.compile(r"(?P<method>[a-z0-9]+(?:_[a-z0-9]+)*?)_(?P<variant>baseline|hvs)_s(?P<seed>\d+)_"
                  r"(?P<eval>knn|linear|finetune|detection)(?:-(?P<dataset>[a-z0-9-]+))?\.json$")
#: our dataset names -> the paper's (Table 2's columns)
PAPER_DATASETS = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "flowers102": "Flowers102", "inat21": "iNat21",
                  "inat21-mini": "iNat21", "food101": "Food101", "imagenet": "ImageNet"}
#: protocol names in the files -> in the table
SHOWN = {"knn": "k-NN", "linear": "linear", "finetune": "F.T."}
#: (part, metric) of a detection results file -> the paper's protocol name (Table 7)
DET_METRICS = {("box", "AP"): "det_AP", ("box", "AP50"): "det_AP50", ("box", "AP75"): "det_AP75",
               ("mask", "AP"): "mask_AP", ("mask", "AP50"): "mask_AP50", ("mask", "AP75"): "mask_AP75"}

#: how to read our cells (every table of the summary)
UNCERTAINTY = ("Brackets are 95 % intervals.  One seed: the accuracy's Wilson interval on its test set (test-set "
               "sampling only).  Several seeds: mean ± sd over seeds and the Student-t interval of the mean.  "
               "Ours diff: HVS minus baseline paired by seed (the same seed gives both the same initial weights and "
               "data order), with the t-interval of the per-seed differences (one seed: Newcombe's interval of "
               "the difference of two accuracies).  Verdict: \"no difference detectable at this scale\" when the "
               "interval contains 0.")

#: Table 1's long-schedule column is 300 epochs, except SimCLR's 200.
LONG_EPOCHS = {"SimCLR": "200"}


def paper_rows(table="1", epochs="100"):
    """{(method, protocol): [(arch, baseline, hvs), ...]} from the paper's table
    (Table 2: ``[(arch, dataset, baseline, hvs), ...]``); ``epochs="300"`` means
    each method's long schedule (SimCLR: 200)."""
    rows = defaultdict(list)
    with open(PAPER_CSV) as f:
        for r in csv.DictReader(f):
            wanted = LONG_EPOCHS.get(r["method"], epochs) if epochs == "300" else epochs
            if r["table"] == table and r["epochs"] == wanted:
                extra = (r["dataset"],) if table in ("2", "7") else ()
                rows[(r["method"], r["protocol"])].append((r["arch"], *extra, float(r["baseline"]), float(r["hvs"])))
    return rows


def token_info(token: str):
    """``(method class, entry, family)`` of a run_all.sh token (:mod:`common.engine.registry`),
    or of its part before the first underscore; None if neither is a token."""
    tokens = registry.run_all_tokens()
    return tokens.get(token) or tokens.get(token.split("_")[0])


def paper_name(token: str) -> str:
    """The paper's name of a method token (the method's ``paper_name``): ``dino_resnet`` -> ``DINO``."""
    info = token_info(token)
    return info[0].paper_name if info and info[0].paper_name else token


def family(arch: str | None, token: str = "") -> str | None:
    """Backbone family of an architecture name, ours (``resnet18``, ``vit_tiny/4``)
    or the paper's (``RN50``, ``ViT-S/16``): ``resnet``, ``vit`` or None if
    unknown; without an architecture, the token's usual family."""
    if not arch:
        info = token_info(token)
        return info[2] if info else None
    a = arch.lower()
    if a.startswith(("resnet", "rn")):
        return "resnet"
    if a.startswith("vit"):
        return "vit"
    return None


class Ours:
    """Top-1 of one method token, architecture, evaluation and dataset
    (None: the pretraining dataset): {variant: {seed: top-1}}, and the notes of
    the files (protocol, mode)."""

    def __init__(self, token: str, arch: str | None, evaluation: str, dataset: str | None):
        self.token, self.arch, self.eval, self.dataset = token, arch, evaluation, dataset
        self.name, self.family = paper_name(token), family(arch, token)
        self.top1 = {"baseline": {}, "hvs": {}}
        self.n_test = {"baseline": {}, "hvs": {}}  # test images of every result (None: not a proportion)
        self.notes: set = set()


def read_top1(path: Path, evaluation: str, k: str) -> tuple[float, dict]:
    report = json.loads(path.read_text())
    if evaluation != "knn":
        return report["top1"], report
    try:
        return report["knn"][k]["top1"], report
    except KeyError:
        raise SystemExit(f"eval.summary: {path} has no k={k} result (it has k = "
                         f"{', '.join(report.get('knn', {})) or 'none'}); pass --k") from None


def collect(results: Path, k: str) -> list:
    """Our results, one :class:`Ours` per (token, architecture, evaluation,
    dataset), from the evaluation files (the architecture is the file's ``arch``)."""
    groups = {}
    for path in sorted(results.glob("*.json")):
        m = FILE.match(path.name)
        if not m or m["eval"] == "detection":
            continue
        top1, report = read_top1(path, m["eval"], k)
        key = (m["method"], report.get("arch"), m["eval"], m["dataset"])
        if key not in groups:
            groups[key] = Ours(*key)
        groups[key].top1[m["variant"]][int(m["seed"])] = top1
        groups[key].n_test[m["variant"]][int(m["seed"])] = report.get("n_test")
        if m["eval"] != "knn":
            groups[key].notes.add((report.get("protocol"), report.get("mode", "full")))
    return sorted(groups.values(), key=lambda g: (g.name, g.token, g.arch or "", g.eval, g.dataset or ""))


def our_cells(g: Ours | None, dataset_cell: bool = False) -> str:
    """Ours arch | [dataset |] baseline | + HVS | diff | verdict | seeds (paired
    seeds: both variants).  One seed: the accuracy with its Wilson 95 %
    interval on its test set; several: mean ± sd with the t-interval over
    seeds; the difference is paired by seed (:mod:`analysis.stats`)."""
    lead = f"{g.arch or '—'} | " if g else "— | "
    if dataset_cell:
        lead += f"{g.dataset if g else '—'} | "
    if g is None:
        return lead + "not run | not run | — | — | 0"
    base, hvs = g.top1["baseline"], g.top1["hvs"]
    seeds = sorted(set(base) & set(hvs))
    n_test = {s: g.n_test["baseline"].get(s) or g.n_test["hvs"].get(s) for s in seeds}
    diff, verdict = difference_cells(hvs, base, n_test)
    return (lead + f"{value_cell(base, g.n_test['baseline'])} | {value_cell(hvs, g.n_test['hvs'])} | "
            f"{diff} | {verdict} | {len(seeds)}")


def paper_cells(baseline: float, hvs: float) -> str:
    return f"{baseline:.2f} | {hvs:.2f} | {hvs - baseline:+.2f}"


def table1(found: list, paper: dict) -> list:
    """k-NN and linear rows: every paper row of a method we ran, beside our runs
    of the same backbone family (or "not run"), and our runs of a family the
    paper has no row for."""
    lines = ["| Method | Protocol | Ours arch | Ours baseline | Ours + HVS | Ours diff | Ours verdict | Seeds | "
             "Paper arch | Paper baseline | Paper + HVS | Paper diff |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    paper_methods = {method for method, _ in paper}
    for name in sorted({g.name for g in found}):
        for protocol in ("knn", "linear"):
            ours = [g for g in found if g.name == name and g.eval == protocol and g.dataset is None]
            shown = set()
            for arch, pb, ph in paper.get((name, protocol), []):
                for g in [g for g in ours if g.family == family(arch)] or [None]:
                    lines.append(f"| {name} | {SHOWN[protocol]} | {our_cells(g)} | {arch} | {paper_cells(pb, ph)} |")
                    shown.add(id(g))
            paper_arch = "—" if name in paper_methods else "no paper number"  # a method beyond the paper
            lines += [f"| {name} | {SHOWN[protocol]} | {our_cells(g)} | {paper_arch} | — | — | — |"
                      for g in ours if id(g) not in shown]
    return lines


def table2(found: list, paper: dict) -> list:
    """Transfer rows (linear and finetuning on another dataset): beside the
    paper's row of the same method, protocol, backbone family and dataset, or
    the mean of its datasets where the paper has no column for ours."""
    lines = ["| Method | Protocol | Ours arch | Ours dataset | Ours baseline | Ours + HVS | Ours diff | Ours verdict | "
             "Seeds | Paper arch | Paper dataset | Paper baseline | Paper + HVS | Paper diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for g in [g for g in found if g.dataset is not None]:
        rows = [r for r in paper.get((g.name, g.eval), []) if family(r[0]) == g.family]
        same = [r for r in rows if r[1] == PAPER_DATASETS.get(g.dataset)]
        head = f"| {g.name} | {'Lin.' if g.eval == 'linear' else SHOWN[g.eval]} | {our_cells(g, dataset_cell=True)}"
        if same:
            arch, dataset, pb, ph = same[0]
            lines.append(f"{head} | {arch} | {dataset} | {paper_cells(pb, ph)} |")
        elif rows:
            pb, ph = statistics.mean(r[2] for r in rows), statistics.mean(r[3] for r in rows)
            lines.append(f"{head} | {rows[0][0]} | mean of {len(rows)} ({', '.join(r[1] for r in rows)}) | "
                         f"{paper_cells(pb, ph)} |")
        else:
            lines.append(f"{head} | — | (no Table 2 row) | — | — | — |")
    return lines


def collect_detection(results: Path) -> tuple[list, list]:
    """Our detection results, one :class:`Ours` per (token, architecture,
    metric, dataset) with the metric in ``top1``, and one note per
    (dataset, config) on the scale they ran at."""
    groups, notes = {}, {}
    for path in sorted(results.glob("*_detection-*.json")):
        m = FILE.match(path.name)
        if not m:
            continue
        report = json.loads(path.read_text())
        for (part, metric), protocol in DET_METRICS.items():
            if metric not in report.get(part, {}):
                continue
            key = (m["method"], report.get("arch"), protocol, m["dataset"])
            if key not in groups:
                groups[key] = Ours(*key)
            groups[key].top1[m["variant"]][int(m["seed"])] = float(report[part][metric])
        notes[(m["dataset"], report.get("config"))] = (
            f"{m['dataset']}: `{report.get('config')}`, {report.get('iterations')} steps of batch "
            f"{report.get('ims_per_batch')}, test short side {report.get('min_size_test')} px")
    found = sorted(groups.values(), key=lambda g: (g.name, g.token, g.dataset or "", list(DET_METRICS.values())
                                                     .index(g.eval)))
    return found, [notes[k] for k in sorted(notes, key=str)]


def table_detection(found: list, paper: dict) -> list:
    """Detection rows beside the paper's Table 7 row (Table 3's AP50 are its
    AP50 columns) of the same method, metric and task: box metrics of a
    VOC-layout set beside VOC07+12, mask metrics beside COCO."""
    lines = ["| Method | Metric | Ours arch | Ours dataset | Ours baseline | Ours + HVS | Ours diff | Ours verdict | "
             "Seeds | Paper arch | Paper dataset | Paper baseline | Paper + HVS | Paper diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for g in found:
        task = "COCO" if g.dataset.startswith("coco") else "VOC07+12"
        rows = [r for r in paper.get((g.name, g.eval), []) if family(r[0]) == g.family and r[1] == task]
        head = f"| {g.name} | {g.eval} | {our_cells(g, dataset_cell=True)}"
        if rows:
            arch, dataset, pb, ph = rows[0]
            lines.append(f"{head} | {arch} | {dataset} | {paper_cells(pb, ph)} |")
        else:
            lines.append(f"{head} | — | (no Table 7 row) | — | — | — |")
    return lines


def protocol_notes(found: list) -> str:
    notes = sorted({(g.name, p, mode) for g in found if g.eval == "linear" for p, mode in g.notes if p})
    if not notes:
        return ""
    return ("Our linear probes (protocol, mode): " + "; ".join(f"{n}: {p}, {mode}" for n, p, mode in notes)
            + ". fast = features of un-augmented images computed once, the learning rate chosen on held-out "
              "training images (`eval/linear.py`); full = the protocol.")


def render(results: Path, scale: str, k: str = "20", paper_epochs: str = "100") -> str:
    """The summary: Table 1 (k-NN and linear on the pretraining dataset), and
    Table 2 (transfer) when there are transfer results."""
    found = collect(results, k)
    long = " (SimCLR: 200)" if paper_epochs == "300" else ""
    lines = [
        "# HVS: our numbers beside the paper's", "",
        f"**Our scale:** {scale}", "",
        "Each of our runs is beside the paper's row of the same method, protocol and backbone family (ours: "
        "ResNet-18/50 beside RN50, ViTs beside ViT-S/16).  Numbers at our scale are not comparable in absolute "
        "terms; compare the difference and its interval.", "",
        f"## Table 1: pretraining dataset (paper: ImageNet, {paper_epochs} epochs{long})", "",
        f"Our k-NN: weighted {k}-NN top-1 (T = 0.07) on the test split; our linear: top-1 of the last epoch.",
        "", UNCERTAINTY, "",
    ]
    lines += table1(found, paper_rows("1", paper_epochs)) if found else \
        ["| (no results found) | | | | | | | | | | |"]
    note = protocol_notes(found)
    lines += ["", note] if note else []
    transfer = [g for g in found if g.dataset is not None]
    if transfer:
        lines += ["", "## Table 2: transfer (paper: ImageNet-pretrained, 100 epochs, to five datasets)", "",
                  "Lin.: linear probe on the frozen backbone; F.T.: end-to-end finetuning; top-1 of the last "
                  "epoch on the transfer dataset's test split.", ""]
        lines += table2(transfer, paper_rows("2", "100"))
    detection, det_notes = collect_detection(results)
    if detection:
        lines += ["", "## Tables 3 and 7: detection transfer (paper: ImageNet-pretrained RN50, 100 epochs; "
                  "Faster R-CNN R50-C4 on VOC07+12, Mask R-CNN R50-C4 on COCO)", "",
                  "Box (det_) and mask (mask_) AP on the test split after fine-tuning end to end with Detectron2 "
                  "(`detection/train_net.py`); Table 3 is the AP50 rows.  Our scale: " + "; ".join(det_notes)
                  + ".", ""]
        lines += table_detection(detection, paper_rows("7", "100"))
    attention = sorted(p.name for p in results.glob("*_attention.png"))
    if attention:
        lines += ["", "## Attention maps (Appendix J)", "",
                  "Last-block [CLS] attention per head, HVS above the baseline: "
                  + ", ".join(f"[{name}]({name})" for name in attention) + "."]
    from analysis.section5 import render as section5  # the analyses of run_all.sh --evals analysis

    lines += section5(results)
    lines += wall_times(results)
    return "\n".join(lines) + "\n"


def wall_times(results: Path) -> list:
    """The wall time of every part run_all.sh ran (``timings.tsv``: label,
    seconds, end time; the rows of a label are summed, so a part run in
    several sittings counts all of them)."""
    path = results / "timings.tsv"
    if not path.is_file():
        return []
    total: dict = defaultdict(int)
    sittings: dict = defaultdict(int)
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 2 and parts[1].isdigit():
            total[parts[0]] += int(parts[1])
            sittings[parts[0]] += 1
    if not total:
        return []
    clock = lambda s: f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"  # noqa: E731
    lines = ["", "## Wall time of each part (run_all.sh, `timings.tsv`)", "",
             "| Part | Wall time (h:mm:ss) | Sittings |", "|---|---|---|"]
    lines += [f"| {label} | {clock(total[label])} | {sittings[label]} |" for label in total]
    lines.append(f"| **all parts** | {clock(sum(total.values()))} | — |")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", required=True, help="folder holding the evaluation JSON files")
    p.add_argument("--scale", required=True, help="one line describing the scale our numbers ran at")
    p.add_argument("--k", default="20", help="which k of the k-NN to report (default 20, as DINO)")
    p.add_argument("--paper-epochs", default="100", choices=["100", "300"],
                   help="Table 1 rows to show: 100, or 300 (each method's long schedule: 200 for SimCLR)")
    args = p.parse_args(argv)
    results = Path(args.results)
    text = render(results, args.scale, args.k, args.paper_epochs)
    (results / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
