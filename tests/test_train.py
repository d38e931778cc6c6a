"""Training runs end to end: HVS changes the views, resume is exact, errors are clear."""
import json

import numpy as np
import pytest
import torch

from common.engine import checkpoint as ckpt_io
from common.engine.config import ConfigError
from common.engine.train import run
from simsiam.method import SimSiamMethod
from tests.helpers import tiny_cfg
from tests.helpers import cli, read_log


@pytest.mark.slow
def test_hvs_run_selects_other_views(tmp_path, image_root):
    out = tmp_path / "hvs"
    run(tiny_cfg(SimSiamMethod, out, image_root, "train.epochs=1", "hvs.enabled=true"), SimSiamMethod)
    steps = [r for r in read_log(out) if r["type"] == "step"]
    assert len(steps) == 4
    assert all(np.isfinite(r["loss"]) for r in steps)
    assert max(r["sel_changed"] for r in steps) > 0  # some samples train on views other than 0 and 1
    assert all(r["sel_score"] >= r["sel_score_all"] - 1e-6 for r in steps)
    (npz,) = (out / "selection").glob("*.npz")
    sel = np.load(npz)
    assert sel["params"].shape == (4, 8, 4, len(sel["param_names"]))
    assert sel["scores"].shape == (4, 8, 6) and sel["combos"].shape == (4, 6, 2)
    assert (sel["scores"].max(-1) == np.take_along_axis(sel["scores"], sel["choice"][..., None], -1)[..., 0]).all()
    assert (out / "config.yaml").exists() and (out / "checkpoint.pth").exists()


def weights(out):
    return ckpt_io.load(out / "checkpoint.pth")["model"]


@pytest.mark.slow
@pytest.mark.parametrize("stop", [4, 6])  # an epoch boundary, and inside an epoch
def test_exact_resume(tmp_path, image_root, stop):
    args = ("train.epochs=2", "hvs.enabled=true", "hvs.max_combinations=4")
    run(tiny_cfg(SimSiamMethod, tmp_path / "a", image_root, *args), SimSiamMethod)
    b = tmp_path / "b"
    run(tiny_cfg(SimSiamMethod, b, image_root, *args, f"run.stop_after_steps={stop}"), SimSiamMethod)
    assert ckpt_io.load(b / "checkpoint.pth")["step"] == stop
    run(tiny_cfg(SimSiamMethod, b, image_root, *args), SimSiamMethod)  # the same command again resumes
    wa, wb = weights(tmp_path / "a"), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [r["step"] for r in read_log(b)] == [r["step"] for r in read_log(tmp_path / "a")]


def test_config_changes_are_named():
    from common.engine.runtime import config_changes

    old = {"train": {"epochs": 2, "batch_size": 8}, "run": {"stop_after_steps": 4}}
    new = {"train": {"epochs": 4, "batch_size": 8}, "run": {"stop_after_steps": 0}}
    assert config_changes(old, new) == ["train.epochs: 2 -> 4"]


@pytest.mark.slow
def test_checkpoint_of_other_architecture_or_method(tmp_path, image_root):
    out = tmp_path / "r"
    run(tiny_cfg(SimSiamMethod, out, image_root, "train.epochs=1", "run.max_steps_per_epoch=1"), SimSiamMethod)
    with pytest.raises(ckpt_io.CheckpointError, match="architecture 'resnet18'.*'resnet34'"):
        run(tiny_cfg(SimSiamMethod, out, image_root, "model.arch=resnet34"), SimSiamMethod)
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    state["method"] = "dino"
    torch.save(state, out / "checkpoint.pth")
    with pytest.raises(ckpt_io.CheckpointError, match="'dino' checkpoint.*'simsiam'"):
        run(tiny_cfg(SimSiamMethod, out, image_root), SimSiamMethod)


class Evil:
    """An arbitrary Python object: loading it would need unpickling code."""


def test_untrusted_or_foreign_checkpoint_is_refused(tmp_path):
    torch.save({"format": ckpt_io.FORMAT, "obj": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ckpt_io.CheckpointError, match="weights_only"):
        ckpt_io.load(tmp_path / "evil.pth")
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(ckpt_io.CheckpointError, match="not a pretraining checkpoint of this repository"):
        ckpt_io.load(tmp_path / "other.pth")
    with pytest.raises(ckpt_io.CheckpointError, match="does not exist"):
        ckpt_io.load(tmp_path / "missing.pth")


def test_atomic_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    ckpt_io.save_atomic({"a": torch.ones(2)}, path)

    def broken(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        ckpt_io.save_atomic({"a": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]


def test_config_errors(tmp_path, image_root):
    with pytest.raises(ConfigError, match="unknown config key 'hvs.views'.*hvs.n_views"):
        tiny_cfg(SimSiamMethod, tmp_path, image_root, "hvs.views=4")
    with pytest.raises(ConfigError, match="hvs.mode"):
        tiny_cfg(SimSiamMethod, tmp_path, image_root, "hvs.mode=hardest")
    with pytest.raises(ConfigError, match="train.epochs"):
        tiny_cfg(SimSiamMethod, tmp_path, image_root, "train.epochs=many")


@pytest.mark.slow
def test_cli_errors_name_the_problem(tmp_path):
    r = cli("-m", "simsiam.main", "--output-dir", str(tmp_path / "x"), "data.dataset=cifar10",
            env={"HVS_DATA_DIR": str(tmp_path / "nowhere")})
    assert r.returncode == 2 and "nowhere" in r.stderr and "HVS_DATA_DIR" in r.stderr
    (tmp_path / "empty" / "train").mkdir(parents=True)
    r = cli("-m", "simsiam.main", "--output-dir", str(tmp_path / "y"), "--data-dir", str(tmp_path / "empty"),
            "data.dataset=imagefolder")
    assert r.returncode == 2 and "empty" in r.stderr
    r = cli("-m", "simsiam.main", "hvs.resolution=high")
    assert r.returncode == 2 and "hvs.resolution" in r.stderr


@pytest.mark.slow
def test_knn_reads_a_training_checkpoint(tmp_path, image_root):
    out = tmp_path / "r"
    run(tiny_cfg(SimSiamMethod, out, image_root, "train.epochs=1"), SimSiamMethod)
    r = cli("-m", "eval.knn", "--checkpoint", str(out / "checkpoint.pth"), "knn.ks=[1,3]",
            "data.num_workers=0", "--output", str(tmp_path / "knn.json"))
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "knn.json").read_text())
    assert res["n_train"] == 32 and res["n_test"] == 16
    assert 0 <= res["knn"]["3"]["top1"] <= 100


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path, image_root):
    out = tmp_path / "ddp"
    r = cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "simsiam.main", "--output-dir", str(out), "--data-dir", str(image_root),
            "data.dataset=imagefolder", "model.arch=resnet18", "model.cifar_stem=true", "model.proj_hidden=64",
            "model.dim=64", "model.pred_dim=16", "augment.size=16", "train.batch_size=8", "train.epochs=1",
            "data.num_workers=0", "hvs.enabled=true", "run.log_every=1", "run.selection_log_every=1",
            env={"GLOO_SOCKET_IFNAME": "lo"})
    assert r.returncode == 0, r.stderr[-3000:]
    state = ckpt_io.load(out / "checkpoint.pth")
    assert state["step"] == 4 and state["epoch"] == 1  # 32 images / global batch 8
    assert sorted(p.name[:5] for p in (out / "selection").glob("*.npz")) == ["rank0", "rank1"]
    rank1 = np.load(next((out / "selection").glob("rank1*.npz")))
    assert rank1["scores"].shape == (4, 4, 6)  # per-rank batch of 4, selection per sample on each rank
