"""The Section 5 part of the summary: our analysis files beside the paper's numbers."""
import json

from analysis.section5 import policy_label, read_runs, render
from eval.summary import render as render_summary


def write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def iou_report(lowest, first, last, base):
    return {"lowest_iou_fraction": {"overall": lowest, "chance": 1 / 6},
            "chosen_iou": {"mean": (first + last) / 2, "fit": {"at_first_step": first, "at_last_step": last}},
            "baseline": {"iou": {"mean": base}}}


def test_policy_labels_are_the_papers():
    assert policy_label("iou_0.30-0.35_alt") == "range(0.30-0.35)+alternating"
    assert policy_label("iou_1.00-0.10") == "range(1.00-0.10)"


def test_section5_tables(tmp_path):
    r = tmp_path
    for seed, top1 in ((0, {"baseline": 30.0, "hvs": 31.0, "easy": 10.0, "n_views_8": 30.5,
                            "iou_0.30-0.35": 29.0, "iou_0.30-0.35_alt": 30.5}),
                       (1, {"baseline": 32.0, "hvs": 33.0, "easy": 12.0, "n_views_8": 32.5,
                            "iou_0.30-0.35": 31.0, "iou_0.30-0.35_alt": 32.5})):
        for variant, value in top1.items():
            write(r / f"simsiam_{variant}_s{seed}_linear.json", {"top1": value})
        write(r / f"simsiam_easy_s{seed}_train.json", {"last": {"out_std": 0.001, "loss": -0.99}})
        write(r / f"dino_baseline_s{seed}_linear.json", {"top1": 40.0})
        write(r / f"dino_iou_0.30-0.35_s{seed}_linear.json", {"top1": 38.5})
        write(r / f"dino_stn-baseline_s{seed}_linear.json", {"top1": 40.0})
        write(r / f"dino_stn-affine_s{seed}_linear.json", {"top1": 35.0})
        write(r / "analysis" / f"simsiam_hvs_s{seed}" / "iou.json", iou_report(0.45, 0.31, 0.36, 0.40))
        write(r / "analysis" / f"simsiam_hvs_s{seed}" / "importance.json",
              {"importance": {"iou": 0.2, "brightness": 0.05, "blur_diff": 0.01}})
    write(r / "analysis" / "simsiam_hvs" / "predict.json",
          {"cross_validation": {"accuracy": 0.3}, "held_out_accuracy": None})
    runs = read_runs(r)
    assert runs[("simsiam", "iou_0.30-0.35_alt")]["linear"] == {0: 30.5, 1: 32.5}
    assert runs[("dino", "stn-affine")]["linear"] == {0: 35.0, 1: 35.0}
    text = "\n".join(render(r))
    # identical differences on both seeds: sd 0, an interval of width 0, and a verdict
    assert ("| range(0.30-0.35) | -1.00 ± 0.00 [-1.00, -1.00]: iou_0.30-0.35 below the baseline | -0.80 | "
            "-1.50 ± 0.00 [-1.50, -1.50]: iou_0.30-0.35 below the baseline | -1.47 |") in text
    assert "| range(0.30-0.35)+alternating | +0.50 ± 0.00 [0.50, 0.50]: iou_0.30-0.35_alt above" in text
    assert "| affine | TCP | 35.00 ± 0.00 [35.00, 35.00] (2 seeds) | -5.00 ± 0.00 [-5.00, -5.00]: stn-affine" in text
    assert ("| easy | easy selection, argmin (App. F.2) | 11.00 ± 1.41 [-1.71, 23.71] (2 seeds) | "
            "-21.00 ± 0.00 [-21.00, -21.00]: easy below hvs | 0.0010 ± 0.0000 [0.0010, 0.0010] (2 seeds) |") in text
    assert "| simsiam | hvs | 45.0 ± 0.0 % [45.0, 45.0] (2 seeds) | — | 16.7 % | 0.31 ± 0.00" in text
    assert "| 30.0 % (no interval) | — | — |" in text  # GBT: an older file, no held-out seed with < 3 runs
    assert "| iou | 20.00 % (no null) | 20.00 % (no null) | 15.20 % |" in text
    assert "| blur_diff | 1.00 % (no null) | 1.00 % (no null) | — |" in text
    assert "Section 5" in render_summary(r, "test scale")


def test_no_analysis_no_section(tmp_path):
    write(tmp_path / "simsiam_baseline_s0_linear.json", {"top1": 30.0})
    assert render(tmp_path) == []


def test_section5_intervals_and_null(tmp_path):
    """A run's lowest-IoU fraction with its Wilson interval beside chance, the
    GBT accuracy beside chance and majority, and fANOVA importances beside
    their null, the one above it in bold."""
    from analysis.stats import proportion

    r = tmp_path / "analysis"
    report = iou_report(0.45, 0.31, 0.36, 0.40)
    report["lowest_iou_fraction"].update(chance_with_ties=0.17, interval=proportion(450, 1000, chance=0.17),
                                         last_epoch={"epoch": 3, **proportion(50, 100, chance=0.17)})
    write(r / "simsiam_hvs_s0" / "iou.json", report)
    write(r / "simsiam_hvs_s0" / "importance.json", {
        "importance": {"iou": 0.2, "hue": 0.03}, "sum_first_order": 0.23,
        "null": {"shuffles": 20, "percentile_95": {"iou": 0.05, "hue": 0.04}, "above_null": {"iou": True, "hue": False},
                 "sum_first_order_95": 0.12}})
    write(r / "simsiam_hvs" / "predict.json", {
        "chance": {"uniform": 1 / 6}, "cross_validation": {"accuracy": 0.2, "interval": {
            "accuracy": {**proportion(200, 1000, chance=1 / 6), "above_majority": False},
            "majority": proportion(190, 1000)}}, "held_out_interval": None, "held_out_accuracy": None})
    text = "\n".join(render(tmp_path))
    assert ("| simsiam | hvs | 45.0 % [41.9, 48.1] (above chance) | 50.0 % [40.4, 59.6] (above chance) | 17.0 % |"
            in text)
    assert "| 20.0 % [17.6, 22.6] (above chance) | — | 16.7 % / 19.0 % [16.7, 21.5] |" in text
    assert "| iou | **20.00 % (5.00 %)** | 15.20 % |" in text and "| hue | 3.00 % (4.00 %) | 0.60 % |" in text
    assert "| sum of first order | 23.00 % (null 12.00 %) | — |" in text and "20 shuffles of the loss" in text
