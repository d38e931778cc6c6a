"""The results table puts our numbers beside the paper's, row by row of the
same method and backbone family."""
import json

import pytest

from eval.summary import FILE, family, main, paper_name, paper_rows


def write(folder, name, top1, arch=None):
    report = {"knn": {"20": {"top1": top1, "top5": 90.0}}}
    if arch is not None:
        report["arch"] = arch
    (folder / name).write_text(json.dumps(report))


def rows(folder, prefix):
    """Cells of every summary row starting with ``prefix``."""
    text = (folder / "summary.md").read_text()
    return [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.startswith(prefix)]


def test_summary_table(tmp_path):
    write(tmp_path, "simsiam_baseline_s0_knn.json", 40.0)
    write(tmp_path, "simsiam_hvs_s0_knn.json", 41.5)
    write(tmp_path, "simsiam_baseline_s1_knn.json", 42.0)
    write(tmp_path, "simsiam_hvs_s1_knn.json", 42.5)
    main(["--results", str(tmp_path), "--scale", "tiny test scale"])
    text = (tmp_path / "summary.md").read_text()
    assert "tiny test scale" in text
    [cells] = rows(tmp_path, "| SimSiam | k-NN")
    assert cells[2] == "—"  # no arch in these files
    assert cells[3:7] == ["41.00 ± 1.41", "42.00 ± 0.71", "+1.00 ± 0.71", "2"]
    assert cells[7:] == ["RN50", "57.47", "58.97", "+1.50"]  # Table 1, SimSiam k-NN, 100 epochs
    [linear] = rows(tmp_path, "| SimSiam | linear")
    assert linear[3:5] == ["not run yet", "not run yet"] and linear[7:] == ["RN50", "68.20", "68.98", "+0.78"]


def test_paper_rows_cover_table_1():
    rows_ = paper_rows("1", "100")
    assert {m for m, _ in rows_} == {"SimSiam", "SimCLR", "DINO", "iBOT"}
    assert rows_[("SimSiam", "linear")] == [("RN50", 68.20, 68.98)]


def test_long_schedule_rows_use_simclr_200_epochs(tmp_path):
    assert paper_rows("1", "300")[("SimCLR", "knn")] == [("RN50", 55.65, 57.31)]
    assert paper_rows("1", "300")[("SimSiam", "knn")] == [("RN50", 61.40, 62.97)]
    write(tmp_path, "simclr_baseline_s0_knn.json", 30.0)
    write(tmp_path, "simclr_hvs_s0_knn.json", 31.0)
    main(["--results", str(tmp_path), "--scale", "s", "--paper-epochs", "300"])
    row = next(line for line in (tmp_path / "summary.md").read_text().splitlines()
               if line.startswith("| SimCLR | k-NN"))
    assert "55.65 | 57.31 | +1.66" in row and "nan" not in row


def test_file_names_keep_the_method_token():
    m = FILE.match("dino_resnet_baseline_s0_knn.json")
    assert (m["method"], m["variant"], m["seed"]) == ("dino_resnet", "baseline", "0")
    m = FILE.match("dino_hvs_s12_knn.json")
    assert (m["method"], m["variant"], m["seed"]) == ("dino", "hvs", "12")
    assert FILE.match("dino_resnet_s0_knn.json") is None
    assert paper_name("dino_resnet") == paper_name("dino") == "DINO"
    assert paper_name("ibot") == "iBOT"
    assert family("vit_tiny/4") == family("ViT-S/16") == "vit"
    assert family("resnet18") == family("RN50") == "resnet"
    assert family(None, "dino") == "vit" and family(None, "dino_resnet") == "resnet"


@pytest.mark.parametrize("epochs, vit, rn50", [("100", ["68.80", "70.72", "+1.92"], ["66.28", "67.33", "+1.05"]),
                                               ("300", ["72.62", "73.64", "+1.02"], ["69.53", "70.05", "+0.52"])])
def test_dino_runs_sit_beside_the_paper_row_of_their_backbone(tmp_path, epochs, vit, rn50):
    write(tmp_path, "dino_baseline_s0_knn.json", 30.0, arch="vit_tiny/4")
    write(tmp_path, "dino_hvs_s0_knn.json", 31.5, arch="vit_tiny/4")
    write(tmp_path, "dino_resnet_baseline_s0_knn.json", 35.0, arch="resnet18")
    write(tmp_path, "dino_resnet_hvs_s0_knn.json", 34.0, arch="resnet18")
    main(["--results", str(tmp_path), "--scale", "s", "--paper-epochs", epochs])
    knn = rows(tmp_path, "| DINO | k-NN")
    assert len(knn) == 2
    by_paper_arch = {cells[7]: cells for cells in knn}
    assert by_paper_arch["ViT-S/16"][2:7] == ["vit_tiny/4", "30.00", "31.50", "+1.50", "1"]
    assert by_paper_arch["ViT-S/16"][8:] == vit
    assert by_paper_arch["RN50"][2:7] == ["resnet18", "35.00", "34.00", "-1.00", "1"]
    assert by_paper_arch["RN50"][8:] == rn50
    linear = rows(tmp_path, "| DINO | linear")
    assert [c[7] for c in linear] == ["ViT-S/16", "RN50"]
    assert all(c[3:5] == ["not run yet", "not run yet"] for c in linear)


def test_paper_row_without_our_family_says_not_run(tmp_path):
    write(tmp_path, "dino_baseline_s0_knn.json", 30.0, arch="vit_tiny/4")
    write(tmp_path, "dino_hvs_s0_knn.json", 31.0, arch="vit_tiny/4")
    main(["--results", str(tmp_path), "--scale", "s"])
    knn = {cells[7]: cells for cells in rows(tmp_path, "| DINO | k-NN")}
    assert knn["ViT-S/16"][2] == "vit_tiny/4"
    assert knn["RN50"][2:7] == ["—", "not run", "not run", "—", "0"]
    assert knn["RN50"][8:] == ["66.28", "67.33", "+1.05"]
    assert not rows(tmp_path, "| SimSiam") and not rows(tmp_path, "| iBOT")


def test_family_comes_from_the_checkpoint_arch_not_the_token(tmp_path):
    # token dino, trained with model.arch=resnet18: beside the RN50 row
    write(tmp_path, "dino_baseline_s0_knn.json", 20.0, arch="resnet18")
    write(tmp_path, "dino_hvs_s0_knn.json", 21.0, arch="resnet18")
    main(["--results", str(tmp_path), "--scale", "s"])
    knn = {cells[7]: cells for cells in rows(tmp_path, "| DINO | k-NN")}
    assert knn["RN50"][2:4] == ["resnet18", "20.00"]
    assert knn["ViT-S/16"][3] == "not run"


def test_results_of_two_archs_are_not_averaged(tmp_path):
    write(tmp_path, "dino_baseline_s0_knn.json", 20.0, arch="vit_tiny/4")
    write(tmp_path, "dino_hvs_s0_knn.json", 21.0, arch="vit_tiny/4")
    write(tmp_path, "dino_baseline_s1_knn.json", 40.0, arch="vit_small/4")
    write(tmp_path, "dino_hvs_s1_knn.json", 42.0, arch="vit_small/4")
    main(["--results", str(tmp_path), "--scale", "s"])
    vit = [c for c in rows(tmp_path, "| DINO | k-NN") if c[7] == "ViT-S/16"]
    assert sorted((c[2], c[3], c[5]) for c in vit) == [("vit_small/4", "40.00", "+2.00"),
                                                       ("vit_tiny/4", "20.00", "+1.00")]


def test_missing_k_is_a_clear_error(tmp_path):
    write(tmp_path, "simsiam_baseline_s0_knn.json", 40.0)
    with pytest.raises(SystemExit, match="no k=10 result"):
        main(["--results", str(tmp_path), "--scale", "s", "--k", "10"])


@pytest.mark.parametrize("epochs, knn, linear", [("100", ["62.82", "63.05", "+0.23"], ["69.50", "70.41", "+0.91"]),
                                                 ("300", ["66.60", "67.12", "+0.52"], ["72.48", "73.99", "+1.51"])])
def test_ibot_runs_sit_beside_the_paper_ibot_row(tmp_path, epochs, knn, linear):
    # as eval.knn writes them for an ibot checkpoint: arch = IBOTMethod.arch(cfg), "vit_tiny/4"
    write(tmp_path, "ibot_baseline_s0_knn.json", 25.0, arch="vit_tiny/4")
    write(tmp_path, "ibot_hvs_s0_knn.json", 25.75, arch="vit_tiny/4")
    write(tmp_path, "dino_baseline_s0_knn.json", 30.0, arch="vit_tiny/4")
    write(tmp_path, "dino_hvs_s0_knn.json", 31.5, arch="vit_tiny/4")
    main(["--results", str(tmp_path), "--scale", "s", "--paper-epochs", epochs])
    [cells] = rows(tmp_path, "| iBOT | k-NN")  # one paper row (ViT-S/16), no RN50 row for iBOT
    assert cells[2:7] == ["vit_tiny/4", "25.00", "25.75", "+0.75", "1"]
    assert cells[7:] == ["ViT-S/16", *knn]
    [lin] = rows(tmp_path, "| iBOT | linear")
    assert lin[3:5] == ["not run yet", "not run yet"] and lin[7:] == ["ViT-S/16", *linear]
    # DINO's results stay beside DINO's rows, not iBOT's
    dino = {c[7]: c for c in rows(tmp_path, "| DINO | k-NN")}
    assert dino["ViT-S/16"][3] == "30.00" and dino["RN50"][3] == "not run"


def test_ibot_file_without_arch_is_a_vit(tmp_path):
    write(tmp_path, "ibot_baseline_s0_knn.json", 25.0)
    write(tmp_path, "ibot_hvs_s0_knn.json", 26.0)
    main(["--results", str(tmp_path), "--scale", "s"])
    [cells] = rows(tmp_path, "| iBOT | k-NN")
    assert cells[3] == "25.00" and cells[7:] == ["ViT-S/16", "62.82", "63.05", "+0.23"]
    assert family(None, "ibot") == "vit"


def test_ibot_checkpoint_arch_is_a_vit():
    """The arch eval.knn writes for an iBOT checkpoint (the method's ``arch``) is of the ViT family."""
    from pathlib import Path

    from common.config import COMMON_SPEC, resolve
    from ibot.method import IBOTMethod
    configs = Path(__file__).resolve().parents[1] / "configs"
    for name, arch in (("ibot_small", "vit_tiny/4"), ("ibot_tiny_imagenet_gpu", "vit_tiny/8"),
                       ("ibot_paper", "vit_small/16")):
        cfg = resolve({**COMMON_SPEC, **IBOTMethod.spec}, str(configs / f"{name}.yaml"), [])
        assert IBOTMethod.arch(cfg) == arch and family(arch) == family("ViT-S/16") == "vit"
