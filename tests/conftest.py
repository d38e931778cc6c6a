"""Shared fixtures: tiny synthetic image folders and tiny run configs."""
import numpy as np
import pytest
from PIL import Image

from common.config import COMMON_SPEC, resolve

TINY = [
    "model.arch=resnet18", "model.cifar_stem=true", "model.proj_hidden=64", "model.dim=64",
    "model.pred_dim=16", "augment.size=16", "augment.blur_p=0.5", "train.batch_size=8",
    "data.num_workers=0", "data.dataset=imagefolder", "run.log_every=1", "run.selection_log_every=1",
]


def make_image_folder(root, classes=4, per_class=8, size=20, seed=0):
    """ImageFolder tree root/{train,val}/<class>/<i>.png of coloured noise, one
    mean colour per class so that a k-NN on pixels can tell them apart."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", max(2, per_class // 2))):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            base = rng.integers(0, 256, 3)
            for i in range(n):
                arr = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def image_root(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"))


def tiny_cfg(method_cls, out, data_dir, *overrides):
    spec = {**COMMON_SPEC, **method_cls.spec}
    tiny = [o for o in TINY if o.split("=")[0] in spec]  # e.g. SimCLR has no predictor
    cfg = resolve(spec, None, tiny + [f"run.output_dir={out}", f"data.data_dir={data_dir}", *overrides])
    cfg["method"] = method_cls.name
    return cfg


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, image_root):
    """Checkpoints of one short pretraining each on ``image_root`` (16 px):
    ``simsiam`` (ResNet-18, CIFAR stem), ``dino`` and ``dino_hvs`` (ViT-tiny/4
    with 2 blocks, 3 heads).  Shared by the evaluation tests; read-only."""
    from common.train import run
    from dino.method import DINOMethod
    from simsiam.method import SimSiamMethod
    from tests.test_dino import dino_cfg

    root = tmp_path_factory.mktemp("pretrained")
    run(tiny_cfg(SimSiamMethod, root / "simsiam", image_root, "train.epochs=1"), SimSiamMethod)
    run(dino_cfg(root / "dino", image_root, "train.epochs=1"), DINOMethod)
    run(dino_cfg(root / "dino_hvs", image_root, "train.epochs=1", "hvs.enabled=true"), DINOMethod)
    return {name: root / name / "checkpoint.pth" for name in ("simsiam", "dino", "dino_hvs")}
