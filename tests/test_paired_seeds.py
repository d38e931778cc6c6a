"""The paired difference HVS minus baseline (analysis.stats) relies on one
seed giving both arms the same initial weights and the same data order: the
only difference between them is the choice of views."""
import pytest
import torch

from common.engine.runtime import seed_everything
from common.engine.train import build
from dino.method import DINOMethod
from simclr.method import SimCLRMethod
from simsiam.method import SimSiamMethod
from tests.helpers import dino_cfg, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


def built(make_cfg, seed, hvs):
    cfg = make_cfg(f"run.seed={seed}", f"hvs.enabled={str(hvs).lower()}")
    seed_everything(seed)  # as run_session does before build
    r = build(cfg, cfg.pop("_cls"), torch.device("cpu"))
    order = []
    for epoch in (0, 1):
        r.sampler.set_epoch(epoch)
        order.append([int(i) for i in r.sampler])
    return {k: v.clone() for k, v in r.ctx.method.model.state_dict().items()}, order


def configs(tmp_path, image_root):
    def simsiam(*o):
        return {**tiny_cfg(SimSiamMethod, tmp_path / "a", image_root, *o), "_cls": SimSiamMethod}

    def simclr(*o):
        return {**tiny_cfg(SimCLRMethod, tmp_path / "b", image_root, *o), "_cls": SimCLRMethod}

    def dino(*o):
        return {**dino_cfg(tmp_path / "c", image_root, *o), "_cls": DINOMethod}

    return {"simsiam": simsiam, "simclr": simclr, "dino": dino}


@pytest.mark.parametrize("method", ["simsiam", "simclr", "dino"])
def test_same_seed_same_weights_and_data_order_with_and_without_hvs(tmp_path, image_root, method):
    make = configs(tmp_path, image_root)[method]
    base_w, base_order = built(make, 3, hvs=False)
    hvs_w, hvs_order = built(make, 3, hvs=True)
    assert base_w.keys() == hvs_w.keys()
    assert all(torch.equal(base_w[k], hvs_w[k]) for k in base_w)
    assert base_order == hvs_order and base_order[0] != base_order[1]
    other_w, other_order = built(make, 4, hvs=False)  # another seed: other weights, other order
    assert any(not torch.equal(base_w[k], other_w[k]) for k in base_w if base_w[k].is_floating_point())
    assert other_order != base_order
