"""The results table puts our numbers beside the paper's, row by row of the
same method and backbone family."""
import json

import pytest

from eval.summary import FILE, family, main, paper_name, paper_rows


def write(folder, name, top1, arch=None, **fields):
    """A result file as the evaluations write them: k-NN (``*_knn.json``) or
    linear / finetuning (``top1`` at the top level)."""
    report = {"knn": {"20": {"top1": top1, "top5": 90.0}}, **fields} if name.endswith("_knn.json") else \
        {"top1": top1, "top5": 90.0, **fields}
    if arch is not None:
        report["arch"] = arch
    (folder / name).write_text(json.dumps(report))


def rows(folder, prefix, plain=True):
    """Cells of every summary row starting with ``prefix``; ``plain``: our
    cells without their interval and our verdict column left out (the
    intervals have their own tests below)."""
    found, ours, verdict = [], (), None
    for line in (folder / "summary.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| Method"):
            verdict = cells.index("Ours verdict") if "Ours verdict" in cells else None
            ours = range(cells.index("Ours baseline"), cells.index("Ours diff") + 1) if "Ours diff" in cells else ()
        elif line.startswith(prefix):
            found.append(cells if not plain else [c.split(" [")[0].split(" (")[0] if i in ours else c
                                                  for i, c in enumerate(cells) if i != verdict])
    return found


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
    assert linear[3:5] == ["not run", "not run"] and linear[7:] == ["RN50", "68.20", "68.98", "+0.78"]


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
    assert all(c[3:5] == ["not run", "not run"] for c in linear)


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
    assert lin[3:5] == ["not run", "not run"] and lin[7:] == ["ViT-S/16", *linear]
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

    from common.engine.config import COMMON_SPEC, resolve
    from ibot.method import IBOTMethod
    configs = Path(__file__).resolve().parents[1] / "configs"
    for name, arch in (("ibot_small", "vit_tiny/4"), ("ibot_tiny_imagenet_gpu", "vit_tiny/8"),
                       ("ibot_paper", "vit_small/16")):
        cfg = resolve({**COMMON_SPEC, **IBOTMethod.spec}, str(configs / f"{name}.yaml"), [])
        assert IBOTMethod.arch(cfg) == arch and family(arch) == family("ViT-S/16") == "vit"


def test_file_names_of_every_evaluation():
    m = FILE.match("dino_resnet_hvs_s1_linear.json")
    assert (m["method"], m["variant"], m["seed"], m["eval"], m["dataset"]) == ("dino_resnet", "hvs", "1", "linear", None)
    m = FILE.match("simsiam_baseline_s0_finetune-tiny-imagenet-100.json")
    assert (m["method"], m["eval"], m["dataset"]) == ("simsiam", "finetune", "tiny-imagenet-100")
    assert FILE.match("simsiam_baseline_s0_results.json") is None


def test_linear_rows_are_filled_from_linear_files(tmp_path):
    for variant, knn, lin in (("baseline", 40.0, 45.0), ("hvs", 41.0, 47.5)):
        write(tmp_path, f"simsiam_{variant}_s0_knn.json", knn, arch="resnet18")
        write(tmp_path, f"simsiam_{variant}_s0_linear.json", lin, arch="resnet18", protocol="simsiam", mode="fast")
    main(["--results", str(tmp_path), "--scale", "s"])
    [linear] = rows(tmp_path, "| SimSiam | linear")
    assert linear[2:] == ["resnet18", "45.00", "47.50", "+2.50", "1", "RN50", "68.20", "68.98", "+0.78"]
    [knn] = rows(tmp_path, "| SimSiam | k-NN")
    assert knn[3:5] == ["40.00", "41.00"]
    assert "SimSiam: simsiam, fast" in (tmp_path / "summary.md").read_text()
    assert "Table 2" not in (tmp_path / "summary.md").read_text()  # no transfer results, no transfer table


def test_transfer_rows_sit_beside_table_2(tmp_path):
    for variant, a, b, c in (("baseline", 30.0, 50.0, 60.0), ("hvs", 31.0, 49.0, 62.0)):
        write(tmp_path, f"simsiam_{variant}_s0_linear-tiny-imagenet-100.json", a, arch="resnet18")
        write(tmp_path, f"simsiam_{variant}_s0_finetune-tiny-imagenet-100.json", b, arch="resnet18")
        write(tmp_path, f"dino_{variant}_s0_linear-cifar10.json", c, arch="vit_tiny/4")
        write(tmp_path, f"simclr_{variant}_s0_linear-cifar10.json", c, arch="resnet18")
    (tmp_path / "dino_s0_attention.png").write_bytes(b"png")
    main(["--results", str(tmp_path), "--scale", "s"])
    [lin] = rows(tmp_path, "| SimSiam | Lin.")
    # a dataset the paper has no column for: beside the mean of its five SimSiam RN50 linear transfers
    assert lin[2:8] == ["resnet18", "tiny-imagenet-100", "30.00", "31.00", "+1.00", "1"]
    base = (82.60 + 54.20 + 34.27 + 32.50 + 65.70) / 5
    hvs = (84.40 + 57.10 + 38.37 + 33.90 + 67.10) / 5
    assert lin[8] == "RN50" and lin[9].startswith("mean of 5 (CIFAR10")
    assert lin[10:] == [f"{base:.2f}", f"{hvs:.2f}", f"{hvs - base:+.2f}"]
    [ft] = rows(tmp_path, "| SimSiam | F.T.")
    assert ft[4:7] == ["50.00", "49.00", "-1.00"] and ft[9].startswith("mean of 5")
    [dino] = rows(tmp_path, "| DINO | Lin.")  # the same dataset: beside the paper's CIFAR10 column
    assert dino[3] == "cifar10" and dino[8:] == ["ViT-S/16", "CIFAR10", "94.53", "95.13", "+0.60"]
    [simclr] = rows(tmp_path, "| SimCLR | Lin.")
    assert simclr[9] == "(no Table 2 row)"
    assert "[dino_s0_attention.png](dino_s0_attention.png)" in (tmp_path / "summary.md").read_text()


def write_detection(folder, name, box, mask=None, arch="resnet18", **fields):
    """A detection result as ``detection.train_net --output`` writes it."""
    report = {"task": "detection", "arch": arch, "box": dict(zip(("AP", "AP50", "AP75"), box)),
              "config": "detection/configs/voc_small.yaml", "iterations": 200, "ims_per_batch": 2,
              "min_size_test": 64, **fields}
    if mask:
        report["mask"] = dict(zip(("AP", "AP50", "AP75"), mask))
    (folder / name).write_text(json.dumps(report))


def test_detection_rows_sit_beside_table_7(tmp_path):
    write(tmp_path, "simsiam_baseline_s0_knn.json", 40.0)
    write_detection(tmp_path, "simsiam_baseline_s0_detection-raccoon.json", (20.0, 50.0, 10.0))
    write_detection(tmp_path, "simsiam_hvs_s0_detection-raccoon.json", (21.0, 52.5, 9.0))
    write_detection(tmp_path, "dino_resnet_baseline_s0_detection-coco.json", (30.0, 50.0, 31.0),
                    mask=(25.0, 45.0, 26.0), config="detection/configs/coco_R_50_C4_90k.yaml")
    assert FILE.match("dino_resnet_hvs_s2_detection-coco.json")["method"] == "dino_resnet"
    main(["--results", str(tmp_path), "--scale", "s"])
    text = (tmp_path / "summary.md").read_text()
    assert "Tables 3 and 7" in text and "raccoon: `detection/configs/voc_small.yaml`, 200 steps of batch 2" in text
    [ap50] = rows(tmp_path, "| SimSiam | det_AP50")
    assert ap50[2:8] == ["resnet18", "raccoon", "50.00", "52.50", "+2.50", "1"]
    assert ap50[8:] == ["RN50", "VOC07+12", "78.46", "79.06", "+0.60"]  # Table 3's AP50 = Table 7's
    [ap75] = rows(tmp_path, "| SimSiam | det_AP75")
    assert ap75[5:7] == ["9.00", "-1.00"] and ap75[10:] == ["56.88", "57.55", "+0.67"]
    # COCO: mask AP beside Table 7's COCO row; box AP has no paper row; no HVS file: "not run"
    [mask] = rows(tmp_path, "| DINO | mask_AP |")
    assert mask[4:6] == ["25.00", "—"] and mask[8:] == ["RN50", "COCO", "30.25", "30.02", "-0.23"]
    [box] = rows(tmp_path, "| DINO | det_AP |")
    assert box[9] == "(no Table 7 row)"


@pytest.mark.parametrize("token,name", [("byol", "BYOL"), ("mocov3_vit", "MoCo v3"), ("barlowtwins", "Barlow Twins"),
                                        ("vicreg", "VICReg")])
def test_methods_beyond_the_paper_say_no_paper_number(tmp_path, token, name):
    """A method the paper never ran has its own row, its paper columns saying so,
    while a paper method's row without our family still shows the paper's numbers."""
    write(tmp_path, f"{token}_baseline_s0_knn.json", 30.0, arch="resnet18")
    write(tmp_path, f"{token}_hvs_s0_knn.json", 31.0, arch="resnet18")
    write(tmp_path, "simsiam_baseline_s0_knn.json", 40.0, arch="resnet18")
    main(["--results", str(tmp_path), "--scale", "s"])
    [cells] = rows(tmp_path, f"| {name} | k-NN")
    assert paper_name(token) == name
    assert cells[3:7] == ["30.00", "31.00", "+1.00", "1"] and cells[7:] == ["no paper number", "—", "—", "—"]
    [simsiam] = rows(tmp_path, "| SimSiam | k-NN")
    assert simsiam[7:] == ["RN50", "57.47", "58.97", "+1.50"]


def test_every_accuracy_carries_its_interval_and_the_difference_its_verdict(tmp_path):
    """One seed: Wilson on the file's test-set size, Newcombe for the
    difference; three seeds: t-intervals over seeds, the difference paired by
    seed, and the plain verdict."""
    from scipy import stats as sps

    write(tmp_path, "simsiam_baseline_s0_knn.json", 29.9, n_test=1000)
    write(tmp_path, "simsiam_hvs_s0_knn.json", 30.7, n_test=1000)
    for seed, (b, h) in enumerate([(50.0, 52.0), (55.0, 57.5), (60.0, 61.5)]):
        write(tmp_path, f"simclr_baseline_s{seed}_knn.json", b, n_test=10000)
        write(tmp_path, f"simclr_hvs_s{seed}_knn.json", h, n_test=10000)
    main(["--results", str(tmp_path), "--scale", "s"])
    [one] = rows(tmp_path, "| SimSiam | k-NN", plain=False)
    ci = sps.binomtest(299, 1000).proportion_ci(method="wilson")
    assert one[3] == f"29.90 [{100 * ci.low:.2f}, {100 * ci.high:.2f}]"
    assert one[5].startswith("+0.80 [-") and one[6] == "no difference detectable at this scale"
    [three] = rows(tmp_path, "| SimCLR | k-NN", plain=False)
    low, high = sps.t.interval(0.95, 2, loc=55.0, scale=sps.sem([50.0, 55.0, 60.0]))
    assert three[3] == f"55.00 ± 5.00 [{low:.2f}, {high:.2f}] (3 seeds)"
    # differences 2.0, 2.5, 1.5: the seed spread (sd 5) cancels in the pairing
    low, high = sps.t.interval(0.95, 2, loc=2.0, scale=sps.sem([2.0, 2.5, 1.5]))
    assert three[5] == f"+2.00 ± 0.50 [{low:.2f}, {high:.2f}]" and three[6] == "HVS above the baseline"
    assert three[7] == "3"
    assert "no difference detectable at this scale" in (tmp_path / "summary.md").read_text()
