"""run_all.sh refuses what it cannot run before starting anything: detection
without Detectron2, detection of a ViT method, an unknown evaluation."""
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT


def run_all(tmp_path, *args, detectron2: bool):
    """``bash run_all.sh *args`` with a stand-in ``detectron2`` package first
    on the path: one that imports, or one that fails to."""
    fake = tmp_path / "fake" / "detectron2"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("" if detectron2 else "raise ImportError('not installed')\n")
    env = {**os.environ, "PYTHONPATH": str(fake.parent),
           "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    return subprocess.run(["bash", str(ROOT / "run_all.sh"), "--data-dir", str(tmp_path), "--runs",
                           str(tmp_path / "runs"), "--results", str(tmp_path / "results"), *args],
                          capture_output=True, text=True, env=env, timeout=60)


def test_detection_without_detectron2_is_refused(tmp_path):
    p = run_all(tmp_path, "--evals", "knn detection", detectron2=False)
    assert p.returncode == 2 and "needs Detectron2, which is not importable" in p.stderr
    assert not (tmp_path / "runs").exists()


def test_detection_of_a_vit_method_is_refused(tmp_path):
    p = run_all(tmp_path, "--methods", "dino", "--detection-methods", "dino", "--evals", "detection",
                detectron2=True)
    assert p.returncode == 2 and "names dino, a ViT" in p.stderr


@pytest.mark.parametrize("evals", ["knn segmentation"])
def test_unknown_evaluation_is_refused(tmp_path, evals):
    p = run_all(tmp_path, "--evals", evals, detectron2=True)
    assert p.returncode == 2 and "unknown evaluation 'segmentation'" in p.stderr


@pytest.mark.parametrize("option,value,message", [
    ("--iou-policies", "iou_0.5-0.9", "unknown IoU policy 'iou_0.5-0.9'"),
    ("--stn-modes", "shear", "unknown STN mode 'shear'"),
])
def test_unknown_analysis_rows_are_refused(tmp_path, option, value, message):
    p = run_all(tmp_path, "--evals", "analysis", option, value, detectron2=True)
    assert p.returncode == 2 and message in p.stderr
    assert not (tmp_path / "runs").exists()


def test_every_table5_policy_has_a_config():
    """run_all.sh's policy list and configs/analysis/ name the same six policies of Table 5."""
    from analysis.section5 import PAPER_TABLE5

    text = (ROOT / "run_all.sh").read_text()
    listed = text.split('ALL_POLICIES="')[1].split('"')[0].split()
    assert sorted(listed) == sorted(PAPER_TABLE5)
    assert all((ROOT / "configs" / "analysis" / f"{p}.yaml").is_file() for p in listed)


@pytest.mark.parametrize("option,value,message", [
    ("--gpus", "-3", "--gpus '-3': not a whole number (>= 0)"),
    ("--gpus", "two", "--gpus 'two': not a whole number (>= 0)"),
    ("--paper-epochs", "0", "--paper-epochs 0: below 1"),
    ("--seeds", "0 x", "--seeds 'x': not a whole number (>= 0)"),
    ("--seeds", " ", "--seeds '': no seed given"),
])
def test_bad_numbers_are_refused_before_anything_runs(tmp_path, option, value, message):
    p = run_all(tmp_path, option, value, detectron2=True)
    assert p.returncode == 2 and p.stderr.strip() == f"run_all.sh: {message}"
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()
