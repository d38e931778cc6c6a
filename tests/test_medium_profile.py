"""The medium CPU profile: its narrow ResNet-18, its configs, run_all.sh's
--profile medium and the wall-time table of the summary."""
import pytest
import torch
import torchvision

from common.backbones import build_backbone, build_resnet, is_resnet
from eval.summary import wall_times
from tests.test_run_all import run_all


def test_narrow_resnet_has_torchvisions_layout():
    narrow = build_backbone("resnet18_w16", cifar_stem=True)
    full = torchvision.models.resnet18(weights=None)
    assert list(narrow.state_dict()) == [k for k in full.state_dict() if not k.startswith("fc.")]
    assert narrow.num_features == 128 and narrow.conv1.weight.shape == (16, 3, 3, 3)
    assert narrow.layer4[0].conv1.weight.shape == (128, 64, 3, 3)
    assert narrow(torch.randn(2, 3, 32, 32)).shape == (2, 128)
    zeroed = build_resnet("resnet18_w16", cifar_stem=True, zero_init_residual=True)
    assert all(not b.bn2.weight.detach().any() for layer in (zeroed.layer1, zeroed.layer4) for b in layer)
    assert narrow.layer1[0].bn2.weight.detach().sum().item() == 16  # as torchvision's without zero_init_residual
    standard = build_backbone("resnet18_w64", cifar_stem=True)  # W = 64 is ResNet-18 itself
    reference = build_backbone("resnet18", cifar_stem=True)
    assert {k: v.shape for k, v in standard.state_dict().items()} == \
        {k: v.shape for k, v in reference.state_dict().items()}
    assert is_resnet("resnet34_w8") and not is_resnet("resnet50_w16") and not is_resnet("resnet18_w")
    with pytest.raises(ValueError, match="resnet18_w<W>"):
        build_backbone("resnet50_w16")


def test_medium_profile_runs_only_methods_with_a_medium_config(tmp_path):
    p = run_all(tmp_path, "--profile", "medium", "--methods", "byol", detectron2=False)
    assert p.returncode == 2 and "no config configs/byol_medium.yaml" in p.stderr
    assert not (tmp_path / "runs").exists()
    p = run_all(tmp_path / "b", "--profile", "medium", "--evals", "knn selection nonsense", detectron2=False)
    assert p.returncode == 2 and "unknown evaluation 'nonsense'" in p.stderr


def test_wall_times_sum_the_sittings_of_a_part(tmp_path):
    (tmp_path / "timings.tsv").write_text("simsiam baseline s0: pretraining\t3000\tT\n"
                                          "simsiam baseline s0: pretraining\t605\tT\n"
                                          "simsiam baseline s0: k-NN\t61\tT\n")
    lines = wall_times(tmp_path)
    assert "| simsiam baseline s0: pretraining | 1:00:05 | 2 |" in lines
    assert "| simsiam baseline s0: k-NN | 0:01:01 | 1 |" in lines and "| **all parts** | 1:01:06 | — |" in lines
    assert wall_times(tmp_path / "none") == []
