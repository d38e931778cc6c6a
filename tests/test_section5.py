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
    assert "| range(0.30-0.35) | -1.00 ± 0.00 | -0.80 | -1.50 ± 0.00 | -1.47 |" in text
    assert "| range(0.30-0.35)+alternating | +0.50 ± 0.00 | +0.10 | — | -0.45 |" in text
    assert "| affine | TCP | 35.00 ± 0.00 | -5.00 ± 0.00 | 78.30 | 83.50 |" in text
    assert "| easy | easy selection, argmin (App. F.2) | 11.00 ± 1.41 | -21.00 ± 0.00 | 0.0010 ± 0.0000 |" in text
    assert "| simsiam | hvs | 45.00 ± 0.00 % | 16.67 ± 0.00 % | 0.31 ± 0.00 → 0.36 ± 0.00 |" in text
    assert "| 30.00 % | — |" in text  # GBT: 5-fold accuracy, no held-out seed with fewer than 3 runs
    assert "| iou | 20.00 ± 0.00 % | 15.20 % |" in text and "| blur_diff | 1.00 ± 0.00 % | — |" in text
    assert "Section 5" in render_summary(r, "test scale")


def test_no_analysis_no_section(tmp_path):
    write(tmp_path / "simsiam_baseline_s0_linear.json", {"top1": 30.0})
    assert render(tmp_path) == []
