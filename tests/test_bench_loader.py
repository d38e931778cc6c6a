"""The loader benchmark reads images through both loaders and reports every row."""
from bench.loader import main


def test_loader_bench_rows(tmp_path, image_root):
    rows = main(["--data-dir", str(image_root), "--dataset", "imagefolder", "--sizes", "16", "--views", "2", "4",
                 "--images", "8", "--batch-size", "4", "--workers", "0", "--repeats", "1",
                 "--output", str(tmp_path / "l.json")])
    assert [(r["size"], r["n_views"]) for r in rows] == [(16, 2), (16, 4)]
    for r in rows:
        for name in ("ours", "torchvision"):
            assert r[name]["images_per_s"] > 0 and r[name]["views_per_s"] == r[name]["images_per_s"] * r["n_views"]
    assert rows[0]["ours"]["cost_vs_n2"] == 1.0 and (tmp_path / "l.json").is_file()
