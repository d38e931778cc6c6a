"""The loader benchmark reads images through every loader and reports every row."""
import json

import pytest

from bench.loader import goal, main


def test_loader_bench_rows(tmp_path, image_root):
    rows = main(["--data-dir", str(image_root), "--dataset", "imagefolder", "--sizes", "16", "--views", "2", "4",
                 "--images", "8", "--batch-size", "4", "--workers", "0", "--repeats", "1",
                 "--output", str(tmp_path / "l.json")])
    assert [(r["size"], r["n_views"]) for r in rows] == [(16, 2), (16, 4)]
    names = ("ours", "ours_model", "ours_model_crop", "torchvision", "ours_model_total", "ours_model_crop_total")
    for r in rows:
        for name in names:
            assert r[name]["images_per_s"] > 0 and r[name]["views_per_s"] == r[name]["images_per_s"] * r["n_views"]
            assert r[name]["cpu_ms_per_image"] > 0
        for name in ("ours_model", "ours_model_crop"):
            step = r[f"{name}_device_step"]
            assert step["device"] == "cpu" and step["s_per_image"] > 0
            assert step["s_per_view"] == step["s_per_image"] / r["n_views"]
            # the total adds the device step's seconds to the loader's
            total, loader = r[f"{name}_total"], r[name]
            assert abs(1 / total["images_per_s"] - (1 / loader["images_per_s"] + step["s_per_image"])) < 1e-9
            assert total["cpu_ms_per_image"] == loader["cpu_ms_per_image"] + step["s_per_image"] * 1e3
    for name in names:
        assert rows[0][name]["cost_vs_n2"] == rows[0][name]["wall_cost_vs_n2"] == 1.0
        assert rows[1][name]["cost_vs_n2"] == rows[1][name]["cpu_ms_per_image"] / rows[0][name]["cpu_ms_per_image"]
        assert rows[1][name]["wall_cost_vs_n2"] == rows[0][name]["images_per_s"] / rows[1][name]["images_per_s"]
    saved = json.loads((tmp_path / "l.json").read_text())
    assert saved["rows"] == rows and saved["goal_224_n4_over_n2"] == {}  # no 224 px row here


def test_goal_reads_the_224_px_row_and_loaders_can_be_chosen(image_root):
    rows = main(["--data-dir", str(image_root), "--dataset", "imagefolder", "--sizes", "12", "--views", "2",
                 "--images", "4", "--batch-size", "4", "--workers", "0", "--repeats", "1", "--loaders", "ours"])
    assert set(rows[0]) == {"size", "n_views", "ours"}
    fake = [{"size": 224, "n_views": n, "ours": {"cost_vs_n2": c, "wall_cost_vs_n2": c + 1}}
            for n, c in ((2, 1.0), (4, 1.7))]
    assert goal(fake) == {"ours": 1.7} and goal(fake, key="wall_cost_vs_n2") == {"ours": 2.7}
    assert goal(fake, size=64) == {}


def test_cpu_seconds_count_the_workers(image_root):
    """The CPU cost includes the worker processes' (joined) time, not only this process's."""
    from bench.loader import ours, read_all
    from common.views.data import build_dataset

    base = build_dataset("imagefolder", "train", str(image_root))
    _, in_parent, count = read_all(ours(base, 64, 8), batch_size=8, workers=0)
    _, with_worker, count_worker = read_all(ours(base, 64, 8), batch_size=8, workers=1)
    assert count == count_worker == len(base)
    assert with_worker > 0.5 * in_parent  # the parent alone only waits: its own time is far less than the work


def test_kernel_launches_count_computing_operations_only():
    import torch

    from bench.loader import kernel_launches

    x = torch.ones(4, 4)
    assert kernel_launches(lambda: x.view(16)) == 0  # a view launches nothing
    assert kernel_launches(lambda: (x + 1).mul_(2)) == 2
    assert kernel_launches(lambda: [x[i] * 2 for i in range(3)]) == 3  # one per image: three launches


@pytest.mark.slow
def test_paper_dino_paths(tmp_path, image_root):
    """The three augment.device paths at the paper's DINO setting: images/s per
    core, uint8 transport (4 x fewer bytes than float32 views), and kernel
    launches of the device steps."""
    res = main(["--paper-dino", "--data-dir", str(image_root), "--dataset", "imagefolder", "--images", "2",
                "--batch-size", "2", "--workers", "0", "--output", str(tmp_path / "p.json")])
    assert "4 global candidates 224 px + 16 local candidates 96 px" in res["setting"]
    for where in ("loader", "model", "model_crop"):
        assert res[where]["images_per_s_per_core"] > 0 and res[where]["bytes_per_image"] > 0
    # float32 views of 4 x 224^2 + 16 x 96^2 pixels, then the same in uint8
    views = 3 * (4 * 224 ** 2 + 16 * 96 ** 2)
    assert res["loader"]["bytes_per_image"] == 4 * views and res["model"]["bytes_per_image"] == views
    for where in ("model", "model_crop"):
        assert res[where]["kernel_launches_per_batch"] > 0 and res[where]["kernel_batch"] == 2
    assert "kernel_launches_per_batch" not in res["loader"]
    assert json.loads((tmp_path / "p.json").read_text()) == res
