"""The training loader is made once per run: its workers persist across
epochs and prefetch, and every index carries its epoch, so that persistent
workers draw the views of the right epoch (the same training as without
workers)."""
import torch

from common.engine import checkpoint as ckpt_io
from common.engine.runtime import EpochSampler
from common.engine.train import PREFETCH, make_loader, run
from simsiam.method import SimSiamMethod
from tests.helpers import read_log, tiny_cfg


def test_loader_workers_persist_and_prefetch():
    sampler = EpochSampler(16, 4, seed=0)
    loader = make_loader(list(range(16)), sampler, 4, num_workers=2, pin=False)
    assert loader.persistent_workers and loader.prefetch_factor == PREFETCH
    sampler.set_epoch(3)
    assert all(len(key) == 3 and key[1] is None and key[2] == 3 for key in sampler)
    assert not make_loader(list(range(16)), EpochSampler(16, 4, seed=0), 4, num_workers=0, pin=False) \
        .persistent_workers


def test_persistent_workers_train_as_without_workers(tmp_path, image_root, one_thread):
    """Two epochs with two persistent workers and with none: the same losses and weights
    (the workers drew every epoch's own views, not the first epoch's again)."""
    args = ("train.epochs=2", "run.max_steps_per_epoch=2", "hvs.enabled=true")
    run(tiny_cfg(SimSiamMethod, tmp_path / "w0", image_root, *args), SimSiamMethod)
    run(tiny_cfg(SimSiamMethod, tmp_path / "w2", image_root, *args, "data.num_workers=2"), SimSiamMethod)
    a, b = (ckpt_io.load(tmp_path / w / "checkpoint.pth") for w in ("w0", "w2"))
    assert a["step"] == b["step"] == 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    la, lb = (read_log(tmp_path / w) for w in ("w0", "w2"))
    assert [(r["step"], r["loss"]) for r in la] == [(r["step"], r["loss"]) for r in lb]
    assert len({r["loss"] for r in la if r["type"] == "step"}) == 4
