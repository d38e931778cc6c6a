"""Shared fixtures: a tiny synthetic image folder and tiny pretrained
checkpoints (the helpers that build them are in ``tests/helpers.py``)."""
import pytest
import torch

from tests.helpers import dino_cfg, make_image_folder, tiny_cfg


@pytest.fixture(scope="session")
def image_root(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, image_root):
    """Checkpoints of one short pretraining each on ``image_root`` (16 px):
    ``simsiam`` (ResNet-18, CIFAR stem), ``dino`` and ``dino_hvs`` (ViT-tiny/4
    with 2 blocks, 3 heads).  Shared by the evaluation tests; read-only."""
    from common.engine.train import run
    from dino.method import DINOMethod
    from simsiam.method import SimSiamMethod

    root = tmp_path_factory.mktemp("pretrained")
    run(tiny_cfg(SimSiamMethod, root / "simsiam", image_root, "train.epochs=1"), SimSiamMethod)
    run(dino_cfg(root / "dino", image_root, "train.epochs=1"), DINOMethod)
    run(dino_cfg(root / "dino_hvs", image_root, "train.epochs=1", "hvs.enabled=true"), DINOMethod)
    return {name: root / name / "checkpoint.pth" for name in ("simsiam", "dino", "dino_hvs")}


@pytest.fixture
def one_thread():
    """Tiny models run several times faster on one thread than on a few (shared)
    cores.  A test asks for it by name, or a whole module with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
