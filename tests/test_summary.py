"""The results table puts our numbers beside the paper's."""
import json

from eval.summary import main, paper_rows


def write(folder, name, top1):
    (folder / name).write_text(json.dumps({"knn": {"20": {"top1": top1, "top5": 90.0}}}))


def test_summary_table(tmp_path):
    write(tmp_path, "simsiam_baseline_s0_knn.json", 40.0)
    write(tmp_path, "simsiam_hvs_s0_knn.json", 41.5)
    write(tmp_path, "simsiam_baseline_s1_knn.json", 42.0)
    write(tmp_path, "simsiam_hvs_s1_knn.json", 42.5)
    main(["--results", str(tmp_path), "--scale", "tiny test scale"])
    text = (tmp_path / "summary.md").read_text()
    assert "tiny test scale" in text
    row = next(line for line in text.splitlines() if line.startswith("| SimSiam | k-NN"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:6] == ["41.00 ± 1.41", "42.00 ± 0.71", "+1.00 ± 0.71", "2"]
    assert cells[6:] == ["RN50", "57.47", "58.97", "+1.50"]  # Table 1, SimSiam k-NN, 100 epochs


def test_paper_rows_cover_table_1():
    rows = paper_rows("1", "100")
    assert {m for m, _ in rows} == {"SimSiam", "SimCLR", "DINO", "iBOT"}
    assert rows[("SimSiam", "linear")] == [("RN50", 68.20, 68.98)]


def test_long_schedule_rows_use_simclr_200_epochs(tmp_path):
    assert paper_rows("1", "300")[("SimCLR", "knn")] == [("RN50", 55.65, 57.31)]
    assert paper_rows("1", "300")[("SimSiam", "knn")] == [("RN50", 61.40, 62.97)]
    write(tmp_path, "simclr_baseline_s0_knn.json", 30.0)
    write(tmp_path, "simclr_hvs_s0_knn.json", 31.0)
    main(["--results", str(tmp_path), "--scale", "s", "--paper-epochs", "300"])
    row = next(line for line in (tmp_path / "summary.md").read_text().splitlines()
               if line.startswith("| SimCLR | k-NN"))
    assert "55.65 | 57.31 | +1.66" in row and "nan" not in row
