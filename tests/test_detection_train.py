"""Detection transfer end to end (detection/train_net.py, detection/data.py):
a few steps of Faster R-CNN on a handful of VOC-layout images train with a
finite loss, the VOC evaluator returns AP, a second call resumes; bad data,
configs, checkpoints and weight files are refused with one line naming the
file."""
import json
import math
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("detectron2", reason="Detectron2 is not installed (see docs/detection.md)")

from PIL import Image  # noqa: E402

from common.views.data import DataError, archive_key  # noqa: E402
from detection import data as det_data  # noqa: E402
from detection import train_net  # noqa: E402
from tests.helpers import ROOT  # noqa: E402

SMALL = str(ROOT / "detection" / "configs" / "voc_small.yaml")
RACCOON = ROOT.parent / "shared" / "data" / "raccoon-voc.tar.gz"
XML = """<annotation><size><width>{w}</width><height>{h}</height><depth>3</depth></size>
{objects}</annotation>"""
OBJECT = "<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>" \
         "<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"


def synthetic_voc(root: Path, n_trainval=4, n_test=2, seed=0) -> Path:
    """A VOC-layout folder of noise images with one bright box each, class
    ``raccoon``."""
    rng = np.random.default_rng(seed)
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids = [f"img{i}" for i in range(n_trainval + n_test)]
    for image_id in ids:
        h, w = 96, 128
        pixels = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
        x0, y0 = int(rng.integers(5, 40)), int(rng.integers(5, 30))
        x1, y1 = x0 + int(rng.integers(40, 80)), y0 + int(rng.integers(30, 60))
        pixels[y0:y1, x0:x1] = rng.integers(150, 255, 3, dtype=np.uint8)
        Image.fromarray(pixels).save(root / "JPEGImages" / f"{image_id}.jpg")
        obj = OBJECT.format(name="raccoon", x0=x0 + 1, y0=y0 + 1, x1=x1, y1=y1)
        (root / "Annotations" / f"{image_id}.xml").write_text(XML.format(w=w, h=h, objects=obj))
    (root / "ImageSets/Main/trainval.txt").write_text("\n".join(ids[:n_trainval]) + "\n")
    (root / "ImageSets/Main/test.txt").write_text("\n".join(ids[n_trainval:]) + "\n")
    return root


def handful_of_raccoons(data_dir: Path, n_trainval=6, n_test=3) -> Path:
    """``data_dir/raccoon-voc``: the first images of the offline raccoon set's
    splits when ``../shared/data`` is there, synthetic ones otherwise."""
    root = data_dir / "raccoon-voc"
    if not RACCOON.is_file():
        return synthetic_voc(root, n_trainval, n_test)
    with tarfile.open(RACCOON) as tar:
        tar.extractall(data_dir / "full", filter="data")
    full = data_dir / "full" / "raccoon-voc"
    (root / "ImageSets/Main").mkdir(parents=True)
    for split, n in (("trainval", n_trainval), ("test", n_test)):
        ids = (full / "ImageSets/Main" / f"{split}.txt").read_text().split()[:n]
        (root / "ImageSets/Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    shutil.copytree(full / "Annotations", root / "Annotations")
    shutil.copytree(full / "JPEGImages", root / "JPEGImages")
    shutil.rmtree(data_dir / "full")
    return root


def run_cli(capsys, *argv):
    """``python -m detection.train_net *argv`` in this process: (exit status, stderr).
    Detectron2's loggers are set up afresh (their handlers hold the stdout of the call
    that made them, which pytest closes after each test)."""
    import logging

    from detectron2.utils.logger import setup_logger

    setup_logger.cache_clear()
    for name in ("detectron2", "fvcore"):
        logging.getLogger(name).handlers.clear()
    try:
        train_net.cli([str(a) for a in argv])
        code = 0
    except SystemExit as err:
        code = err.code
    return code, capsys.readouterr().err


# --- bad input ----------------------------------------------------------------------------------------


@pytest.fixture
def voc(tmp_path):
    return synthetic_voc(tmp_path / "raccoon-voc")


def test_good_voc_split_loads(voc):
    dicts = det_data.load_voc(voc, "trainval", ("raccoon",))
    assert len(dicts) == 4 and all(len(d["annotations"]) == 1 for d in dicts)
    box = dicts[0]["annotations"][0]["bbox"]
    xml = (voc / "Annotations" / "img0.xml").read_text()
    assert f"<xmin>{int(box[0]) + 1}</xmin>" in xml  # VOC's 1-based corner moved to 0-based


def test_malformed_xml_names_the_file(voc):
    bad = voc / "Annotations" / "img1.xml"
    bad.write_text(bad.read_text()[:-20])
    with pytest.raises(DataError, match=r"img1\.xml is not valid XML"):
        det_data.load_voc(voc, "trainval", ("raccoon",))


def test_missing_split_file_names_it(voc):
    with pytest.raises(DataError, match=r"ImageSets/Main/val\.txt does not exist.*splits there: test, trainval"):
        det_data.load_voc(voc, "val", ("raccoon",))


def test_unknown_class_names_the_file_and_class(voc):
    xml = voc / "Annotations" / "img2.xml"
    xml.write_text(xml.read_text().replace("<name>raccoon</name>", "<name>badger</name>"))
    with pytest.raises(DataError, match=r"img2\.xml: object class 'badger' is not one of .*raccoon"):
        det_data.load_voc(voc, "trainval", ("raccoon",))


def test_missing_image_and_box_outside_the_image(voc):
    (voc / "JPEGImages" / "img3.jpg").unlink()
    with pytest.raises(DataError, match=r"img3\.jpg does not exist"):
        det_data.load_voc(voc, "trainval", ("raccoon",))
    xml = voc / "Annotations" / "img0.xml"
    xml.write_text(xml.read_text().replace("<width>128</width>", "<width>20</width>"))
    with pytest.raises(DataError, match=r"img0\.xml: box .* outside the 20x96 image"):
        det_data.load_voc(voc, "trainval", ("raccoon",))


def test_dataset_found_in_archive_and_reported_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("HVS_CACHE_DIR", str(tmp_path / "cache"))
    synthetic_voc(tmp_path / "src" / "raccoon-voc")
    (tmp_path / "data").mkdir()
    with tarfile.open(tmp_path / "data" / "raccoon-voc.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "raccoon-voc", arcname="raccoon-voc")
    root = det_data.voc_root("raccoon", str(tmp_path / "data"))
    key = archive_key(tmp_path / "data" / "raccoon-voc.tar.gz")[:16]
    assert root == tmp_path / "cache" / f"raccoon-voc-{key}" and len(det_data.load_voc(root, "test", ("raccoon",))) == 2
    with pytest.raises(DataError, match=r"'voc_2007' not found under .*VOCdevkit/VOC2007"):
        det_data.voc_root("voc_2007", str(tmp_path / "data"))
    with pytest.raises(DataError, match="unknown detection dataset 'pets_trainval'"):
        det_data.split_name("pets_trainval")


def test_checkpoint_of_another_architecture_is_refused(tmp_path, capsys, tiny_checkpoints):
    out = tmp_path / "out"
    # the small profile's ResNet-18 (CIFAR stem) in the paper's R50 config
    code, err = run_cli(capsys, "--config-file", ROOT / "detection/configs/voc_R_50_C4_48k.yaml",
                        "--checkpoint", tiny_checkpoints["simsiam"], "OUTPUT_DIR", out)
    assert code == 2 and "Traceback" not in err
    assert str(tiny_checkpoints["simsiam"]) in err and "resnet18 (CIFAR stem)" in err and "DEPTH" in err
    # a ViT
    code, err = run_cli(capsys, "--config-file", SMALL, "--checkpoint", tiny_checkpoints["dino"], "OUTPUT_DIR", out)
    assert code == 2 and str(tiny_checkpoints["dino"]) in err and "ResNet" in err
    assert not (out / "backbone.pkl").exists()
    code, err = run_cli(capsys, "--config-file", tmp_path / "nope.yaml", "OUTPUT_DIR", out)
    assert code == 2 and "nope.yaml does not exist" in err
    code, err = run_cli(capsys, "--config-file", SMALL, "OUTPUT_DIR", out, "SOLVER.MAX_ITR", "3")
    assert code == 2 and "SOLVER.MAX_ITR" in err and "Traceback" not in err


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.slow
def test_weights_file_with_code_is_not_unpickled(tmp_path, capsys, voc):
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"model": {"x": Evil()}, "__author__": "x"}))
    code, err = run_cli(capsys, "--config-file", SMALL, "--data-dir", voc.parent, "MODEL.WEIGHTS", evil,
                        "OUTPUT_DIR", tmp_path / "out")
    assert code == 2 and "refusing to unpickle builtins.print" in err and str(evil) in err
    assert "pwned" not in capsys.readouterr().out


@pytest.mark.slow
def test_torch_weights_file_with_code_is_refused_in_one_line(tmp_path, capsys, voc):
    """A .pth or .pyth MODEL.WEIGHTS is read with weights_only=True: a file holding code runs
    nothing and ends with one line naming it (exit 2); so does a file that is not there."""
    import torch

    def error_lines(err):
        return [line for line in err.splitlines() if line.startswith(f"{train_net.PROG}: error:")]

    for suffix in (".pth", ".pyth"):
        evil = tmp_path / f"evil{suffix}"
        torch.save({"model_state": {"x": Evil()}, "model": {"x": Evil()}}, evil)
        code, err = run_cli(capsys, "--config-file", SMALL, "--data-dir", voc.parent, "MODEL.WEIGHTS", evil,
                            "OUTPUT_DIR", tmp_path / "out")
        assert code == 2 and "Traceback" not in err, err
        assert error_lines(err) == [f"{train_net.PROG}: error: cannot read MODEL.WEIGHTS {evil} with "
                                    "weights_only=True: it holds an object of print, not only tensors and plain "
                                    "values; refusing to unpickle it (it could run code)"]
        assert "pwned" not in capsys.readouterr().out
        missing = tmp_path / f"missing{suffix}"
        code, err = run_cli(capsys, "--config-file", SMALL, "--data-dir", voc.parent, "MODEL.WEIGHTS", missing,
                            "OUTPUT_DIR", tmp_path / "out")
        assert code == 2 and "Traceback" not in err
        assert error_lines(err) == [f"{train_net.PROG}: error: MODEL.WEIGHTS {missing} does not exist"]


# --- training, evaluation, resume ----------------------------------------------------------------------


@pytest.mark.slow
def test_few_steps_train_evaluate_and_resume(tmp_path, capsys, tiny_checkpoints):
    data = tmp_path / "data"
    handful_of_raccoons(data)
    out, results = tmp_path / "det", tmp_path / "results.json"
    common = ["--config-file", SMALL, "--checkpoint", tiny_checkpoints["simsiam"], "--data-dir", data,
              "--output", results, "TEST.PRECISE_BN.NUM_ITER", "1", "SOLVER.CHECKPOINT_PERIOD", "2",
              "SOLVER.WARMUP_ITERS", "2", "OUTPUT_DIR", out]
    code, err = run_cli(capsys, *common, "SOLVER.MAX_ITER", "4", "TEST.EVAL_PERIOD", "2")
    assert code == 0, err
    # evaluated after steps 2 and 4 (periodic, and at the end)
    assert (out / "log.txt").read_text().count("Evaluation results for raccoon_test in csv format") == 2
    report = json.loads(results.read_text())
    assert report["dataset"] == "raccoon_test" and report["arch"] == "resnet18" and report["iterations"] == 4
    assert set(report["box"]) == {"AP", "AP50", "AP75"}
    assert all(0 <= v <= 100 and math.isfinite(v) for v in report["box"].values())
    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    losses = [r["total_loss"] for r in rows if "total_loss" in r]
    assert losses and all(math.isfinite(v) for v in losses)
    assert max(r["iteration"] for r in rows if "total_loss" in r) == 3
    assert (out / "last_checkpoint").read_text() == "model_final.pth" and (out / "config.yaml").is_file()
    assert not list(out.glob(".*.tmp"))

    code, err = run_cli(capsys, "--resume", *common, "SOLVER.MAX_ITER", "6")
    assert code == 0, err
    log = (out / "log.txt").read_text()
    assert "Starting training from iteration 4" in log
    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert max(r["iteration"] for r in rows if "total_loss" in r) == 5
    assert json.loads(results.read_text())["iterations"] == 6


# --- the recipe ------------------------------------------------------------------------------------------
MOCO_VOC_24K = {"max_iter": 24000, "steps": (18000, 22000)}  # MoCo's pascal_voc_R_50_C4_24k.yaml


@pytest.mark.parametrize("name", ["voc_R_50_C4_48k", "coco_R_50_C4_90k", "voc_small"])
def test_configs_use_mocos_naive_sync_batchnorm(name, tmp_path):
    """MoCo's C4 recipe normalises with naiveSyncBN (its configs: SyncBN gave a larger variance)."""
    from detectron2.layers import NaiveSyncBatchNorm
    from torch import nn

    from detection.modeling import build_hvs_resnet_backbone

    args = train_net.get_parser().parse_args(["--config-file", str(ROOT / "detection/configs" / f"{name}.yaml"),
                                              "OUTPUT_DIR", str(tmp_path)])
    cfg = train_net.setup(args)
    assert cfg.MODEL.RESNETS.NORM == "naiveSyncBN"
    if name == "voc_small":  # the built layers (small enough to build here)
        from detectron2.layers import ShapeSpec

        backbone = build_hvs_resnet_backbone(cfg, ShapeSpec(channels=3))
        norms = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert norms and all(isinstance(m, NaiveSyncBatchNorm) for m in norms)


def test_voc_decays_are_mocos_scaled_with_the_schedule(tmp_path):
    args = train_net.get_parser().parse_args(["--config-file", str(ROOT / "detection/configs/voc_R_50_C4_48k.yaml"),
                                              "OUTPUT_DIR", str(tmp_path)])
    cfg = train_net.setup(args)
    scale = cfg.SOLVER.MAX_ITER / MOCO_VOC_24K["max_iter"]
    assert cfg.SOLVER.MAX_ITER == 48000 and scale == 2
    assert tuple(cfg.SOLVER.STEPS) == tuple(int(s * scale) for s in MOCO_VOC_24K["steps"]) == (36000, 44000)
